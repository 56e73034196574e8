"""Where metrics go: JSONL (one object per line), TensorBoard event files and PNG curves.

Only process 0 writes; every process may call the writer (the others are no-ops), so the trainer
stays free of `if jax.process_index() == 0` branches.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import numpy as np


def _to_float(value):
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {value.shape}")
    return float(value.reshape(()))


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to WORKDIR/metrics.jsonl and TensorBoard scalars.

    A resumed run re-opens the same files: JSONL lines from steps after the resume point are dropped
    first, so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": int(step)}
        for name, value in sorted(metrics.items()):
            row[name] = _to_float(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for name, value in row.items():
                if name != "step" and math.isfinite(value):
                    self._tb.add_scalar(name, value, global_step=row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> list[dict]:
    """Reads a metrics.jsonl file; a malformed line is an error naming the file and line number."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
    return rows


# (panel title, predicate over metric names); a metric goes to the first panel that takes it.
_PANELS = (
    ("training loss", lambda n: n == "train/loss"),
    ("zero-shot top-1", lambda n: n.startswith(("zeroshot/", "gzsl/")) and n.endswith(("/top1", "/harmonic"))),
    ("retrieval R@1", lambda n: n.startswith("retrieval/") and n.endswith("_r1")),
    ("retrieval R@5", lambda n: n.startswith("retrieval/") and n.endswith("_r5")),
    ("multi-label mAP / few-shot", lambda n: n.endswith("/mAP") or (n.startswith("fewshot/") and n.endswith("shot"))),
)


def plot_curves(workdir: str, out_name: str = "curves.png") -> str | None:
    """Plots the headline metrics of metrics.jsonl against step, one panel per kind."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: ([], []))
    for row in read_metrics(path):
        for name, value in row.items():
            if name != "step" and not name.startswith("best/"):
                series[name][0].append(row["step"])
                series[name][1].append(value)
    panels = [(title, sorted(n for n in series if take(n))) for title, take in _PANELS]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], panels):
        for name in names:
            xs, ys = series[name]
            label = name.split("/", 1)[-1] if "/" in name else name
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = os.path.join(workdir, out_name)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
