"""The protocol between evaluators and whatever embeds images and texts, and shared helpers.

Evaluators never see a model: they receive an `Embedder` (the trainer and `vljax.inference`
wrap their jit-compiled towers in one; tests use a lookup table) and return flat metric dicts
named "<kind>/<dataset>/<metric>", e.g. "zeroshot/fashion_mnist/top1".
"""
import abc
from collections.abc import Iterator, Sequence
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

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """images [N, H, W, 3] float32, already preprocessed -> [N, D] L2-normalised."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> [N, D] L2-normalised (the embedder tokenises and batches)."""


class Evaluator(abc.ABC):
    """An evaluation built from plain arguments; `run` may be called at every eval step."""

    @abc.abstractmethod
    def run(self, embedder: Embedder) -> dict[str, float]:
        """Embeds what it needs with `embedder` and returns {metric name: value}."""


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(n), each at most `batch_size` long."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def embed_images(embedder: Embedder, images: np.ndarray, batch_size: int,
                 indices: np.ndarray | None = None) -> np.ndarray:
    """Embeds `images` [N, H, W, 3] (or only images[indices]) batch by batch -> [N, D] float32.

    Only one batch of pixels is materialised at a time, so a memory-mapped array streams.
    Every call sees the same batch size (the last batch is padded by repeating its last
    image, then trimmed), so a jit-compiled embedder compiles once.
    """
    n = len(images) if indices is None else len(indices)
    if n == 0:
        raise ValueError("no images to embed")
    size = min(batch_size, n)
    out = []
    for s in batch_slices(n, size):
        batch = np.asarray(images[s] if indices is None else images[indices[s]], np.float32)
        pad = size - len(batch)
        batch = np.pad(batch, [(0, pad)] + [(0, 0)] * (batch.ndim - 1), mode="edge")
        out.append(np.asarray(embedder.embed_images(batch), np.float32)[:size - pad])
    return np.concatenate(out, axis=0)


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Embeds `texts` in batches -> [N, D] float32, padding the last batch like
    `embed_images`."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    size = min(batch_size, len(texts))
    out = []
    for s in batch_slices(len(texts), size):
        batch = texts[s]
        pad = size - len(batch)
        z = embedder.embed_texts(batch + batch[-1:] * pad)
        out.append(np.asarray(z, np.float32)[:size - pad])
    return np.concatenate(out, axis=0)


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
