"""Where metrics go: JSONL (one object per line), TensorBoard event files and PNG curves.

Only process 0 writes; every process may call the writer (the others are no-ops), so the trainer
stays free of `if jax.process_index() == 0` branches. Paths go through `etils.epath`: a workdir
may be local or remote (gs://...); object stores cannot append, so there the JSONL file is
rewritten whole at each write (it stays small: one line per logging step).
"""
from __future__ import annotations

import io
import json
import math
import sys
from collections import defaultdict

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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
        self.workdir = epath.Path(workdir)
        self.enabled = enabled
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._lines = None  # all lines, kept for stores that cannot append
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not _can_append(self.path):
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        if resume_step is not None and self.path.exists():
            kept = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(kept))
            if self._lines is not None:
                self._lines = kept
        if tensorboard:
            self._tb = _summary_writer_class()(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": int(step)}
        for name, value in sorted(metrics.items()):
            row[name] = _to_float(value)
        line = json.dumps(row) + "\n"
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        if self._tb is not None:
            for name, value in row.items():
                if name != "step" and math.isfinite(value):
                    self._tb.add_scalar(name, value, global_step=row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _can_append(path: epath.Path) -> bool:
    return "://" not in str(path)  # local files append; object stores (gs://, s3://) cannot


def _summary_writer_class():
    """tensorboardX's SummaryWriter (writes gs:// itself, through google-cloud-storage).

    Imported here: its 0.6 s (protobuf) is paid only by runs that ask for TensorBoard. And imported
    with `torch` hidden when torch is installed but not imported: tensorboardX imports it (2-3 s
    on a 2-core CPU) only to accept torch tensors (tensorboardX/writer.py `numpy_compatible`, an
    optional import), and vljax writes floats. A later `import torch` is unaffected."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError: tensorboardX's no-torch path
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def read_metrics(path) -> list[dict]:
    """Reads a metrics.jsonl file; a malformed line is an error naming the file and line number."""
    rows = []
    with epath.Path(path).open() as f:
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
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
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
    fig = Figure(figsize=(9, 2.8 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)
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
    out = epath.Path(workdir) / out_name
    save_figure(fig, out, dpi=90)
    return str(out)


def save_figure(fig, path, **kwargs) -> None:
    """`fig.savefig` to any epath path (local or remote), creating its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    path.write_bytes(buf.getvalue())
