"""Evaluation plots written as PNG files.

Uses matplotlib's object API with the Agg canvas, not pyplot: no global figure state, no
display needed, safe to call from the trainer's evaluation thread.
"""
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vljax.metrics import save_figure

# Above this many classes tick labels are unreadable; the matrix is still drawn.
_MAX_LABELLED_CLASSES = 40


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str,
                          *, normalize: bool = True, title: str | None = None) -> str:
    """Writes the confusion matrix `confusion` [C, C] (rows true, columns predicted) to `path`.

    Args:
      normalize: show each row as fractions of its true class (rows without images stay 0).
    Returns:
      `path`.
    """
    cm = np.asarray(confusion, np.float64)
    if normalize:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1.0)
    num = len(cm)
    side = min(4.0 + 0.3 * num, 16.0)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if num <= _MAX_LABELLED_CLASSES:
        ax.set_xticks(range(num), labels=class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(num), labels=class_names, fontsize=8)
        if num <= 15:  # cell values stay legible on small matrices
            for i in range(num):
                for j in range(num):
                    ax.text(j, i, f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}",
                            ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 * cm.max() else "black")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path
