"""Checks and per-block helpers shared by the losses: similarities and cross-entropies
over `[b, B]` logit blocks, accumulated in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_scalar(name, x):
    if jnp.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(x)}")


def check_pair(zimg, ztxt, t):
    if zimg.ndim != 2 or ztxt.ndim != 2:
        raise ValueError(f"zimg and ztxt must be [B, D], got {zimg.shape} and {ztxt.shape}")
    if zimg.shape != ztxt.shape:
        raise ValueError(f"zimg {zimg.shape} and ztxt {ztxt.shape} must have the same shape")
    check_scalar("t", t)


def check_impl(impl):
    if impl not in ("all_gather", "ring"):
        raise ValueError(f"impl must be 'all_gather' or 'ring', got {impl!r}")


def sim(a, c):
    """a: [n, D], c: [m, D] -> [n, m] dot products, accumulated in float32."""
    return jnp.einsum("nd,md->nm", a, c, preferred_element_type=jnp.float32)


def pair_logits(zimg, ztxt):
    """<zimg_i, ztxt_i> for the b local pairs: [b] float32 (positives without a [b, B] mask)."""
    return jnp.sum(zimg.astype(jnp.float32) * ztxt.astype(jnp.float32), axis=-1)


def positive_cols(rows, offset):
    """Global column of the positive of each local row: [rows] int32."""
    return offset + jnp.arange(rows)


def hard_ce_sum(logits, offset):
    """Sum over rows of cross-entropy with the positive of local row i at column offset + i.

    logits: [b, B].
    """
    pos = jnp.take_along_axis(logits, positive_cols(logits.shape[0], offset)[:, None], axis=1)
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - pos[:, 0])


def soft_ce_sum(logits, targets):
    """Sum over rows of cross-entropy against a target distribution per row.

    logits, targets: [b, B]; rows of targets sum to 1.
    """
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1))


def is_positive(rows, cols, offset):
    """[rows, cols] bool: True at (i, offset + i), the paired element."""
    return positive_cols(rows, offset)[:, None] == jnp.arange(cols)[None, :]

