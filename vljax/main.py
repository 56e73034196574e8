r"""Entry point: `python -m vljax.main --config=configs/lit.py --workdir=DIR`.

Overrides: `--config.total_steps=100`, `--config.input.batch_size=64`; a config argument after a
colon (`--config=configs/lit.py:steps=50`) is passed to the config file's `get_config(arg)`.
`--mode=eval` evaluates the latest checkpoint of an existing workdir without training.
Output: one line per phase and progress bars; `--verbosity=0` adds the INFO logs of vljax and its
libraries (orbax, tfds, grain), `--verbosity=1` debug logs.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vljax import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for multi-process runs (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    config = _CONFIG.value
    # Validate before anything heavy (device start-up, data, weights) runs or is written.
    from vljax import config_check
    try:
        config_check.validate(config)
    except ValueError as e:
        raise SystemExit(f"{config_flags.get_config_filename(flags.FLAGS['config'])}: {e}") from None

    import jax
    if _COORDINATOR.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    logs.info("JAX %s, %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
              jax.device_count(), jax.devices()[0].device_kind)

    from vljax import train
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    with logs.phase(_MODE.value, outputs=workdir):
        if _MODE.value == "train":
            train.train_and_evaluate(config, workdir)
        else:
            train.evaluate_workdir(config, workdir)


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
