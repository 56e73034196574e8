"""The contrastive loss of mixed images with soft targets (TiMix, M3CoL; the mixing itself is
vljax/mixing.py, made in the update step)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_pair, sim, soft_ce_sum


def mix_targets(lam, partner, all_lam, all_partner, offset, batch):
    """(p_i2t [b, B], p_t2i [b, B]) float32: the soft targets of the local mixed images (rows of
    P) and of the local texts (columns of P), with P [B, B] the global target matrix

        P[i, i] += lam_i,   P[i, partner(i)] += 1 - lam_i

    (image i is lam_i of pair i and 1 - lam_i of pair partner(i)). lam, partner: this device's
    rows [b]; all_lam, all_partner: the global batch's [B]; offset: the global index of local row 0.
    """
    own = offset + jnp.arange(lam.shape[0])  # [b] global rows
    cols = jnp.arange(batch)
    p_i2t = (lam[:, None] * (cols[None, :] == own[:, None])
             + (1.0 - lam)[:, None] * (cols[None, :] == partner[:, None]))
    p_t2i = (all_lam[None, :] * (cols[None, :] == own[:, None])
             + (1.0 - all_lam)[None, :] * (all_partner[None, :] == own[:, None]))
    return p_i2t, p_t2i


def mix_softmax(zimg, ztxt, t, lam, partner, axis_name=None):
    """CLIP's loss on mixed images with soft targets (TiMix's mixed ITC loss; M3CoL's M3Co loss).

    zimg: [b, D] embeddings of the MIXED images (image i = lam_i of image i, 1 - lam_i of image
    partner(i), vljax/mixing.py), ztxt: [b, D] the clean captions, t the logit scale; lam: f32 [b],
    partner: i32 [b] global row indices. With L = t zimg @ ztxt.T over the global batch and P the
    target matrix of `mix_targets` (P[i, i] = lam_i, P[i, partner(i)] = 1 - lam_i):

        loss = 1/2B [ -sum_i sum_j P[i, j] log softmax_j(L[i, :])           (image -> text)
                      -sum_j sum_i P[i, j] log softmax_i(L[:, j]) ]          (text -> image)

    i.e. each mixed image's targets are lam on its own text and 1 - lam on its partner's, and each
    text's targets are the column of P: lam_j on image j, 1 - lam_i on every image i that mixed it
    in. This is the form of both official codes: TiMix (`model_pretrain_mplug.py`, is_mix_up:
    soft CE of log_softmax(logits) and of log_softmax(logits.T) against the same `label_mixed`
    rows, its one lam per step making rows and columns alike) and M3CoL (`mixco_nce`,
    bidirectional: targets `probs` for the images and `probs.T`, unnormalised, for the texts;
    with per-example lam a column sums to lam_j + 1 - lam_partner(j), not 1, as in that code).
    Where partner(i) = i, P[i, i] = 1. With lam = 1 everywhere it is exactly
    `softmax_contrastive`. Gradients flow to zimg, ztxt and t, none to lam or partner.
    """
    check_pair(zimg, ztxt, t)
    b = zimg.shape[0]
    if lam.shape != (b,) or partner.shape != (b,):
        raise ValueError(f"mix_softmax: lam and partner must be [B] with B = {b}, got {lam.shape} "
                         f"and {partner.shape}")
    idx, n = axis_info(axis_name)
    lam = lax.stop_gradient(lam.astype(jnp.float32))
    p_i2t, p_t2i = mix_targets(lam, partner, gather(lam, axis_name), gather(partner, axis_name),
                               idx * b, b * n)
    local = (soft_ce_sum(t * sim(zimg, gather(ztxt, axis_name)), p_i2t)
             + soft_ce_sum(t * sim(ztxt, gather(zimg, axis_name)), p_t2i))
    return psum(local, axis_name) / (2 * b * n)


# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them): the mixed batch's fields come from the step's mixing (config.mixing).
LOSSES = {
    "mix_softmax": dict(fn=mix_softmax, inputs=("zimg", "ztxt", "t", "batch/mix_lam", "batch/mix_partner")),
}
