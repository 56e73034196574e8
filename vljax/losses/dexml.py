"""DEXML's decoupled softmax for (extreme) multi-label learning with a dual encoder (Gupta et al.,
"Dual-encoder models for extreme multi-label classification", ICLR 2024, arXiv 2310.10636).

InfoNCE over labels puts an image's other positives in the denominator, so its positives compete
with each other; the decoupled softmax takes each positive against the negatives only:

    s_il = t <zimg_i, zlabels_l>,   P_i the image's labels, N_i the others,
    loss = (1/B) sum_i (1/|P_i|) sum_{l in P_i} -log( e^{s_il} / (e^{s_il} + sum_{l' in N_i} e^{s_il'}) ).

The equations are those of the authors' code (github nilesh2797/DEXML, losses.py, criterion
"decoupled-softmax": positives masked out of the log-sum-exp, each positive's term weighted
1/|P_i|, the sum divided by the number of images B, an image without a label contributing 0);
the stored paper text gave its abstract only. Their code samples one positive per image when
`loss_sample` is set; here every positive is used (their default).

The label space is the large axis. `decoupled_softmax(..., label_axis=...)` takes this device's
slice of it (zlabels [K_local, D], labels [b, K_local]) and combines the log-sum-exp over labels
across `label_axis` from each device's partial log-sum-exp (an all_gather of [b] values, then one
log-sum-exp: the authors' GatherLayer + logsumexp), so no device holds the [K, D] label
embeddings or a [b, K] logit block; memory per device falls as 1 / devices
(experiments/bench_dexml_memory.py). The trainer's entry (`loss.name="dexml"`, `dexml_loss`)
takes the label prompts replicated (`labels/ztxt`, vljax.objective) and the batch split over the
batch axes; with `loss.label_axis` (vljax/label_shards.py) the prompts, their embeddings and the
label-set columns are split over that mesh axis in the trainer's step too (padded to a multiple
of its size, the padding masked).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from vljax.losses.collectives import psum
from vljax.losses.common import check_scalar

_MASKED = -1e30  # a logit that leaves the log-sum-exp (finite: no nan gradient when all are masked)


def decoupled_softmax(zimg, zlabels, t, labels, axis_name=None, label_axis=None, label_mask=None):
    """DEXML's decoupled softmax (module docstring), a scalar, the same on every device.

    zimg [b, D]: images (rows split over `axis_name`, or all of them); zlabels [k, D]: the label
    embeddings, all K of them (`label_axis=None`) or this device's slice of the label space along
    `label_axis`; labels [b, k] multi-hot over the same columns; label_mask [k] bool (optional):
    False for padding columns (a label space padded to a multiple of the devices), which are
    neither positives nor negatives; t the logit scale."""
    check_scalar("t", t)
    if zlabels.ndim != 2 or labels.shape != (zimg.shape[0], zlabels.shape[0]):
        raise ValueError(f"labels {labels.shape} must be [b, k] = [{zimg.shape[0]}, {zlabels.shape[0]}] "
                         f"for zimg {zimg.shape} and zlabels {zlabels.shape}")
    sim = t * jnp.einsum("bd,kd->bk", zimg, zlabels, preferred_element_type=jnp.float32)
    pos = labels > 0
    valid = jnp.ones(sim.shape[-1], bool) if label_mask is None else jnp.asarray(label_mask, bool)
    pos = pos & valid
    lse_neg = logsumexp(jnp.where(pos | ~valid, _MASKED, sim), axis=-1)        # [b]
    if label_axis is not None:  # each device's partial log-sum-exp over its labels, combined
        lse_neg = logsumexp(lax.all_gather(lse_neg, label_axis), axis=0)
    num_pos = pos.sum(-1).astype(jnp.float32)
    if label_axis is not None:
        num_pos = lax.psum(num_pos, label_axis)
    per = jnp.where(pos, jnp.logaddexp(lse_neg[:, None], sim) - sim, 0.0)
    total = (per.sum(-1) / jnp.maximum(num_pos, 1.0)).sum()
    if label_axis is not None:
        total = lax.psum(total, label_axis)
    rows = psum(jnp.float32(zimg.shape[0]), axis_name)
    return psum(total, axis_name) / rows


def dexml_loss(zimg, zlabels, t, labels, axis_name=None, label_axis=None, label_mask=None):
    """The trainer's decoupled softmax (`loss.name="dexml"`): zimg [b, D] the batch's rows on this
    device, zlabels [K, D] every label prompt (replicated) and labels [b, K] the batch's label sets;
    or, with `loss.label_axis` (vljax/label_shards.py), zlabels [K_pad / n, D] and labels
    [b, K_pad / n] this device's slice of the padded label space, label_mask [K_pad / n] False on
    the padding (given by vljax.objective.make_loss)."""
    return decoupled_softmax(zimg, zlabels, t, labels, axis_name=axis_name, label_axis=label_axis,
                             label_mask=label_mask)


# Label prompts from `loss.template`; a model trained on it ranks labels by softmax over them.
LOSSES = {
    "dexml": dict(fn=dexml_loss, inputs=("zimg", "labels/ztxt", "t", "batch/labels"),
                  config_keys=("template",), logits="softmax"),
}
