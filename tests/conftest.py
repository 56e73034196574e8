"""Test set-up: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
