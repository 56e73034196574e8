"""The protocol between evaluators and whatever embeds images and texts, and shared helpers.

Evaluators never see a model or an image: they name their data (a source, see
vljax/evaluators/data.py) and receive an `Embedder` (vljax/embedder.py streams the data through
the jitted towers; tests use a lookup table) that returns embeddings. They return flat metric
dicts named "<kind>/<dataset>/<metric>", e.g. "zeroshot/fashion_mnist/top1".
"""
import abc
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """What an evaluator needs from a two-tower model.

    Attributes:
      logit_scale: the model's temperature exp(t) (logits = scale * cos + bias).
      logit_bias: the SigLIP bias b, or None for models without one.
    """
    logit_scale: float
    logit_bias: float | None

    def embed_images(self, data):
        """data: a source (len / getitem records) -> an object with `z` [M, D] L2-normalised
        embeddings of the readable records and `index` [M] their record indices, in order."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> [N, D] L2-normalised (the embedder tokenises, batches and caches)."""


class Evaluator(abc.ABC):
    """An evaluation built from plain arguments; `run` may be called at every eval step."""

    @abc.abstractmethod
    def run(self, embedder: Embedder) -> dict[str, float]:
        """Embeds what it needs with `embedder` and returns {metric name: value}."""


def run_all(evaluators: Mapping[str, "Evaluator"], embedder: Embedder, *,
            timed: bool = True) -> dict[str, float]:
    """Runs every evaluator ({name: Evaluator}, in order) with one embedder (evaluators over the
    same data or class prompts share its cached embeddings) -> their merged metrics, plus
    `time/eval_<name>_s` (wall seconds of each run) when `timed`. The one evaluation loop of the
    trainer, `vljax.evaluate`, soups and WiSE-FT."""
    results = {}
    for name, ev in evaluators.items():
        t0 = time.perf_counter()
        results.update(ev.run(embedder))
        if timed:
            results[f"time/eval_{name}_s"] = time.perf_counter() - t0
    return results


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(n), each at most `batch_size` long."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def image_embeddings(embedder: Embedder, data) -> tuple[np.ndarray, np.ndarray]:
    """(zimg [M, D] float32 L2-normalised, index [M]) of the readable records of `data`."""
    emb = embedder.embed_images(data)
    index = np.asarray(emb.index, np.int64)
    if len(index) != len(emb.z):
        raise ValueError(f"embedder returned {len(emb.z)} embeddings for {len(index)} records")
    return l2_normalize(np.asarray(emb.z, np.float32)), index


def text_embeddings(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """[N, D] float32 L2-normalised embeddings of `texts`."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    return l2_normalize(np.asarray(embedder.embed_texts(texts), np.float32))


def ranks_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column `target[i]` in row i of `scores`, sorted by descending score.

    Ties are broken deterministically by column index (the lower index ranks first), the
    order a stable descending sort gives. rank < k  <=>  target is in the top k.

    Args:
      scores: [N, M]. target: [N] ints in [0, M).
    """
    rows = np.arange(len(scores))
    s = scores[rows, target][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    ahead = (scores > s) | ((scores == s) & (cols < target[:, None]))
    return ahead.sum(axis=1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of the k highest scores per row, best first; ties to the lower index."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
