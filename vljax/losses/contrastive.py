"""Softmax contrastive losses: CLIP's InfoNCE (all-gather and ring forms) and the decoupled
DCL / DCLW (Yeh et al. 2022)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import (axis_info, block_grads, gather, positives_grads, psum, ring,
                                      ring_cotangents, varying)
from vljax.losses.common import check_impl, check_pair, hard_ce_sum, is_positive, pair_logits, sim


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_ring_partial(zimg, ztxt, t, axis_name):
    """This device's share of the CLIP loss (its images' i2t and its texts' t2i terms) / 2B.

    Both log-sum-exps come from the same travelling blocks L = t zimg_local @ chunk.T, online:
    the row LSE of the local images stays here, the column LSE of each text chunk travels with
    it and arrives home after a full loop (see `ring`).
    """
    return _softmax_ring_fwd(zimg, ztxt, t, axis_name)[0]


def _softmax_ring_lses(zimg, ztxt, t, axis_name):
    """-> (lse_row [b]: local images over all B texts, lse_col [b]: local texts over all B images)."""
    def step(chunk, lse_col, lse_row):
        logits = t * sim(zimg, chunk)  # [b, b]
        return (jnp.logaddexp(lse_col, jax.nn.logsumexp(logits, axis=0)),
                jnp.logaddexp(lse_row, jax.nn.logsumexp(logits, axis=1)))

    init = jnp.full((zimg.shape[0],), -jnp.inf, jnp.float32)
    lse_col, lse_row = ring(axis_name, step, ztxt, init, init)
    return lse_row, lse_col


def _softmax_ring_fwd(zimg, ztxt, t, axis_name):
    # Residuals: the inputs and two [b] LSE vectors, O(b * D) whatever the number of devices.
    lse_row, lse_col = _softmax_ring_lses(zimg, ztxt, t, axis_name)
    nb, n = zimg.shape[0], lax.axis_size(axis_name)
    value = (jnp.sum(lse_row) + jnp.sum(lse_col)
             - 2 * jnp.sum(t * pair_logits(zimg, ztxt))) / (2 * nb * n)
    return value, (zimg, ztxt, t, lse_row, lse_col)


def _softmax_ring_bwd(axis_name, res, ct):
    """d loss / d L_ij = (softmax_row_ij + softmax_col_ij - 2 delta_ij) / 2B, L = t zimg @ ztxt.T.

    The text chunks travel again, each with its column LSE and the gradient gathered for it so
    far; every block's softmaxes are recomputed from the chunk in hand, none is stored.
    """
    zimg, ztxt, t, lse_row, lse_col = res
    scale = ct / (2 * zimg.shape[0] * lax.axis_size(axis_name))

    def step(travel, dchunk, local):
        chunk, chunk_lse_col = travel
        dzimg, dt = local
        logits = t * sim(zimg, chunk)
        g = scale * (jnp.exp(logits - lse_row[:, None]) + jnp.exp(logits - chunk_lse_col[None, :]))
        gi, gc, gt = block_grads(zimg, chunk, t, g)
        return dchunk + gc, (dzimg + gi, dt + gt)

    dzimg, dztxt, dt = positives_grads(zimg, ztxt, t, 2 * scale)
    dztxt, (dzimg, dt) = ring(axis_name, step, (ztxt, lse_col), dztxt, (dzimg, dt))
    return ring_cotangents(zimg, ztxt, t, dzimg, dztxt, dt)


_softmax_ring_partial.defvjp(_softmax_ring_fwd, _softmax_ring_bwd)

def softmax_contrastive(zimg, ztxt, t, axis_name=None, impl="all_gather"):
    """CLIP / ALIGN / LiT loss: (CE(image->text) + CE(text->image)) / 2.

    With L = t zimg @ ztxt.T over the global batch (Radford et al. 2021, Fig. 3):

        loss = 1/2B sum_i [(lse_j L_ij - L_ii) + (lse_j L_ji - L_ii)].

    Args:
      zimg: [b, D] image embeddings (the device's shard when axis_name is set).
      ztxt: [b, D] text embeddings.
      t: scalar logit scale.
      axis_name: mesh axis the batch is split over, or None.
      impl: "all_gather" gathers both modalities (per-device memory O(b * B));
        "ring" passes text chunks around the axis with ppermute and accumulates the row
        (image->text) and column (text->image) log-sum-exps online from the same [b, b]
        blocks, in the forward and (under a custom_vjp) in the backward pass, so memory stays
        O(b^2) at any device count. Both give the same value and gradients.

    Returns:
      Scalar, mean over the global batch of B = b * n_devices pairs; negatives of every row are
      all B - 1 other elements of the global batch. Equal to open_clip's ClipLoss
      (local_loss=False, gather_with_grad=True) on the gathered batch.
    """
    check_pair(zimg, ztxt, t)
    check_impl(impl)
    if axis_name is not None and impl == "ring":
        # t enters the custom_vjp per device; the transpose of this cast psums its gradient.
        return lax.psum(_softmax_ring_partial(zimg, ztxt, varying(t, axis_name), axis_name),
                        axis_name)
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    logits_i2t = t * sim(zimg, gather(ztxt, axis_name))  # [b, B]
    if axis_name is None:
        # One matmul suffices on a single device: text rows are the columns of logits_i2t, and
        # CE = logsumexp - positive logit with the positives from a [b] dot product.
        local = (jnp.sum(jax.nn.logsumexp(logits_i2t, axis=-1))
                 + jnp.sum(jax.nn.logsumexp(logits_i2t, axis=0))
                 - 2 * jnp.sum(t * pair_logits(zimg, ztxt)))
    else:
        # Positives picked from the logits: 23% less temp memory than the form above at 8
        # devices (XLA CPU, b = 512), while the form above wins by 25% on one device.
        logits_t2i = t * sim(ztxt, gather(zimg, axis_name))  # [b, B]
        local = hard_ce_sum(logits_i2t, idx * b) + hard_ce_sum(logits_t2i, idx * b)
    return psum(local, axis_name) / (2 * b * n)


# ----------------------------------------------------------------------------- DCL, DCLW


def _decoupled(zimg, ztxt, t, axis_name, weight):
    """Sum over the local rows of both directions' decoupled terms, the positive's scaled by
    `weight` [b] (1 for DCL): sum_i w_i (-t <zimg_i, ztxt_i>) + log sum_{j != i} exp(t <., .>)."""
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    if b * n < 2:
        raise ValueError(f"dcl_loss needs a global batch of at least 2, got {b * n}")
    pos_mask = is_positive(b, b * n, idx * b)
    pos = t * pair_logits(zimg, ztxt)  # [b], the same in both directions

    def negatives(logits):  # logits: [b, B] -> sum_i log sum_{j != i} exp
        return jnp.sum(jax.nn.logsumexp(jnp.where(pos_mask, -jnp.inf, logits), axis=-1))

    local = (-2 * jnp.sum(weight * pos) + negatives(t * sim(zimg, gather(ztxt, axis_name)))
             + negatives(t * sim(ztxt, gather(zimg, axis_name))))
    return psum(local, axis_name) / (2 * b * n)


def dcl_loss(zimg, ztxt, t, axis_name=None):
    """Decoupled Contrastive Learning loss (Yeh et al. 2022, Eq. 6), image-text form, symmetric.

    InfoNCE with the positive removed from the denominator:

        L_i2t(i) = -t <zimg_i, ztxt_i> + log sum_{j != i} exp(t <zimg_i, ztxt_j>)

    and L_t2i likewise with the modalities swapped; loss = mean_i (L_i2t(i) + L_t2i(i)) / 2.
    Negatives are the other modality's B - 1 elements (the paper's SimCLR form also adds the
    same-view ones; image-text training has no second view). Needs a global batch B >= 2.

    Args:
      zimg, ztxt: [b, D] embeddings; t: scalar logit scale; axis_name: mesh axis or None.
    """
    check_pair(zimg, ztxt, t)
    return _decoupled(zimg, ztxt, t, axis_name, 1.0)


def dclw_loss(zimg, ztxt, t, axis_name=None, sigma=0.5):
    """Weighted DCL (DCLW, Yeh et al. 2022, Eq. 7): DCL whose positive term of pair i is
    scaled by the von Mises-Fisher weight

        w_i = 2 - exp(<zimg_i, ztxt_i> / sigma) / E_k[exp(<zimg_k, ztxt_k> / sigma)],

    the expectation over the GLOBAL batch's pairs (the official code's 2 - B softmax_i(.);
    it keeps the weight's gradient, so does this). Pairs that are already close weigh less,
    hard positives more; the weights average to 1. sigma: the paper's 0.5.
    """
    check_pair(zimg, ztxt, t)
    _, n = axis_info(axis_name)
    s = pair_logits(zimg, ztxt) / sigma  # [b]
    log_mean = jax.nn.logsumexp(gather(s, axis_name)) - jnp.log(s.shape[0] * n)
    return _decoupled(zimg, ztxt, t, axis_name, 2.0 - jnp.exp(s - log_mean))



# The losses of this family, by config name (`config.loss.name`), with the inputs they take first
# (names as vljax.objective.Loss gives them); vljax.objective registers every one.
LOSSES = {
    "softmax": dict(fn=softmax_contrastive, inputs=("zimg", "ztxt", "t")),
    "dcl": dict(fn=dcl_loss, inputs=("zimg", "ztxt", "t")),
    "dclw": dict(fn=dclw_loss, inputs=("zimg", "ztxt", "t")),
}
