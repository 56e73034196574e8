"""vljax.hostmem: with VLJAX_KEEP_HOST_MEMORY=1, XLA:CPU's per-execution temp buffer is reused,
not page-faulted again at every call; without it (the default), glibc is left as it is."""
import os
import subprocess
import sys
import textwrap

import pytest

# A jitted function whose temp buffer (a 64 MB intermediate, [16384, 1024] float32) is far above
# glibc's mmap threshold; the minor page faults of its later calls are counted in a fresh process.
_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    import vljax
    from vljax import hostmem

    w = jnp.full((64, 1024), 1e-2, jnp.float32)
    f = jax.jit(lambda x: jnp.sin(x @ w) @ w.T)
    x = jnp.ones((16384, 64), jnp.float32)
    faults = []
    for _ in range(13):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    faults = sorted(faults[3:])
    print(int(hostmem.keep_freed_memory()), faults[len(faults) // 2])
""")


def _probe(keep: str | None) -> tuple[int, float]:
    """(applied, median minor faults of a call) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "VLJAX_KEEP_HOST_MEMORY"}
    env.update(XLA_FLAGS="", **({"VLJAX_KEEP_HOST_MEMORY": keep} if keep else {}))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    return int(applied), float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_large_xla_buffers_are_reused_without_page_faults():
    applied, faults = _probe("1")
    applied_off, faults_off = _probe(None)  # the default: off
    assert (applied, applied_off) == (1, 0)
    # The median call after three warm-up calls. Off: each call maps its temp buffers anew and
    # faults in every 4 KiB page of them. On: the freed heap
    # blocks are reused (an occasional call still extends the heap when the blocks' order left no
    # hole large enough, hence the median).
    assert faults_off > 8_000, faults_off  # 64 MB = 16,384 pages; half of them at least
    assert faults < 0.05 * faults_off, (faults, faults_off)

