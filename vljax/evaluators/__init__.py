"""Evaluators for language-image models: zero-shot classification, generalised zero-shot,
retrieval, zero-shot multi-label, few-shot linear probes, the embedding space's geometry
(modality gap, alignment, uniformity); model soups; plots.

Every evaluator is built from plain arguments and has `run(embedder) -> {metric: float}`,
where `embedder` follows `base.Embedder`. The trainer builds them from config entries:
`EVALUATORS[kind](**kwargs)`.
"""
from vljax.evaluators.base import Embedder, Evaluator
from vljax.evaluators.base_to_new import BaseToNewEvaluator
from vljax.evaluators.fewshot import FewShotEvaluator
from vljax.evaluators.fewshot_adapt import FewShotAdaptEvaluator
from vljax.evaluators.gzsl import GZSLEvaluator
from vljax.evaluators.labelfree import LabelFreeEvaluator
from vljax.evaluators.multilabel import MultilabelEvaluator
from vljax.evaluators.multilabel_train import MultilabelTrainEvaluator
from vljax.evaluators.representation import RepresentationEvaluator
from vljax.evaluators.retrieval import RetrievalEvaluator
from vljax.evaluators.soups import greedy_soup, uniform_soup
from vljax.evaluators.zeroshot import ZeroShotEvaluator

EVALUATORS = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "multilabel": MultilabelEvaluator,
    "gzsl": GZSLEvaluator,
    "fewshot": FewShotEvaluator,
    "fewshot_adapt": FewShotAdaptEvaluator,
    "base_to_new": BaseToNewEvaluator,
    "labelfree": LabelFreeEvaluator,
    "multilabel_train": MultilabelTrainEvaluator,
    "representation": RepresentationEvaluator,
}

__all__ = ["EVALUATORS", "BaseToNewEvaluator", "Embedder", "Evaluator", "FewShotAdaptEvaluator",
           "FewShotEvaluator", "GZSLEvaluator", "LabelFreeEvaluator", "MultilabelEvaluator",
           "MultilabelTrainEvaluator", "RepresentationEvaluator", "RetrievalEvaluator",
           "ZeroShotEvaluator", "greedy_soup", "uniform_soup"]
