"""Multi-label training: the losses against the papers' formulas written out element by element, and
a trained label head that beats the zero-shot prompts' mAP on constructed data."""
import math

import numpy as np
import pytest
from test_evaluators import TableEmbedder, index_images, normalize

from vljax.adapt import multilabel as ml
from vljax.evaluators import EVALUATORS
from vljax.evaluators.multilabel_train import MultilabelTrainEvaluator


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_losses_equal_the_formulas():
    logits = np.array([[2.0, -1.0, 0.3], [-0.5, 1.5, -3.0]], np.float32)
    y = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
    ref_bce, ref_asl, ref_wan = [], [], []
    for i in range(2):
        for j in range(3):
            p = _sig(float(logits[i, j]))
            ce = -(y[i, j] * math.log(p) + (1 - y[i, j]) * math.log(1 - p))
            ref_bce.append(ce)
            # ASL Eq. 6-8: gamma+ 1, gamma- 4, m .05.
            pm = max(p - 0.05, 0.0)
            ref_asl.append(-((1 - p) * math.log(p)) if y[i, j] else -(pm ** 4 * math.log(1 - pm)))
            # WAN: negatives weighted 1 / (L - 1) = 1/2.
            ref_wan.append(ce if y[i, j] else 0.5 * ce)
    assert float(ml.bce(logits, y)) == pytest.approx(np.mean(ref_bce), rel=1e-5)
    assert float(ml.asl(logits, y)) == pytest.approx(np.mean(ref_asl), rel=1e-5)
    assert float(ml.wan(logits, y)) == pytest.approx(np.mean(ref_wan), rel=1e-5)


def test_trained_head_beats_zero_shot_map():
    # 6 labels; an image holds 1-3 of them, its embedding the sum of their directions plus noise.
    # The label prompts' embeddings are those directions rotated part-way to a wrong one, so the
    # zero-shot ranking is poor and training must repair it.
    rng = np.random.default_rng(0)
    dirs = normalize(rng.normal(size=(6, 16)))
    targets = np.zeros((400, 6), bool)
    for row in targets:
        row[rng.choice(6, rng.integers(1, 4), replace=False)] = True
    table = normalize(targets @ dirs + 0.3 * rng.normal(size=(400, 16)))
    names = [f"l{j}" for j in range(6)]
    texts = {f"{n}": normalize(dirs[j] + 1.5 * dirs[(j + 1) % 6]) for j, n in enumerate(names)}
    labels = [np.flatnonzero(r) for r in targets]
    images = index_images(400)
    ev = MultilabelTrainEvaluator(images[:300], labels[:300], images[300:], labels[300:], names,
                                  name="toy", templates="name", losses=("bce", "asl", "wan"),
                                  steps=150, lr=0.05, batch_size=64)
    got = ev.run(TableEmbedder(table, texts))
    zs = got["multilabel_train/toy/zeroshot/mAP"]
    for loss in ("bce", "asl", "wan"):
        assert got[f"multilabel_train/toy/{loss}/mAP"] > zs + 0.15
        assert got[f"multilabel_train/toy/{loss}/CF1@thr"] > 0.5
    assert "multilabel_train/toy/zeroshot/OF1@3" in got
    assert EVALUATORS["multilabel_train"] is MultilabelTrainEvaluator


def _ref_trainer_loss(zimg, zlab, t, b, y, kind):
    """The trainer's multi-label loss written out: mean over labeled images of the mean over labels."""
    logits = t * zimg.astype(np.float64) @ zlab.T.astype(np.float64) + b
    p = 1 / (1 + np.exp(-logits))
    if kind == "wan":
        ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        per = np.where(y == 1, ce, ce / (y.shape[1] - 1))
    else:  # asl, defaults gamma- 4, gamma+ 1, m .05
        pm = np.maximum(p - 0.05, 0)
        per = np.where(y == 1, -(1 - p) * np.log(p), -(pm ** 4) * np.log(1 - pm))
    labeled = y.sum(1) > 0
    return per.mean(1)[labeled].mean()


@pytest.mark.parametrize("kind", ["wan", "asl"])
def test_trainer_loss_equals_the_formula_on_1_and_8_devices(kind):
    import jax
    from jax.sharding import PartitionSpec as P

    from vljax import losses
    rng = np.random.default_rng(0)
    zimg, zlab = normalize(rng.normal(size=(16, 8))), normalize(rng.normal(size=(5, 8)))
    y = (rng.random((16, 5)) < 0.3).astype(np.float32)
    y[[3, 9]] = 0  # unlabeled records: left out of the mean
    t, b = np.float32(7.0), np.float32(-2.0)
    ref = _ref_trainer_loss(zimg, zlab, t, b, y, kind)
    one = losses.multilabel_loss(zimg, zlab, t, b, y, kind=kind)
    assert float(one) == pytest.approx(ref, rel=1e-5)
    from test_losses import _sharded_value_and_grad
    value, grad = _sharded_value_and_grad(
        lambda zi, zl, y_, axis_name: losses.multilabel_loss(zi, zl, t, b, y_, axis_name=axis_name, kind=kind),
        (zimg, zlab, y), (P("data"), P(), P("data")), argnums=(0, 1), n=8)
    assert float(value) == pytest.approx(ref, rel=1e-5)
    single = jax.grad(lambda zi, zl: losses.multilabel_loss(zi, zl, t, b, y, kind=kind), argnums=(0, 1))(zimg, zlab)
    for g8, g1 in zip(grad, single):
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-7)
    assert float(losses.multilabel_loss(zimg, zlab, t, b, np.zeros_like(y), kind=kind)) == 0.0


def test_multilabel_added_to_a_contrastive_loss():
    """with_regularisers(softmax, multilabel_weight=w) = softmax + w * multilabel_loss."""
    from vljax import losses, objective
    rng = np.random.default_rng(1)
    zimg, ztxt = normalize(rng.normal(size=(8, 6))), normalize(rng.normal(size=(8, 6)))
    zlab = normalize(rng.normal(size=(4, 6)))
    y = (rng.random((8, 4)) < 0.4).astype(np.float32)
    t, b = np.float32(5.0), np.float32(-3.0)
    spec = objective.with_regularisers(objective.LOSSES["softmax"], multilabel_weight=0.5, multilabel_kind="asl")
    assert spec.inputs == ("zimg", "ztxt", "t", "zimg", "labels/ztxt", "t", "b", "batch/labels")
    value = spec.fn(zimg, ztxt, t, zimg, zlab, t, b, y)
    expected = losses.softmax_contrastive(zimg, ztxt, t) + 0.5 * _ref_trainer_loss(zimg, zlab, t, b, y, "asl")
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="`loss.multilabel_kind`"):
        objective.with_regularisers(objective.LOSSES["softmax"], multilabel_weight=1.0, multilabel_kind="focal")
