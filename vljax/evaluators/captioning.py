"""What a caption decoder (LocCa / CapPa, SigLIP 2's; vljax/models/decoder.py) has learnt, measured
by its own log-likelihoods (`Embedder.caption_loglik`: teacher forcing, autoregressive reading,
no parallel prediction; a model without a decoder is refused, naming `model.decoder`).

"caption_nll": the decoder's negative log-likelihood of held-out captions given their images.
  For captions c_j with real tokens (ids != the decoder's pad_id, end-of-text included) t_jl:
      nll            = sum_j sum_l -log p(t_jl | t_j<l, image_j) / sum_j |c_j|   (per token)
      perplexity     = exp(nll)
      nll_per_caption = mean_j of (sum_l -log p(t_jl | ...) / |c_j|)  (the training loss's
                        normalisation, vljax/losses/captioning.py `caption_loss`)
  big_vision's CapPa perplexity evaluator (`evaluators/proj/cappa/perplexity.py`) computes the
  same per-token cross-entropy with weights (labels != pad).

"cappa_zeroshot": CapPa's scoring classifier (Tschannen et al. 2023, "Image Captioners Are
  Scalable Vision Learners Too", zero-shot classification by scoring; big_vision's
  `evaluators/proj/cappa/scoring_classifier.py` with `trainers/proj/cappa/predict_fns.py`
  `predict_fn_score`): every class's text is scored by the decoder's log-likelihood given the
  image, the SUM of its real tokens' log-probabilities (big_vision: `weighted_softmax_xent(...,
  normalize=False)` over tokens != pad, negated), and the image takes the class of the highest
  score. big_vision scores the bare class names, optionally behind one fixed prompt (its
  `prompt`, default none): `templates=("{}",)` is that default, and a prompt template such as
  ("a photo of a {}.",) the prompted form (a fixed prefix adds the same log-likelihood to every
  class under causal reading, so it changes scores only through how the name is read after it).
  With several templates (our extension) a class scores the mean of its templates' scores.
  `score="mean"` divides each text's sum by its token count (a length-normalised variant).
  Batched over classes x images: the image tower runs once per image batch, the decoder once per
  text over the batch (towers.py `decoder_loglik_all`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base, prompts, registry
from vljax.evaluators import data as data_lib
from vljax.evaluators import zeroshot


def _check_embedder(embedder, name: str) -> None:
    if not callable(getattr(embedder, "caption_loglik", None)):
        raise TypeError(f"evals.{name}: the embedder gives no caption log-likelihoods "
                        f"({type(embedder).__name__} has no caption_loglik; the model needs "
                        "model.decoder)")


def nll_metrics(loglik: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """loglik [n] (each caption's sum of token log-probabilities), counts [n] (its real tokens)
    -> {"nll", "perplexity", "nll_per_caption", "captions", "tokens"} (module docstring)."""
    loglik, counts = np.asarray(loglik, np.float64), np.asarray(counts, np.float64)
    nll = float(-loglik.sum() / max(counts.sum(), 1.0))
    return {"nll": nll, "perplexity": float(np.exp(nll)),
            "nll_per_caption": float(np.mean(-loglik / np.maximum(counts, 1.0))),
            "captions": float(len(loglik)), "tokens": float(counts.sum())}


@registry.register("caption_nll")
class CaptionNLLEvaluator(base.Evaluator):
    NEEDS_DECODER = True  # config_check refuses it for a config whose model has no decoder
    """Metrics "caption_nll/<name>/nll" (per token), ".../perplexity", ".../nll_per_caption",
    ".../captions", ".../tokens" (module docstring)."""
    DATA_KEYS = ("name", "split", "data_dir", "max_examples", "source")

    def __init__(self, data, captions: Sequence[Sequence[str]], *, name: str,
                 captions_per_image: int | None = None):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py).
          captions: N lists of captions, captions[i] describing record i of `data`.
          captions_per_image: score only the first k captions of each image (None: all).
        """
        if len(data) != len(captions):
            raise ValueError(f"{name}: {len(data)} records but {len(captions)} caption lists")
        if captions_per_image is not None and int(captions_per_image) < 1:
            raise ValueError(f"config key `evals.{name}.captions_per_image`: {captions_per_image!r} "
                             "must be a positive int or None")
        k = None if captions_per_image is None else int(captions_per_image)
        rows, texts = [], []
        for i, caps in enumerate(captions):
            caps = [c.strip() for c in ([caps] if isinstance(caps, str) else caps) if c.strip()][:k]
            rows += [i] * len(caps)
            texts += caps
        if not texts:
            raise ValueError(f"{name}: no record of {data!r} has a caption")
        # One row per (image, caption) pair: the record repeated for each of its captions.
        self.data, self.texts, self.name = data_lib.Subset(data, rows), texts, name

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="caption_nll", data=dict(name=...,
        split=..., max_examples=...), captions_per_image=None); `data` may be a source entry of
        any kind. The captions are the source's (`captions_of`, no image decoded)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        source = data_lib.first(data_lib.open_entry(name, data), data.get("max_examples"))
        return cls(source, [source.captions_of(i) for i in range(len(source))], name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        _check_embedder(embedder, self.name)
        emb, counts = embedder.caption_loglik(self.data, self.texts, paired=True)
        index = np.asarray(emb.index, np.int64)
        out = nll_metrics(np.asarray(emb.z), np.asarray(counts)[index])
        return {f"caption_nll/{self.name}/{k}": v for k, v in out.items()}


def class_scores(loglik: np.ndarray, counts: np.ndarray, num_classes: int, score: str = "sum") -> np.ndarray:
    """loglik [M, C*P] (image x text, the texts class-major: class c's P templates together),
    counts [C*P] -> [M, C]: per class the mean over its templates of the text's score, the sum
    of its token log-probabilities ("sum", CapPa's) or that over its token count ("mean")."""
    s = np.asarray(loglik, np.float64)
    if score == "mean":
        s = s / np.maximum(np.asarray(counts, np.float64), 1.0)
    return s.reshape(len(s), num_classes, -1).mean(axis=2)


@registry.register("cappa_zeroshot")
class CapPaZeroShotEvaluator(base.Evaluator):
    NEEDS_DECODER = True
    """Metrics "cappa_zeroshot/<name>/top1" (each k of `ks`), ".../mean_per_class",
    ".../worst_class" (`zeroshot.accuracies`)."""
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS
    SCORES = ("sum", "mean")

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str, *, name: str,
                 templates: str | Sequence[str] = ("{}",), canonicalize: bool = True,
                 score: str = "sum", ks: Sequence[int] = (1, 5)):
        """
        Args:
          data: the images, a source; labels: [N] ints in [0, C), one per record.
          class_names: C names, or a file (`prompts.load_class_names`).
          templates: a `prompts.TEMPLATES` key or a list of "{}" templates (default the bare
            class name, as big_vision's CapPa scoring).
          score: "sum" (CapPa: the sum of token log-probabilities) or "mean" (per token).
        """
        if score not in self.SCORES:
            raise ValueError(f"config key `evals.{name}.score`: {score!r} is not one of {self.SCORES}")
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"{name}: labels must lie in [0, {len(self.class_names)})")
        self.texts = prompts.class_texts(self.class_names, templates)
        self.name, self.score, self.ks = name, score, tuple(ks)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="cappa_zeroshot", data=dict(name=...,
        split=..., label=..., max_examples=...), templates=("{}",), score="sum"); `data` may be a
        source entry of any kind (vljax/evaluators/data.py `classification`)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        source, labels, class_names = data_lib.classification(name, data)
        return cls(source, labels, class_names, name=name, **kwargs)

    def scores(self, embedder: base.Embedder) -> tuple[np.ndarray, np.ndarray]:
        """(scores [M, C], record indices [M]) of the readable images."""
        _check_embedder(embedder, self.name)
        flat = [t for ts in self.texts for t in ts]
        emb, counts = embedder.caption_loglik(self.data, flat, paired=False)
        return class_scores(emb.z, counts, len(self.class_names), self.score), np.asarray(emb.index, np.int64)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        s, index = self.scores(embedder)
        labels = self.labels[index]
        metrics = zeroshot.accuracies(base.ranks_of(s, labels), labels, self.ks)
        return {f"cappa_zeroshot/{self.name}/{k}": v for k, v in metrics.items()}
