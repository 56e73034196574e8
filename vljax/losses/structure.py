"""STRUCTURE (Gröger, Wen, Le & Brbić 2025, "With Limited Data for Multimodal Alignment, Let the
STRUCTURE Guide You", arXiv 2506.16895): a regulariser that keeps the neighbourhood geometry of a
frozen unimodal latent space in the aligned (joint) space, at several scales, added with a weight
to the alignment loss (vljax/objective.py `with_regularisers`, `loss.structure_weight`).

What was read: the paper's abstract and summaries (the regulariser "preserves the multi-scale
neighbourhood geometry of the latent space of unimodal encoders", comparing similarity
distributions of the frozen and the aligned representations). The equations of its Sec. 3 could
not be read here; the form below is this module's choice, stated so it can be checked against
the paper:

    P = row-softmax of cos(f_i, f_j) / tau over j != i   (f: the frozen features of the batch)
    Q = row-softmax of cos(z_i, z_j) / tau over j != i   (z: the aligned embeddings)
    R = 1/L sum_{l=1..L} 1/B sum_i JS(P^l_{i,:} || Q^l_{i,:})

P^l, the l-th matrix power of the row-stochastic P, is the distribution of an l-step random walk
on the batch's similarity graph: level 1 keeps each point's nearest neighbours, higher levels the
coarser cluster structure (the "multi-scale" geometry). JS is the Jensen-Shannon divergence
(symmetric, bounded by log 2). The frozen side has no gradient.

The paper's second component picks the layer of each frozen encoder to align by representation
similarity across the modalities (instead of the last layer). The towers here expose only their
final features (`pre_logits`, the stored LiT features), so that choice is not made: the frozen side
is the tower's final pre-projection features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import sim


def _transition(x, temperature):
    """[B, W] -> [B, B] row-softmax of cosine similarities / temperature, the diagonal excluded."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    logits = sim(x, x) / temperature
    eye = jnp.eye(x.shape[0], dtype=bool)
    return jax.nn.softmax(jnp.where(eye, -jnp.inf, logits), axis=-1)


def _js_rows_sum(p, q):
    """sum over rows of JS(p_i || q_i); p, q: [b, B] rows summing to 1."""
    m = (p + q) / 2
    # Zeros (the excluded diagonal) contribute 0; a safe log keeps their gradient 0, not NaN.
    log = lambda a: jnp.log(jnp.where(a > 0, a, 1.0))  # noqa: E731
    kl = lambda a: jnp.sum(a * (log(a) - log(m)))  # noqa: E731
    return (kl(p) + kl(q)) / 2


def structure_loss(z, frozen, axis_name=None, levels=2, temperature=0.1):
    """STRUCTURE's regulariser (module docstring) over the GLOBAL batch.

    z: [b, D] aligned embeddings (the trained side); frozen: [b, W] the frozen encoder's
    features of the same records (any width; gradient stopped). levels: L >= 1 scales;
    temperature: tau > 0 of both similarity distributions. Every device builds the [B, B]
    transition matrices of the gathered batch (O(B^2) memory, like the all-gather losses) and
    scores only its own rows, so the gradient of each row reaches its owner once.
    """
    if int(levels) < 1 or temperature <= 0:
        raise ValueError(f"structure_loss: levels must be >= 1 and temperature > 0, got {levels}, {temperature}")
    if z.ndim != 2 or frozen.ndim != 2 or z.shape[0] != frozen.shape[0]:
        raise ValueError(f"structure_loss: z [b, D] and frozen [b, W] must have the same rows, got "
                         f"{z.shape} and {frozen.shape}")
    idx, n = axis_info(axis_name)
    b = z.shape[0]
    p_all = jax.lax.stop_gradient(_transition(gather(frozen, axis_name), temperature))  # [B, B]
    q_all = _transition(gather(z, axis_name), temperature)
    rows = lambda m: jax.lax.dynamic_slice_in_dim(m, idx * b, b, axis=0)  # noqa: E731
    p_l, q_l = rows(p_all), rows(q_all)  # this device's rows of P^1, Q^1
    total = _js_rows_sum(p_l, q_l)
    for _ in range(int(levels) - 1):
        p_l, q_l = p_l @ p_all, q_l @ q_all  # rows of P^(l+1) = P^l P
        total = total + _js_rows_sum(p_l, q_l)
    return psum(total, axis_name) / (int(levels) * b * n)
