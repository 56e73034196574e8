"""FuDD: follow-up differential descriptions (Esfandiarpoor & Bach, "Follow-Up Differential Descriptions:
Language Models Resolve Ambiguities for Image Classification", ICLR 2024, arXiv 2311.07593), training-free.

Three steps (the paper's abstract and its Fig. 2 overview, as read; the paper's equations and the
official code were not readable here, so the averaging in step C is our statement of it):
  A. ambiguous classes: the initial zero-shot classifier (template ensemble) gives each image x its k
     most likely classes A(x);
  B. differential descriptions: for each pair (c, c') of classes, sentences d(c | c') describing what
     tells c apart from c' (the paper asks an LLM; here they are written once into
     configs/descriptions/fudd_*.json, {class: {other class: [sentences]}});
  C. follow-up classification among A(x): class c in A(x) is represented by the mean of the
     normalised embeddings of its descriptions against the other ambiguous classes,
         r_x(c) = normalise( mean_{c' in A(x), c' != c} e(c | c') ),
     e(c | c') the mean embedding of d(c | c'), and x gets argmax_{c in A(x)} <zimg(x), r_x(c)>.
Classes outside A(x) keep their initial ranks below the follow-up order (top-k accuracy for k >= |A|
is unchanged). With k = 1 FuDD is the initial zero-shot prediction.
"""
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base, prompts, registry, zeroshot
from vljax.evaluators import data as data_lib


def load_differential(source: str | os.PathLike | Mapping, class_names: Sequence[str]
                      ) -> list[list[list[str] | None]]:
    """[C][C] sentences d(c | c') (None on the diagonal) from {class: {other class: [sentences]}}
    (keys found by exact or canonical name; "_" keys are notes). A class or pair the file lacks is
    an error naming the file and the pair."""
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "descriptions dict"
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    table = {prompts.canonicalize(str(k)): v for k, v in source.items() if not str(k).startswith("_")}
    missing = [c for c in class_names if not isinstance(table.get(prompts.canonicalize(c)), Mapping)]
    if missing:
        raise ValueError(f"{where}: no differential descriptions for class {missing[0]!r}"
                         + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = []
    for c in class_names:
        row = {prompts.canonicalize(str(k)): v for k, v in table[prompts.canonicalize(c)].items()}
        sentences = []
        for other in class_names:
            if other == c:
                sentences.append(None)
                continue
            s = row.get(prompts.canonicalize(other))
            s = [s] if isinstance(s, str) else list(s or [])
            if not s:
                raise ValueError(f"{where}: class {c!r} has no description against class {other!r}")
            sentences.append([str(x) for x in s])
        out.append(sentences)
    return out


def fudd_scores(zimg: np.ndarray, initial: np.ndarray, pair_emb: np.ndarray, k: int,
                batch_size: int = 512) -> np.ndarray:
    """Scores [N, C] whose ranking is FuDD's: the k initial top classes ordered by the follow-up
    similarity <zimg, r_x(c)> (module docstring), above the others in their initial order.

    Args:
      zimg: [N, D] normalised images. initial: [N, C] initial zero-shot scores.
      pair_emb: [C, C, D] e(c | c') (the diagonal is unused).
      k: the number of ambiguous classes (>= 1).
    """
    n, num_c = initial.shape
    k = min(k, num_c)
    out = np.empty((n, num_c), np.float64)
    for s in base.batch_slices(n, batch_size):
        top = base.top_k(initial[s], k)                                        # [b, k]
        block = pair_emb[top[:, :, None], top[:, None, :]]                     # [b, k, k, D]
        off = (1.0 - np.eye(k))[None, :, :, None]
        rep = (block * off).sum(axis=2) / max(k - 1, 1)                        # [b, k, D]
        if k > 1:
            follow = np.einsum("bd,bkd->bk", zimg[s], base.l2_normalize(rep))
        else:
            follow = np.zeros((len(top), 1))
        # Initial scores mapped below 0 keep their order under the follow-up block (scores in [2, 4]).
        low = initial[s] - initial[s].max(axis=1, keepdims=True) - 1.0
        out[s] = low
        np.put_along_axis(out[s], top, 3.0 + follow - 1e-9 * np.arange(k)[None], axis=1)
    return out


@registry.register("fudd")
class FuDDEvaluator(base.Evaluator):
    """FuDD zero-shot classification (module docstring).

    Metrics "fudd/<name>/top1", ".../top5" (each k of `ks`), ".../mean_per_class", ".../worst_class",
    ".../zeroshot_top1" (the initial classifier) and ".../ambiguous_recall" (the share of images whose
    true class is among the k ambiguous ones: FuDD's ceiling).
    """
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str, *, name: str,
                 descriptions: str | os.PathLike | Mapping, k: int = 5,
                 templates: str | Sequence[str] = "clip80", ks: Sequence[int] = (1, 5),
                 canonicalize: bool = True):
        """
        Args:
          data / labels / class_names: the images (a source), their [N] labels, the C class names.
          descriptions: configs/descriptions/fudd_*.json or its dict (`load_differential`).
          k: ambiguous classes per image (the paper's k; 1 gives the initial prediction).
          templates: the initial classifier's templates (`prompts.TEMPLATES` key or list).
        """
        if k < 1:
            raise ValueError(f"config key `evals.{name}.k` must be >= 1, got {k}")
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        self.differential = load_differential(descriptions, names)
        self.texts = prompts.class_texts(self.class_names, templates)
        self.name, self.k, self.ks = name, int(k), tuple(ks)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From `evals.<name>` = dict(type="fudd", data=dict(name=..., split=..., label=...) or a source
        entry, descriptions="configs/descriptions/fudd_fashion_mnist.json", k=5, templates=...)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        source, labels, class_names = data_lib.classification(name, data)
        return cls(source, labels, class_names, name=name, **kwargs)

    def pair_embeddings(self, embedder: base.Embedder) -> np.ndarray:
        """[C, C, D]: e(c | c'), the mean of the normalised embeddings of d(c | c') (zero on the diagonal)."""
        num_c = len(self.class_names)
        pairs = [(i, j) for i in range(num_c) for j in range(num_c) if i != j]
        per_pair = zeroshot.class_text_embeddings(embedder, [self.differential[i][j] for i, j in pairs])
        out = np.zeros((num_c, num_c, per_pair[0].shape[1]), np.float32)
        for (i, j), z in zip(pairs, per_pair):
            out[i, j] = z.mean(axis=0)
        return out

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        labels = self.labels[index]
        initial = zimg @ zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts)).T
        scores = fudd_scores(zimg, initial, self.pair_embeddings(embedder), self.k)
        metrics = zeroshot.accuracies(base.ranks_of(scores, labels), labels, self.ks)
        metrics["zeroshot_top1"] = float(np.mean(np.argmax(initial, axis=1) == labels))
        metrics["ambiguous_recall"] = float(np.mean(base.ranks_of(initial, labels) < self.k))
        return {f"fudd/{self.name}/{k}": v for k, v in metrics.items()}
