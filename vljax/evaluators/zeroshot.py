"""Zero-shot classification: class text embeddings (prompt ensembling, optional ZPE weighting),
top-k / mean per-class accuracy and the confusion matrix.
"""
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base
from vljax.evaluators import data as data_lib
from vljax.evaluators import plots
from vljax.evaluators import prompts


def class_text_embeddings(embedder: base.Embedder, texts: Sequence[Sequence[str]]
                          ) -> list[np.ndarray]:
    """Embeds every class's sentences in one call (the embedder batches and caches it, so
    evaluators with the same class prompts share it).

    Args:
      texts: C lists of sentences (see `prompts.class_texts`).
    Returns:
      C arrays [T_c, D], the L2-normalised embedding of each sentence of class c.
    """
    flat = [t for ts in texts for t in ts]
    z = base.text_embeddings(embedder, flat)
    splits = np.cumsum([len(ts) for ts in texts])[:-1]
    return np.split(z, splits)


def ensemble(per_class: Sequence[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """Prompt ensembling: per class the (weighted) mean of its normalised sentence embeddings,
    renormalised (CLIP's recipe). `weights` [T] applies when every class has T sentences.

    Returns: [C, D] L2-normalised class embeddings.
    """
    if weights is None:
        means = [z.mean(axis=0) for z in per_class]
    else:
        means = [np.tensordot(weights, z, axes=1) for z in per_class]
    return base.l2_normalize(np.stack(means).astype(np.float32))


def zpe_weights(zimg: np.ndarray, ztpl: np.ndarray, logit_scale: float,
                temperature: float = 1.0, zref: np.ndarray | None = None,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot prompt ensembling weights (ZPE; Allingham et al., ICML 2023).

    With template p's logits l_p(x, c) = logit_scale * <zimg(x), ztpl[p, c]>, the naive
    "max-logit" score E_x[max_c l_p(x, c)] prefers templates whose words are frequent in
    pre-training (every class scores high with them), not templates that fit the task. ZPE
    first removes that bias by normalising each logit by its expectation over images,
        lbar_p(c) = E_x' [l_p(x', c)],
    the expectation the paper takes over the pre-training distribution, estimated on a sample
    of images (`zref`); without one, the unlabeled test images stand in for it (the default).
    A template scores how much its best class stands out on the test images,
        s_p = E_x [max_c (l_p(x, c) - lbar_p(c))],
    and the weights are softmax_p(s_p / temperature). A constant logit bias cancels; the scale
    matters (the scores are in logit units, so it sets how peaked the weights are). No label
    is used.

    Args:
      zimg: [N, D] normalised test-image embeddings.
      ztpl: [P, C, D] normalised embedding of template p filled with class c.
      zref: [M, D] images that estimate lbar (default: `zimg`).
    Returns:
      (weights [P] summing to 1, scores [P]).
    """
    zref = zimg if zref is None else zref
    num_p, num_c, _ = ztpl.shape
    flat = ztpl.reshape(num_p * num_c, -1).T  # [D, P*C]: one BLAS matmul per chunk

    def logits(z):
        return (logit_scale * (z @ flat)).reshape(len(z), num_p, num_c)

    # Logits are linear in the image embedding: their mean is the mean embedding's logits.
    lbar = logits(zref.mean(axis=0, keepdims=True))[0]  # [P, C]
    chunk = max(1, min(batch_size, (1 << 22) // (num_p * num_c)))  # bound [b, P, C] memory
    scores = sum((logits(zimg[s]) - lbar).max(axis=2).sum(axis=0)
                 for s in base.batch_slices(len(zimg), chunk)) / len(zimg)
    w = np.exp((scores - scores.max()) / temperature)
    return w / w.sum(), scores


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def ranks_and_predictions(zimg: np.ndarray, ztxt: np.ndarray, labels: np.ndarray,
                          batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the true class and top-1 class per image, scoring [batch, C] at a time.

    Ranking by cosine equals ranking by logits (scale > 0, one bias for all classes). Ties
    rank the lower class index first (see `base.ranks_of`).
    Args: zimg [N, D], ztxt [C, D], labels [N]. Returns: ([N], [N]).
    """
    ranks, preds = [], []
    for s in base.batch_slices(len(zimg), batch_size):
        scores = zimg[s] @ ztxt.T
        ranks.append(base.ranks_of(scores, labels[s]))
        preds.append(np.argmax(scores, axis=1))  # first maximum: the lower index on ties
    return np.concatenate(ranks), np.concatenate(preds)


def accuracies(ranks: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)
               ) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall (over classes with at least one image).

    Args: ranks [N] 0-based rank of the true class, labels [N].
    """
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    correct = ranks == 0
    out["mean_per_class"] = float(np.mean([correct[labels == c].mean()
                                           for c in np.unique(labels)]))
    return out


@dataclasses.dataclass
class ZeroShotResult:
    metrics: dict[str, float]
    confusion: np.ndarray             # [C, C], rows true, columns predicted
    predictions: np.ndarray           # [N] top-1 class
    template_weights: np.ndarray | None  # [P] ZPE weights, None without ZPE


class ZeroShotEvaluator(base.Evaluator):
    """Zero-shot classification of labeled images against class-name prompts.

    Metrics: "zeroshot/<name>/top1", ".../top5" (each k of `ks`), ".../mean_per_class".
    With `plot_dir`, each run writes "<plot_dir>/confusion_<name>.png".
    """

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str,
                 *, name: str, templates: str | Sequence[str] | None = "clip80",
                 descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                 canonicalize: bool = True, zpe: bool = False, zpe_temperature: float = 1.0,
                 ks: Sequence[int] = (1, 5), plot_dir: str | None = None):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py); only the embedder reads them.
          labels: [N] ints in [0, C), one per record of `data`.
          class_names: C names, or a file (see `prompts.load_class_names`).
          name: the data set's name in the metric keys.
          templates: a `prompts.TEMPLATES` key or a list; None for descriptions only.
          descriptions: CuPL sentences per class (JSON path or dict), mixed with the templates.
          canonicalize: clean class names with `prompts.canonicalize_name`.
          zpe: weight templates by ZPE scores (needs templates and no descriptions).
        """
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize \
            else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise ValueError(f"{name}: labels must lie in [0, {len(self.class_names)})")
        if zpe and (templates is None or descriptions is not None):
            raise ValueError("ZPE weights templates: give templates and no descriptions")
        self.texts = prompts.class_texts(self.class_names, templates, descriptions)
        self.name, self.zpe, self.zpe_temperature = name, zpe, zpe_temperature
        self.ks, self.plot_dir = tuple(ks), plot_dir

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="zeroshot", data=dict(name=..., split=...,
        label=..., max_examples=...), templates=..., ...)."""
        data, kwargs = data_lib.split_spec(name, spec)
        source, labels, class_names = data_lib.classification(name, data)
        kwargs.setdefault("plot_dir", plot_dir)
        return cls(source, labels, class_names, name=name, **kwargs)

    def evaluate(self, embedder: base.Embedder) -> ZeroShotResult:
        zimg, index = base.image_embeddings(embedder, self.data)
        labels = self.labels[index]
        per_class = class_text_embeddings(embedder, self.texts)
        weights = None
        if self.zpe:
            ztpl = np.stack(per_class, axis=1)  # [P, C, D]
            weights, _ = zpe_weights(zimg, ztpl, float(embedder.logit_scale),
                                     self.zpe_temperature)
        ztxt = ensemble(per_class, weights)
        ranks, preds = ranks_and_predictions(zimg, ztxt, labels)
        metrics = accuracies(ranks, labels, self.ks)
        cm = confusion_matrix(labels, preds, len(self.class_names))
        return ZeroShotResult({f"zeroshot/{self.name}/{k}": v for k, v in metrics.items()},
                              cm, preds, weights)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        result = self.evaluate(embedder)
        if self.plot_dir is not None:
            plots.plot_confusion_matrix(
                result.confusion, self.class_names,
                os.path.join(self.plot_dir, f"confusion_{self.name}.png"),
                title=f"{self.name}: top-1 {result.metrics[f'zeroshot/{self.name}/top1']:.3f}")
        return result.metrics
