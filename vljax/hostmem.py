"""Host memory: keep freed blocks in the process so XLA:CPU does not page-fault its buffers each step.

XLA:CPU allocates an executable's temp buffer (activations, gradients, optimizer temporaries) at
every execution and frees it when the execution ends. glibc serves a block that large with `mmap`
and hands it back with `munmap`, so every step maps the buffer anew and page-faults all of it: on
the `base` benchmark step (`experiments/bench_train.py`, 1.6 GB temp buffer) `strace` shows one
1,586,597,888-byte mmap/munmap pair per step, and `getrusage` 390,000 minor faults and 0.8 s of
kernel time in a 3.6 s step on one core. PyTorch does not pay this: its tensors are small enough
for glibc's heap, which reuses them.

`keep_freed_memory()` sets glibc's malloc so that large blocks come from the heap and stay there
when freed (`mallopt`: one arena, no mmap, no trimming; see mallopt(3)). The next step's buffer
reuses the same pages: 0 minor faults and 0.0 s of kernel time per step, 3.6 s -> 2.7 s on that
step.

The price is host memory. Freed blocks stay with the process, and with one arena and no mmap
the heap fragments: the demo-scale `configs/clip.py` run (100 steps with its evaluations) peaks at
3.7 GB RSS with it against 1.7 GB without, and is no faster (72 vs 70 s: its buffers are small
enough for glibc's own reuse). So it is opt-in: set `VLJAX_KEEP_HOST_MEMORY=1` for CPU runs whose
steps need large buffers (the `base` benchmark, big models on CPU), as TPU VMs preload tcmalloc.

It only affects threads that have not yet allocated, so it must run before JAX starts its CPU
client: `import vljax` calls it, first thing, when the variable is set. It does nothing outside
Linux/glibc.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ENV = "VLJAX_KEEP_HOST_MEMORY"


@functools.cache
def keep_freed_memory() -> bool:
    """Configures glibc's malloc to keep freed memory for reuse; True when it was applied.

    Idempotent. Applied only when `VLJAX_KEEP_HOST_MEMORY=1` (or true / yes / on), on Linux with
    glibc.
    """
    if os.environ.get(ENV, "0").strip().lower() not in ("1", "true", "yes", "on") \
            or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a stub
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 disables trimming (mallopt(3)); one arena, so that every thread's large blocks come from
    # the main heap, which (unlike the other arenas' 64 MB heaps) can grow.
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
