"""Embedder: a trained two-tower model as two batched, compiled-once functions.

It implements the protocol evaluators use (vljax/evaluators/base.py): `embed_images`, `embed_texts`,
`logit_scale`, `logit_bias`. Batches are padded to a fixed size so each tower compiles once.
With `image_feature_cache`, the locked part of the image tower (everything before its projection
head) runs once per image array and is reused by later calls: evaluations during LiT training then
cost a projection, not a forward pass of the image tower.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def _fingerprint(images: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((images.shape, images.dtype)).encode())
    flat = images.reshape(-1)
    step = max(1, flat.size // 4096)
    h.update(np.ascontiguousarray(flat[::step]).tobytes())
    return h.hexdigest()


class Embedder:
    """Embeds preprocessed images `[N, H, W, 3]` and raw texts with fixed params."""

    def __init__(self, model, params, tokenizer, *, batch_size: int = 64, image_feature_cache: bool = False):
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._cache = {} if image_feature_cache else None
        self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, None)[0])
        self._txt = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1])
        self._img_features = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=model.image_trunk))
        self._img_from_features = jax.jit(
            lambda p, f: model.apply({"params": p}, f, method=model.image_head))

    @property
    def logit_scale(self) -> float:
        return float(jnp.exp(self.params["t"]))

    @property
    def logit_bias(self) -> float | None:
        return float(self.params["b"]) if "b" in self.params else None

    def _batched(self, fn, params, x: np.ndarray) -> np.ndarray:
        n = len(x)
        outs = []
        for start in range(0, n, self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(fn(params, chunk))[:self.batch_size - pad])
        if not outs:
            raise ValueError("nothing to embed: got an empty array")
        return np.concatenate(outs)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """images: [N, H, W, 3] float32, preprocessed as in training -> [N, D] L2-normalised."""
        images = np.asarray(images)
        if self._cache is None:
            return self._batched(self._img, self.params, images)
        key = _fingerprint(images)
        if key not in self._cache:
            self._cache[key] = self._batched(self._img_features, self.params, images)
        return self._batched(self._img_from_features, self.params, self._cache[key])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """texts: N strings -> [N, D] L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got one string")
        ids = np.asarray(self.tokenizer(list(texts)), np.int32)
        return self._batched(self._txt, self.params, ids)
