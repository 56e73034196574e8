"""STRUCTURE's layer selection (vljax/layer_selection.py): the mutual kNN metric equals references
written from the authors' code (a set-based numpy one, and their torch ops line by line), the topk
rules give the code's k, each layer's features are the towers' own (the last text layer pooled is
the tower's pre_logits; the last MBConv block's map through top_conv is the trunk's features), the
CLI writes the matrix and the chosen pair, and bad settings are refused naming the flag."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO

from vljax import layer_selection as ls
from vljax.models import efficientnet
from vljax.models.two_towers import TwoTowers


def _ref_mutual_knn(a, b, topk, normalize=True):
    """From metrics.py / measure_alignment.py, with Python sets: per row, the topk others of
    largest inner product (after F.normalize), the shared fraction, averaged."""
    def nn_sets(x):
        x = np.asarray(x, np.float64)
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ x.T
        return [set(sorted((j for j in range(len(x)) if j != i), key=lambda j: -sims[i, j])[:topk])
                for i in range(len(x))]
    sa, sb = nn_sets(a), nn_sets(b)
    return float(np.mean([len(p & q) / topk for p, q in zip(sa, sb)]))


def _torch_code_mutual_knn(a, b, topk):
    """The authors' ops verbatim (compute_score's F.normalize, compute_nearest_neighbors, mutual_knn)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    def knn(feats):
        return (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]

    x, y = (F.normalize(torch.tensor(v, dtype=torch.float32), p=2, dim=-1) for v in (a, b))
    knn_a, knn_b = knn(x), knn(y)
    n = knn_a.shape[0]
    r = torch.arange(n).unsqueeze(1)
    lvm, llm = torch.zeros(n, n), torch.zeros(n, n)
    lvm[r, knn_a] = 1.0
    llm[r, knn_b] = 1.0
    return ((lvm * llm).sum(dim=1) / topk).mean().item()


def _paired(n=40, seed=0):
    """Two views of shared structure plus noise: scores well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    a = z @ rng.normal(size=(4, 12)) + 0.7 * rng.normal(size=(n, 12))
    b = z @ rng.normal(size=(4, 9)) + 0.7 * rng.normal(size=(n, 9))
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("topk", [1, 5, 12])
def test_mutual_knn_equals_the_codes(topk):
    a, b = _paired()
    got = ls.mutual_knn(ls.l2_normalize(a), ls.l2_normalize(b), topk)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(_ref_mutual_knn(a, b, topk), abs=1e-12)
    assert got == pytest.approx(_torch_code_mutual_knn(a, b, topk), abs=1e-6)
    assert ls.mutual_knn(a, a, topk) == 1.0


def test_topk_rules_give_the_codes_k():
    # ceil(2 n^(1/3)), ceil(sqrt(n)), ceil(log2(n) + 1): measure_alignment.py l. 53-61.
    assert ls.resolve_topk("rice", 5000) == 35 and ls.resolve_topk("rice", 2000) == 26
    assert ls.resolve_topk("rice", 64) == 8
    assert ls.resolve_topk("sqrt", 2000) == 45 and ls.resolve_topk("sqrt", 100) == 10
    assert ls.resolve_topk("sturges", 2000) == 12 and ls.resolve_topk("sturges", 1024) == 11
    assert ls.resolve_topk(10, 50) == 10 and ls.resolve_topk("10", 50) == 10


def test_score_matrix_and_choice():
    a, b = _paired(n=30)
    rng = np.random.default_rng(1)
    img = [rng.normal(size=(30, 5)), a, 2.0 * a]  # scale must not matter (normalised)
    txt = [b, rng.normal(size=(30, 7))]
    scores = ls.score_matrix(img, txt, topk="rice", normalize=True)
    k = ls.resolve_topk("rice", 30)
    assert scores.shape == (3, 2)
    for i, x in enumerate(img):
        for j, y in enumerate(txt):
            assert scores[i, j] == pytest.approx(_ref_mutual_knn(x, y, k), abs=1e-12)
    assert scores[1, 0] == scores[2, 0] > scores[0, 0]
    assert ls.choose(scores) == (1, 0)  # the first of equal maxima


def test_bad_settings_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--topk: unknown topk rule 'median'"):
        ls.resolve_topk("median", 100)
    with pytest.raises(ValueError, match="--samples: 20 paired samples.*topk = 20"):
        ls.resolve_topk(20, 20)
    with pytest.raises(ValueError, match="--samples"):
        ls.resolve_topk("sqrt", 1)  # k = 1: a sample of one has no neighbour
    with pytest.raises(ValueError, match="--topk: topk must be >= 1"):
        ls.resolve_topk(0, 10)


def test_bad_settings_are_refused_by_the_cli():
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "vljax.layer_selection", "--config=configs/lit.py",
                           "--workdir=/tmp/unused", "--topk=median"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "--topk: unknown topk rule 'median'" in proc.stderr


def _tiny_towers():
    return TwoTowers(
        image_model="efficientnet_lite", image=dict(variant="lite0", num_classes=8),
        text_model="bert", text=dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_classes=8))


@pytest.mark.slow
def test_layer_features_are_the_towers_own():
    model = _tiny_towers()
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    t = np.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0], [1, 3, 4, 6, 8, 2]], np.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.asarray(t))["params"]
    _, _, out = jax.jit(lambda p: model.apply({"params": p}, x, jnp.asarray(t)))(params)

    names, feats = ls.text_layer_features(model, params, t, batch=2)  # a padded last batch
    assert names == ["embeddings", "encoderblock_0", "encoderblock_1"]
    np.testing.assert_allclose(feats[-1], np.asarray(out["txt/pre_logits"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats[0], feats[-1])

    names, feats = ls.image_layer_features(model, params, np.asarray(x), batch=2)
    specs = efficientnet.block_specs("lite0")
    assert names == [f"blocks_{i}" for i in range(len(specs))] + ["top_conv"]
    assert [f.shape for f in feats[:-1]] == [(3, s["cout"]) for s in specs]
    np.testing.assert_allclose(feats[-1], np.asarray(out["img/pre_logits"]), rtol=1e-5, atol=1e-6)
    # The last block's map (sown) through top_conv and ReLU6, pooled, is the trunk's features.
    _, state = jax.jit(lambda p: model.apply({"params": p}, x, method=model.image_trunk,
                                             mutable=["intermediates"]))(params)
    last = state["intermediates"]["img"][f"blocks_{len(specs) - 1}_out"][0]
    np.testing.assert_allclose(np.asarray(last).mean(axis=(1, 2)), feats[-2], rtol=1e-5, atol=1e-6)
    top = params["img"]["top_conv"]
    y = jnp.clip(jnp.einsum("bhwc,cd->bhwd", last, top["kernel"][0, 0]) + top["bias"], 0.0, 6.0)
    np.testing.assert_allclose(np.asarray(y.mean(axis=(1, 2))), feats[-1], rtol=1e-4, atol=1e-5)


CONFIG = """
import sys
sys.path.insert(0, {tests!r})
import helpers

def get_config(arg=None):
    c = helpers.tiny_config(helpers.make_shapes_manifest({shapes!r}, n_per=2), "lit", steps=2, batch=8)
    c.tokenizer = dict(kind="bert", max_len=8)
    c.model = dict(image_model="efficientnet_lite", image=dict(variant="lite0", num_classes=8),
                   text_model="bert", text=dict(hidden_size=16, num_layers=2, num_heads=2,
                                                intermediate_size=32, num_classes=8),
                   temperature_init=10.0, bias_init=None)
    return c
"""


@pytest.mark.slow
def test_cli_writes_the_matrix_and_the_chosen_pair(tmp_path):
    cfg = tmp_path / "tiny_lit.py"
    cfg.write_text(CONFIG.format(tests=os.path.join(REPO, "tests"), shapes=str(tmp_path / "shapes")))
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "vljax.layer_selection", f"--config={cfg}",
                           f"--workdir={tmp_path / 'out'}", "--samples=16", "--topk=sturges"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / ls.REPORT).read_text())
    scores = np.array(report["scores"])
    assert scores.shape == (len(efficientnet.block_specs("lite0")) + 1, 3)
    assert report["n"] == 16 and report["topk_value"] == 5 and report["topk"] == "sturges"
    assert (report["chosen"]["image"], report["chosen"]["text"]) == ls.choose(scores)
    assert report["config_keys"]["model.text.num_layers"] == report["chosen"]["text"]
    assert np.all((scores >= 0) & (scores <= 1))
    assert "chosen: image" in proc.stdout
    # 24 shapes records: more samples than records takes them all.
    assert report["first_ids"][0].startswith("0:")


def test_lowest_layers_cuts_only_the_layers_above_the_model():
    from vljax import pretrained
    ckpt = {"word_embeddings": 1, **{f"encoderblock_{i}": i for i in range(6)}}
    model = {"word_embeddings": 0, "encoderblock_0": 0, "encoderblock_1": 0, "head": 0}
    assert pretrained.lowest_layers(ckpt, model, "txt") == {"word_embeddings": 1, "encoderblock_0": 0,
                                                            "encoderblock_1": 1}
    assert set(pretrained.lowest_layers(ckpt, {"word_embeddings": 0}, "txt")) == {"word_embeddings"}
    img = {"stem_conv": 0, **{f"blocks_{i}": i for i in range(16)}, "top_conv": 0, "head": 0}
    cut = pretrained.lowest_layers(img, {"stem_conv": 0, **{f"blocks_{i}": 0 for i in range(7)}}, "img")
    assert set(cut) == {"stem_conv", "head", *(f"blocks_{i}" for i in range(7))}
    # As deep as the checkpoint: unchanged (a missing top_conv alone is left to write_tower to refuse).
    assert pretrained.lowest_layers(img, {k: 0 for k in img if k != "top_conv"}, "img") == img
    with pytest.raises(ValueError, match="model.image.feature_block"):
        efficientnet.EfficientNetLite(feature_block=16).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.slow
def test_towers_cut_at_the_chosen_layers_give_the_measured_features():
    """Training on STRUCTURE's chosen layers: MiniLM cut to 2 blocks and EfficientNet-Lite0 cut after
    block 6, with the pretrained weights of the layers kept, give exactly the features the layer
    selection measured on the whole pretrained towers (text layer 2, image blocks_6)."""
    from vljax import pretrained
    from vljax.convert.bert import load_minilm

    def towers(image_extra, text_layers):
        kw, _ = load_minilm()
        text = {k: v for k, v in kw.items() if k in ("vocab_size", "hidden_size", "num_heads",
                                                     "intermediate_size", "max_position_embeddings")}
        return TwoTowers(image_model="efficientnet_lite", image=dict(variant="lite0", num_classes=8, **image_extra),
                         text_model="bert", text=dict(text, num_layers=text_layers, num_classes=8))

    x = jax.random.uniform(jax.random.key(1), (4, 64, 64, 3), minval=-1.0, maxval=1.0)
    t = np.array([[101, 1037, 4937, 2006, 102, 0], [101, 2417, 4231, 102, 0, 0],
                  [101, 1037, 2158, 1999, 2067, 102], [101, 7592, 102, 0, 0, 0]], np.int32)

    def loaded(model):
        params = jax.jit(model.init)(jax.random.key(0), x, jnp.asarray(t))["params"]
        for tower, name in (("img", "efficientnet_lite0"), ("txt", "minilm")):
            params = pretrained.write_tower(
                params, pretrained.lowest_layers(pretrained.load_tower(name), params[tower], tower), tower)
        return params

    full = towers({}, 6)
    img_names, img_feats = ls.image_layer_features(full, loaded(full), np.asarray(x))
    txt_names, txt_feats = ls.text_layer_features(full, loaded(full), t)
    cut = towers({"feature_block": 6}, 2)
    params = loaded(cut)
    assert "top_conv" not in params["img"] and "blocks_7" not in params["img"]
    assert sorted(k for k in params["txt"] if k.startswith("encoderblock")) == ["encoderblock_0", "encoderblock_1"]
    _, _, out = jax.jit(lambda p: cut.apply({"params": p}, x, jnp.asarray(t)))(params)
    np.testing.assert_allclose(np.asarray(out["img/pre_logits"]), img_feats[img_names.index("blocks_6")],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["txt/pre_logits"]), txt_feats[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lit_trains_on_a_chosen_image_block(tmp_path):
    """`model.image.feature_block` through vljax.main: the LiT store holds the block's pooled map
    (block 3 of EfficientNet-Lite0: 40 features), the run trains, and the checkpoint's trunk is the
    pretrained blocks 0-3 (nothing above them)."""
    from helpers import losses_of, run_main

    from vljax import factory, pretrained
    cfg = tmp_path / "tiny_lit_block.py"
    cfg.write_text(CONFIG.format(tests=os.path.join(REPO, "tests"), shapes=str(tmp_path / "shapes"))
                   + "\n\ndef _cut(c):\n    c.model.image.feature_block = 3\n    c.total_steps = 4\n"
                   "    c.model_init = dict(img='efficientnet_lite0', txt=None)\n    return c\n\n"
                   "_get = get_config\nget_config = lambda arg=None: _cut(_get(arg))\n")
    run_main(cfg, tmp_path / "run", devices=1)
    stores = [json.loads(p.read_text()) for p in (tmp_path / "run" / "features").glob("*/index.json")]
    assert stores and all(s["num_features"] == 40 for s in stores)
    assert len(losses_of(str(tmp_path / "run"))) == 4
    img = factory.load(str(tmp_path / "run")).params["img"]
    assert sorted(k for k in img if k.startswith("blocks_")) == [f"blocks_{i}" for i in range(4)]
    assert "top_conv" not in img
    ref = pretrained.load_tower("efficientnet_lite0")
    np.testing.assert_array_equal(np.asarray(img["blocks_3"]["project"]["kernel"]),
                                  np.asarray(ref["blocks_3"]["project"]["kernel"]))
