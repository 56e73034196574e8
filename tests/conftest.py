"""Test set-up: 8 simulated CPU devices (set before jax is imported), one compilation cache for the
session, and shared fixtures."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Many tests build the same programs (a tiny config's init and step, evaluated towers) in
    # fresh jit objects, several times per file and across files: JAX's persistent cache compiles
    # each once per test session. A fresh directory, made by the first process (the xdist
    # controller, before it starts the workers, which inherit it, as do the CLI tests' subprocesses),
    # so no result depends on an earlier run. Compilations are still counted (and logged) on a hit.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vljax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# grain worker processes (input.num_workers / eval_workers > 0) read absl flags: parsed once here,
# as absl.app.run parses them for the entry points (library code never marks them parsed).
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def n_devices():
    return len(jax.devices())
