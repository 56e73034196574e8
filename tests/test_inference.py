"""Using trained models: Predictor / vljax-infer on workdirs and transformers CLIP directories,
standalone evaluation (--mode=eval, vljax.evaluate), model soups over real checkpoints."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, make_shapes_manifest, tiny_config

from vljax import evaluate, sharding, soup, train
from vljax.embedder import Embedder
from vljax.inference import Predictor, cli

LABELS = ["red circle", "green square", "blue triangle", "yellow circle"]
# Small real eval sets (the demo's TFDS builds) at the tiny models' 32 px.
TINY_EVALS = dict(
    emoji=dict(type="zeroshot", data=dict(name="vljax_emoji", split="test", label="category",
                                          max_examples=24), templates="icon"),
    emoji_retrieval=dict(type="retrieval", data=dict(name="vljax_emoji", split="val", max_examples=24)),
)


def _embedder(model, params, tokenizer):
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    return Embedder(model, params, tokenizer, mesh=mesh, image_size=32, value_range=(-1.0, 1.0))


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2)


def _lit(shapes, workdir, steps=6, **over):
    config = tiny_config(shapes, "lit", steps=steps, batch=8)
    config.evals = TINY_EVALS
    config.select_metric = "retrieval/emoji_retrieval/i2t_r1"
    config.update(over)
    train.Trainer(config, str(workdir), devices=jax.devices()[:1]).fit()
    return config


@pytest.fixture(scope="module")
def workdir(shapes, tmp_path_factory):
    """A tiny LiT run with checkpoints at steps 3 and 6 (and its evals at step 6)."""
    wd = tmp_path_factory.mktemp("lit_a")
    _lit(shapes, wd, ckpt_every=3, keep_ckpts=3)
    return str(wd)


def _images(shapes):
    root = os.path.dirname(shapes)
    return [os.path.join(root, f) for f in ("red_circle_0.png", "blue_triangle_1.png", "green_square_0.png")]


def test_predictor_loads_a_workdir(workdir, shapes):
    p = Predictor.load(workdir)
    paths = _images(shapes)
    results = p.classify(paths, LABELS, templates="name", top_k=len(LABELS))
    assert len(results) == len(paths)
    for top in results:
        assert sorted(label for label, _ in top) == sorted(LABELS)
        probs = [q for _, q in top]
        assert probs == sorted(probs, reverse=True)
        np.testing.assert_allclose(sum(probs), 1.0, rtol=1e-5)
    assert [len(t) for t in p.classify(paths, LABELS, top_k=2)] == [2, 2, 2]

    zimg, ztxt = p.embed_images(paths), p.embed_texts(LABELS)
    dim = tiny_config(shapes, "lit").model.image.num_classes
    assert zimg.shape == (3, dim) and ztxt.shape == (4, dim)
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
    # The checkpoint's params, not a fresh init; files, PIL-decoded arrays and paths agree.
    # (The trainer's own restore of the full state is an independent path to the same params.)
    resumed = jax.device_get(train.Trainer(p_config(workdir), workdir, devices=jax.devices()[:1],
                                           write_config=False).state["params"])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(p.params)):
        np.testing.assert_array_equal(a, b)
    emb = _embedder(p.model, resumed, p.tokenizer)
    np.testing.assert_allclose(zimg, emb.embed_image_array(p.preprocess(paths)), atol=1e-6)
    from PIL import Image
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in paths]
    np.testing.assert_allclose(p.embed_images(arrays), zimg, atol=1e-6)


def p_config(workdir):
    return soup.read_config(workdir)


def test_cli_classify_prints_file_then_labels(workdir, shapes):
    paths = _images(shapes)
    out = _run(["-m", "vljax.inference", "classify", f"--model={workdir}", f"--labels={','.join(LABELS)}",
                "--top-k=2", *paths])
    lines = out.strip().splitlines()
    assert len(lines) == len(paths), out
    for path, line in zip(paths, lines):
        name, rest = line.split(None, 1)
        assert name == os.path.basename(path)
        entries = rest.split("  |  ")
        assert len(entries) == 2
        for e in entries:
            label, pct = e.rsplit(" ", 1)
            assert label in LABELS and pct.endswith("%") and 0 <= float(pct[:-1]) <= 100


def test_cli_embed_writes_npy(workdir, shapes, tmp_path, capsys):
    out = str(tmp_path / "z.npy")
    assert cli(["embed", f"--model={workdir}", "--texts=a red circle,a blue square", f"--out={out}",
                *_images(shapes)]) == 0
    assert "wrote" in capsys.readouterr().out
    zimg, ztxt = np.load(out), np.load(str(tmp_path / "z_text.npy"))
    p = Predictor.load(workdir)
    np.testing.assert_allclose(zimg, p.embed_images(_images(shapes)), atol=1e-6)
    np.testing.assert_allclose(ztxt, p.embed_texts(["a red circle", "a blue square"]), atol=1e-6)
    # A missing image is reported (tests/test_cli_errors.py) and the exit status is 1.
    assert cli(["classify", f"--model={workdir}", "--labels=a,b", str(tmp_path / "missing.png")]) == 1


def test_standalone_evaluation_equals_the_trainers(workdir):
    """vljax.evaluate on a workdir reproduces the numbers the trainer logged at its last step."""
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = {k: v for r in logged if r["step"] == 6 for k, v in r.items()}
    results = evaluate.evaluate(Predictor.load(workdir), p_config(workdir))
    keys = [k for k in results if not k.startswith("time/")]
    assert "zeroshot/emoji/top1" in keys and "retrieval/emoji_retrieval/i2t_r1" in keys
    for k in keys:
        np.testing.assert_allclose(results[k], logged[k], atol=1e-6, err_msg=k)


def test_evaluate_cli_writes_the_metrics_of_evaluate(workdir, tmp_path):
    """`python -m vljax.evaluate` (the user's command) writes what `evaluate.evaluate` returns,
    and on a CPU run keeps freed host memory as vljax.main does."""
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--model={workdir}", "--evals=emoji",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.load(open(out))
    want = evaluate.evaluate(Predictor.load(workdir), p_config(workdir), only=["emoji"])
    assert written["model"] == workdir and "zeroshot/emoji/top1" in written
    for k in want:
        if not k.startswith("time/"):
            np.testing.assert_allclose(written[k], want[k], atol=1e-6, err_msg=k)
    from vljax import hostmem
    if not hostmem.accelerator_possible() and hostmem.setting() is None:
        assert "host memory: freed blocks kept" in proc.stderr, proc.stderr[-3000:]


def test_main_eval_mode(workdir, tmp_path):
    before = open(os.path.join(workdir, "config.json")).read()
    cfg = tmp_path / "eval_config.py"
    cfg.write_text("import json, ml_collections\n\ndef get_config():\n"
                   f"    c = ml_collections.ConfigDict(json.load(open({os.path.join(workdir, 'config.json')!r})))\n"
                   "    c.evals = {k: v for k, v in c.evals.items() if k == 'emoji'}\n    return c\n")
    _run(["-m", "vljax.main", "--mode=eval", f"--config={cfg}", f"--workdir={workdir}"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert "zeroshot/emoji/top1" in rows[-1] and rows[-1]["step"] == 6
    assert "retrieval/emoji_retrieval/i2t_r1" not in rows[-1]
    assert open(os.path.join(workdir, "config.json")).read() == before  # the run's config is kept


# -- transformers CLIP directories ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(**tower, vocab_size=49408, max_position_embeddings=16, eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=0),
        vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    path = str(tmp_path_factory.mktemp("hf_clip"))
    model.save_pretrained(path)
    return path, model


def test_predictor_loads_a_transformers_clip(hf_clip_dir):
    import torch
    path, model = hf_clip_dir
    p = Predictor.load(path)
    assert p.image_size == 32 and p.value_range == "clip"
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    texts = ["a photo of a cat", "a dog", "an espresso on a table"]
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        ids = torch.from_numpy(np.asarray(p.tokenizer(texts), np.int64))
        ref_txt = model.get_text_features(input_ids=ids)
    ref_img, ref_txt = (getattr(r, "pooler_output", r).numpy() for r in (ref_img, ref_txt))
    ref_img /= np.linalg.norm(ref_img, axis=1, keepdims=True)
    ref_txt /= np.linalg.norm(ref_txt, axis=1, keepdims=True)
    np.testing.assert_allclose(p.embed_images(images), ref_img, atol=1e-5)
    np.testing.assert_allclose(p.embed_texts(texts), ref_txt, atol=1e-5)
    np.testing.assert_allclose(p.embedder.logit_scale, model.logit_scale.exp().item(), rtol=1e-6)


def test_evaluate_a_transformers_clip(hf_clip_dir, shapes):
    """A converted checkpoint runs the same evaluators, on data preprocessed its own way."""
    path, _ = hf_clip_dir
    config = tiny_config(shapes)
    config.evals = TINY_EVALS
    results = evaluate.evaluate(Predictor.load(path), config, only=["emoji"])
    assert set(results) == {"zeroshot/emoji/top1", "zeroshot/emoji/top5", "zeroshot/emoji/mean_per_class",
                            "zeroshot/emoji/worst_class",
                            "time/eval_emoji_s"}
    assert 0.0 <= results["zeroshot/emoji/top1"] <= results["zeroshot/emoji/top5"] <= 1.0


# -- soups -----------------------------------------------------------------------------------------


def test_soups_of_real_checkpoints(workdir, tmp_path):
    # One run's kept checkpoints (steps 3 and 6) are the ingredients.
    spec, model, ingredients = soup.load_ingredients([workdir], all_steps=True)
    assert [n.rsplit("@", 1)[1] for n, _ in ingredients] == ["3", "6"]
    config = soup.read_config(workdir)

    from vljax import eval_builder
    evaluators = eval_builder.build(config)
    results = soup.cook(spec, model, ingredients, evaluators, config.select_metric, batch_size=8)
    params = [p for _, p in ingredients]
    assert not np.allclose(*(np.asarray(p["txt"]["head"]["kernel"]) for p in params))
    for got, a, b in zip(*(jax.tree.leaves(t) for t in (results["uniform"]["params"], *params))):
        np.testing.assert_allclose(np.asarray(got), (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)
    for entry in [*results["ingredients"], results["uniform"], results["greedy"]]:
        assert "zeroshot/emoji/top1" in entry["metrics"] and config.select_metric in entry["metrics"]
    best = max(results["ingredients"], key=lambda r: r["metrics"][config.select_metric])
    assert results["greedy"]["ingredients"][0] == best["name"]
    assert results["greedy"]["metrics"][config.select_metric] >= best["metrics"][config.select_metric]
    assert "uniform soup" in soup.report(results)

    # A saved soup is a workdir: the predictor loads exactly the averaged params...
    soup.save_workdir(spec, config, results["uniform"]["params"], str(tmp_path / "uniform"))
    p = Predictor.load(str(tmp_path / "uniform"))
    ref = _embedder(model, results["uniform"]["params"], p.tokenizer)
    np.testing.assert_allclose(p.embed_texts(LABELS), ref.embed_texts(LABELS), atol=1e-6)
    # ... and the latest checkpoints of several workdirs are ingredients too.
    _, _, latest = soup.load_ingredients([workdir, str(tmp_path / "uniform")])
    assert [n.rsplit("@", 1)[1] for n, _ in latest] == ["6", "0"]


@pytest.mark.slow
def test_soup_cli(workdir, tmp_path):
    out = _run(["-m", "vljax.soup", f"--workdirs={workdir}", "--all_steps", f"--out={tmp_path}"])
    assert "greedy soup ingredients" in out
    res = json.load(open(tmp_path / "soup_results.json"))
    assert len(res["ingredients"]) == 2 and "metrics" in res["uniform"] and "metrics" in res["greedy"]


def test_every_evaluator_type_builds_from_config_entries():
    """Each evaluator type reads its own config entry: from_config(name, spec, plot_dir=...)."""
    import inspect
    from vljax.evaluators import EVALUATORS
    for kind, cls in EVALUATORS.items():
        params = inspect.signature(cls.from_config).parameters
        assert list(params)[:2] == ["name", "spec"] and "plot_dir" in params, kind
        assert "name" in inspect.signature(cls.__init__).parameters, kind
