"""A non-finite training step: stop at it with a message naming it (`NonFiniteError`), or drop it
and go on (`config.nonfinite`, `NonFiniteGuard`)."""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (config.nonfinite="stop")."""

    def __init__(self, message, step, loss, grad_norm):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class NonFiniteGuard:
    """`config.nonfinite`: "stop" (default) ends the run at the first non-finite step with a
    message naming it and the last finite values; the step dropped its update, so the state is
    the last good one and no checkpoint of it is written (the kept ones stay). "skip" drops such
    updates and goes on; `train/nonfinite` (the fraction of dropped steps) is logged either way."""

    def __init__(self, mode: str):
        if mode not in ("stop", "skip"):
            raise ValueError(f"config key `nonfinite`: {mode!r} is not 'stop' or 'skip'")
        self.mode, self.last_good = mode, None

    def check(self, m, step: int) -> None:
        if m is None or self.mode == "skip":
            return
        loss, grad_norm, bad = (float(m[k]) for k in ("train/loss", "train/grad_norm", "train/nonfinite"))
        if not bad:
            self.last_good = (step, loss, grad_norm)
            return
        last = ("no finite step before it" if self.last_good is None else
                "last finite step {}: loss {:.4g}, grad norm {:.4g}".format(*self.last_good))
        raise NonFiniteError(f"non-finite training at step {step}: loss {loss}, grad norm {grad_norm} "
                             f"({last}). The update was dropped and no checkpoint was written; lower "
                             "`lr`, set `grad_clip_norm`, or `nonfinite='skip'` to drop such steps and go on.",
                             step, loss, grad_norm)
