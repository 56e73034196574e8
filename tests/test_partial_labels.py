"""Partial labels and extreme label spaces: PU-MLC, nnPU and DEXML's decoupled softmax against numpy
references written from their equations (and the same value and gradients on 8 devices, DEXML's
also with the label space sharded over them); the seeded label hiding and its record; a run of
the trainer with hidden labels."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from helpers import finite_differences
from test_losses import _mesh, _sharded_value_and_grad

from vljax import config_check, objective
from vljax.data import sources
from vljax.losses import dexml, partial_labels


def _normalized(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    zimg, zlab = _normalized(rng.normal(size=(16, 8))), _normalized(rng.normal(size=(13, 8)))
    y = (rng.random((16, 13)) < 0.25).astype(np.float32)
    y[[2, 11]] = 0  # images with no observed label
    y[:, 4] = 0     # a label without a positive in the batch
    return zimg, zlab, np.float32(6.0), np.float32(-2.0), y


def _ref_pu_mlc(zimg, zlab, t, b, y, gamma, alpha):
    """PU-MLC per the authors' vpu_loss.py, written out label by label in float64."""
    logits = t * zimg.astype(np.float64) @ zlab.T.astype(np.float64) + b
    total = 0.0
    for j in range(logits.shape[1]):
        x = logits[:, j]
        tau = min(alpha * np.sqrt(np.mean((x - x.mean()) ** 2)), 1.0)
        p = _sigmoid(x / tau)
        w = (1 - np.mean(1 - p)) ** gamma
        pos = y[:, j] == 1
        positive = np.log(p[pos]).mean() if pos.any() else 0.0
        total += w * np.log(p.mean() + 1e-10) - positive
    return total


_ELL = {"sigmoid": lambda z: _sigmoid(-z), "logistic": lambda z: np.log1p(np.exp(-z))}  # ell(z, +1)


def _nnpu_parts(zimg, zlab, t, b, y, c, surrogate="sigmoid"):
    """Kiryo et al.'s two risks per label in float64, pi_j = (|P_j| / B) / c:
    ([K] pi_j R_p^+, [K] r_j = R_u^- - pi_j R_p^-)."""
    logits = t * zimg.astype(np.float64) @ zlab.T.astype(np.float64) + b
    ell = _ELL[surrogate]
    n, positive, negative = logits.shape[0], [], []
    for j in range(logits.shape[1]):
        x, pos = logits[:, j], y[:, j] == 1
        pi = pos.sum() / n / c
        r_p_plus = ell(x[pos]).mean() if pos.any() else 0.0
        r_p_minus = ell(-x[pos]).mean() if pos.any() else 0.0
        positive.append(pi * r_p_plus)
        negative.append(ell(-x).mean() - pi * r_p_minus)
    return np.array(positive), np.array(negative)


def _ref_nnpu(zimg, zlab, t, b, y, c, surrogate="sigmoid"):
    """Kiryo et al. Eq. 6 per label, mean over labels."""
    positive, negative = _nnpu_parts(zimg, zlab, t, b, y, c, surrogate)
    return np.mean(positive + np.maximum(negative, 0.0))


def _ref_nnpu_grad(zimg, zlab, t, b, y, c, beta, gamma, surrogate, eps=1e-6):
    """Kiryo et al.'s Algorithm 1 label by label, by central differences in float64: the gradient
    of pi R_p^+ + r_j where r_j >= -beta, of -gamma r_j where it is below (mean over labels)."""
    defend = _nnpu_parts(zimg, zlab, t, b, y, c, surrogate)[1] < -beta

    def descent(zi, zl):
        positive, negative = _nnpu_parts(zi, zl, t, b, y, c, surrogate)
        return np.mean(np.where(defend, -gamma * negative, positive + negative))

    grads = finite_differences(descent, [zimg, zlab], h=eps)
    return defend, grads


def _ref_dexml(zimg, zlab, t, y):
    """DEXML's decoupled softmax, loop by loop: each positive against the image's negatives."""
    s = t * zimg.astype(np.float64) @ zlab.T.astype(np.float64)
    total = 0.0
    for i in range(s.shape[0]):
        pos = np.flatnonzero(y[i])
        neg = np.exp(s[i][y[i] == 0]).sum()
        for l in pos:
            total += -np.log(np.exp(s[i, l]) / (np.exp(s[i, l]) + neg)) / len(pos)
    return total / s.shape[0]


@pytest.mark.parametrize("name", ["pu_mlc", "nnpu"])
def test_pu_losses_equal_the_references_on_1_and_8_devices(name, batch):
    zimg, zlab, t, b, y = batch
    if name == "pu_mlc":
        opts = dict(gamma=2.0, alpha=0.5)
        fn, ref = partial_labels.pu_mlc_loss, _ref_pu_mlc(zimg, zlab, t, b, y, **opts)
    else:
        opts = dict(label_frequency=0.5)
        fn, ref = partial_labels.nnpu_loss, _ref_nnpu(zimg, zlab, t, b, y, 0.5)
    assert float(fn(zimg, zlab, t, b, y, **opts)) == pytest.approx(ref, rel=1e-5)
    value, grad = _sharded_value_and_grad(
        lambda zi, zl, y_, axis_name: fn(zi, zl, t, b, y_, axis_name=axis_name, **opts),
        (zimg, zlab, y), (P("data"), P(), P("data")), argnums=(0, 1), n=8)
    assert float(value) == pytest.approx(ref, rel=1e-5)
    single = jax.grad(lambda zi, zl: fn(zi, zl, t, b, y, **opts), argnums=(0, 1))(zimg, zlab)
    for g8, g1 in zip(grad, single):
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
    assert np.abs(single[0]).sum() > 0


@pytest.mark.parametrize("c, beta, gamma, surrogate", [(0.5, 0.0, 1.0, "sigmoid"), (0.05, 0.0, 1.0, "sigmoid"),
                                                        (0.05, 0.2, 0.5, "sigmoid"), (0.2, 0.0, 1.0, "logistic")])
def test_nnpu_steps_by_kiryos_algorithm_1(batch, c, beta, gamma, surrogate):
    """Value: Eq. 6 (the negative part clamped at 0). Gradient: Algorithm 1 per label, the defensive
    step (-gamma times the negative part's gradient) where that part is below -beta. In this batch
    pi_j R_p^- outweighs R_u^- for some labels (more at observed frequency 0.05): both regimes."""
    zimg, zlab, t, b, y = batch
    opts = dict(label_frequency=c, beta=beta, gamma=gamma, surrogate=surrogate)
    value, grads = jax.value_and_grad(partial_labels.nnpu_loss, argnums=(0, 1))(zimg, zlab, t, b, y, **opts)
    assert float(value) == pytest.approx(_ref_nnpu(zimg, zlab, t, b, y, c, surrogate), rel=1e-5)
    defend, ref = _ref_nnpu_grad(zimg, zlab, t, b, y, c, beta, gamma, surrogate)
    assert 0 < defend.sum() < len(defend), defend  # both branches are exercised
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-6)
    # A gradient step raises the defended labels' negative risks (a plain max would not move them).
    step = [a - 0.1 * g for a, g in zip((zimg, zlab), grads)]
    before, after = (_nnpu_parts(*z, t, b, y, c, surrogate)[1] for z in ((zimg, zlab), step))
    assert np.all(after[defend] > before[defend])


def test_nnpu_checks_its_options(batch):
    zimg, zlab, t, b, y = batch
    with pytest.raises(ValueError, match="`loss.label_frequency`"):
        partial_labels.nnpu_loss(zimg, zlab, t, b, y, label_frequency=0.0)
    with pytest.raises(ValueError, match="`loss.beta`"):
        partial_labels.nnpu_loss(zimg, zlab, t, b, y, beta=-0.1)
    with pytest.raises(ValueError, match="`loss.gamma`"):
        partial_labels.nnpu_loss(zimg, zlab, t, b, y, gamma=0.0)
    with pytest.raises(ValueError, match="`loss.surrogate`"):
        partial_labels.nnpu_loss(zimg, zlab, t, b, y, surrogate="hinge")


def test_nnpu_sigmoid_surrogate_vanishes_at_a_negative_bias_and_logistic_does_not(batch):
    """At SigLIP's bias init (-10) every score is a confident negative: the sigmoid loss's gradient
    is ~e^-10 (why lit_multilabel.py's nnPU uses the logistic loss); the logistic loss's is O(1)."""
    zimg, zlab, t, _, y = batch
    norms = {s: float(np.abs(jax.grad(lambda z: partial_labels.nnpu_loss(
        zimg, z, 1.0, -10.0, y, label_frequency=0.5, surrogate=s))(zlab)).sum()) for s in ("sigmoid", "logistic")}
    assert norms["sigmoid"] < 1e-3 * norms["logistic"], norms


def test_dexml_equals_the_reference_replicated_and_label_sharded(batch):
    zimg, zlab, t, _, y = batch
    ref = _ref_dexml(zimg, zlab, t, y)
    assert float(dexml.dexml_loss(zimg, zlab, t, y)) == pytest.approx(ref, rel=1e-5)
    single = jax.grad(lambda zi, zl: dexml.dexml_loss(zi, zl, t, y), argnums=(0, 1))(zimg, zlab)
    # The trainer's layout: batch rows over 8 devices, every label on each.
    value, grad = _sharded_value_and_grad(
        lambda zi, zl, y_, axis_name: dexml.dexml_loss(zi, zl, t, y_, axis_name=axis_name),
        (zimg, zlab, y), (P("data"), P(), P("data")), argnums=(0, 1), n=8)
    assert float(value) == pytest.approx(ref, rel=1e-5)
    for g8, g1 in zip(grad, single):
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
    # The label space over 8 devices: 13 labels padded to 16 (mask), each device 2 of them.
    pad = 3
    zlab_p = np.concatenate([zlab, _normalized(np.ones((pad, 8)))])
    y_p = np.concatenate([y, np.ones((16, pad), np.float32)], axis=1)  # padding: never a positive
    mask = np.arange(16) < 13
    mesh = _mesh(8)
    f = jax.shard_map(lambda zi, zl, y_, m: dexml.decoupled_softmax(zi, zl, t, y_, label_axis="data", label_mask=m),
                      mesh=mesh, in_specs=(P(), P("data"), P(None, "data"), P("data")), out_specs=P())
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in
            zip((zimg, zlab_p, y_p, mask), (P(), P("data"), P(None, "data"), P("data")))]
    value, grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
    assert float(value) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(grad[0], single[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[1])[:13], single[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad[1])[13:], 0)
    with pytest.raises(ValueError, match=r"must be \[b, k\]"):
        dexml.dexml_loss(zimg, zlab, t, y[:, :5])


@pytest.mark.parametrize("name", ["pu_mlc", "nnpu", "dexml", "comic"])
def test_learning_from_half_the_labels_ranks_the_hidden_ones(name):
    """Label embeddings trained from images' observed labels (half of them hidden, `hidden_of`)
    rank the images by every true label: mAP on the FULL label sets far above the start's."""
    import optax

    from vljax.evaluators.multilabel import mean_average_precision
    rng = np.random.default_rng(0)
    dirs = _normalized(rng.normal(size=(6, 16)))
    full = np.zeros((256, 6), np.float32)
    for row in full:
        row[rng.choice(6, rng.integers(1, 4), replace=False)] = 1
    zimg = _normalized(full @ dirs + 0.3 * rng.normal(size=(256, 16)))
    seen = full.copy()
    for i, row in enumerate(full):
        seen[i, sources.hidden_of(np.flatnonzero(row), 0.5, 0, 0, i)] = 0
    assert 0.4 < 1 - seen.sum() / full.sum() < 0.6
    loss_fn = {"pu_mlc": lambda z: partial_labels.pu_mlc_loss(zimg, z, 10.0, 0.0, seen),
               "nnpu": lambda z: partial_labels.nnpu_loss(zimg, z, 10.0, 0.0, seen, label_frequency=0.5),
               "dexml": lambda z: dexml.dexml_loss(zimg, z, 10.0, seen),
               # COMIC's focal terms need a negative bias (the trainer's is learned; here fixed).
               "comic": lambda z: partial_labels.comic_loss(zimg, z, 10.0, -3.0, seen)}[name]
    tx = optax.adam(0.05)

    @jax.jit
    def step(z, opt):
        g = jax.grad(lambda z: loss_fn(_unit(z)))(z)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(z, updates), opt

    z = rng.normal(size=(6, 16)).astype(np.float32)
    before = mean_average_precision(zimg @ _normalized(z).T, full.astype(bool))
    opt = tx.init(z)
    for _ in range(150):
        z, opt = step(z, opt)
    after = mean_average_precision(zimg @ _normalized(np.asarray(z)).T, full.astype(bool))
    oracle = mean_average_precision(zimg @ dirs.T, full.astype(bool))  # the true directions
    assert after > before + 0.2 and after > oracle - 0.12, (before, after, oracle)


def _unit(z):
    return z / jax.numpy.linalg.norm(z, axis=-1, keepdims=True)


def test_losses_are_registered_with_their_options():
    for name in ("pu_mlc", "nnpu", "dexml"):
        loss = objective.resolve(name)
        assert loss.inputs[:2] == ("zimg", "labels/ztxt") and "template" in loss.config_keys
    assert {"gamma", "alpha", "template"} <= objective.option_keys("pu_mlc")
    assert {"label_frequency", "beta", "gamma"} <= objective.option_keys("nnpu")
    assert objective.resolve("dexml").logits == "softmax"


# --------------------------------------------------------------------------------- label hiding


def test_hidden_labels_are_seeded_and_order_free():
    draws = [sources.hidden_of(range(40), 0.5, 3, 0, i) for i in range(200)]
    assert draws == [sources.hidden_of(list(range(40))[::-1], 0.5, 3, 0, i) for i in range(200)]
    fraction = sum(map(len, draws)) / (40 * 200)
    assert 0.47 < fraction < 0.53
    assert draws != [sources.hidden_of(range(40), 0.5, 4, 0, i) for i in range(200)]
    assert draws != [sources.hidden_of(range(40), 0.5, 3, 1, i) for i in range(200)]
    assert sources.hidden_of([1, 2], 0.0, 3, 0, 0) == [] and sources.hidden_of([], 0.9, 3, 0, 0) == []
    for bad, key in ((dict(fraction=1.0, seed=0), "fraction"), (dict(fraction=0.5, seed=-1), "seed"),
                     (dict(fraction=0.5), "hide_labels")):
        with pytest.raises(ValueError, match=f"`input.hide_labels.*{key}|`input.{key}"):
            sources.check_hide_labels(bad)


class _Tags:
    """A tiny source of label sets (3 names)."""
    label_names = ["a", "b", "c"]
    num_labels = 3

    def __init__(self, sets):
        self.sets = sets

    def __len__(self):
        return len(self.sets)

    def __getitem__(self, i):
        return {"id": str(i), "labels": list(self.sets[i]), "captions": ["x"]}

    def label_set_of(self, i):
        return list(self.sets[i])


def test_hide_labels_wrapper_and_its_record():
    src = _Tags([[0, 1, 2]] * 50 + [[]])
    hidden = sources.HideLabels(src, 0.5, 7, source_index=1)
    record = sources.hidden_labels_record([src], 0.5, 7)
    assert record["sources"][0]["positives"] == 150 and record["sources"][0]["records"] == 51
    total = 0
    for i in range(len(src)):
        seen = hidden[i]["labels"]
        dropped = sources.hidden_of(src.sets[i], 0.5, 7, 1, i)
        assert sorted(seen + dropped) == sorted(src.sets[i])
        total += len(dropped)
    assert 50 < total < 100
    # The record of source 0 names the labels that HideLabels(source_index=0) drops.
    zero = sources.HideLabels(src, 0.5, 7, source_index=0)
    for i, names in record["sources"][0]["hidden_by_record"].items():
        kept = [src.label_names[x] for x in zero[int(i)]["labels"]]
        assert sorted(kept + names) == ["a", "b", "c"]
    assert record["sources"][0]["hidden"] == sum(map(len, record["sources"][0]["hidden_by_record"].values()))


# --------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from helpers import make_shapes_manifest
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


def test_hide_labels_config_is_checked(manifest):
    from helpers import tiny_config
    bad = tiny_config(manifest, "clip", steps=2)
    bad.input.hide_labels = dict(fraction=0.5, seed=1)
    with pytest.raises(ValueError, match="`input.hide_labels`.*input.labels=True"):
        config_check.validate(bad)
    bad.input.labels = True
    bad.input.hide_labels = dict(fraction=1.5, seed=1)
    with pytest.raises(ValueError, match="`input.hide_labels.fraction`"):
        config_check.validate(bad)


def test_lit_multilabel_arguments():
    """configs/lit_multilabel.py's arguments: the loss, the hidden fraction, conformal alpha."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import lit_multilabel
    c = lit_multilabel.get_config("loss=nnpu,hide=0.4,hide_seed=3,alpha=0.2")
    config_check.validate(c)
    assert dict(c.loss) == dict(name="nnpu", template="an icon of {}.", label_frequency=0.6, surrogate="logistic")
    assert dict(c.input.hide_labels) == dict(fraction=0.4, seed=3)
    assert c.evals.emoji_tags.alphas == (0.2,) and c.evals.emoji_tags.calibration.split == "val"
    for loss in ("pu_mlc", "dexml"):
        c = lit_multilabel.get_config(f"loss={loss}")
        config_check.validate(c)
        assert c.loss.name == loss and "hide_labels" not in c.input
        assert c.model.bias_init == (0.0 if loss == "pu_mlc" else -10.0)
    with pytest.raises(ValueError, match="`loss.name`"):
        config_check.validate(lit_multilabel.get_config("loss=pu"))
