"""Label-free transductive adaptation, evaluated (vljax/adapt/pseudo_label.py): CoOp's context is
trained on zero-shot pseudo-labels of unlabelled target images, then the labelled test split is
classified with the learned prompts.

Metrics "labelfree/<name>/zeroshot" (the prompt ensemble before adaptation), ".../adapted"
(mean over seeds) and ".../adapted_std", ".../pseudo_labelled" (images kept).
"""
from collections.abc import Sequence

import numpy as np

from vljax.adapt import coop as coop_lib
from vljax.adapt import pseudo_label
from vljax.evaluators import base, prompts, registry, zeroshot
from vljax.evaluators import data as data_lib

DATA_KEYS = ("name", "label", "label_key", "target_split", "test_split", "data_dir",
             "max_target", "max_examples", "source")


@registry.register("labelfree")
class LabelFreeEvaluator(base.Evaluator):
    """See the module docstring. The target images come without labels: none is ever read."""
    DATA_KEYS = DATA_KEYS

    def __init__(self, target_data, test_data, test_labels: Sequence[int],
                 class_names: Sequence[str], *, name: str, templates: str | Sequence[str] = "clip80",
                 per_class: int = 16, min_confidence: float = 0.0, seeds: int = 1,
                 coop: dict | None = None):
        """
        Args:
          target_data: the unlabelled target images, a source (only the embedder reads it).
          test_data / test_labels: the labelled evaluation images and their [N] labels.
          per_class / min_confidence: the class-balanced confidence filter.
          coop: keyword arguments of `vljax.adapt.coop.PromptLearner`.
        """
        self.target_data, self.test_data = target_data, test_data
        self.test_labels = np.asarray(test_labels, np.int64)
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.texts = prompts.class_texts(self.class_names, templates, None)
        self.name, self.per_class, self.min_confidence = name, per_class, min_confidence
        self.seeds, self.coop = seeds, dict(coop or {})

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="labelfree", data=dict(name=..., label=...,
        target_split="train", test_split="test", max_target=..., max_examples=...), ...), or with
        a source entry of any kind for the two splits (`target_<key>` gives the target split's, see
        vljax/evaluators/data.py). The test split's labels are read; the target split's are not."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, DATA_KEYS)
        splits = data_lib.open_splits(name, data, {"target": "train", "test": "test"})
        target = data_lib.first(splits["target"], data.get("max_target"))
        label_key = data.get("label") or data.get("label_key")
        test, labels, names = data_lib.labelled(name, splits["test"], label_key, data.get("max_examples"))
        return cls(target, test, labels, names, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        target, _ = base.image_embeddings(embedder, self.target_data)
        test, index = base.image_embeddings(embedder, self.test_data)
        y_test = self.test_labels[index]
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        scale = float(embedder.logit_scale)
        idx, pseudo = pseudo_label.pseudo_labels(target, ztxt, scale, self.per_class,
                                                 self.min_confidence)
        learner = coop_lib.PromptLearner.from_embedder(embedder, self.class_names, **self.coop)
        adapted = [float(np.mean(learner.fit_coop(target[idx], pseudo, seed=s).predict(test)
                                 == y_test)) for s in range(self.seeds)]
        prefix = f"labelfree/{self.name}"
        return {f"{prefix}/zeroshot": float(np.mean(np.argmax(test @ ztxt.T, 1) == y_test)),
                f"{prefix}/adapted": float(np.mean(adapted)),
                f"{prefix}/adapted_std": float(np.std(adapted)),
                f"{prefix}/pseudo_labelled": float(len(idx))}
