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
  CP / CR / CF1 / OP / OR / OF1 (the multi-label recognition convention, e.g. Chen et al.,
    "Multi-Label Image Recognition with Graph Convolutional Networks", CVPR 2019, Sec. 4.1), of
    a set of predicted labels per image (scores above a threshold, or the top k):
    per-class precision TP_c / (TP_c + FP_c) (0 for a class never predicted) and recall
    TP_c / (TP_c + FN_c), averaged over the labels with a positive: CP, CR; CF1 = 2 CP CR /
    (CP + CR); overall OP = sum TP / sum (TP + FP), OR = sum TP / sum (TP + FN), OF1 likewise.
  real_top1: ReaL-style accuracy, the top-1 label counted when it is any label of the image
    (vljax/evaluators/conformal.py).
  conformal_coverage@alpha / conformal_size@alpha (with `calibration`): split conformal label sets
    calibrated on the held-out `calibration` split, their coverage of the test images' label sets
    and mean size (vljax/evaluators/conformal.py: the score, the guarantee).
"""
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base, conformal, registry
from vljax.evaluators import data as data_lib
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


def set_metrics(pred: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 of predicted label sets pred [N, L] bool vs targets [N, L] bool
    (see the module docstring)."""
    pred, targets = np.asarray(pred, bool), np.asarray(targets, bool)
    tp = (pred & targets).sum(0).astype(np.float64)
    npred, npos = pred.sum(0).astype(np.float64), targets.sum(0).astype(np.float64)
    has = npos > 0
    cp = float(np.mean(np.where(npred > 0, tp / np.maximum(npred, 1), 0.0)[has]))
    cr = float(np.mean((tp / np.maximum(npos, 1))[has]))
    op = float(tp.sum() / max(npred.sum(), 1))
    orr = float(tp.sum() / max(npos.sum(), 1))

    def f1(a, b):
        return 2 * a * b / (a + b) if a + b > 0 else 0.0
    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}


def topk_set(scores: np.ndarray, k: int) -> np.ndarray:
    """[N, L] bool: each image's k highest-scoring labels."""
    pred = np.zeros(scores.shape, bool)
    np.put_along_axis(pred, base.top_k(scores, k), True, axis=1)
    return pred


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


@registry.register("multilabel")
class MultilabelEvaluator(base.Evaluator):
    """Metrics "multilabel/<name>/mAP", ".../precision@k", ".../recall@k", ".../f1@k",
    ".../CP@k" ... ".../OF1@k" of the top-k label sets, ".../real_top1", and with a calibration
    split ".../conformal_coverage@<alpha>" and ".../conformal_size@<alpha>" for each alpha."""
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS  # the keys of `evals.<name>.data` (config_check reads them)

    def __init__(self, data, labels, class_names: Sequence[str] | str, *,
                 name: str, templates: str | Sequence[str] | None = "clip80",
                 descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                 canonicalize: bool = True, ks: Sequence[int] = (1, 3, 5),
                 calibration=None, alphas: Sequence[float] = (0.1,)):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py).
          labels: [N, L] multi-hot, or N lists of label indices, one per record of `data`.
          class_names: the L label names (or a file).
          calibration: (source, labels) of held-out images with label sets over the same L
            labels, for conformal label sets at each of `alphas`; refused when it has fewer
            labeled images than an alpha needs (n >= 1/alpha - 1).
        """
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize \
            else names
        self.data = data
        self.targets = to_multi_hot(labels, len(names))
        if len(self.data) != len(self.targets):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.targets)} label sets")
        self.texts = prompts.class_texts(self.class_names, templates, descriptions)
        self.name, self.ks = name, tuple(ks)
        self.alphas, self.calibration = tuple(float(a) for a in alphas), None
        if calibration is not None:
            cal_data, cal_labels = calibration
            cal_targets = to_multi_hot(cal_labels, len(names))
            if len(cal_data) != len(cal_targets):
                raise ValueError(f"evals.{name}.calibration: {len(cal_data)} records but "
                                 f"{len(cal_targets)} label sets")
            n = int(cal_targets.any(1).sum())
            for alpha in self.alphas:
                conformal.check_calibration_size(n, alpha, where=f"config key `evals.{name}.calibration`")
            self.calibration = (cal_data, cal_targets)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="multilabel", data=dict(name=...,
        split=..., label="tags", max_examples=...), templates=..., ...); `label` (or
        `label_key`) is a Sequence(ClassLabel) feature of a TFDS set (default the source's
        `labels_key`, else "tags", as in emoji and openclipart); `data` may be a source entry of
        any kind with label sets (vljax/evaluators/data.py)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        source = data_lib.open_entry(name, data)
        label_key = data.get("label") or data.get("label_key")
        names = source.label_set_names(label_key)
        source = data_lib.first(source, data.get("max_examples"))
        labels = [np.asarray(source.label_set_of(i, label_key), np.int64) for i in range(len(source))]
        if kwargs.get("calibration") is not None:  # a data entry of held-out images: opened here
            kwargs["calibration"] = cls._calibration(name, dict(kwargs["calibration"]), names, label_key)
        return cls(source, labels, names, name=name, **kwargs)

    @staticmethod
    def _calibration(name: str, entry: dict, names, label_key):
        """(source, label sets) of `evals.<name>.calibration` (a data entry as `data`), whose label
        names must be the evaluated ones."""
        where = f"{name}.calibration"
        data_lib.check_keys(where, entry, MultilabelEvaluator.DATA_KEYS)
        source = data_lib.open_entry(where, entry)
        key = entry.get("label") or entry.get("label_key") or label_key
        if list(source.label_set_names(key)) != list(names):
            raise ValueError(f"config key `evals.{where}`: its label names are not those of "
                             f"`evals.{name}.data` (the same label space is needed)")
        source = data_lib.first(source, entry.get("max_examples"))
        return source, [np.asarray(source.label_set_of(i, key), np.int64) for i in range(len(source))]

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        scores, targets = zimg @ ztxt.T, self.targets[index]
        metrics = {"mAP": mean_average_precision(scores, targets)}
        for k in self.ks:
            metrics.update(topk_metrics(scores, targets, k))
            metrics.update({f"{m}@{k}": v for m, v in
                            set_metrics(topk_set(scores, k), targets).items()})
        metrics["real_top1"] = conformal.real_accuracy(scores, targets)
        if self.calibration is not None:
            cal_data, cal_targets = self.calibration
            zcal, cal_index = base.image_embeddings(embedder, cal_data)
            cal_scores = zcal @ ztxt.T
            for alpha in self.alphas:
                qhat = conformal.calibrate(cal_scores, cal_targets[cal_index], alpha,
                                           where=f"evals.{self.name}.calibration")
                cov, size = conformal.coverage_and_size(conformal.label_sets(scores, qhat), targets)
                metrics[f"conformal_coverage@{alpha:g}"], metrics[f"conformal_size@{alpha:g}"] = cov, size
        return {f"multilabel/{self.name}/{k}": v for k, v in metrics.items()}
