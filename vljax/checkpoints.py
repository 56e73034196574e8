"""Checkpoints of the train state and the data iterator, and a preemption guard.

The train state is one pytree ``{"params", "opt_state", "step", "rng"}``; it is saved with
orbax (every process writes its own shards, so it works multi-host and with sharded params)
as separate items (params, opt_state, meta = step and rng), so each can be read alone, next to
the JSON state of the input pipeline. Typed PRNG keys (``jax.random.key``) cannot be
serialised as such: they are saved as ``jax.random.key_data`` (uint32) and turned back into
keys with ``jax.random.wrap_key_data`` on restore, the key implementation being read from the
abstract state. Restoring onto another mesh only needs an abstract state that carries the new
shardings (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, or arrays already placed).

Typical loop::

    ckpt = Checkpointer(workdir, save_interval_steps=1000)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(abstract_state=abstract_state)
    with PreemptionGuard() as guard:
        for step in range(first_step, total_steps + 1):
            state = train_step(state, batch)
            stop = guard.reached(step)
            ckpt.save(step, state, loader.get_state(), force=stop or step == total_steps)
            if stop:
                break
    ckpt.close()
"""
import contextlib
import gc
import json
import logging
import signal
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PARAMS, OPT_STATE, META, DATA, CHECKSUMS = "params", "opt_state", "meta", "data", "checksums"
TEACHER = "teacher"  # the EMA teacher of self-distillation (vljax/teacher.py), when the state has one
QUEUE = "queue"  # momentum towers and queues of negatives (vljax/momentum.py), when the state has them
ITEMS = (PARAMS, OPT_STATE, META, DATA, CHECKSUMS, TEACHER, QUEUE)
_ARRAY_ITEMS = (PARAMS, OPT_STATE, TEACHER, QUEUE)


class CheckpointError(RuntimeError):
    """No intact checkpoint could be restored (each damaged one was moved aside)."""


# --------------------------------------------------------------------------- integrity


def _leaf_checksum(x) -> int:
    """Sum of the bit patterns of this process's share of a (possibly sharded) array, as uint32
    words mod 2**32; each shard counted once (replica 0)."""
    total = 0
    if _is_key(x):
        x = jax.random.key_data(x)
    shards = [s.data for s in x.addressable_shards if s.replica_id == 0] \
        if isinstance(x, jax.Array) else [x]
    for data in shards:
        a = np.ascontiguousarray(np.asarray(data)).reshape(-1)
        words = a.view({1: np.uint8, 2: np.uint16}.get(a.dtype.itemsize, np.uint32))
        total += int(words.sum(dtype=np.uint64))
    return total


def _checksum_dict(items: dict) -> dict:
    """{leaf path: checksum}: the sum of every leaf's bit patterns (uint32 words, wrapping), exact
    and independent of summation order and sharding, so a restore onto any mesh can recompute it."""
    flat = jax.tree_util.tree_flatten_with_path(items)[0]
    sums = np.asarray([_leaf_checksum(x) % 2**32 for _, x in flat], np.uint64)
    if jax.process_count() > 1:
        sums = multihost_utils.process_allgather(sums).sum(axis=0, dtype=np.uint64)
    return {jax.tree_util.keystr(path): int(v % 2**32) for (path, _), v in zip(flat, sums)}


# --------------------------------------------------------------------------- typed keys


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _key_impl(abstract_key):
    """The PRNG implementation name of a (possibly abstract) typed key array."""
    impl = []

    def data(k):
        impl.append(jax.random.key_impl(k))
        return jax.random.key_data(k)

    data_shape = jax.eval_shape(data, abstract_key)
    return impl[0], data_shape


def _to_saveable(state):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract(x):
    """A restore target: ShapeDtypeStruct with sharding (key data in place of keys)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        raise ValueError(f"abstract_state leaf {x} has no sharding; give every leaf a "
                         f"jax.ShapeDtypeStruct(..., sharding=NamedSharding(mesh, spec))")
    if _is_key(x):
        _, data = _key_impl(x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _from_saved(restored, abstract_state):
    return jax.tree.map(
        lambda x, a: jax.random.wrap_key_data(x, impl=_key_impl(a)[0]) if _is_key(a) else x,
        restored, abstract_state)


# --------------------------------------------------------------------------- data state


def _gather_data_state(data_state):
    """``{process_index: data_state}`` of all processes: orbax writes JSON from process 0 only,
    and each process has its own iterator position."""
    if jax.process_count() == 1:
        return {"0": data_state}
    blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size]))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    return {str(i): json.loads(bytes(blobs[i, :n]).decode()) for i, n in enumerate(sizes)}


class Checkpointer:
    """An ``ocp.CheckpointManager`` whose items can be read alone: "params", "opt_state",
    "meta" (step and rng) and "data" (the JSON state of every process's input pipeline).

    A state is the train-state dict ``{"params", "opt_state", "step", "rng"}`` or any part of it
    (model selection saves params alone); ``restore_params`` reads the params item only, so
    inference needs neither the optimizer nor its config.

    Args:
      workdir: directory of the step folders (created if missing).
      max_to_keep: how many recent checkpoints survive; older ones are deleted.
      save_interval_steps: ``save`` writes only on multiples of it unless ``force=True``.
      async_save: write in a background thread; ``save`` returns once the arrays are copied
        off the devices, so training goes on while files are written. ``wait()`` blocks.
    """

    def __init__(self, workdir, max_to_keep=3, save_interval_steps=1, async_save=True):
        self._interval = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            enable_async_checkpointing=async_save)
        self.directory = epath.Path(workdir)
        if not str(self.directory).startswith(("gs://", "s3://")):
            self.directory = self.directory.absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, step: int, state, data_state=None, force: bool = False) -> bool:
        """Saves ``state`` (any of params / opt_state / step + rng) and the JSON-able
        ``data_state`` at ``step``; True if it saved.

        Without ``force`` only multiples of ``save_interval_steps`` are written (orbax alone
        would also write the first step it sees). Call it on every process.
        """
        step = int(step)
        if not force and step % self._interval:
            return False
        items = {}
        for name in _ARRAY_ITEMS:
            if name in state:
                items[name] = ocp.args.StandardSave(_to_saveable(state[name]))
        meta = {k: state[k] for k in ("step", "rng") if k in state}
        if meta:
            items[META] = ocp.args.StandardSave(_to_saveable(meta))
        if meta or data_state is not None:  # a resumable state: its input position goes with it
            items[DATA] = ocp.args.JsonSave(_gather_data_state(data_state))
        arrays = {name: state[name] for name in _ARRAY_ITEMS if name in state}
        if meta:
            arrays[META] = meta
        items[CHECKSUMS] = ocp.args.JsonSave(_checksum_dict(arrays))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _restore_one(self, step, abstract_items: dict, with_data: bool):
        args = {name: ocp.args.StandardRestore(jax.tree.map(_abstract, tree))
                for name, tree in abstract_items.items()}
        args[CHECKSUMS] = ocp.args.JsonRestore()
        if with_data:
            args[DATA] = ocp.args.JsonRestore()
        with _quiet_background_errors():
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        arrays = {name: out[name] for name in abstract_items}
        if out[CHECKSUMS] is not None:
            saved, got = out[CHECKSUMS], _checksum_dict(arrays)
            bad = sorted(k for k in got if k in saved and saved[k] != got[k])
            if bad:
                raise ValueError(f"checksum mismatch in {len(bad)} arrays, e.g. {bad[0]}")
        return {name: _from_saved(arrays[name], tree) for name, tree in abstract_items.items()}, out

    def _restore(self, step, abstract_items: dict, with_data: bool):
        """Restores `step` (default: the latest intact one). A damaged or incomplete checkpoint
        (unreadable files, checksum mismatch) is named in one log line and moved aside, and the
        previous one is tried; a requested `step` that is damaged is an error."""
        if step is not None:
            try:
                return self._restore_one(step, abstract_items, with_data)
            except Exception as e:  # orbax raises many types for damaged files
                raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be restored: "
                                      f"{_reason(e)}") from None
        if not self.all_steps():
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for candidate in sorted(self.all_steps(), reverse=True):
            try:
                return self._restore_one(candidate, abstract_items, with_data)
            except Exception as e:
                aside = self._move_aside(candidate)
                logging.warning("checkpoint %d in %s is damaged (%s); moved to %s, trying the previous one",
                                candidate, self.directory, _reason(e), aside)
        raise CheckpointError(f"no intact checkpoint in {self.directory} (damaged ones were moved aside "
                              "as <step>.damaged-*)")

    def _move_aside(self, step: int):
        """Renames a step folder to `<step>.damaged-<n>` (kept for inspection, out of rotation)."""
        src = self.directory / str(step)
        n = 0
        while (self.directory / f"{step}.damaged-{n}").exists():
            n += 1
        dst = self.directory / f"{step}.damaged-{n}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vljax_ckpt_aside_{step}")
        self._manager.reload()
        return dst

    def restore(self, step: int | None = None, abstract_state=None):
        """Restores ``(state, data_state)`` at ``step`` (default: the latest).

        ``abstract_state`` is the train state's structure: each leaf gives shape, dtype and the
        sharding to restore onto (a ShapeDtypeStruct with sharding, or an array); every array is
        read straight into its shards.
        """
        if abstract_state is None:
            raise ValueError("restore needs abstract_state: the state's structure, shapes, "
                             "dtypes and target shardings")
        items = {name: abstract_state[name] for name in _ARRAY_ITEMS if name in abstract_state}
        meta = {k: abstract_state[k] for k in ("step", "rng") if k in abstract_state}
        if meta:
            items[META] = meta
        restored, out = self._restore(step, items, with_data=True)
        state = {k: v for k, v in restored.items() if k != META}
        state.update(restored.get(META, {}))
        per_process = out[DATA]
        step = int(jax.device_get(state["step"])) if "step" in state else step
        me = str(jax.process_index())
        if me not in per_process:
            raise ValueError(f"checkpoint {step} holds the data state of {len(per_process)} "
                             f"processes; process {me} has none (the process count changed?)")
        return state, per_process[me]

    def restore_params(self, step: int | None = None, abstract_params=None):
        """Only the params of checkpoint ``step`` (default: the latest), onto the shardings of
        ``abstract_params`` (ShapeDtypeStructs with sharding)."""
        restored, _ = self._restore(step, {PARAMS: abstract_params}, with_data=False)
        return restored[PARAMS]

    def wait(self):
        """Blocks until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reason(e: Exception) -> str:
    """A one-line reason from an orbax / tensorstore error (their messages run over many lines)."""
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def _quiet_background_errors():
    """While a damaged checkpoint is read, orbax's asyncio reads fail in background coroutines
    and threads, each printing a traceback ("Event loop is closed", "Exception ignored in
    <coroutine ...>", and asyncio's "Future exception was never retrieved" logged when a failed
    read's future is collected); the one error that matters is raised in the caller. Mute the others."""
    hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None
    def drop(_record):  # a logging filter that keeps nothing
        return False
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(drop)
    try:
        yield
    finally:
        gc.collect()  # coroutines and futures left unawaited report now, while muted
        asyncio_log.removeFilter(drop)
        sys.unraisablehook, threading.excepthook = hooks


# --------------------------------------------------------------------------- preemption


class PreemptionGuard:
    """Turns SIGTERM (the preemption notice of most schedulers) into a stop flag.

    Single process: a signal handler sets ``should_stop``; ``reached(step)`` returns it.
    Multi-process: every process must stop at the same step for the (collective) save.
    ``jax.distributed`` runs a preemption service that owns SIGTERM and agrees on that step,
    so ``reached(step)`` asks ``multihost_utils.reached_preemption_sync_point(step)`` and no
    Python handler is installed for SIGTERM. Where that service is off, the handler is
    installed and ``reached`` ORs the flag over processes (a tiny all-gather per call).
    Either way, call ``reached`` on every process at every step with the same step.

    Args:
      catch_sigint: also turn the first Ctrl-C into a stop (a second one interrupts).
    """

    def __init__(self, catch_sigint: bool = False):
        self._flag = False
        self._previous = {}
        self._jax_sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        signals = [] if self._jax_sync else [signal.SIGTERM]
        if catch_sigint:
            signals.append(signal.SIGINT)
        for sig in signals:
            self._install(sig)

    def _install(self, sig):
        try:
            self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            logging.warning("PreemptionGuard: cannot install a %s handler outside the main "
                            "thread; preemption will not be detected", signal.Signals(sig).name)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self._flag:
            raise KeyboardInterrupt
        logging.warning("PreemptionGuard: got %s, stopping at the next step",
                        signal.Signals(signum).name)
        self._flag = True

    @property
    def should_stop(self) -> bool:
        """True once a stop signal arrived here (or the processes agreed to stop)."""
        return self._flag

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``; the same answer on every process."""
        if jax.process_count() == 1:
            return self._flag
        if self._jax_sync:
            try:
                self._flag |= multihost_utils.reached_preemption_sync_point(int(step))
                return self._flag
            except RuntimeError:  # the service was not started: fall back to our handler
                self._jax_sync = False
                self._install(signal.SIGTERM)
        flags = multihost_utils.process_allgather(np.array(self._flag))
        self._flag = bool(np.any(flags))
        return self._flag

    def restore(self):
        """Puts back the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
