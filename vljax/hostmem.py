"""Host memory: keep freed blocks in the process so XLA:CPU does not page-fault its buffers each step.

XLA:CPU allocates an executable's temp buffer (activations, gradients, optimizer temporaries) at
every execution and frees it when the execution ends. glibc serves a block that large with `mmap`
and hands it back with `munmap`, so every step maps the buffer anew and page-faults all of it: on
the `base` benchmark step (`experiments/bench_train.py`, 1.6 GB temp buffer) `strace` shows one
1,586,597,888-byte mmap/munmap pair per step, and `getrusage` 390,000 minor faults and 0.8 s of
kernel time in a 3.6 s step on one core. PyTorch does not pay this: its tensors are small enough
for glibc's heap, which reuses them.

Two `mallopt` calls fix it (mallopt(3)):

* `one_arena()`: every thread allocates from glibc's main arena. It only affects threads that have
  not allocated yet, so it must run before JAX starts its CPU client; on its own it changes nothing
  measurable (the large blocks are still mmapped).
* `keep_freed_memory()`: large blocks come from the main heap (no mmap) and stay there when freed (no
  trimming). It can run any time after `one_arena()`. The next step's buffer reuses the same pages: 0
  minor faults and 0.0 s of kernel time per step, 3.6 s -> 2.7 s on that step. (Without the one-arena
  limit, XLA's threads allocate in arenas whose 64 MB heaps cannot hold the buffer, and those fall
  back to mmap whatever the setting.)

The price is host memory: freed blocks stay with the process and the heap fragments. Measured
with `python -m vljax.main` (quiet 2-core machine, runs alternating): the demo-scale `configs/clip.py`
(100 steps and its evaluations, a 449 MB step buffer) takes 74.8-77.3 s against 77.6-89.0 s, 117-120
s of CPU against 129-141 (9-10 s of it in the kernel against 32-35), and peaks at 2.4-3.3 GB RSS
against 1.6 GB; the README's LiT demo (`configs/lit.py`, 500 steps) spends 845 s of CPU against 933
(4.7M minor faults against 47.6M) and peaks at 1.99 GB against 2.03 GB.

Who gets it, `VLJAX_KEEP_HOST_MEMORY`:

* unset (the default): `python -m vljax.main` applies it on a CPU run (`cli_prepare()` before JAX
  starts, `cli_apply()` once the backend is known to be the CPU), not on a machine with an
  accelerator plugin (libtpu, jax_plugins), whose step buffers live on the device. Importing vljax
  as a library (notebooks, tests, your own loop) leaves glibc as it is.
* `1` (true / yes / on): `import vljax` applies both, first thing, in any process.
* `0` (false / no / off): never.

Nothing happens outside Linux/glibc.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ENV = "VLJAX_KEEP_HOST_MEMORY"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
APPLIED = "host memory: freed blocks kept (vljax/hostmem.py)"  # what the CLIs log when it applies


def setting() -> bool | None:
    """`VLJAX_KEEP_HOST_MEMORY`: True (on everywhere), False (never) or None (unset: the CLI on CPU)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value in _ON or value in _OFF:
        return value in _ON
    raise ValueError(f"environment variable {ENV}={os.environ[ENV]!r}: expected 1 or 0 (or unset)")


@functools.cache
def _mallopt():
    """glibc's mallopt, or None (not Linux, or musl, whose mallopt is a stub)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    # mallopt takes an int: without argtypes a Python 2**40 would arrive as 0 ("trim always").
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def _set(*params) -> bool:
    mallopt = _mallopt()
    return mallopt is not None and all(mallopt(p, v) == 1 for p, v in params)


@functools.cache
def one_arena() -> bool:
    """Every thread allocates from the main arena from now on; True when applied. Idempotent."""
    return setting() is not False and _set((M_ARENA_MAX, 1))


@functools.cache
def keep_freed_memory() -> bool:
    """One arena, no mmap, no trimming (-1 is the documented "never"); True when applied. Idempotent.

    Fully effective only when `one_arena()` ran before JAX started its CPU client."""
    return one_arena() and _set((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def accelerator_possible() -> bool:
    """Whether JAX may start a non-CPU backend here: JAX_PLATFORMS names one, or (unset) an
    accelerator plugin is installed (libtpu, a `jax_plugins` module or entry point)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return any(p.strip() != "cpu" for p in platforms.split(","))
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        # Only probed: a namespace package that exists when a CUDA / ROCm plugin is installed (and
        # importing it must not import jax before one_arena()).
        import jax_plugins  # noqa: PLC0415
        if any(pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def cli_prepare() -> bool:
    """`python -m vljax.main`, before JAX starts: the one-arena half when the run may be a CPU run
    and the variable is unset (with it set, `import vljax` has decided). True when applied."""
    return setting() is None and not accelerator_possible() and one_arena()


def cli_apply(backend: str, prepared: bool) -> bool:
    """`python -m vljax.main`, once JAX runs: keeps freed memory on a CPU run that `cli_prepare`
    prepared, or wherever the variable asked for it. True when the setting is in effect."""
    chosen = setting()
    if chosen is None:
        return prepared and backend == "cpu" and keep_freed_memory()
    return chosen and keep_freed_memory()


def at_import() -> bool:
    """`import vljax`: applies the setting first thing when `VLJAX_KEEP_HOST_MEMORY=1`."""
    try:
        return bool(setting()) and keep_freed_memory()
    except ValueError:  # reported where the CLI reads it; an import must not fail on it
        return False
