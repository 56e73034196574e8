"""Generalised zero-shot learning (GZSL): test images of seen and unseen classes are both
classified among ALL classes (Xian et al., "Zero-shot learning: the good, the bad and the
ugly", 2018).

  S = accuracy on test images of seen classes, U = accuracy on those of unseen classes,
  H = 2 S U / (S + U), the harmonic mean, which is high only when both are.

Accuracies are averaged per class by default (Xian et al.'s protocol), per image otherwise.
Calibrated stacking (Chao et al., 2016) subtracts `gamma` from the scores of seen classes to
counter a model's bias towards them; scores are cosine similarities, so `gamma` is in cosine
units and does not depend on the model's temperature.

The calibration sweep (Chao et al., "An empirical study and analysis of generalized zero-shot
learning for object recognition in the wild", ECCV 2016, Sec. 3.2): as gamma runs from -inf
(everything predicted seen) to +inf (everything unseen), (U(gamma), S(gamma)) traces the
seen-unseen accuracy curve, and its area (AUSUC, trapezoidal over U) summarises the trade-off
independently of one gamma. The curve is exact: an image's prediction only changes at
gamma = d_i = (best seen score - best unseen score), so evaluating between consecutive d_i
visits every point of it.
"""
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base, registry
from vljax.evaluators import data as data_lib
from vljax.evaluators import late_interaction, prompts
from vljax.evaluators import zeroshot


def _accuracy(correct: np.ndarray, labels: np.ndarray, per_class: bool) -> float:
    if not len(correct):
        return float("nan")
    if per_class:
        return float(np.mean([correct[labels == c].mean() for c in np.unique(labels)]))
    return float(correct.mean())


def gzsl_metrics(scores: np.ndarray, labels: np.ndarray, seen: np.ndarray, *,
                 gamma: float = 0.0, per_class: bool = True) -> dict[str, float]:
    """S, U, H and the conventional ZSL accuracy from scores.

    Args:
      scores: [N, C] image-class similarities. labels: [N].
      seen: [C] bool, True for the seen classes.
    Returns:
      {"seen": S, "unseen": U, "harmonic": H, "zsl": accuracy of unseen-class images
      classified among the unseen classes only}.
    """
    calibrated = scores - gamma * seen[None, :]
    correct = np.argmax(calibrated, axis=1) == labels
    is_seen = seen[labels]
    s = _accuracy(correct[is_seen], labels[is_seen], per_class)
    u = _accuracy(correct[~is_seen], labels[~is_seen], per_class)
    h = 2 * s * u / (s + u) if s + u > 0 else 0.0
    unseen_idx = np.flatnonzero(~seen)
    zsl_pred = unseen_idx[np.argmax(scores[~is_seen][:, unseen_idx], axis=1)]
    zsl = _accuracy(zsl_pred == labels[~is_seen], labels[~is_seen], per_class)
    return {"seen": s, "unseen": u, "harmonic": float(h), "zsl": zsl}


def calibration_sweep(scores: np.ndarray, labels: np.ndarray, seen: np.ndarray, *,
                      per_class: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gammas [G], S [G], U [G]): the seen-unseen curve over every distinct calibration.

    Args: as `gzsl_metrics`. gammas ascend, from below every d_i (U = 0) to above all (S = 0).
    """
    unseen = ~seen
    seen_idx, unseen_idx = np.flatnonzero(seen), np.flatnonzero(unseen)
    best_seen = seen_idx[np.argmax(scores[:, seen_idx], axis=1)]
    best_unseen = unseen_idx[np.argmax(scores[:, unseen_idx], axis=1)]
    rows = np.arange(len(scores))
    d = scores[rows, best_seen] - scores[rows, best_unseen]
    cut = np.unique(d)
    gammas = np.concatenate([[cut[0] - 1.0], (cut[1:] + cut[:-1]) / 2, [cut[-1] + 1.0]])
    # Image i is predicted seen while gamma < d_i (argmax keeps the lower index on a tie, which
    # the midpoints never produce).
    pred_seen = gammas[:, None] < d[None, :]                                  # [G, N]
    correct = np.where(pred_seen, best_seen == labels, best_unseen == labels)  # [G, N]
    is_seen = seen[labels]

    def mean_acc(group):
        w = group.astype(np.float64)
        if per_class:  # each class of the group weighs equally
            counts = np.bincount(labels[group], minlength=len(seen))
            w = np.where(group, 1.0 / np.maximum(counts[labels], 1), 0.0)
            w /= max(len(np.unique(labels[group])), 1)
        else:
            w /= max(group.sum(), 1)
        return correct.astype(np.float64) @ w

    return gammas, mean_acc(is_seen), mean_acc(~is_seen)


def ausuc(s: np.ndarray, u: np.ndarray) -> float:
    """Area under the seen (y) - unseen (x) accuracy curve, trapezoidal, points sorted by U."""
    order = np.lexsort((-s, u))
    x, y = u[order], s[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


@registry.register("gzsl")
class GZSLEvaluator(base.Evaluator):
    """Metrics "gzsl/<name>/seen", ".../unseen", ".../harmonic", ".../zsl" at `gamma`, and over
    the calibration sweep ".../ausuc" and ".../best_harmonic" (the best H any gamma reaches: an
    upper bound, gamma chosen on the test images)."""
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS  # the keys of `evals.<name>.data` (config_check reads them)

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str,
                 seen_classes: Sequence[int] | Sequence[str], *, name: str,
                 templates: str | Sequence[str] | None = "clip80",
                 descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                 canonicalize: bool = True, gamma: float = 0.0, per_class: bool = True,
                 similarity: str | None = None, filip_chunk=late_interaction.DEFAULT_CHUNK):
        """
        Args:
          data: test images of seen and unseen classes, a source (vljax/evaluators/data.py).
          labels: [N] ints in [0, C), one per record of `data`.
          class_names: all C class names (or a file).
          seen_classes: the seen classes, as indices or as names (before canonicalisation).
          gamma: calibrated-stacking offset subtracted from seen-class cosine scores.
          similarity / filip_chunk: as in the zero-shot evaluator ("global", "filip", or None for
            the model's own).
        """
        self.chunk = late_interaction.check(similarity, filip_chunk)
        self.similarity = similarity
        names = prompts.load_class_names(class_names)
        seen = np.zeros(len(names), bool)
        for c in seen_classes:
            seen[names.index(c) if isinstance(c, str) else int(c)] = True
        if seen.all() or not seen.any():
            raise ValueError("GZSL needs both seen and unseen classes")
        self.seen = seen
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize \
            else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        self.texts = prompts.class_texts(self.class_names, templates, descriptions)
        self.name, self.gamma, self.per_class = name, gamma, per_class

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="gzsl", data=dict(name=..., split=...,
        label=...), seen_classes=[...], templates=..., ...)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        source, labels, class_names = data_lib.classification(name, data)
        return cls(source, labels, class_names, name=name, **kwargs)

    def scores(self, embedder: base.Embedder) -> tuple[np.ndarray, np.ndarray]:
        """-> (scores [N, C], record indices [N]): cosine to the prompt-ensembled class embeddings,
        or, for a model scored by late interaction (the FILIP loss, or `similarity="filip"`), the
        zero-shot evaluator's FILIP class scores (i2t, averaged over each class's prompts)."""
        if late_interaction.resolve(self.similarity, embedder) == "filip":
            blocks, index = zeroshot.filip_class_scores(embedder, self.data, self.texts, self.chunk)
            scores = np.zeros((len(index), len(self.texts)), np.float32)
            for s, block in blocks:
                scores[s] = block
            return scores, index
        zimg, index = base.image_embeddings(embedder, self.data)
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        return zimg @ ztxt.T, index

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        scores, index = self.scores(embedder)
        labels = self.labels[index]
        metrics = gzsl_metrics(scores, labels, self.seen, gamma=self.gamma,
                               per_class=self.per_class)
        _, s, u = calibration_sweep(scores, labels, self.seen, per_class=self.per_class)
        metrics["ausuc"] = ausuc(s, u)
        h = np.where(s + u > 0, 2 * s * u / np.maximum(s + u, 1e-12), 0.0)
        metrics["best_harmonic"] = float(h.max())
        return {f"gzsl/{self.name}/{k}": v for k, v in metrics.items()}
