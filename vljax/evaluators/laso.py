"""LaSO evaluation (Alfassy et al., CVPR 2019, as we recall its Sec. 4; the paper's text was out of
reach here, so the protocol's details below are our choices): set-operation nets trained on the
train split's image features and label sets (vljax/adapt/laso.py), then, on pairs of test
images, the operated features' predicted labels against the target label sets, and retrieval
by label set.

For each operation op in int (L(a) ∩ L(b)), uni (∪) and sub (L(a) \\ L(b)), over `test_pairs`
pairs (a, b) of test images drawn as in training (vljax/data/pairs.py, seed + 1):

  laso/<name>/<op>/mAP          mAP of C(M_op(F_a, F_b)) against the target sets (labels with
                                a positive among the pairs; the paper's classification metric)
  laso/<name>/<op>/mAP_input    the same for C(F_a), the un-operated feature (the baseline)
  laso/<name>/<op>/mAP_labels   the same for the operation done on C's probabilities of a and b
                                (p_a p_b, p_a + p_b - p_a p_b, p_a (1 - p_b)): a label-space
                                reference that needs both images' labels, not a feature
  laso/<name>/<op>/R@k          retrieval by label set: the fraction of queries for which one
                                of the k test images nearest (cosine) to M_op(F_a, F_b) has
                                exactly the target label set; a and b are left out of the
                                gallery, and only queries with a non-empty target set that
                                some other test image has are counted (`.../queries`)
  laso/<name>/<op>/R@k_input    the same with F_a as the query
  laso/<name>/real/mAP          C on the test images' own features (the classifier's quality)
  laso/<name>/train/loss        the training loss, mean of the last tenth of the steps
                                (`train/loss_start`: of the first tenth)

C is the multi-label classifier trained with the nets (the label-prompt-initialised cosine head,
vljax/adapt/laso.py says why). The paper's retrieval, as we recall it, ranks a gallery of real
images (COCO val) by the operated feature and counts a hit when a retrieved image's label set
equals the target; here the gallery is the test split.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vljax.adapt import laso as laso_lib
from vljax.data import pairs as pairs_lib
from vljax.evaluators import base, multilabel, multilabel_train, prompts, registry, zeroshot
from vljax.losses import laso as laso_loss

DATA_KEYS = multilabel_train.DATA_KEYS
OPS = ("int", "uni", "sub")


def label_ops(p_a: np.ndarray, p_b: np.ndarray) -> dict:
    """The operations on label probabilities p_a, p_b [P, L] (independent labels): {"int", "uni", "sub"}."""
    return {"int": p_a * p_b, "uni": p_a + p_b - p_a * p_b, "sub": p_a * (1.0 - p_b)}


def set_ids(*multi_hot: np.ndarray) -> list[np.ndarray]:
    """One integer id per distinct label set, shared across the arrays ([N, L] bool each)."""
    ids: dict[bytes, int] = {}
    return [np.array([ids.setdefault(np.packbits(r).tobytes(), len(ids)) for r in m], np.int64)
            for m in multi_hot]


def retrieval_at_k(queries: np.ndarray, gallery: np.ndarray, target_ids: np.ndarray,
                   gallery_ids: np.ndarray, exclude: np.ndarray, valid: np.ndarray,
                   ks: Sequence[int]) -> dict[int, float]:
    """{k: fraction of valid queries with a gallery row of their target set among the k nearest}.

    queries [P, D], gallery [M, D] (unit rows; cosine), target_ids [P], gallery_ids [M],
    exclude [P, 2] gallery rows left out per query, valid [P] bool.
    """
    scores = queries @ gallery.T
    np.put_along_axis(scores, exclude, -np.inf, axis=1)
    order = base.top_k(scores, max(ks))
    hits = gallery_ids[order] == target_ids[:, None]
    return {k: float(hits[valid, :k].any(axis=1).mean()) for k in ks}


def _map(scores, targets) -> float:
    return multilabel.mean_average_precision(scores, targets) if targets.any() else float("nan")


@registry.register("laso")
class LasoEvaluator(base.Evaluator):
    """See the module docstring."""
    DATA_KEYS = DATA_KEYS

    def __init__(self, train_data, train_labels, test_data, test_labels, class_names: Sequence[str], *,
                 name: str, templates: str | Sequence[str] = "icon", steps: int = 1000, lr: float = 1e-3,
                 batch_size: int = 64, latent: int | None = None, layers: int = 3, dropout: float = 0.5,
                 shared_fraction: float = 0.5, sym_weight: float = 1.0, rec_weight: float = 1.0,
                 classifier: str = "trained", test_pairs: int = 1000, ks: Sequence[int] = (1, 5),
                 seed: int = 0):
        """
        Args:
          train_data / test_data: sources; train_labels / test_labels: N lists of label indices
            (or [N, L] multi-hot), one per record.
          class_names: the L label names, prompted with `templates` (C's initialisation).
          steps, lr, batch_size, latent, layers, dropout, shared_fraction, sym_weight,
            rec_weight, classifier ("trained" | "zeroshot"), seed: vljax/adapt/laso.py `train`.
          test_pairs: pairs of test images evaluated; ks: retrieval cut-offs.
        """
        for key, value in (("steps", steps), ("batch_size", batch_size), ("test_pairs", test_pairs)):
            if int(value) < 1:
                raise ValueError(f"{name}: `{key}` must be >= 1, got {value}")
        if not ks or min(ks) < 1:
            raise ValueError(f"{name}: `ks` must be positive retrieval cut-offs, got {ks}")
        for key, value, ok in (("shared_fraction", shared_fraction, 0 <= shared_fraction <= 1),
                               ("dropout", dropout, 0 <= dropout < 1), ("layers", layers, layers >= 0),
                               ("latent", latent, latent is None or latent >= 1),
                               ("classifier", classifier, classifier in laso_lib.CLASSIFIERS)):
            if not ok:
                raise ValueError(f"{name}: `{key}` out of range, got {value!r}")
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.texts = prompts.class_texts(self.class_names, templates, None)
        self.train_data, self.test_data = train_data, test_data
        self.train_targets = multilabel.to_multi_hot(train_labels, len(class_names))
        self.test_targets = multilabel.to_multi_hot(test_labels, len(class_names))
        self.name, self.test_pairs, self.ks, self.seed = name, int(test_pairs), tuple(ks), seed
        self.train_kwargs = dict(steps=steps, lr=lr, batch_size=batch_size, latent=latent, layers=layers,
                                 dropout=dropout, shared_fraction=shared_fraction,
                                 sym_weight=sym_weight, rec_weight=rec_weight, classifier=classifier,
                                 seed=seed)
        self.shared_fraction = shared_fraction

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="laso", data=dict(name=..., label="tags",
        train_split="train", test_split="test", max_train=..., max_examples=...), steps=...), or a
        source entry of any kind with label sets for the two splits (vljax/evaluators/data.py)."""
        del plot_dir  # no plots
        args, kwargs = multilabel_train.label_set_splits(name, spec)
        return cls(*args, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        train, train_index = base.image_embeddings(embedder, self.train_data)
        test, test_index = base.image_embeddings(embedder, self.test_data)
        y_train, y_test = self.train_targets[train_index], self.test_targets[test_index]
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        model, log = laso_lib.train(train, y_train, ztxt, float(embedder.logit_scale), **self.train_kwargs)
        i, j = pairs_lib.pair_batch(self.seed + 1, 0, self.test_pairs, y_test,
                                    pairs_lib.label_index(y_test), self.shared_fraction)
        outs = {k: np.asarray(v) for k, v in model.apply(test[i], test[j]).items()}
        targets = {k: np.asarray(v) > 0.5 for k, v in laso_loss.set_targets(y_test[i], y_test[j]).items()}
        logits_a = model.logits(test[i])
        p_a, p_b = (1 / (1 + np.exp(-x)) for x in (logits_a, model.logits(test[j])))
        on_labels = label_ops(p_a, p_b)
        tail = max(1, len(log) // 10)
        results = {"real/mAP": _map(model.logits(test), y_test > 0.5),
                   "train/loss_start": float(np.mean([r["loss"] for r in log[:tail]])),
                   "train/loss": float(np.mean([r["loss"] for r in log[-tail:]]))}
        for op in OPS:
            results[f"{op}/mAP"] = _map(model.logits(outs[op]), targets[op])
            results[f"{op}/mAP_input"] = _map(logits_a, targets[op])
            results[f"{op}/mAP_labels"] = _map(on_labels[op], targets[op])
            target_ids, gallery_ids = set_ids(targets[op], y_test > 0.5)
            others = np.ones((len(i), len(test)), bool)
            others[np.arange(len(i)), i] = others[np.arange(len(i)), j] = False
            valid = targets[op].any(axis=1) & ((gallery_ids[None] == target_ids[:, None]) & others).any(axis=1)
            results[f"{op}/queries"] = float(valid.sum())
            if not valid.any():
                continue
            exclude = np.stack([i, j], axis=1)
            for query, suffix in ((outs[op], ""), (test[i], "_input")):
                for k, r in retrieval_at_k(query, test, target_ids, gallery_ids, exclude, valid, self.ks).items():
                    results[f"{op}/R@{k}{suffix}"] = r
        return {f"laso/{self.name}/{k}": v for k, v in results.items()}
