"""Evaluators for language-image models: zero-shot classification, generalised zero-shot,
retrieval, zero-shot multi-label, few-shot linear probes, the embedding space's geometry
(modality gap, alignment, uniformity); model soups; plots.

Every evaluator is built from plain arguments and has `run(embedder) -> {metric: float}`,
where `embedder` follows `base.Embedder`. The trainer builds them from config entries
`evals.<name> = dict(type=kind, data=dict(...), ...)`: `EVALUATORS[kind].from_config(name, spec)`
(vljax/eval_builder.py). `EVALUATORS` is the registry of kinds (vljax/evaluators/registry.py):
each evaluator module registers its class (`@registry.register(kind)`) and every module of this
package is imported below, so adding an evaluator is one file here; from outside vljax, any module
that calls `vljax.evaluators.register(kind, cls)` before the config is read.
"""
import importlib
import pkgutil

from vljax.evaluators.base import Embedder, Evaluator
from vljax.evaluators.base_to_new import BaseToNewEvaluator
from vljax.evaluators.fewshot import FewShotEvaluator
from vljax.evaluators.fewshot_adapt import FewShotAdaptEvaluator
from vljax.evaluators.gzsl import GZSLEvaluator
from vljax.evaluators.labelfree import LabelFreeEvaluator
from vljax.evaluators.multilabel import MultilabelEvaluator
from vljax.evaluators.multilabel_train import MultilabelTrainEvaluator
from vljax.evaluators.registry import EVALUATORS, evaluator_class, register
from vljax.evaluators.representation import RepresentationEvaluator
from vljax.evaluators.retrieval import RetrievalEvaluator
from vljax.evaluators.soups import greedy_soup, uniform_soup
from vljax.evaluators.zeroshot import ZeroShotEvaluator

# Any other evaluator module of this package registers itself on import: adding one is one file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = ["EVALUATORS", "BaseToNewEvaluator", "Embedder", "Evaluator", "FewShotAdaptEvaluator",
           "FewShotEvaluator", "GZSLEvaluator", "LabelFreeEvaluator", "MultilabelEvaluator",
           "MultilabelTrainEvaluator", "RepresentationEvaluator", "RetrievalEvaluator",
           "ZeroShotEvaluator", "evaluator_class", "greedy_soup", "register", "uniform_soup"]
