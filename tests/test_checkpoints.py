"""Checkpoint round trips (also onto another mesh), retention, async saves, preemption."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vljax import optim, sharding
from vljax.checkpoints import Checkpointer, PreemptionGuard

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")

RULES = [(".*/bias", "replicate"), (".*", "fsdp")]


def make_state(mesh, seed=0):
    """A train state with a locked tower (MaskedNode / EmptyState nodes in opt_state)."""
    rng = np.random.default_rng(seed)
    params = {"img": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                                  "bias": jnp.zeros(16)}},
              "txt": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
                                  "bias": jnp.ones(8)}},
              "t": jnp.float32(2.3)}
    cfg = ml_collections.ConfigDict(dict(
        lr=1e-3, total_steps=10, optax=dict(name="adamw"), grad_accum_steps=2,
        schedule=[("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=2))]))
    tx, _, _ = optim.make_optimizer(cfg, params)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and counters
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(seed + 1),
             "rng": jax.random.key(seed)}
    return jax.device_put(state, sharding.state_shardings(state, mesh, RULES))


def abstract(state, mesh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, sharding.state_shardings(state, mesh, RULES))


def assert_states_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert jax.dtypes.issubdtype(b["rng"].dtype, jax.dtypes.prng_key)
    a = dict(a, rng=jax.random.key_data(a["rng"]))
    b = dict(b, rng=jax.random.key_data(b["rng"]))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture
def mesh8():
    return sharding.make_mesh([("data", -1)])


def test_round_trip(tmp_path, mesh8):
    state = make_state(mesh8)
    data_state = {"next_index": 17, "epoch": 1, "seed": [1, 2]}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, data_state)
        restored, restored_data = ckpt.restore(abstract_state=abstract(state, mesh8))
    assert_states_equal(state, restored)
    assert restored_data == data_state
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)),
                                  jax.random.normal(state["rng"], (3,)))


def test_max_to_keep_and_interval(tmp_path, mesh8):
    state = make_state(mesh8)
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2, async_save=False) as ckpt:
        saved = [ckpt.save(step, state, {"step": step}) for step in range(1, 7)]
        assert saved == [False, True, False, True, False, True]
        assert ckpt.save(7, state, {"step": 7}, force=True)
        assert ckpt.all_steps() == [6, 7]
        _, data = ckpt.restore(4 + 2, abstract_state=abstract(state, mesh8))
    assert data == {"step": 6}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_restore_onto_another_mesh(tmp_path, mesh8):
    state = make_state(mesh8, seed=3)
    mesh42 = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    target = abstract(state, mesh42)
    kernel = target["params"]["img"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # differs from mesh8
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, None)
        restored, data = ckpt.restore(abstract_state=target)
    assert data is None
    assert_states_equal(state, restored)
    got = jax.tree.map(lambda x: x.sharding, restored)
    want = jax.tree.map(lambda x: x.sharding, target)
    assert got == want
    assert restored["params"]["img"]["Dense_0"]["kernel"].addressable_shards[0].data.shape == (8, 8)


def test_async_save_then_wait(tmp_path, mesh8):
    state = make_state(mesh8)
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(3, state, {"i": 3})
    ckpt.wait()
    assert (tmp_path / "3" / "params").is_dir() and (tmp_path / "3" / "opt_state").is_dir()
    assert ckpt.latest_step() == 3
    restored, data = ckpt.restore(3, abstract_state=abstract(state, mesh8))
    ckpt.close()
    assert_states_equal(state, restored)
    assert data == {"i": 3}


def test_restore_without_checkpoint_is_a_clear_error(tmp_path, mesh8):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(abstract_state=abstract(make_state(mesh8), mesh8))


def wait_for(predicate, timeout=5.0):
    """Python runs signal handlers between bytecodes of the main thread: poll briefly."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_sigterm_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop and not guard.reached(10)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: guard.should_stop)
        assert guard.reached(11)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored on exit


def test_sigint_is_caught_only_when_asked():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGINT) is before
    with PreemptionGuard(catch_sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_for(lambda: guard.should_stop)
    assert signal.getsignal(signal.SIGINT) is before


# Runs in each of 2 processes x 4 CPU devices (jax.distributed must start before any backend).
WORKER = r'''
import json, os, signal, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vljax import sharding
from vljax.checkpoints import Checkpointer, PreemptionGuard

mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
batch = sharding.shard_batch({"x": np.full((4, 2), pid, np.float32)}, mesh)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(batch["x"])
state = {"params": {"w": jnp.arange(16.0).reshape(8, 2)}, "step": jnp.int32(1),
         "rng": jax.random.key(0)}
shardings = sharding.state_shardings(state, mesh, [(".*", "fsdp")])
state = jax.jit(lambda s: s, out_shardings=shardings)(state)
target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
with Checkpointer(workdir) as ckpt:
    ckpt.save(1, state, {"pos": 10 + pid})
    ckpt.wait()
    restored, data = ckpt.restore(abstract_state=target)
w = restored["params"]["w"]
w_ok = all(np.array_equal(s.data, np.arange(16.0).reshape(8, 2)[s.index])
           for s in w.addressable_shards)
stop_at = None
with PreemptionGuard() as guard:
    for step in range(300):
        if pid == 0 and step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # only process 0 is told
        if guard.reached(step):
            stop_at = step
            break
        time.sleep(0.02)
print("RESULT", json.dumps(dict(sum=float(total), data=data, w_ok=w_ok, stop_at=stop_at)))
'''


@pytest.mark.slow
def test_two_processes(tmp_path):
    """Multi-host paths: global batch, per-process data state, agreed preemption step."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, str(tmp_path / "ck")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    results = []
    for out in outs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out[-3000:]
        results.append(json.loads(lines[0][len("RESULT "):]))
    for pid, r in enumerate(results):
        assert r["sum"] == 8.0                   # 4 rows of zeros + 4 rows of ones, 2 columns
        assert r["data"] == {"pos": 10 + pid}    # each process gets its own iterator state
        assert r["w_ok"]
    assert results[0]["stop_at"] is not None and results[0]["stop_at"] >= 5
    assert results[0]["stop_at"] == results[1]["stop_at"]  # both save at the same step


# -- integrity ---------------------------------------------------------------------------------


def _two_checkpoints(tmp_path, mesh8):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(mesh8, seed=0), {"i": 1}, force=True)
        ckpt.save(2, make_state(mesh8, seed=1), {"i": 2}, force=True)
    return make_state(mesh8, seed=0)


def _truncate_largest(folder):
    """Cuts the array data files of a checkpoint item in half (an interrupted copy)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if "/d/" in os.path.join(r, f)]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def test_damaged_latest_is_moved_aside_and_the_previous_restored(tmp_path, mesh8, caplog, capfd):
    first = _two_checkpoints(tmp_path, mesh8)
    _truncate_largest(tmp_path / "2" / "params")
    with Checkpointer(tmp_path) as ckpt, caplog.at_level("WARNING"):
        state, data = ckpt.restore(abstract_state=abstract(first, mesh8))
        assert ckpt.all_steps() == [1]
    assert_states_equal(first, state)
    assert data == {"i": 1}
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged-0"]  # kept for inspection, out of rotation
    # (the tmp path itself says "damaged": count the records that name the checkpoint, from any logger)
    assert not [r for r in caplog.records if r.name == "asyncio"]  # background read failures muted
    damaged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint 2 in")]
    assert len(damaged) == 1 and "checkpoint 2" in damaged[0] and "\n" not in damaged[0]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_checksum_mismatch_is_detected(tmp_path, mesh8):
    first = _two_checkpoints(tmp_path, mesh8)
    path = tmp_path / "2" / "checksums" / "metadata"
    sums = json.loads(path.read_text())
    key = next(k for k in sums if "kernel" in k)
    sums[key] = (sums[key] + 1) % 2**32  # as if a bit of that array had flipped on disk
    path.write_text(json.dumps(sums))
    with Checkpointer(tmp_path) as ckpt:
        state, _ = ckpt.restore(abstract_state=abstract(first, mesh8))
    assert_states_equal(first, state)
    assert "2.damaged-0" in os.listdir(tmp_path)


def test_no_intact_checkpoint_is_one_clear_error(tmp_path, mesh8):
    from vljax.checkpoints import CheckpointError
    first = _two_checkpoints(tmp_path, mesh8)
    for step in ("1", "2"):
        _truncate_largest(tmp_path / step / "params")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.restore(abstract_state=abstract(first, mesh8))
