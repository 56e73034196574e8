"""Model selection on a held-out metric and early stopping (`config.select_metric`,
`early_stop_patience`)."""
from __future__ import annotations

import json

import jax
from etils import epath

from vljax import checkpoints


class Selector:
    """Model selection on a held-out metric (`config.select_metric`, e.g. a val-split retrieval R@1):
    the best evaluation's params go to WORKDIR/best (orbax), its metrics to the final `best/...`
    row; with `early_stop_patience` > 0 training stops after that many evaluations without gain."""

    def __init__(self, workdir, metric, patience):
        self.metric, self.patience = metric, int(patience or 0)
        self.path = epath.Path(workdir) / "best.json"
        self.best = {}
        if metric and self.path.exists():
            self.best = json.loads(self.path.read_text())
        self.bad_evals = self.best.get("bad_evals", 0)
        self.stopped = False
        self._ckpt = checkpoints.Checkpointer(epath.Path(workdir) / "best", max_to_keep=1) if metric else None

    def update(self, step, results, params) -> bool:
        """Records an evaluation; True when training should stop early."""
        if not self.metric:
            return False
        if self.metric not in results:
            raise ValueError(f"config key `select_metric`: {self.metric!r} is not among the evaluation "
                             f"metrics ({', '.join(sorted(k for k in results if not k.startswith('time/')))})")
        value = float(results[self.metric])
        if not self.best or value > self.best["value"]:
            self.best = {"step": int(step), "value": value,
                         "metrics": {k: float(v) for k, v in results.items() if not k.startswith("time/")}}
            self.bad_evals = 0
            self._ckpt.save(step, {"params": params}, {}, force=True)
        else:
            self.bad_evals += 1
        self.best["bad_evals"] = self.bad_evals
        if jax.process_index() == 0:
            self.path.write_text(json.dumps(self.best, indent=1))
        self.stopped = bool(self.patience) and self.bad_evals >= self.patience
        return self.stopped

    def summary(self) -> dict:
        if not self.best:
            return {}
        out = {f"best/{k}": v for k, v in self.best["metrics"].items()}
        out["best/step"] = self.best["step"]
        return out

    def close(self):
        if self._ckpt is not None:
            self._ckpt.close()
