"""SigLIP 2's evaluations (issue 24): the dense probe (a linear probe on the image tower's patch
tokens predicting foreground from the PNG's alpha channel, scored as mIoU), the caption decoder's
log-likelihood of held-out captions, and CapPa's scoring classifier. Each equals a numpy reference
of its computation on a tiny trained model (the references read the model's outputs straight from
`model.apply`, not through the Embedder), and all three run from config entries through
`vljax.evaluate` on the tiny workdir."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from helpers import COLOURS, REPO, SHAPES, tiny_config
from PIL import Image, ImageDraw

from vljax import config_check, factory, sharding, towers, train
from vljax import evaluate as evaluate_lib
from vljax.data.eval_transform import EvalImage
from vljax.embedder import Embedder
from vljax.evaluators import captioning, dense_probe
from vljax.models import registry as model_registry
from vljax.models.two_towers import TwoTowers

S, P = 32, 8  # tiny_config's image size and patch size: a 4 x 4 grid


def _rgba(shape, colour, rng):
    """A coloured shape on a transparent background (alpha 0 outside it)."""
    img = Image.new("RGBA", (S, S), (255, 255, 255, 0))
    d = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(1, 10, size=2))
    x1, y1 = (int(S - v) for v in rng.integers(1, 10, size=2))
    fill = COLOURS[colour] + (255,)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return img


def _manifest(root, seed, no_alpha=0):
    """12 RGBA shapes (+ `no_alpha` RGB images, which the dense probe skips), labelled by shape."""
    os.makedirs(root, exist_ok=True)
    rng, lines = np.random.default_rng(seed), []
    for k, (colour, (si, shape)) in enumerate((c, s) for c in COLOURS for s in enumerate(SHAPES)):
        img = _rgba(shape, colour, rng)
        if k < no_alpha:
            img = img.convert("RGB")
        img.save(os.path.join(root, f"{k}.png"))
        lines.append(dict(image=f"{k}.png", captions=[f"a {colour} {shape}", shape], label=si))
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path, lines


def _evals(train_path, test_path):
    data = dict(source="jsonl", path=test_path, class_names=list(SHAPES))
    return dict(dense=dict(type="dense_probe", data=dict(data, train_path=train_path), alpha="image"),
                nll=dict(type="caption_nll", data=data),
                cappa=dict(type="cappa_zeroshot", data=data))


def _config(train_path):
    config = tiny_config(train_path, "siglip", steps=4, batch=8)
    config.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=49408,
                                max_len=16, pad_id=0, parallel_fraction=0.5)
    config.loss = dict(name="sigmoid_caption", caption_weight=1.0)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SigLIP 2 model (tiny_config's towers + a caption decoder) as a model bundle, its
    params from init with the decoder's zero-initialised output projection made random (so the
    log-likelihoods differ between texts), and what `vljax.evaluate.evaluate` (the function the
    CLI runs) computes for the three evals with it over all 8 devices."""
    root = tmp_path_factory.mktemp("eval_siglip2")
    train_path, train_lines = _manifest(str(root / "train"), seed=0)
    test_path, test_lines = _manifest(str(root / "test"), seed=1, no_alpha=1)
    spec = factory.spec_from_config(_config(train_path))
    model, tokenizer = factory.build_model(spec), factory.build_tokenizer(spec)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, S, S, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
    head = params["dec"]["head"]["kernel"]
    params["dec"]["head"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(1), head.shape)
    bundle = factory.Bundle(model, params, tokenizer, spec)
    evals = ml_collections.ConfigDict(dict(evals=_evals(train_path, test_path), eval_batch_size=16))
    results = evaluate_lib.evaluate(bundle, evals)

    def images(path, lines):
        return np.stack([bundle.preprocess(os.path.join(os.path.dirname(path), r["image"])) for r in lines])
    return dict(root=root, bundle=bundle, evals=evals, results=results,
                train=(train_path, train_lines, images(train_path, train_lines)),
                test=(test_path, test_lines, images(test_path, test_lines)))


def _apply(bundle, images, ids=None):
    return jax.jit(lambda p, x, t: bundle.model.apply({"params": p}, x, t))(bundle.params, images, ids)[2]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _loglik(bundle, images, texts):
    """numpy: per (image, text) row, the sum over real tokens (id != 0) of log softmax(logits) at
    the target, from the full model's decoder logits out["dec/logits"]."""
    ids = np.asarray(bundle.tokenizer(texts), np.int32)
    logp = _log_softmax(_apply(bundle, images, ids)["dec/logits"])
    at = np.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    return (at * (ids != 0)).sum(1), (ids != 0).sum(1)


# -- the dense probe -----------------------------------------------------------------------------
def test_patch_targets_follow_the_stated_rule_and_miou_is_the_mean_class_iou():
    """A patch is foreground when more than half of its pixels have alpha > 0.5 after the model's
    eval transform; mIoU is the mean of the two classes' IoU (a class absent from both left out)."""
    alpha = np.zeros((S, S), np.uint8)
    alpha[:, :12] = 255   # columns 0..11: patch column 0 all, column 1 half (4 of 8 pixels)
    alpha[:2, 16:24] = 200  # 2 of 8 rows of patch (0, 2): a quarter
    ev = EvalImage(S, (-1.0, 1.0))
    fg, rows = dense_probe.patch_targets(alpha, ev, num_tokens=16 + 1)  # a class token first
    np.testing.assert_array_equal(rows, np.arange(1, 17))
    want = np.zeros((4, 4), bool)
    want[:, 0] = True  # column 1 is exactly half: not MORE than half
    np.testing.assert_array_equal(fg, want.reshape(-1))
    alpha[:, 12] = 255  # now 5 of 8 columns of patch column 1
    fg, rows = dense_probe.patch_targets(alpha, ev, num_tokens=16)
    want[:, 1] = True
    np.testing.assert_array_equal(fg, want.reshape(-1))
    np.testing.assert_array_equal(rows, np.arange(16))
    # NaFlex: a 16 x 32 alpha at patch 8 and a budget of 16 -> the real patches of its grid.
    nf = EvalImage(value_range=(-1.0, 1.0), naflex=(P, 16))
    tall = np.zeros((32, 16), np.uint8)
    tall[:20] = 255
    fg, rows = dense_probe.patch_targets(tall, nf)
    x = nf(Image.fromarray(tall).convert("RGB"))
    h, w = x["shapes"]
    np.testing.assert_array_equal(rows, np.arange(h * w))
    ref = np.array([(x["patches"][r] > 0).mean() > 0.5 for r in rows])
    np.testing.assert_array_equal(fg, ref)
    assert fg.any() and not fg.all()
    with pytest.raises(ValueError, match="not a square patch grid"):
        dense_probe.patch_targets(alpha, ev, num_tokens=18)

    pred, true = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    assert dense_probe.iou(pred, true) == pytest.approx(dict(iou_fg=1 / 3, iou_bg=1 / 3, miou=1 / 3))
    out = dense_probe.iou(np.zeros(4, bool), np.zeros(4, bool))
    assert math.isnan(out["iou_fg"]) and out["miou"] == 1.0


def test_ridge_probe_equals_a_least_squares_reference():
    """fit_ridge equals the minimiser of ||Xc w - (y - mean y)||^2 + lam ||w||^2 (lstsq on the
    stacked system, lam = l2 * trace(Xc^T Xc) / W), and separable patches are classified exactly."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = (x @ rng.normal(size=6) + 0.3 * rng.normal(size=200)) > 0
    w, b = dense_probe.fit_ridge(x, y, l2=0.1)
    xc = x - x.mean(0)
    lam = 0.1 * np.trace(xc.T @ xc) / 6
    ref = np.linalg.lstsq(np.concatenate([xc, np.sqrt(lam) * np.eye(6)]),
                          np.concatenate([y - y.mean(), np.zeros(6)]), rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-12)
    assert b == pytest.approx(y.mean() - x.mean(0) @ ref)
    sep = np.concatenate([rng.normal(size=(50, 4)) + 3, rng.normal(size=(50, 4)) - 3])
    truth = np.arange(100) < 50
    assert dense_probe.iou(dense_probe.predict(sep, *dense_probe.fit_ridge(sep, truth, 1e-3)), truth)["miou"] == 1.0


def test_dense_probe_equals_its_numpy_reference(trained):
    """The evaluator's mIoU equals the numpy pipeline: the model's own tokens (class token
    dropped), targets from the PNGs' alpha per 8 x 8 patch, ridge by lstsq, IoU; the RGB image
    without alpha is skipped and counted."""
    bundle, results = trained["bundle"], trained["results"]

    def split(which, skip):
        path, lines, images = trained[which]
        tokens = np.asarray(_apply(bundle, images)["img/tokens"], np.float64)
        assert tokens.shape[1] == 16  # SigLIP's MAP pooling: no class token
        xs, ys = [], []
        for k, r in enumerate(lines):
            if k < skip:
                continue
            a = np.asarray(Image.open(os.path.join(os.path.dirname(path), r["image"])).getchannel("A"))
            ys.append(((a > 127.5).reshape(4, P, 4, P).mean(axis=(1, 3)) > 0.5).reshape(-1))
            xs.append(tokens[k])
        return np.concatenate(xs), np.concatenate(ys)
    x_train, y_train = split("train", 0)
    x_test, y_test = split("test", 1)
    xc = x_train - x_train.mean(0)
    lam = 1e-3 * np.trace(xc.T @ xc) / xc.shape[1]
    w = np.linalg.lstsq(np.concatenate([xc, np.sqrt(lam) * np.eye(xc.shape[1])]),
                        np.concatenate([y_train - y_train.mean(), np.zeros(xc.shape[1])]), rcond=None)[0]
    pred = x_test @ w + (y_train.mean() - x_train.mean(0) @ w) > 0.5
    ious = [np.sum((pred == c) & (y_test == c)) / np.sum((pred == c) | (y_test == c)) for c in (True, False)]
    got = {k.split("/")[-1]: v for k, v in results.items() if k.startswith("dense_probe/dense/")}
    assert got["skipped"] == 1 and got["train_patches"] == 12 * 16 and got["test_patches"] == 11 * 16
    assert got["fg_fraction"] == pytest.approx(y_test.mean())
    assert got["miou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert 0.0 < got["miou"] <= 1.0


def test_a_tower_without_tokens_and_bad_alpha_keys_are_refused(monkeypatch, trained):
    class NoTokens(nn.Module):
        num_classes: int = 8

        @nn.compact
        def __call__(self, images, train=False):
            f = images.mean(axis=(1, 2))
            return nn.Dense(self.num_classes, name="head")(f), {"pre_logits": f}
    monkeypatch.setitem(model_registry.MODELS, "no_tokens", lambda: NoTokens)
    model = TwoTowers(image_model="no_tokens", image={}, text_model="text_transformer",
                      text=dict(width=8, depth=1, num_heads=1, mlp_dim=8, vocab_size=10, max_len=4, num_classes=8))
    x = jnp.zeros((1, S, S, 3))
    with pytest.raises(ValueError, match="'no_tokens' gives no patch tokens"):
        jax.eval_shape(lambda x: towers.patch_tokens(model, model.init(jax.random.key(0), x, None)["params"], x), x)
    test_path = trained["test"][0]
    entry = dict(type="dense_probe", data=dict(source="jsonl", path=test_path, train_path=trained["train"][0]))
    with pytest.raises(ValueError, match=r"`evals.d.alpha`: 'alfa'"):
        dense_probe.DenseProbeEvaluator.from_config("d", dict(entry, alpha="alfa"))
    with pytest.raises(FileNotFoundError, match=r"`evals.d.alpha_dir`: .*nowhere/emoji.json"):
        dense_probe.DenseProbeEvaluator.from_config("d", dict(entry, alpha="emoji", alpha_dir="/nowhere"))


# -- the caption decoder -------------------------------------------------------------------------
def test_caption_nll_equals_minus_sum_log_softmax_at_targets_over_count(trained):
    """nll = -sum over every (image, caption) pair's real tokens of log softmax(logits)[target]
    / their count (teacher forcing), perplexity = exp(nll), nll_per_caption the mean of each
    caption's mean; the logits from the full model (`TwoTowers.__call__`'s decoder)."""
    _, lines, images = trained["test"]
    rows = [k for k, r in enumerate(lines) for _ in r["captions"]]
    texts = [c for r in lines for c in r["captions"]]
    ll, n = _loglik(trained["bundle"], images[rows], texts)
    got = {k.split("/")[-1]: v for k, v in trained["results"].items() if k.startswith("caption_nll/nll/")}
    assert got["captions"] == len(texts) and got["tokens"] == n.sum()
    assert got["nll"] == pytest.approx(-ll.sum() / n.sum(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(-ll.sum() / n.sum()), rel=1e-5)
    assert got["nll_per_caption"] == pytest.approx(np.mean(-ll / n), rel=1e-5)


def test_cappa_scores_and_argmax_equal_the_reference(trained):
    """CapPa's scoring classifier: per image and class, the sum of the class name's token
    log-probabilities given the image; its scores, argmax and top-1 equal the reference's."""
    bundle, (_, lines, images) = trained["bundle"], trained["test"]
    ev = captioning.CapPaZeroShotEvaluator.from_config("cappa", trained["evals"].evals.cappa.to_dict())
    embedder = Embedder.from_bundle(bundle, mesh=sharding.make_mesh([("data", -1)]), batch_size=16, progress=False)
    scores, index = ev.scores(embedder)
    np.testing.assert_array_equal(index, np.arange(len(lines)))
    m, c = len(lines), len(SHAPES)
    ll, _ = _loglik(bundle, np.repeat(images, c, axis=0), [s for _ in range(m) for s in SHAPES])
    ref = ll.reshape(m, c)
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(scores.argmax(1), ref.argmax(1))
    labels = np.array([r["label"] for r in lines])
    assert trained["results"]["cappa_zeroshot/cappa/top1"] == pytest.approx(np.mean(ref.argmax(1) == labels))


def test_a_model_without_decoder_is_refused_naming_model_decoder(trained):
    bundle = trained["bundle"]
    model = bundle.model.clone(decoder=None)
    params = {k: v for k, v in bundle.params.items() if k != "dec"}
    embedder = Embedder(model, params, bundle.tokenizer, mesh=sharding.make_mesh([("data", -1)]),
                        eval_image=bundle.eval_image, batch_size=16, progress=False)
    for name in ("nll", "cappa"):
        spec = trained["evals"].evals[name].to_dict()
        ev = {"nll": captioning.CaptionNLLEvaluator, "cappa": captioning.CapPaZeroShotEvaluator}[name].from_config(name, spec)
        with pytest.raises(ValueError, match=r"model.decoder is None"):
            ev.run(embedder)


def test_eval_entries_pass_the_config_check(trained):
    """The three entries pass config_check (their keys from the evaluators' signatures); a typo
    in a key is refused, naming it."""
    config_check.validate_evals(trained["evals"].evals)
    bad = dict(trained["evals"].evals.to_dict(),
               x=dict(type="cappa_zeroshot", data=dict(name="emoji"), scor="sum"))
    with pytest.raises(ValueError, match="scor"):
        config_check.validate_evals(ml_collections.ConfigDict(bad))


@pytest.mark.slow  # the trainer's compiles (~50 s on 2 busy cores) and a CLI subprocess (~30 s)
def test_vljax_evaluate_runs_the_evals_on_a_trained_workdir(trained, tmp_path):
    """A tiny SigLIP 2 trained through the trainer (4 steps): `python -m vljax.evaluate
    --model=<workdir> --config=<file>` writes the metrics that the in-process evaluation of the
    loaded workdir (`evaluate.evaluate`, what the CLI calls) gives."""
    wd = str(tmp_path / "wd")
    train.Trainer(_config(trained["train"][0]), wd).fit()
    want = evaluate_lib.evaluate(factory.load(wd), trained["evals"])
    cfg = tmp_path / "evals.py"
    cfg.write_text("import ml_collections\n\n"
                   "def get_config(arg=None):\n"
                   f"    return ml_collections.ConfigDict({trained['evals'].to_dict()!r})\n")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--model={wd}", f"--config={cfg}",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    keys = [k for k in want if not k.startswith("time/")]
    assert {k.split("/")[0] for k in keys} == {"dense_probe", "caption_nll", "cappa_zeroshot"}
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
