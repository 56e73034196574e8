"""What a run prints: one line per phase, progress bars on long phases, quiet third-party logs.

    from vljax import logs
    logs.setup(verbose=False)                      # entry points (main, evaluate, inference) once
    with logs.phase("feature cache", records=n):   # one line when it ends: "feature cache: 93.1 s (records 9395)"
        for batch in logs.progress(batches, desc="feature cache", total=len(batches)):
            ...

orbax, tfds, grain and vljax's own `absl.logging.info` lines log through absl at INFO; by default
`setup` raises absl's threshold to WARNING, so a run shows warnings, errors, the phase lines and
the progress bars. `--verbosity=0` (absl's own flag, INFO) or higher brings the INFO lines back.
Phase lines and bars are written by process 0 only (every process would repeat them), to stderr.
In a notebook kernel the bars are notebook widgets (tqdm.auto) when ipywidgets is installed.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

from absl import logging as absl_logging
from tqdm import tqdm

_LOGGER = logging.getLogger("vljax")
# Python loggers of libraries that do not go through absl (or may log before absl is set up).
_THIRD_PARTY = ("absl", "orbax", "tensorflow_datasets", "grain", "jax", "etils", "array_record")


def _is_main_process() -> bool:
    if "jax" not in sys.modules:  # nothing multi-process can have started without jax
        return True
    # Imported here, never at the top: `python -m vljax.main` imports this module before
    # hostmem.cli_prepare(), which must run before jax is imported (importing jax starts a thread).
    import jax  # noqa: PLC0415
    try:
        return jax.process_index() == 0
    except RuntimeError:  # backends not initialised yet
        return True


def _handler() -> logging.Handler:
    h = logging.StreamHandler()  # sys.stderr at creation: in a notebook, the kernel's stream
    h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    return h


def setup(verbose: bool = False) -> None:
    """Phase lines on; third-party INFO logs off unless `verbose` (call once per entry point)."""
    if not _LOGGER.handlers:
        _LOGGER.addHandler(_handler())
        _LOGGER.propagate = False  # absl's root handler would print each line a second time
    _LOGGER.setLevel(logging.INFO)
    if verbose:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def info(msg: str, *args) -> None:
    """One line (process 0): what a user should see whatever the verbosity."""
    if _is_main_process():
        if not _LOGGER.handlers:
            setup(verbose=True)  # a library call outside an entry point: do not touch others' loggers
        _LOGGER.info(msg, *args)


@contextlib.contextmanager
def phase(name: str, **details):
    """Times a block and logs one line when it ends: "name: 12.3 s (k v, ...)".

    `details` may be updated inside the block (the yielded dict), e.g. with counts found on the way.
    A block that raises logs nothing: its error says what happened.
    """
    t0 = time.perf_counter()
    yield details
    extra = ", ".join(f"{k} {v}" for k, v in details.items())
    info("%s: %.1f s%s", name, time.perf_counter() - t0, f" ({extra})" if extra else "")


def _tqdm_class():
    # IPython and ipywidgets are optional (notebooks only, not vljax dependencies): imported on use.
    try:
        from IPython import get_ipython  # noqa: PLC0415
        kernel = get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except ImportError:
        kernel = False
    if kernel:
        try:
            import ipywidgets  # noqa: F401, PLC0415  tqdm.notebook needs it and raises without it
            from tqdm.notebook import tqdm as notebook_tqdm  # noqa: PLC0415
            return notebook_tqdm
        except ImportError:
            pass
    return tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, **kwargs):
    """A tqdm progress bar over `iterable` (or a manual one: `bar.update(n)`) on process 0;
    elsewhere, or with `enabled=False`, the same object silently does nothing."""
    cls = _tqdm_class()
    kwargs.setdefault("leave", True)
    return cls(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True,
               disable=not (enabled and _is_main_process()), **kwargs)
