"""Mixing augmentation with soft targets (vljax/mixing.py, vljax/losses/mixing.py): the loss equals
a numpy reference of the papers' soft-target cross-entropies (value and gradients) on one device
and on a data x fsdp mesh, and CLIP's loss when nothing is mixed; each kind mixes as its paper's
code does (shares, regions on the patch grid, the reversed batch as partner), the same on a
sharded batch; the config check refuses what cannot work, naming the key; one update step on 8
devices (data x fsdp) equals the step on 1; `python -m vljax.main` learns with it."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import REPO, make_shapes_manifest, run_main, tiny_config, tiny_config_file
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import config_check, metrics, mixing, objective, sharding
from vljax.losses import softmax_contrastive
from vljax.losses.mixing import mix_softmax
from vljax.step import make_train_step


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(zi, zt, t, lam, partner):
    """(value, dzimg, dztxt, dt) in float64 from the equations: P[i, i] += lam_i,
    P[i, partner(i)] += 1 - lam_i; image i's CE against row i of P over the texts, text j's
    against column j of P over the images, summed and divided by 2B."""
    b = zi.shape[0]
    p = np.zeros((b, b))
    for i in range(b):
        p[i, i] += lam[i]
        p[i, partner[i]] += 1 - lam[i]
    s = zi @ zt.T
    logits = t * s

    def log_softmax(x):  # over axis 1
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
    lr, lc = log_softmax(logits), log_softmax(logits.T).T  # rows over texts, columns over images
    value = -(np.sum(p * lr) + np.sum(p * lc)) / (2 * b)
    # d/dlogits of -sum_ij P_ij log softmax: softmax * (row / column sums of P) - P.
    g = (np.exp(lr) * p.sum(1, keepdims=True) - p + np.exp(lc) * p.sum(0, keepdims=True) - p) / (2 * b)
    return value, t * g @ zt, t * g.T @ zi, np.sum(g * s)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    b, d = 8, 5
    lam = rng.beta(0.5, 0.5, size=b)
    lam[[1, 6]] = 1.0  # unmixed rows (M3CoL's unselected examples)
    partner = rng.permutation(b)  # any partner, not only the reversal: the targets' general form
    return _unit(rng, b, d), _unit(rng, b, d), 3.0, lam, partner


_mix_grads = jax.jit(jax.value_and_grad(mix_softmax, argnums=(0, 1, 2)))


def _value_and_grads(zi, zt, t, lam, partner, fn=_mix_grads):
    args = [jnp.asarray(x, jnp.float32) for x in (zi, zt, t, lam)] + [jnp.asarray(partner, jnp.int32)]
    return fn(*args)


def test_loss_equals_the_numpy_reference(case):
    value, (dzi, dzt, dt) = _value_and_grads(*case)
    ref = _reference(*case)
    np.testing.assert_allclose(value, ref[0], rtol=1e-5)
    for got, want in zip((dzi, dzt, dt), ref[1:]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Nothing mixed (lam = 1): exactly CLIP's loss, whatever the partner.
    zi, zt, t, lam, partner = case
    unmixed = _value_and_grads(zi, zt, t, np.ones_like(lam), partner)
    clip = jax.jit(jax.value_and_grad(softmax_contrastive, argnums=(0, 1, 2)))(
        jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.float32(t))
    for got, want in zip(jax.tree.leaves(unmixed), jax.tree.leaves(clip)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_loss_equal_on_a_data_x_fsdp_mesh(case):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    axes = ("data", "fsdp")

    def sharded(zi, zt, t, lam, partner):
        local = lambda *a: mix_softmax(*a, axis_name=axes)  # noqa: E731
        specs = (P(axes), P(axes), P(), P(axes), P(axes))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(zi, zt, t, lam, partner)

    one = _value_and_grads(*case)
    eight = _value_and_grads(*case, fn=jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2))))
    for got, want in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def mixed():
    """images [8, 16, 16, 3] and {(kind, prob): (mixed, lam, partner)} from ONE jitted function of
    every kind, on the batch sharded over 8 devices (data x fsdp), with prob=1 and prob=0: the
    checks below hold for the global batch (the step's 1 == 8 devices test compares values)."""
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(8, 16, 16, 3)), jnp.float32)
    fn = jax.jit(lambda x, prob: {k: mixing.mix(x, jax.random.key(3), k, alpha=0.7, prob=prob, patch=(4, 4))
                                  for k in mixing.KINDS})
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    spread = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    runs = {1.0: fn(spread, 1.0), 0.0: fn(spread, 0.0)}
    return x, {(k, prob): jax.device_get(r[k]) for prob, r in runs.items() for k in mixing.KINDS}


def _own_and_pasted(x, mixed, patch=4):
    """Per image: its own pixels (bool [H, W]) and the pasted region, which must be whole patches
    forming one rectangle equal to a patch-aligned rectangle of the partner's (the reversed batch)."""
    x, mixed = np.asarray(x), np.asarray(mixed)
    own = np.all(mixed == x, axis=-1)
    for i in range(len(x)):
        rows, cols = np.nonzero(~own[i])
        if not len(rows):
            continue
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert (y1 - y0) * (x1 - x0) == len(rows)  # one rectangle
        assert all(v % patch == 0 for v in (y0, y1, x0, x1))  # of whole patches
        region, src = mixed[i, y0:y1, x0:x1], x[len(x) - 1 - i]
        h, w = y1 - y0, x1 - x0
        assert any(np.array_equal(region, src[a:a + h, b:b + w])
                   for a in range(0, src.shape[0] - h + 1, patch) for b in range(0, src.shape[1] - w + 1, patch))
    return own.mean(axis=(1, 2)), own


@pytest.mark.parametrize("kind", mixing.KINDS)
def test_each_kind_mixes_as_its_paper(mixed, kind):
    x, runs = mixed
    x = np.asarray(x)
    out, lam, partner = runs[(kind, 1.0)]
    np.testing.assert_array_equal(partner, np.arange(7, -1, -1))
    np.testing.assert_array_equal(runs[(kind, 0.0)][0], x)  # prob=0: nothing mixed
    np.testing.assert_array_equal(runs[(kind, 0.0)][1], 1.0)
    if kind in ("mixup", "m3col"):
        want = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[::-1]
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
        assert (len(set(lam.tolist())) == 1) == (kind == "mixup")  # m3col: a lam per example
        return
    share, own = _own_and_pasted(x, out)
    np.testing.assert_allclose(share, lam, rtol=1e-6)  # lam = the exact area of the image's own
    assert 0.0 < lam[0] < 1.0 and len(set(lam.tolist())) == 1
    if kind == "cutmix":  # the partner's patches at the same place
        np.testing.assert_array_equal(out[~own], x[::-1][~own])
    else:  # timix: a square of s x s patches, s in [int(4 * 0.25), int(4 * 0.75)] = [1, 3]
        s = int(round(np.sqrt((1 - lam[0]) * 16)))
        assert 1 <= s <= 3 and np.isclose(lam[0], 1 - s * s / 16)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=1)


def _config(manifest, kind="cutmix", mesh=(("data", -1),)):
    config = tiny_config(manifest, "clip", steps=4, batch=8)
    config.loss = dict(name="mix_softmax")
    config.mixing = dict(kind=kind, alpha=1.0, prob=1.0)
    config.mesh = list(mesh)
    return config


def _sigmoid(c):
    c.loss, c.model.bias_init = dict(name="sigmoid"), -10.0


# A change to a valid mixing config -> the error it must raise (the key it names).
_REFUSED = [
    (lambda c: setattr(c, "mixing", None), "`mixing`: loss 'mix_softmax' takes the mixed images"),
    (_sigmoid, "`mixing`: loss 'sigmoid' does not take .* no sigmoid loss"),
    (lambda c: setattr(c.mixing, "kind", "mixmatch"), "`mixing.kind`: 'mixmatch' is not one of"),
    (lambda c: setattr(c.mixing, "alpah", 1.0), r"`mixing`: unknown keys \['alpah'\]"),
    (lambda c: setattr(c.mixing, "prob", 1.5), "`mixing.prob`"),
    (lambda c: setattr(c.mixing, "alpha", 0.0), "`mixing.alpha`"),
    (lambda c: setattr(c.loss, "multilabel_weight", 1.0), "`loss.multilabel_weight`: .* mixed images"),
    # LiT's stored features of the locked image trunk (the feature store) cannot be mixed.
    (lambda c: setattr(c, "lit_cache", True), "`lit_cache`: `mixing` mixes .* cannot be mixed"),
]


def test_config_check_refuses_what_cannot_work(manifest):
    config_check.validate(_config(manifest))
    for change, error in _REFUSED:
        config = _config(manifest)
        change(config)
        with pytest.raises(ValueError, match=error):
            config_check.validate(config)
    spec = importlib.util.spec_from_file_location("cfg_clip", os.path.join(REPO, "configs", "clip.py"))
    clip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip)
    for kind in mixing.KINDS:  # the demo recipe's argument
        config = clip.get_config(f"mix={kind}")
        config_check.validate(config)
        assert config.loss.name == "mix_softmax" and config.mixing.kind == kind
    assert dict(clip.get_config("mix=m3col").mixing) == dict(kind="m3col", alpha=0.15, prob=0.5)
    assert "mixing" not in clip.get_config("")


class _Towers(nn.Module):
    """Two linear towers and a logit scale, the interface of TwoTowers that the step uses."""

    @nn.compact
    def __call__(self, image, text, train=False):
        unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
        zimg = nn.Dense(8, name="img")(image.reshape(image.shape[0], -1))
        ztxt = nn.Dense(8, name="txt")(jax.nn.one_hot(text, 16).mean(1))
        return unit(zimg), unit(ztxt), {"t": jnp.exp(self.param("t", lambda _: jnp.log(10.0)))}


def _one_step(mesh, mix, batch):
    """(metrics, params) after one update step on `mesh`; kernels fsdp-sharded where it has fsdp."""
    model = _Towers()
    params = model.init(jax.random.key(0), batch["image"], batch["text"])["params"]
    tx = optax.adam(1e-2)
    config = ml_collections.ConfigDict(dict(loss=dict(name="mix_softmax")))
    step = make_train_step(model, tx, objective.make_loss(config, mesh), jax.tree.map(lambda _: True, params),
                           mixing=mix)
    fsdp = "fsdp" in mesh.axis_names
    params = jax.tree.map(lambda p: jax.device_put(p, NamedSharding(
        mesh, P("fsdp") if fsdp and p.ndim == 2 else P())), params)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(7)}
    with jax.set_mesh(mesh):
        state, m = jax.jit(step)(state, sharding.shard_batch(batch, mesh))
    return jax.device_get(m), jax.device_get(state["params"])


@pytest.mark.slow  # two compiled update steps (about 7 s of CPU)
def test_one_and_eight_devices_agree_on_the_mixed_step():
    """The update step's mixed loss, gradient norm and updated params on 1 device equal those on 8
    (data 2 x fsdp 4, kernels fsdp-sharded): the mixing (TiMix's regions, drawn in the step), its
    partner and the targets are global. The step did mix (train/mix_lam < 1)."""
    rng = np.random.default_rng(2)
    batch = {"image": rng.uniform(-1, 1, size=(16, 16, 16, 3)).astype(np.float32),
             "text": rng.integers(0, 16, size=(16, 5)).astype(np.int32)}
    mix = mixing.Mixing("timix", alpha=1.0, prob=1.0, patch=(4, 4), min_side=0.25, max_side=0.75)
    one, p_one = _one_step(sharding.make_mesh([("data", -1)], devices=jax.devices()[:1]), mix, batch)
    eight, p_eight = _one_step(sharding.make_mesh([("data", 2), ("fsdp", 4)]), mix, batch)
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_eight), jax.tree.leaves(p_one)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(eight["train/mix_lam"], one["train/mix_lam"], rtol=1e-6)
    assert 0.0 < one["train/mix_lam"] < 0.95


@pytest.mark.slow  # a subprocess: imports, compile, 40 steps and one evaluation (about 40 s)
def test_mixing_through_main_learns(tmp_path):
    """`python -m vljax.main` with `mixing` (TiMix's squares of patches, every step mixed) and
    `loss.name='mix_softmax'` trains and learns on one device (the 12 shapes, batch 8): the loss's
    excess over its floor, the entropy H(lam) of the step's soft targets (one lam per step; every
    row's and column's targets are lam and 1 - lam), falls (measured: 1.63 -> 1.11, mean of the
    first / last 10 steps), and retrieval among the clean training images is far above chance
    (measured: i2t R@1 0.50, t2i R@1 0.375; chance 1/12: two of 24 captions per image). The
    figures are the same on 4 devices (measured): the mixing is global."""
    cfg = tiny_config_file(tmp_path / "tiny.py", tmp_path / "shapes", steps=40, batch=8, lines=[
        "c.loss = dict(name='mix_softmax')",
        "c.mixing = dict(kind='timix', prob=1.0)",
        "c.evals = dict(ret=dict(type='retrieval', data=dict(source='jsonl', path=c.input.data[0]['path'])))"])
    run_main(cfg, tmp_path / "wd", devices=1)
    records = metrics.read_metrics(str(tmp_path / "wd" / "metrics.jsonl"))
    rows = [r for r in records if "train/loss" in r]
    loss, lam = np.array([r["train/loss"] for r in rows]), np.array([r["train/mix_lam"] for r in rows])
    assert len(loss) == 40 and np.all(np.isfinite(loss)) and np.mean(lam) < 0.9
    entr = lambda p: -p * np.log(np.where(p > 0, p, 1.0))  # noqa: E731  (0 log 0 = 0)
    excess = loss - entr(lam) - entr(1 - lam)
    assert np.all(excess > -1e-4)
    first, last = np.mean(excess[:10]), np.mean(excess[-10:])
    assert last < 0.8 * first, (first, last, excess)
    final = [r for r in records if "retrieval/ret/i2t_r1" in r][-1]
    assert final["retrieval/ret/i2t_r1"] >= 0.25 and final["retrieval/ret/t2i_r1"] >= 0.25, final
