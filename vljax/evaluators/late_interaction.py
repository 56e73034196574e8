"""Late-interaction (FILIP) scores for the evaluators, computed in chunks so memory stays bounded.

FILIP (Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training", Sec. 3.1.1,
Eqs. 4-5) scores image x against text y from their projected, per-token L2-normalised tokens:

    i2t(x, y) = 1/n1 sum_k max_r <x_k, y_r>      (each image token finds its best text token)
    t2i(x, y) = 1/n2 sum_r max_k <x_k, y_r>      (each text token finds its best image token)

(`vljax.losses.filip_similarity`, over real text tokens only). The similarity tensor of a block of
ci images and ct texts is [ci, ct, N, M]: `blocks` never builds more than one such block at a time
(memory O(ci * ct * N * M) on the device, plus one row block [ci, n_texts] on the host), so an
evaluation set costs only its tokens [n, N, D], never a [n_img, n_txt, N, M] tensor.

Which similarity an evaluator uses: `evals.<name>.similarity` ("global": cosine of the pooled
embeddings; "filip": late interaction), or, when unset, the one the model was trained with
(`Embedder.similarity`, from the model spec: vljax/factory.py), so train and eval agree.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np

from vljax import losses
from vljax.evaluators import base

SIMILARITIES = ("global", "filip")
DEFAULT_CHUNK = (32, 256)  # (images, texts) per block: 32 x 256 x 16 x 16 x 4 B = 8 MiB (Lite0, 112 px)


def resolve(similarity: str | None, embedder) -> str:
    """The evaluator's `similarity`, or the embedder's (the trained loss's) when None."""
    s = similarity if similarity is not None else getattr(embedder, "similarity", "global")
    if s not in SIMILARITIES:
        raise ValueError(f"config key `evals.<name>.similarity`: {s!r} is not one of {SIMILARITIES}")
    return s


def check(similarity: str | None, chunk) -> tuple[int, int]:
    """Validates the config values (None = decided by the model) and returns the chunk sizes."""
    if similarity is not None and similarity not in SIMILARITIES:
        raise ValueError(f"config key `evals.<name>.similarity`: {similarity!r} is not one of {SIMILARITIES}")
    ci, ct = (int(c) for c in chunk)
    if ci <= 0 or ct <= 0:
        raise ValueError(f"config key `evals.<name>.filip_chunk`: {tuple(chunk)} must be two positive ints")
    return ci, ct


@functools.partial(jax.jit, static_argnames="direction")
def _block(img, txt, txt_mask, direction):
    i2t, t2i = losses.filip_similarity(img, txt, txt_mask)
    return i2t if direction == "i2t" else t2i


def _padded(x: np.ndarray, n: int, fill=0) -> np.ndarray:
    if len(x) == n:
        return x
    return np.concatenate([x, np.full((n - len(x),) + x.shape[1:], fill, x.dtype)])


def blocks(img: np.ndarray, txt: np.ndarray, txt_mask: np.ndarray, direction: str, *,
           rows: str = "images", chunk=DEFAULT_CHUNK) -> Iterator[tuple[slice, np.ndarray]]:
    """Yields (s, block): the `direction` scores ("i2t" or "t2i", both indexed [image, text]) of
    the `rows` ("images" or "texts") in slice s against every item of the other set, as
    [len(s), n_other] float32, computed ci images x ct texts at a time.

    Args:
      img: [n_img, N, D] projected normalised image tokens; txt: [n_txt, M, D] text tokens;
      txt_mask: [n_txt, M] bool (True = a real token); chunk: (ci, ct).
    """
    if direction not in ("i2t", "t2i") or rows not in ("images", "texts"):
        raise ValueError(f"direction {direction!r} / rows {rows!r}: expected i2t|t2i and images|texts")
    ci, ct = min(chunk[0], len(img)), min(chunk[1], len(txt))
    txt_mask = np.asarray(txt_mask, bool)

    def score(s, t):  # [len(s), len(t)]; padded rows are valid zero tokens, cut off after
        out = _block(_padded(img[s], ci), _padded(txt[t], ct), _padded(txt_mask[t], ct, True), direction)
        return np.asarray(out)[:s.stop - s.start, :t.stop - t.start]

    if rows == "images":
        for s in base.batch_slices(len(img), ci):
            yield s, np.concatenate([score(s, t) for t in base.batch_slices(len(txt), ct)], axis=1)
    else:
        for t in base.batch_slices(len(txt), ct):
            yield t, np.concatenate([score(s, t) for s in base.batch_slices(len(img), ci)], axis=0).T


def image_tokens(embedder, data) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [M, N, D] float32, index [M]) of the readable records of `data`."""
    emb = embedder.embed_image_tokens(data)
    index = np.asarray(emb.index, np.int64)
    if len(index) != len(emb.z):
        raise ValueError(f"embedder returned {len(emb.z)} token sets for {len(index)} records")
    return np.asarray(emb.z, np.float32), index


def text_tokens(embedder, texts) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T, L, D] float32, mask [T, L] bool) of `texts`."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    tokens, mask = embedder.embed_text_tokens(texts)
    return np.asarray(tokens, np.float32), np.asarray(mask, bool)

