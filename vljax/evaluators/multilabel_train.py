"""Multi-label training of a label head on frozen image embeddings (vljax/adapt/multilabel.py),
evaluated on the held-out test split against the zero-shot label prompts.

The train split's multi-hot labels (a TFDS Sequence(ClassLabel) feature, e.g. "tags") train the
head s cos(z, w_j) + b_j from the zero-shot classifier, with each loss of `losses`; metrics per
method ("zeroshot" and each loss): "multilabel_train/<name>/<method>/mAP", the CP / CR / CF1 /
OP / OR / OF1 of the top-k label sets (".../CF1@3") and, for the trained heads, of the labels
with p >= `threshold` (".../CF1@thr"; zero-shot cosines have no probability to threshold).
"""
from collections.abc import Sequence

import jax
import numpy as np

from vljax.adapt import multilabel as ml
from vljax.evaluators import base, multilabel, prompts, registry, zeroshot
from vljax.evaluators import data as data_lib

DATA_KEYS = ("name", "label", "train_split", "test_split", "data_dir", "max_train",
             "max_examples", "source")


def label_set_splits(name: str, spec: dict) -> tuple[tuple, dict]:
    """((train source, train label sets, test source, test label sets, label names), the entry's
    other keys) of an evaluator entry whose `data` (DATA_KEYS) names a train and a test split
    with label sets: `label` a label set feature, `max_train` / `max_examples` caps."""
    data, kwargs = data_lib.split_spec(name, spec)
    data_lib.check_keys(name, data, DATA_KEYS)
    key = data.get("label")
    splits = data_lib.open_splits(name, data, {"train": "train", "test": "test"})

    def split(which, cap):
        source = data_lib.first(splits[which], data.get(cap))
        return source, [np.asarray(source.label_set_of(i, key), np.int64) for i in range(len(source))]
    train, train_labels = split("train", "max_train")
    test, test_labels = split("test", "max_examples")
    return (train, train_labels, test, test_labels, splits["train"].label_set_names(key)), kwargs


@registry.register("multilabel_train")
class MultilabelTrainEvaluator(base.Evaluator):
    """See the module docstring."""
    DATA_KEYS = DATA_KEYS

    def __init__(self, train_data, train_labels, test_data, test_labels,
                 class_names: Sequence[str], *, name: str, templates: str | Sequence[str] = "icon",
                 losses: Sequence[str] = ("bce", "asl", "wan"), steps: int = 300,
                 lr: float = 1e-3, batch_size: int = 256, threshold: float = 0.5, k: int = 3):
        """
        Args:
          train_data / test_data: sources; train_labels / test_labels: N lists of label indices
            (or [N, L] multi-hot), one per record.
          class_names: the L label names, prompted with `templates`.
          losses: keys of `vljax.adapt.multilabel.LOSSES`.
        """
        unknown = sorted(set(losses) - set(ml.LOSSES))
        if unknown:
            raise ValueError(f"{name}: unknown losses {unknown} (known: {sorted(ml.LOSSES)})")
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.texts = prompts.class_texts(self.class_names, templates, None)
        self.train_data, self.test_data = train_data, test_data
        self.train_targets = multilabel.to_multi_hot(train_labels, len(class_names))
        self.test_targets = multilabel.to_multi_hot(test_labels, len(class_names))
        self.name, self.losses, self.steps, self.lr = name, tuple(losses), steps, lr
        self.batch_size, self.threshold, self.k = batch_size, threshold, k

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="multilabel_train", data=dict(name=...,
        label="tags", train_split="train", test_split="test", max_train=...), losses=[...]), or
        with a source entry of any kind with label sets for the two splits (vljax/evaluators/data.py).
        `label`: a TFDS label set feature (default the source's `labels_key`, else "tags")."""
        del plot_dir  # no plots
        args, kwargs = label_set_splits(name, spec)
        return cls(*args, name=name, **kwargs)

    def _metrics(self, scores, targets, probs=None):
        out = {"mAP": multilabel.mean_average_precision(scores, targets)}
        out.update({f"{m}@{self.k}": v for m, v in
                    multilabel.set_metrics(multilabel.topk_set(scores, self.k), targets).items()})
        if probs is not None:
            out.update({f"{m}@thr": v for m, v in
                        multilabel.set_metrics(probs >= self.threshold, targets).items()})
        return out

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        train, train_index = base.image_embeddings(embedder, self.train_data)
        test, test_index = base.image_embeddings(embedder, self.test_data)
        y_train, y_test = self.train_targets[train_index], self.test_targets[test_index]
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        results = {"zeroshot": self._metrics(test @ ztxt.T, y_test)}
        for loss in self.losses:
            head = ml.train_head(train, y_train, ztxt, float(embedder.logit_scale), loss=loss,
                                 steps=self.steps, lr=self.lr, batch_size=self.batch_size)
            logits = np.asarray(ml.head_logits(head, test))
            results[loss] = self._metrics(logits, y_test, np.asarray(jax.nn.sigmoid(logits)))
        return {f"multilabel_train/{self.name}/{m}/{k}": v
                for m, r in results.items() for k, v in r.items()}
