"""vljax.hostmem: XLA:CPU's per-execution temp buffer is not page-faulted again at every call."""
import os
import subprocess
import sys
import textwrap

import pytest

# A jitted function whose temp buffer (four 64 MB intermediates) is far above glibc's mmap
# threshold; the minor page faults of its later calls are counted in a fresh process.
_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    import vljax
    from vljax import hostmem

    f = jax.jit(lambda x: jnp.sin(x @ x + 1.0) @ jnp.cos(x) + jnp.exp(-x))
    x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
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
    # faults in every 4 KiB page of them (>= 16k pages for one 64 MB buffer). On: the freed heap
    # blocks are reused (an occasional call still extends the heap when the blocks' order left no
    # hole large enough, hence the median).
    assert faults_off > 16_000, faults_off
    assert faults < 0.05 * faults_off, (faults, faults_off)

