"""The momentum queue of negatives (vljax/momentum.py, vljax/losses/queue.py): the loss equals a
numpy reference of BriVL's / MoCo's equations (value and gradients) on one device and on a
data x fsdp mesh; the queue is FIFO and the momentum towers an EMA; the config check refuses what
cannot work, naming the key; the trainer gives the same losses on 1 and 8 devices, a resumed run
equals the uninterrupted one exactly, and `python -m vljax.main` learns with it."""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, losses_of, make_shapes_manifest, tiny_config, tiny_config_file
from jax.sharding import PartitionSpec as P

from vljax import checkpoints, config_check, momentum, sharding, train
from vljax.losses.queue import queue_contrastive


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(zi, zt, t, mzi, mzt, qi, qt, batch_negatives=False):
    """(value, dzimg, dztxt, dt) in float64: InfoNCE of each online embedding against the other
    modality's momentum embedding (positive) and queue (negatives; with `batch_negatives`, also
    the batch's other momentum embeddings), mean of both directions."""
    b = zi.shape[0]

    def direction(z, key, queue):
        # Candidates [b, C]: column 0 the positive, then the negatives.
        others = [key[np.arange(b) != i] for i in range(b)] if batch_negatives else [key[:0]] * b
        cand = np.stack([np.concatenate([key[i:i + 1], others[i], queue]) for i in range(b)])  # [b, C, D]
        s = np.einsum("bd,bcd->bc", z, cand)
        logits = t * s
        lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
        p = np.exp(logits - lse[:, None])
        value = np.sum(lse - logits[:, 0])
        dz = t * (np.einsum("bc,bcd->bd", p, cand) - key)
        dt = np.sum(np.sum(p * s, 1) - s[:, 0])
        return value, dz, dt

    v1, dzi, dt1 = direction(zi, mzt, qt)
    v2, dzt, dt2 = direction(zt, mzi, qi)
    return (v1 + v2) / (2 * b), dzi / (2 * b), dzt / (2 * b), (dt1 + dt2) / (2 * b)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    b, q, d = 8, 16, 5
    return (_unit(rng, b, d), _unit(rng, b, d), 3.0, _unit(rng, b, d), _unit(rng, b, d),
            _unit(rng, q, d), _unit(rng, q, d))


def _grads(fn, case, **kw):
    zi, zt, t, *rest = [jnp.asarray(x, jnp.float32) for x in case]
    return jax.value_and_grad(lambda a, c, s: fn(a, c, s, *rest, **kw), argnums=(0, 1, 2))(zi, zt, t)


@pytest.mark.parametrize("batch_negatives", [False, True])
def test_loss_equals_the_numpy_reference(case, batch_negatives):
    value, (dzi, dzt, dt) = _grads(queue_contrastive, case, batch_negatives=batch_negatives)
    ref = _reference(*case, batch_negatives=batch_negatives)
    np.testing.assert_allclose(value, ref[0], rtol=1e-5)
    for got, want in zip((dzi, dzt, dt), ref[1:]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The momentum embeddings and the queues are constants: no gradient reaches them.
    args = [jnp.asarray(x, jnp.float32) for x in case]
    consts = jax.grad(lambda *c: queue_contrastive(*args[:3], *c), argnums=(0, 1, 2, 3))(*args[3:])
    assert all(not np.any(np.asarray(g)) for g in consts)


# ALBEF's form only: it runs every collective of the queue-only form (the queues split over the
# mesh) plus the batch's momentum keys gathered; both forms equal the numpy reference on one device.
@pytest.mark.parametrize("batch_negatives", [True])
def test_loss_equal_on_a_data_x_fsdp_mesh(case, batch_negatives):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])  # Auto axes, as the trainer's
    axes = ("data", "fsdp")

    def sharded(zi, zt, t, *rest, **kw):
        specs = (P(axes), P(axes), P(), *(P(axes),) * 4)
        local = lambda *a: queue_contrastive(*a, axis_name=axes, **kw)  # noqa: E731
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(zi, zt, t, *rest)

    one, g1 = _grads(queue_contrastive, case, batch_negatives=batch_negatives)
    eight, g8 = _grads(sharded, case, batch_negatives=batch_negatives)
    np.testing.assert_allclose(eight, one, rtol=1e-6)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_queue_is_fifo_and_the_towers_an_ema():
    m = momentum.Momentum(size=8, dim=3, momentum=0.75)
    params = {"img": {"w": jnp.ones((2,))}, "txt": {"w": jnp.full((2,), 2.0)}, "t": jnp.zeros(())}
    state = m.init(params, jax.random.key(1))
    assert set(state["params"]) == {"img", "txt"} and state["img"].shape == (8, 3)
    np.testing.assert_allclose(np.linalg.norm(state["txt"], axis=1), 1.0, rtol=1e-6)
    online = {**params, "img": {"w": jnp.full((2,), 5.0)}}
    mp = m.advance(state, online)
    np.testing.assert_allclose(mp["img"]["w"], 0.75 * 1 + 0.25 * 5)
    np.testing.assert_allclose(mp["txt"]["w"], 2.0)
    first = state["img"]
    for k in range(3):
        keys = jnp.full((4, 3), float(k))
        state = m.update(state, mp, {"momentum/zimg": keys, "momentum/ztxt": -keys})
    # Batches 0, 1, 2 of 4 rows into 8: batch 2 replaced batch 0 (the oldest), batch 1 stays.
    np.testing.assert_array_equal(state["img"][:4], 2.0)
    np.testing.assert_array_equal(state["img"][4:], 1.0)
    np.testing.assert_array_equal(state["txt"][4:], -1.0)
    assert int(state["ptr"]) == 4 and not np.array_equal(first[:4], state["img"][:4])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


def _config(manifest, steps=6, size=32, mesh=(("data", -1),)):
    config = tiny_config(manifest, "clip", steps=steps, batch=8)
    config.loss = dict(name="queue_contrastive")
    config.queue = dict(size=size, momentum=0.9)
    config.mesh = list(mesh)
    return config


def test_config_check_refuses_what_cannot_work(manifest, tmp_path):
    config = _config(manifest, size=20)
    with pytest.raises(ValueError, match=r"`queue.size`=20 is not a multiple of .*input.batch_size=8"):
        config_check.validate(config)
    config = _config(manifest)
    config.queue = None
    with pytest.raises(ValueError, match="`queue`: loss 'queue_contrastive' takes"):
        config_check.validate(config)
    config = _config(manifest)
    config.loss = dict(name="softmax")
    with pytest.raises(ValueError, match="`queue`: loss 'softmax' does not take"):
        config_check.validate(config)
    config = _config(manifest)
    config.queue.momnetum = 0.9
    with pytest.raises(ValueError, match=r"`queue`: unknown keys \['momnetum'\]"):
        config_check.validate(config)
    config = _config(manifest)
    config.queue.momentum = 1.0
    with pytest.raises(ValueError, match="`queue.momentum`"):
        config_check.validate(config)
    spec = importlib.util.spec_from_file_location("cfg_clip", os.path.join(REPO, "configs", "clip.py"))
    clip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip)
    config = clip.get_config("queue=1024,qb=0")  # the demo recipe's argument
    config_check.validate(config)
    assert config.loss.name == "queue_contrastive" and config.queue.size == 1024
    with pytest.raises(ValueError, match="`queue.size`=1000"):
        config_check.validate(clip.get_config("queue=1000"))
    config = _config(manifest)
    config.lit_cache = True
    with pytest.raises(ValueError, match="`lit_cache`"):
        train.Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow  # four trainer runs (1 device, 8 devices straight, preempted, resumed)
def test_one_and_eight_devices_agree_and_resume_is_exact(manifest, tmp_path, monkeypatch):
    """1 device == 8 devices (data 2 x fsdp 4, params and momentum towers fsdp-sharded, queue rows
    over both axes); on 8 devices, a run preempted at step 3 and resumed equals the straight one
    bit for bit (params, momentum towers, queues, pointer)."""
    config = _config(manifest)
    config_check.validate(config)
    one = train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])

    mesh = (("data", 2), ("fsdp", 4))
    config = _config(manifest, mesh=mesh)
    config.sharding_rules = [(".*", "fsdp")]
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert straight["queue"]["img"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_allclose(losses_of(tmp_path / "straight"), losses_of(tmp_path / "one"), rtol=1e-5)
    for key in ("img", "txt"):  # embeddings, unit norm (Adam's near-zero moments amplify the
        # float-order differences of a few params, so those are compared through the losses)
        np.testing.assert_allclose(straight["queue"][key], one["queue"][key], atol=2e-4)
    assert int(straight["queue"]["ptr"]) == (6 * 8) % 32

    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 3)
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config, workdir)
    assert len(losses_of(workdir)) == 3
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, workdir)
    assert losses_of(workdir) == losses_of(tmp_path / "straight")
    for key in ("params", "queue"):
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # a subprocess: imports, compile and 40 steps (about 25 s of CPU)
def test_queue_config_through_main_learns(tmp_path):
    """`python -m vljax.main` with `loss.name='queue_contrastive'` and `queue` trains and learns:
    the 12 shapes of distinct captions, a batch and a queue of 4 on 4 devices, ALBEF's form
    (`batch_negatives`). BriVL's / MoCo's queue-only form does not learn from random towers in
    40 steps here: the loss settles at log(1 + Q), every embedding alike (measured; the queue's
    negatives get no gradient, so nothing pushes a collapsed start apart)."""
    cfg = tiny_config_file(tmp_path / "tiny.py", tmp_path / "shapes", steps=40, batch=4, lines=[
        "c.loss = dict(name='queue_contrastive', batch_negatives=True)",
        "c.queue = dict(size=4, momentum=0.9)"])
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.75 * first, (first, last)
