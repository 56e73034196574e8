"""Zero-shot classification: class text embeddings (prompt ensembling, optional ZPE weighting),
top-k / mean per-class accuracy and the confusion matrix.

With `similarity="filip"` (or a model trained with the FILIP loss, see
vljax/evaluators/late_interaction.py) images are scored by FILIP's late interaction in the
image -> text direction, i2t(x, y) = mean over image tokens of the best text-token similarity,
as the paper classifies (Yao et al. 2021, Sec. 3.1.1 and 3.1.2). Token-level class
representations cannot be averaged like CLIP's pooled embeddings, so the prompt ensemble
averages the late-interaction SIMILARITIES over a class's prompts (Sec. 3.1.2, "prompt
ensemble"): s(x, c) = 1/T_c sum_p i2t(x, prompt_p(c)).
"""
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base, registry
from vljax.evaluators import data as data_lib
from vljax.evaluators import late_interaction
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


def ensemble(per_class: Sequence[np.ndarray]) -> np.ndarray:
    """Prompt ensembling: per class the mean of its normalised sentence embeddings,
    renormalised (CLIP's recipe).

    Returns: [C, D] L2-normalised class embeddings.
    """
    return base.l2_normalize(np.stack([z.mean(axis=0) for z in per_class]).astype(np.float32))


def zpe_weights(zimg: np.ndarray, ztpl: np.ndarray, logit_scale: float,
                zref: np.ndarray | None = None, select_threshold: float | None = None,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot prompt ensembling weights (ZPE; Allingham et al., ICML 2023, Sec. 3, and the
    official notebook in google/uncertainty-baselines, `get_weights` / `mad_method`).

    With template p's logits l_p(x, c) = logit_scale * <zimg(x), ztpl[p, c]>, the naive
    "max-logit" score E_x[max_c l_p(x, c)] prefers templates whose words are frequent in
    pre-training (every class scores high with them). ZPE removes that bias with the expected
    logit over images, averaged over both sources (the notebook's debias_mode="both"):

        lbar_p(c) = (E_{x' ~ pretraining proxy}[l_p(x', c)] + E_{x ~ test}[l_p(x, c)]) / 2,

    (the test images alone when no proxy `zref` is given), scores each template by
        s_p = E_x [max_c (l_p(x, c) - lbar_p(c))],
    and weights w = softmax_p(s_p). The selection variant ("ZPE (prompt selection)", the
    paper's headline) keeps only the outlier templates by the median absolute deviation,
    (s_p - median(s)) / MAD(s) > select_threshold (0.5 for ImageNet, 2.0 for the fine-grained
    sets in the paper); the weights of the others are set to 0 (the kept ones keep their
    softmax values, as in the notebook). Should nothing pass, the best template is kept (the
    notebook reports accuracy 0 there). No label is used.

    Args:
      zimg: [N, D] normalised test-image embeddings.
      ztpl: [P, C, D] normalised embedding of template p filled with class c.
      zref: [M, D] pretraining-proxy images (e.g. the training collection's), or None.
      select_threshold: the MAD threshold, or None to keep every template.
    Returns:
      (weights [P], scores [P]).
    """
    num_p, num_c, _ = ztpl.shape
    flat = ztpl.reshape(num_p * num_c, -1).T  # [D, P*C]: one BLAS matmul per chunk

    def logits(z):
        return (logit_scale * (z @ flat)).reshape(len(z), num_p, num_c)

    # Logits are linear in the image embedding: their mean is the mean embedding's logits.
    lbar = logits(zimg.mean(axis=0, keepdims=True))[0]  # [P, C]
    if zref is not None:
        lbar = 0.5 * (lbar + logits(zref.mean(axis=0, keepdims=True))[0])
    chunk = max(1, min(batch_size, (1 << 22) // (num_p * num_c)))  # bound [b, P, C] memory
    scores = sum((logits(zimg[s]) - lbar).max(axis=2).sum(axis=0)
                 for s in base.batch_slices(len(zimg), chunk)) / len(zimg)
    w = np.exp(scores - scores.max())
    w = w / w.sum()
    if select_threshold is not None:
        med = np.median(scores)
        mad = np.median(np.abs(scores - med))
        with np.errstate(divide="ignore", invalid="ignore"):
            keep = (scores - med) / mad > select_threshold
        keep[np.argmax(scores)] = True
        w = np.where(keep, w, 0.0)
    return w, scores


def logit_average(per_class: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """ZPE's classifier: the weighted average of the templates' LOGITS, sum_p w_p l_p(x, c).
    Logits are linear in the text embedding, so it is one [C, D] matrix, sum_p w_p ztpl[p, c],
    NOT renormalised per class (renormalising would rescale each class's logits). Its scores
    are the averaged logits over logit_scale, and rank the classes the same way."""
    return np.stack([np.tensordot(weights, z, axes=1) for z in per_class]).astype(np.float32)


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
    return ranks_from_blocks(((s, zimg[s] @ ztxt.T) for s in base.batch_slices(len(zimg), batch_size)),
                             labels)


def ranks_from_blocks(blocks, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rank of the true class [N], top-1 class [N]) from score blocks (s, [len(s), C]) that
    cover the images in order."""
    ranks, preds = [], []
    for s, scores in blocks:
        ranks.append(base.ranks_of(scores, labels[s]))
        preds.append(np.argmax(scores, axis=1))  # first maximum: the lower index on ties
    return np.concatenate(ranks), np.concatenate(preds)


def filip_class_blocks(img: np.ndarray, per_class_tokens, chunk=late_interaction.DEFAULT_CHUNK):
    """Yields (s, [len(s), C]) FILIP zero-shot scores: per class, the i2t late-interaction
    similarity averaged over its prompts (module docstring).

    Args:
      img: [N, T, D] projected normalised image tokens.
      per_class_tokens: (tokens [P, L, D], mask [P, L]) of all prompts, and class_of [P] ints.
    """
    (txt, mask), class_of = per_class_tokens
    num_c = int(class_of.max()) + 1
    average = np.zeros((len(txt), num_c), np.float32)  # [P, C]: 1/T_c where prompt p is of class c
    average[np.arange(len(txt)), class_of] = 1.0 / np.bincount(class_of, minlength=num_c)[class_of]
    for s, block in late_interaction.blocks(img, txt, mask, "i2t", rows="images", chunk=chunk):
        yield s, block @ average


def filip_class_scores(embedder, data, texts, chunk=late_interaction.DEFAULT_CHUNK):
    """-> (blocks, record indices): `filip_class_blocks` of the set's image tokens against every
    prompt of `texts` (one list of sentences per class), the tokens streamed by `embedder`."""
    img, index = late_interaction.image_tokens(embedder, data)
    flat = [t for ts in texts for t in ts]
    class_of = np.repeat(np.arange(len(texts)), [len(ts) for ts in texts])
    return filip_class_blocks(img, (late_interaction.text_tokens(embedder, flat), class_of), chunk), index


def accuracies(ranks: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5),
               groups: np.ndarray | None = None) -> dict[str, float]:
    """Top-k accuracies, mean and worst per-class recall (over classes with at least one
    image) and, with `groups`, the worst-group top-1 accuracy (the lowest accuracy over the
    groups; "Distributionally robust neural networks", Sagawa et al., ICLR 2020).

    Args: ranks [N] 0-based rank of the true class, labels [N], groups [N] ints or None.
    """
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    correct = ranks == 0
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    out["mean_per_class"] = float(np.mean(per_class))
    out["worst_class"] = float(np.min(per_class))
    if groups is not None:
        out["worst_group"] = float(min(correct[groups == g].mean() for g in np.unique(groups)))
    return out


@dataclasses.dataclass
class ZeroShotResult:
    metrics: dict[str, float]
    confusion: np.ndarray             # [C, C], rows true, columns predicted
    predictions: np.ndarray           # [N] top-1 class
    template_weights: np.ndarray | None  # [P] ZPE weights, None without ZPE


@registry.register("zeroshot")
class ZeroShotEvaluator(base.Evaluator):
    """Zero-shot classification of labeled images against class-name prompts.

    Metrics: "zeroshot/<name>/top1", ".../top5" (each k of `ks`), ".../mean_per_class",
    ".../worst_class", and ".../worst_group" with `groups`.
    With `plot_dir`, each run writes "<plot_dir>/confusion_<name>.png".
    """
    # The keys of `evals.<name>.data` (checked by config_check too); `group`: worst-group accuracy.
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS + ("group",)

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str,
                 *, name: str, templates: str | Sequence[str] | None = "clip80",
                 descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                 canonicalize: bool = True, zpe: bool = False, zpe_reference=None,
                 zpe_select: float | None = None, ks: Sequence[int] = (1, 5), plot_dir: str | None = None,
                 groups: Sequence[int] | None = None, similarity: str | None = None,
                 filip_chunk: Sequence[int] = late_interaction.DEFAULT_CHUNK):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py); only the embedder reads them.
          labels: [N] ints in [0, C), one per record of `data`.
          class_names: C names, or a file (see `prompts.load_class_names`).
          name: the data set's name in the metric keys.
          templates: a `prompts.TEMPLATES` key or a list; None for descriptions only.
          descriptions: CuPL sentences per class (JSON path or dict), mixed with the templates.
          canonicalize: clean class names with `prompts.canonicalize_name`.
          zpe: weight templates by ZPE scores and average their logits (needs templates and
            no descriptions; see `zpe_weights`).
          zpe_reference: pretraining-proxy images (a source) for ZPE's debiasing, beside the
            test images; None debiases with the test images only.
          zpe_select: ZPE's MAD selection threshold (the paper: 0.5 ImageNet, 2.0 fine-grained).
          groups: [N] group ids, one per record (e.g. an emoji's category when the labels are
            its subcategories), for the worst-group accuracy.
          similarity: "global", "filip" (module docstring), or None for the model's.
          filip_chunk: (images, prompts) scored per block with "filip".
        """
        self.chunk = late_interaction.check(similarity, filip_chunk)
        self.similarity = similarity
        if zpe and similarity == "filip":
            raise ValueError(f"config keys `evals.{name}.zpe` and `similarity`='filip' conflict: ZPE "
                             "weights templates by pooled-embedding logits; use one of them")
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize \
            else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise ValueError(f"{name}: labels must lie in [0, {len(self.class_names)})")
        self.groups = None if groups is None else np.asarray(groups, np.int64)
        if self.groups is not None and len(self.groups) != len(self.labels):
            raise ValueError(f"{name}: {len(self.groups)} groups for {len(self.labels)} records")
        if zpe and (templates is None or descriptions is not None):
            raise ValueError("ZPE weights templates: give templates and no descriptions")
        if (zpe_reference is not None or zpe_select is not None) and not zpe:
            raise ValueError(f"{name}: zpe_reference / zpe_select need zpe=True")
        self.texts = prompts.class_texts(self.class_names, templates, descriptions)
        self.name, self.zpe, self.zpe_reference, self.zpe_select = name, zpe, zpe_reference, zpe_select
        self.ks, self.plot_dir = tuple(ks), plot_dir

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="zeroshot", data=dict(name=..., split=...,
        label=..., max_examples=..., group=...), templates=..., zpe=..., zpe_reference=dict(name=...,
        split=..., max_examples=...), zpe_select=...); `group` names an integer feature whose
        values group the records (worst-group accuracy)."""
        data, kwargs = data_lib.split_spec(name, spec)
        group_key = data.pop("group", None)
        ref = kwargs.get("zpe_reference")
        if ref is not None:
            ref = dict(ref)
            data_lib.check_keys(f"{name}.zpe_reference", ref,
                                ("name", "split", "data_dir", "max_examples", "source"))
            if "name" not in ref and "source" not in ref:
                raise ValueError(f"config key `evals.{name}.zpe_reference.name` is missing")
            kwargs["zpe_reference"] = data_lib.first(
                data_lib.open_entry(f"{name}.zpe_reference", ref, default_split="train"),
                ref.get("max_examples"))
        source, labels, class_names = data_lib.classification(name, data)
        if group_key is not None:
            kwargs["groups"] = [source.label_of(i, group_key) for i in range(len(source))]
        kwargs.setdefault("plot_dir", plot_dir)
        return cls(source, labels, class_names, name=name, **kwargs)

    def evaluate(self, embedder: base.Embedder) -> ZeroShotResult:
        if late_interaction.resolve(self.similarity, embedder) == "filip":
            return self._evaluate_filip(embedder)
        zimg, index = base.image_embeddings(embedder, self.data)
        labels = self.labels[index]
        per_class = class_text_embeddings(embedder, self.texts)
        weights = None
        if self.zpe:
            ztpl = np.stack(per_class, axis=1)  # [P, C, D]
            zref = None if self.zpe_reference is None else base.image_embeddings(
                embedder, self.zpe_reference)[0]
            weights, _ = zpe_weights(zimg, ztpl, float(embedder.logit_scale), zref, self.zpe_select)
            ztxt = logit_average(per_class, weights)
        else:
            ztxt = ensemble(per_class)
        ranks, preds = ranks_and_predictions(zimg, ztxt, labels)
        return self._result(ranks, preds, labels, index, weights)

    def _evaluate_filip(self, embedder: base.Embedder) -> ZeroShotResult:
        if self.zpe:
            raise ValueError(f"config key `evals.{self.name}.zpe`: the model scores by FILIP late "
                             "interaction; ZPE weights pooled-embedding logits (set similarity='global')")
        blocks, index = filip_class_scores(embedder, self.data, self.texts, self.chunk)
        labels = self.labels[index]
        ranks, preds = ranks_from_blocks(blocks, labels)
        return self._result(ranks, preds, labels, index, None)

    def _result(self, ranks, preds, labels, index, weights) -> ZeroShotResult:
        metrics = accuracies(ranks, labels, self.ks,
                             None if self.groups is None else self.groups[index])
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
