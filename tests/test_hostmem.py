"""vljax.hostmem: XLA:CPU's per-execution temp buffer is reused, not page-faulted again at every call,
where the setting applies (`python -m vljax.main` on CPU, or VLJAX_KEEP_HOST_MEMORY=1 anywhere);
importing vljax as a library leaves glibc as it is."""
import os
import subprocess
import sys
import textwrap

import pytest

from vljax import hostmem

# A jitted function whose temp buffer (a 64 MB intermediate, [16384, 1024] float32) is far above
# glibc's mmap threshold; the minor page faults of its later calls are counted in a fresh process.
# `cli` follows vljax.main's order: the one-arena half before JAX starts, the rest once the
# backend is known and a few calls have run (they must not have committed XLA's threads to arenas).
# With the setting, the heap grows to its working size over the first calls (a call that finds no
# free hole large enough, when a small block took part of the last one, extends the heap and
# faults in the new pages; more often on a loaded machine): 10 calls settle it, 20 are counted.
_PROBE = textwrap.dedent("""
    import resource, sys
    import vljax
    from vljax import hostmem
    cli = sys.argv[1] == "cli"
    prepared = hostmem.cli_prepare() if cli else False
    import jax, jax.numpy as jnp

    w = jnp.full((64, 1024), 1e-2, jnp.float32)
    f = jax.jit(lambda x: jnp.sin(x @ w) @ w.T)
    x = jnp.ones((16384, 64), jnp.float32)
    for _ in range(3):
        f(x).block_until_ready()
    applied = hostmem.cli_apply(jax.default_backend(), prepared) if cli else hostmem.at_import()
    faults = []
    for _ in range(30):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print(int(applied), sum(faults[10:]))
""")


def _probe(keep: str | None, path: str = "import") -> tuple[int, int]:
    """(applied, minor faults of 20 calls once settled) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in (hostmem.ENV, "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="", **({hostmem.ENV: keep} if keep else {}))
    out = subprocess.run([sys.executable, "-c", _PROBE, path], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    return int(applied), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.skipif(hostmem.accelerator_possible(), reason="the CLI applies it on CPU-only machines")
@pytest.mark.slow  # subprocesses allocating large XLA buffers (~27 s): the default run's budget
def test_large_xla_buffers_are_reused_without_page_faults_where_the_setting_applies():
    # The library default: glibc untouched, so each call maps its temp buffers anew and faults in
    # every 4 KiB page of them (64 MB = 16,384 pages a call; 20 calls, half of the pages at least).
    applied_off, faults_off = _probe(None)
    assert applied_off == 0 and faults_off > 20 * 8_000, faults_off
    # VLJAX_KEEP_HOST_MEMORY=1 at import, and the CLI's own order with the variable unset: the
    # freed heap blocks are reused. Measured on a 2-core machine, settled calls fault in 0 or 1
    # of 20 (idle), and the unsettled first 10 in 1 to 5 with the other core busy: at most a
    # quarter of the calls may still grow the heap.
    for keep, path in (("1", "import"), (None, "cli")):
        applied, faults = _probe(keep, path)
        assert applied == 1 and faults < 0.25 * faults_off, (keep, path, faults, faults_off)
    # VLJAX_KEEP_HOST_MEMORY=0 turns the CLI's default off.
    applied, faults = _probe("0", "cli")
    assert applied == 0 and faults > 20 * 8_000, faults


def test_the_variable_is_read_strictly(monkeypatch):
    for value, expected in (("1", True), ("on", True), ("0", False), ("No", False), ("", None)):
        monkeypatch.setenv(hostmem.ENV, value)
        assert hostmem.setting() is expected
    monkeypatch.setenv(hostmem.ENV, "sometimes")
    with pytest.raises(ValueError, match="VLJAX_KEEP_HOST_MEMORY='sometimes'"):
        hostmem.setting()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not hostmem.accelerator_possible()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert hostmem.accelerator_possible()
