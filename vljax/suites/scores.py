"""A suite dataset's metrics under CLIP_benchmark's JSON keys, from vljax's evaluators.

classification (ZeroShotEvaluator): acc1, acc5 (NaN under 5 classes, as CLIP_benchmark),
  mean_per_class_recall, and DataComp's F1-macro_all: sklearn's f1_score(average="macro") over
  the classes that are true or predicted for some image, from the confusion matrix.
retrieval (RetrievalEvaluator): image_retrieval_recall@k = text -> image, text_retrieval_recall@k
  = image -> text, and DataComp's mean_recall@1, their mean at k = 1.
multi-label (MultilabelEvaluator): mean_average_precision (vljax's mAP averages over the labels
  with a positive; CLIP_benchmark averages all labels with AP 0 for none: equal on VOC 2007, where
  every label has one).
"""
from __future__ import annotations

import numpy as np

from vljax.evaluators.multilabel import MultilabelEvaluator
from vljax.evaluators.retrieval import RetrievalEvaluator


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that are true or predicted at least once; confusion [C, C]
    (rows true, columns predicted)."""
    tp = np.diag(confusion).astype(np.float64)
    true, pred = confusion.sum(1), confusion.sum(0)
    seen = (true + pred) > 0
    return float(np.mean((2 * tp / np.maximum(true + pred, 1))[seen]))


def compute(name: str, evaluator, embedder) -> dict[str, float]:
    """CLIP_benchmark-keyed metrics of suite dataset `name` run by `evaluator` on `embedder`."""
    if isinstance(evaluator, RetrievalEvaluator):
        m = evaluator.run(embedder)
        out = {}
        for k in evaluator.ks:
            out[f"image_retrieval_recall@{k}"] = m[f"retrieval/{name}/t2i_r{k}"]
            out[f"text_retrieval_recall@{k}"] = m[f"retrieval/{name}/i2t_r{k}"]
        out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
        return out
    if isinstance(evaluator, MultilabelEvaluator):
        return {"mean_average_precision": evaluator.run(embedder)[f"multilabel/{name}/mAP"]}
    result = evaluator.evaluate(embedder)
    m = result.metrics
    return {"acc1": m[f"zeroshot/{name}/top1"], "acc5": m.get(f"zeroshot/{name}/top5", float("nan")),
            "mean_per_class_recall": m[f"zeroshot/{name}/mean_per_class"],
            "F1-macro_all": macro_f1(result.confusion)}
