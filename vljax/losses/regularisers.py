"""Alignment and uniformity (Wang & Isola 2020), added to a loss as regularisers."""
from __future__ import annotations

import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import is_positive, sim


def alignment_loss(zimg, ztxt, axis_name=None, alpha=2.0):
    """Alignment (Wang & Isola 2020, Eq. 4 with alpha = 2): E_i ||zimg_i - ztxt_i||_2^alpha."""
    diff = zimg.astype(jnp.float32) - ztxt.astype(jnp.float32)
    _, n = axis_info(axis_name)
    local = jnp.sum(jnp.sum(diff * diff, axis=-1) ** (alpha / 2))
    return psum(local, axis_name) / (zimg.shape[0] * n)


def uniformity_loss(z, axis_name=None, temp=2.0):
    """Uniformity (Wang & Isola 2020, Eq. 5, t = 2): log E_{i != j} exp(-t ||z_i - z_j||^2),
    over the GLOBAL batch's distinct pairs (the paper's `pdist`). z: [b, D] L2-normalised."""
    idx, n = axis_info(axis_name)
    b = z.shape[0]
    z = z.astype(jnp.float32)
    sq = jnp.maximum(2.0 - 2.0 * sim(z, gather(z, axis_name)), 0.0)  # [b, B] on the sphere
    off = ~is_positive(b, b * n, idx * b)
    local = jnp.sum(jnp.where(off, jnp.exp(-temp * sq), 0.0))
    return jnp.log(psum(local, axis_name) / (b * n * (b * n - 1)))

