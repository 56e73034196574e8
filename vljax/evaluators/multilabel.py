"""Zero-shot multi-label classification: each image is scored against every label's prompt
embedding; no threshold is learned, so the metrics are ranking metrics.

  mAP: mean over labels with at least one positive image of the average precision of the
    ranking of all images by that label's score. AP = (1/P) sum over the P positive images of
    precision at the positive's rank (the standard, non-interpolated definition). Ties are
    ranked by image index (lower first), so a result never depends on sort internals; note
    that scikit-learn instead groups tied scores into one threshold.
  precision@k / recall@k / F1@k, micro-averaged: the top-k labels of each image are its
    predictions; with TP the total number of correct predictions over all images,
    P@k = TP / (N k), R@k = TP / (number of true labels), F1@k = 2 P R / (P + R).
"""
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base
from vljax.evaluators import prompts
from vljax.evaluators import zeroshot


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ranking by descending `scores` [N] (ties: lower index first); positive [N] bool."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    if not hits.any():
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP over the labels that have a positive. scores, targets: [N, L] (targets bool)."""
    aps = [average_precision(scores[:, j], targets[:, j])
           for j in range(targets.shape[1]) if targets[:, j].any()]
    if not aps:
        raise ValueError("no label has a positive image")
    return float(np.mean(aps))


def topk_metrics(scores: np.ndarray, targets: np.ndarray, k: int) -> dict[str, float]:
    """Micro-averaged precision@k, recall@k and F1@k (see the module docstring).

    Args: scores [N, L], targets [N, L] bool.
    """
    pred = base.top_k(scores, k)
    tp = float(np.take_along_axis(targets, pred, axis=1).sum())
    p = tp / pred.size
    r = tp / max(float(targets.sum()), 1.0)
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {f"precision@{k}": p, f"recall@{k}": r, f"f1@{k}": f1}


def to_multi_hot(labels: np.ndarray | Sequence[Sequence[int]], num_labels: int) -> np.ndarray:
    """A [N, L] 0/1 array, or N lists of label indices -> [N, L] bool."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        if labels.shape[1] != num_labels:
            raise ValueError(f"multi-hot labels have {labels.shape[1]} columns, "
                             f"expected {num_labels}")
        return labels.astype(bool)
    out = np.zeros((len(labels), num_labels), bool)
    for i, ls in enumerate(labels):
        out[i, list(ls)] = True
    return out


class MultilabelEvaluator(base.Evaluator):
    """Metrics "multilabel/<name>/mAP", ".../precision@k", ".../recall@k", ".../f1@k"."""

    def __init__(self, images: np.ndarray, labels, class_names: Sequence[str] | str, *,
                 name: str, templates: str | Sequence[str] | None = "clip80",
                 descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                 canonicalize: bool = True, ks: Sequence[int] = (1, 3, 5),
                 batch_size: int = 256, text_batch_size: int = 256):
        """
        Args:
          images: [N, H, W, 3] float32, preprocessed.
          labels: [N, L] multi-hot, or N lists of label indices.
          class_names: the L label names (or a file).
        """
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize \
            else names
        self.images = images
        self.targets = to_multi_hot(labels, len(names))
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} label sets")
        self.texts = prompts.class_texts(self.class_names, templates, descriptions)
        self.name, self.ks = name, tuple(ks)
        self.batch_size, self.text_batch_size = batch_size, text_batch_size

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg = base.l2_normalize(base.embed_images(embedder, self.images, self.batch_size))
        ztxt = zeroshot.ensemble(
            zeroshot.class_text_embeddings(embedder, self.texts, self.text_batch_size))
        scores = zimg @ ztxt.T
        metrics = {"mAP": mean_average_precision(scores, self.targets)}
        for k in self.ks:
            metrics.update(topk_metrics(scores, self.targets, k))
        return {f"multilabel/{self.name}/{k}": v for k, v in metrics.items()}
