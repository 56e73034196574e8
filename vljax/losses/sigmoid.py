"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), all-gather and ring forms."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import (axis_info, block_grads, gather, positives_grads, psum, ring,
                                      ring_cotangents, varying)
from vljax.losses.common import check_impl, check_pair, check_scalar, pair_logits, sim


# -log_sigmoid(y x) is softplus(x) for y = -1 and softplus(x) - x for y = +1, so the SigLIP sum
# over a block is the sum of softplus over all its logits minus the logits of the positives.
# Positives are the local pairs: no label matrix is ever built, and every ring step is alike.


def _sigmoid_positives_sum(zimg, ztxt, t, b):
    """-sum of the positives' logits, the correction that turns softplus into -log_sigmoid."""
    return -jnp.sum(t * pair_logits(zimg, ztxt) + b)


def _sigmoid_negatives_sum(zimg, chunk, t, b):
    """sum softplus(t <zimg_i, chunk_j> + b) over a [b_img, b_chunk] block."""
    return jnp.sum(jax.nn.softplus(t * sim(zimg, chunk) + b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_ring_partial(zimg, ztxt, t, b, axis_name):
    """This device's share of the SigLIP sum: its images against all B texts, divided by B."""
    def step(chunk, home, total):
        return home, total + _sigmoid_negatives_sum(zimg, chunk, t, b)

    _, total = ring(axis_name, step, ztxt, (), _sigmoid_positives_sum(zimg, ztxt, t, b))
    return total / (zimg.shape[0] * lax.axis_size(axis_name))


def _sigmoid_ring_fwd(zimg, ztxt, t, b, axis_name):
    # Residuals are the inputs only: O(b * D), whatever the number of devices.
    return _sigmoid_ring_partial(zimg, ztxt, t, b, axis_name), (zimg, ztxt, t, b)


def _sigmoid_ring_bwd(axis_name, res, ct):
    """Backward pass that travels the ring as well, each text chunk with its gradient so far.

    With x = t * S + b, d loss / d x = scale * sigmoid(x) on every block (scale = ct / B),
    db = sum of it; the positives' term adds -scale per pair. Blocks are recomputed.
    """
    zimg, ztxt, t, b = res
    nb = zimg.shape[0]
    scale = ct / (nb * lax.axis_size(axis_name))

    def step(chunk, dchunk, local):
        dzimg, dt, db = local
        g = jax.nn.sigmoid(t * sim(zimg, chunk) + b) * scale  # [b_img, b_chunk]
        gi, gc, gt = block_grads(zimg, chunk, t, g)
        return dchunk + gc, (dzimg + gi, dt + gt, db + jnp.sum(g))

    dzimg, dztxt, dt = positives_grads(zimg, ztxt, t, scale)
    dztxt, (dzimg, dt, db) = ring(axis_name, step, ztxt, dztxt, (dzimg, dt, -scale * nb))
    return (*ring_cotangents(zimg, ztxt, t, dzimg, dztxt, dt), db.astype(jnp.result_type(b)))


_sigmoid_ring_partial.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def sigmoid_loss(zimg, ztxt, t, b, axis_name=None, impl="all_gather"):
    """SigLIP loss (Zhai et al. 2023): an independent binary decision for every image-text pair.

        loss = -1/B * sum_{i, j in global batch} log_sigmoid(y_ij * (t <zimg_i, ztxt_j> + b)),
        y_ij = +1 if i == j else -1,

    i.e. the sum over each image's B binary terms, averaged over the B images (the paper's
    Algorithm 1 and big_vision). open_clip's SigLipLoss computes the same sum restricted to the
    device's own b images but divides by the LOCAL batch b; DDP then averages gradients over the
    n devices, so its effective objective is (1/n) sum_devices (sum_local / b) = sum / B, this
    loss, with the same gradients. Its logged value is one device's (mean over its b images),
    an estimate of this global mean rather than the mean itself.

    Args:
      zimg: [b, D] image embeddings (the device's shard when axis_name is set).
      ztxt: [b, D] text embeddings.
      t: scalar logit scale; b: scalar logit bias.
      axis_name: mesh axis the batch is split over, or None.
      impl: "all_gather" gathers all texts (per-device memory O(b * B));
        "ring" passes text chunks around the axis with ppermute, in the forward and (under a
        custom_vjp) in the backward pass, so memory stays O(b^2) at any device count.
        Both give the same value and gradients.

    Returns:
      Scalar loss.
    """
    check_pair(zimg, ztxt, t)
    check_scalar("b", b)
    check_impl(impl)
    if axis_name is not None and impl == "ring":
        # t and b enter the custom_vjp per device; the transpose of this cast psums their grads.
        partial = _sigmoid_ring_partial(zimg, ztxt, varying(t, axis_name),
                                        varying(b, axis_name), axis_name)
        return lax.psum(partial, axis_name)
    _, n = axis_info(axis_name)
    local = (_sigmoid_positives_sum(zimg, ztxt, t, b)
             + _sigmoid_negatives_sum(zimg, gather(ztxt, axis_name), t, b))
    return psum(local, axis_name) / (zimg.shape[0] * n)



# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them); a model trained on SigLIP's binary decisions scores with sigmoid.
LOSSES = {
    "sigmoid": dict(fn=sigmoid_loss, inputs=("zimg", "ztxt", "t", "b"), logits="sigmoid"),
}
