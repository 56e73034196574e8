"""Checkpoints of the train state and the data iterator, and a preemption guard.

The train state is one pytree ``{"params", "opt_state", "step", "rng"}``; it is saved with
orbax (every process writes its own shards, so it works multi-host and with sharded params)
next to the JSON state of the input pipeline. Typed PRNG keys (``jax.random.key``) cannot be
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
import json
import logging
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE, DATA = "state", "data"


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
    """An ``ocp.CheckpointManager`` with two items: "state" (arrays) and "data" (JSON).

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
        self._manager = ocp.CheckpointManager(os.path.abspath(os.fspath(workdir)),
                                              options=options, item_names=(STATE, DATA))

    def save(self, step: int, state, data_state=None, force: bool = False) -> bool:
        """Saves ``state`` and the JSON-able ``data_state`` at ``step``; True if it saved.

        Without ``force`` only multiples of ``save_interval_steps`` are written (orbax alone
        would also write the first step it sees). Call it on every process.
        """
        step = int(step)
        if not force and step % self._interval:
            return False
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(_to_saveable(state)),
            DATA: ocp.args.JsonSave(_gather_data_state(data_state)),
        })
        return self._manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int | None = None, abstract_state=None):
        """Restores ``(state, data_state)`` at ``step`` (default: the latest).

        ``abstract_state`` has the structure of the saved state; each leaf gives shape, dtype
        and the sharding to restore onto (a ShapeDtypeStruct with sharding, or an array).
        """
        if abstract_state is None:
            raise ValueError("restore needs abstract_state: the state's structure, shapes, "
                             "dtypes and target shardings")
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
        target = jax.tree.map(_abstract, abstract_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target),
            DATA: ocp.args.JsonRestore(),
        }))
        per_process = out[DATA]
        me = str(jax.process_index())
        if me not in per_process:
            raise ValueError(f"checkpoint {step} holds the data state of {len(per_process)} "
                             f"processes; process {me} has none (the process count changed?)")
        return _from_saved(out[STATE], abstract_state), per_process[me]

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
