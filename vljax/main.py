r"""Entry point: `python -m vljax.main --config=configs/lit.py --workdir=DIR`.

Overrides: `--config.total_steps=100`, `--config.input.batch_size=64`; a config argument after a
colon (`--config=configs/lit.py:steps=50`) is passed to the config file's `get_config(arg)`.
`--mode=eval` evaluates the latest checkpoint of an existing workdir without training.
Output: one line per phase and progress bars; `--verbosity=0` adds the INFO logs of vljax and its
libraries (orbax, tfds, grain), `--verbosity=1` debug logs.
On a CPU run, glibc keeps freed host memory so that XLA:CPU's step buffers are reused, not
page-faulted anew every step (vljax/hostmem.py; `VLJAX_KEEP_HOST_MEMORY=0` turns it off).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vljax import hostmem, logs

# Only absl, ml_collections, hostmem and logs are imported above: everything that imports jax
# (config_check, train, checkpoints, jax itself) is imported inside main() after
# hostmem.cli_prepare(), whose one-arena limit reaches only threads that have not allocated yet
# (importing jax starts one).

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for multi-process runs you launch yourself "
    "(jax.distributed); on TPU pods, SLURM and Open MPI the cluster is detected without it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    try:
        keep_host = hostmem.cli_prepare()  # before JAX starts its CPU client
    except ValueError as e:
        raise SystemExit(f"vljax.main: {e}") from None
    config = _CONFIG.value
    # Validate before anything heavy (device start-up, data, weights) runs or is written.
    from vljax import config_check  # noqa: PLC0415  (after cli_prepare, see the top)
    try:
        config_check.validate(config)
    except ValueError as e:
        raise SystemExit(f"{config_flags.get_config_filename(flags.FLAGS['config'])}: {e}") from None

    import jax  # noqa: PLC0415  (after cli_prepare, see the top)
    init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    keep_host = hostmem.cli_apply(jax.default_backend(), keep_host)
    logs.info("JAX %s, %d process(es), %d device(s): %s%s", jax.__version__, jax.process_count(),
              jax.device_count(), jax.devices()[0].device_kind,
              f"; {hostmem.APPLIED}" if keep_host else "")

    from vljax import checkpoints, nonfinite, train  # noqa: PLC0415  (after cli_prepare, see the top)
    workdir = _WORKDIR.value
    if "://" not in workdir:  # gs://... stays as it is
        workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        with logs.phase(_MODE.value, outputs=workdir):
            if _MODE.value == "train":
                train.train_and_evaluate(config, workdir)
            else:
                train.evaluate_workdir(config, workdir)
    except (nonfinite.NonFiniteError, checkpoints.CheckpointError) as e:
        raise SystemExit(f"vljax.main: {e}") from None


def init_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
    """Starts jax.distributed: explicitly with --coordinator (several processes on one machine,
    or hosts you list yourself), otherwise by JAX's cluster auto-detection (Cloud TPU pod
    slices, SLURM, Open MPI, Kubernetes JobSets), so that the same command run on every host of a
    pod joins one job. On a machine in no cluster it is a single-process run."""
    import jax  # noqa: PLC0415  (after cli_prepare, see the top)
    if coordinator:
        # Collectives between CPU devices of several processes (tests, CPU clusters); no effect
        # on accelerators.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return
    if num_processes or process_id is not None:
        raise app.UsageError("--num_processes / --process_id need --coordinator=host:port")
    try:
        jax.distributed.initialize()
    except ValueError as e:  # no cluster environment detected: a single-process run
        if "coordinator" not in str(e).lower():
            raise


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
