"""Cross-modal momentum-contrast loss against queues of negatives (MoCo, He et al. 2020, Eq. 1 /
Alg. 1; MoCo v2, Chen et al. 2020, arXiv 2003.04297; made cross-modal by WenLan / BriVL, Huo et
al. 2021, arXiv 2103.06561, Sec. 3.2: two momentum towers and two queues).

The queues and the momentum towers live in the train state (vljax/queue.py); this module is the
pure loss over what they give:

  zimg, ztxt: [b, D]   the online towers' L2-normalised embeddings (gradients flow here);
  mzimg, mztxt: [b, D] the momentum towers' embeddings of the same pairs (constants);
  qimg, qtxt: [q, D]   the image / text queues (the device's rows of [Q, D]; constants).

BriVL's image-to-text InfoNCE (MoCo's Eq. 1 with the momentum text embedding as key):

    L_i2t(i) = -log  exp(t <zimg_i, mztxt_i>) / (exp(t <zimg_i, mztxt_i>) + sum_{n in Qtxt} exp(t <zimg_i, n>))

and L_t2i(i) likewise with ztxt_i, mzimg_i and the image queue. As in MoCo (Alg. 1: `l_neg =
mm(q, queue)`), the negatives are the queue only: the current batch's momentum embeddings join
it after the step (vljax/queue.py), not before.
Read here: only BriVL's abstract and section summaries (its equation text was not reachable),
so the form above is MoCo's Eq. 1 / Alg. 1 made cross-modal as BriVL describes it in words; ALBEF's
queue form (`batch_negatives`) likewise from its paper as we know it, its code not re-read.
Our choices: the value is mean_i (L_i2t(i) + L_t2i(i)) / 2 (BriVL writes the sum of the two
directions' batch sums; a constant factor 2B, so the scale matches vljax's `softmax`), and the
temperature is the model's learned logit scale `t` (BriVL and MoCo fix tau; `t` can be frozen in
`schedule` to do the same).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_pair, pair_logits, sim


def _direction(z, key, queue, t, axis_name, batch_negatives):
    """sum over the b local rows of -log softmax of the positive among [positive, queue] (with
    `batch_negatives`: among [the global batch's momentum keys, queue])."""
    pos = t * pair_logits(z, key)  # [b]
    lse = jax.nn.logsumexp(t * sim(z, queue), axis=-1)  # [b], over the Q queue rows
    if batch_negatives:
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(t * sim(z, gather(key, axis_name)), axis=-1))
    else:
        lse = jnp.logaddexp(lse, pos)
    return jnp.sum(lse - pos)


def queue_contrastive(zimg, ztxt, t, mzimg, mztxt, qimg, qtxt, axis_name=None, batch_negatives=False):
    """The cross-modal momentum-contrast loss (module docstring): a scalar, the mean over the
    global batch, equal on any number of devices (each gathers the queues' rows: memory
    O(Q * D + b * Q) a device).

    batch_negatives: False (MoCo, BriVL): the negatives are the queue's Q rows. True (ALBEF's
      contrastive term, Li et al. 2021, arXiv 2107.07651, Sec. 3.2: the batch's momentum
      features concatenated before the queue): also the other B - 1 momentum embeddings of the
      global batch.
    """
    check_pair(zimg, ztxt, t)
    check_pair(mzimg, mztxt, t)
    if mzimg.shape != zimg.shape:
        raise ValueError(f"momentum embeddings {mzimg.shape} and embeddings {zimg.shape} must have the same shape")
    if qimg.ndim != 2 or qimg.shape != qtxt.shape or qimg.shape[1] != zimg.shape[1]:
        raise ValueError(f"queues {qimg.shape} and {qtxt.shape} must both be [Q, {zimg.shape[1]}]")
    _, n = axis_info(axis_name)
    mzimg, mztxt = jax.lax.stop_gradient(mzimg), jax.lax.stop_gradient(mztxt)
    qimg = jax.lax.stop_gradient(gather(qimg, axis_name))
    qtxt = jax.lax.stop_gradient(gather(qtxt, axis_name))
    local = (_direction(zimg, mztxt, qtxt, t, axis_name, batch_negatives)
             + _direction(ztxt, mzimg, qimg, t, axis_name, batch_negatives))
    return psum(local, axis_name) / (2 * zimg.shape[0] * n)


# Inputs named `momentum/...` and `queue/...` are given by the step when `config.queue` is set
# (vljax/queue.py, `Momentum.inputs`); vljax.queue.options refuses one without the other.
LOSSES = {
    "queue_contrastive": dict(fn=queue_contrastive, inputs=("zimg", "ztxt", "t", "momentum/zimg",
                                                            "momentum/ztxt", "queue/img", "queue/txt")),
}
