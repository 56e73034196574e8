"""SimCLR's NT-Xent between two augmented views of each image (Chen et al. 2020, arXiv 2002.05709,
Sec. 2.1 Eq. 1), in the form SLIP adds to CLIP's loss (Mu et al. 2022, arXiv 2112.12750, Sec. 3:
L = L_CLIP + ssl_scale * L_SSL; official code facebookresearch/SLIP `losses.py` SIMCLRLoss).

For the 2B embeddings of B images' two views (a_i, b_i), L2-normalised, with temperature tau:

    l_a(i) = -log  exp(a_i.b_i / tau) / (sum_j exp(a_i.b_j / tau) + sum_{j != i} exp(a_i.a_j / tau))
    l_b(i) = the same with a and b exchanged
    L_SSL  = (1 / 2B) sum_i (l_a(i) + l_b(i))

Every view's negatives are the other 2B - 2 views of the GLOBAL batch: as SLIP's code, each
device gathers both views of every device (`all_gather_batch_with_grad`; here `lax.all_gather`,
whose transpose returns each row's gradient to its owner) and scores its own rows against them.
SLIP masks the self-similarity with -1e9; here it is -inf (the same value, exp underflows either way).
The SimCLR projection head that makes a_i, b_i is `vljax.models.ssl_heads.SimCLRHead`.
"""
from __future__ import annotations

import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import hard_ce_sum, is_positive, sim


def _normalise(z):
    """F.normalize(z, dim=-1): z / max(||z||, 1e-12), in float32."""
    z = z.astype(jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def simclr_loss(z1, z2, axis_name=None, temperature: float = 0.1):
    """NT-Xent of the views z1, z2: [B, D] (row i of both: one image; unnormalised head outputs,
    normalised here as SLIP does), mean over the 2B views of the global batch (module docstring).
    With `axis_name`, called inside `jax.shard_map` on per-device rows; returns the value of the
    one-device call on the gathered batch."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"simclr_loss: z1 and z2 must be [B, D] of one shape, got {z1.shape} and {z2.shape}")
    if not temperature > 0:
        raise ValueError(f"simclr_loss: temperature must be > 0, got {temperature!r}")
    qa, qb = _normalise(z1), _normalise(z2)
    ka, kb = gather(qa, axis_name), gather(qb, axis_name)
    idx, n = axis_info(axis_name)
    rows = qa.shape[0]
    offset = idx * rows
    self_mask = is_positive(rows, ka.shape[0], offset)

    def side(q, k_other, k_same):
        # [b, 2B]: the other view's B columns first (the positive at offset + i), then the same
        # view's B columns with the view itself left out.
        same = jnp.where(self_mask, -jnp.inf, sim(q, k_same) / temperature)
        return hard_ce_sum(jnp.concatenate([sim(q, k_other) / temperature, same], axis=1), offset)

    total = side(qa, kb, ka) + side(qb, ka, kb)
    return psum(total, axis_name) / (2 * rows * n)


