"""Adaptive Soft Contrastive Learning (ASCL; Feng & Patras, ICPR 2022, arXiv 2207.11163) in the
image-text softmax loss, all-gather and ring forms.

What was read: the official code (github.com/MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022,
model.py `ASCL._forward_moco` / `_forward_byol`, main.py's defaults); the paper's text was not reachable
from here (abstract only), so no equation number is cited. The code's target for a query q with key k
(the other view of the same image) and candidates (the queue, or the batch's other keys in its BYOL
form) is, with the relation of the key to every other candidate at temperature T2,

    p_ij = softmax_{j != i}(<k_i, k_j> / T2)                      (stop-gradient: the teacher side)
    c_i  = 1 - H(p_i) / log(N_i)          H the entropy, N_i the number of other candidates
    a_ii = 1,  a_ij = min(K c_i p_ij, 1)   (K = `neighbours`, the code's nn_num / --K, default 1)
    y_ij = a_ij / sum_l a_il
    loss_i = -sum_j y_ij log softmax_j(<q_i, k_j> / T1)       (the MoCo form; the BYOL form regresses
                                                               the predictor onto sum_j y_ij k_j instead)

i.e. the one-hot instance target plus the key's own similarity distribution over the other samples,
weighted by its confidence (1 - normalised entropy: a flat relation adds nothing, a peaked one adds up
to K units of target mass, each entry capped at 1), then renormalised.

Image-text form (our mapping, named): the query is anchor i in one modality, its key the paired
embedding in the other (the positive), the candidates the other modality's global batch; the
relation is that of the key to the other candidates (<ztxt_i, ztxt_j> for image anchors, the
candidates' own modality as in MoCo's k . queue), N_i = B - 1. T1 is the model's learned logit scale
t = 1 / T1. Both directions (image -> text rows, text -> image columns) are averaged, as CLIP does;
the paper's setting is single-modality self-supervision with one direction.

    loss = 1/2B sum_i [loss_i(zimg -> ztxt) + loss_i(ztxt -> zimg)]

With neighbours -> 0 this is CLIP's loss (losses.softmax_contrastive). Needs a global batch B >= 3
(log(B - 1) > 0).

The ring form (`impl="ring"`) passes candidate chunks around the axis (collectives.ring): one pass for
each anchor's logit log-sum-exp and its relation's log-sum-exp and mean (the entropy), a second for the
target-weighted logits and the normaliser, which need the confidence; the backward pass recomputes
every block (custom_vjp): memory O(b^2) at any device count, the value and gradients of the all-gather
form. Measured (XLA CPU, compiled temporaries of value_and_grad, b = 256 rows per device, D = 256):
ring 3.3 / 3.0 MiB on 2 / 8 devices, all-gather 7.0 / 28.0 MiB.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, block_grads, gather, psum, ring, ring_cotangents, varying
from vljax.losses.common import check_impl, check_pair, is_positive, sim, soft_ce_sum

_NEG_INF = -jnp.inf


def check_options(relation_temperature, neighbours):
    """Raises ValueError naming the config key (`loss.relation_temperature`, ...) of a bad option."""
    if not float(relation_temperature) > 0.0 or not math.isfinite(float(relation_temperature)):
        raise ValueError("config key `loss.relation_temperature`: ASCL's relation temperature T2 must be "
                         f"finite and > 0, got {relation_temperature}")
    if not float(neighbours) > 0.0 or not math.isfinite(float(neighbours)):
        raise ValueError(f"config key `loss.neighbours`: ASCL's number of neighbours K must be > 0, got {neighbours}")


def _confidence(lse_r, mean_r, count):
    """c = 1 - H / log(N) with H = lse_r - E_p[r] the relation's entropy over N candidates."""
    return 1.0 - (lse_r - mean_r) / jnp.log(count)


def _direction(anchor, key, cands, t, idx, tau, k):
    """Sum over the local anchors [b, D] of the soft cross-entropy against all candidates [B, D];
    `key` [b, D] the anchors' paired candidates (the relation's side)."""
    b, nb = anchor.shape[0], cands.shape[0]
    pos = is_positive(b, nb, idx * b)
    r = jnp.where(pos, _NEG_INF, sim(lax.stop_gradient(key), lax.stop_gradient(cands)) / tau)  # [b, B]
    logp = jax.nn.log_softmax(r, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(pos, 0.0, p * logp), axis=-1, keepdims=True)
    conf = 1.0 - entropy / jnp.log(nb - 1.0)
    a = jnp.where(pos, 1.0, jnp.minimum(k * conf * p, 1.0))
    return soft_ce_sum(t * sim(anchor, cands), a / jnp.sum(a, axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- ring


def _ids(axis_name, b):
    idx, _ = axis_info(axis_name)
    return idx * b + jnp.arange(b)


def _relation_block(key, chunk, ids, cids, tau):
    """(r [b, c] with the positive at -inf, pos [b, c])."""
    pos = ids[:, None] == cids[None, :]
    return jnp.where(pos, _NEG_INF, sim(key, chunk) / tau), pos


def _pass_one(anchor, key, cands, t, axis_name, tau):
    """-> (lse_L [b], lse_r [b], mean_r [b]): the logits' log-sum-exp over all B candidates, the
    relation's over the B - 1 others and its mean under p (online, merged chunk by chunk)."""
    b = anchor.shape[0]
    ids = _ids(axis_name, b)

    def step(travel, home, acc):
        chunk, cids = travel
        lse_l, lse_r, mean_r = acc
        r, pos = _relation_block(key, chunk, ids, cids, tau)
        blse = jax.nn.logsumexp(r, axis=1)
        safe = jnp.where(jnp.isfinite(blse), blse, 0.0)
        bmean = jnp.sum(jnp.where(pos, 0.0, jnp.exp(r - safe[:, None]) * jnp.where(pos, 0.0, r)), axis=1)
        new = jnp.logaddexp(lse_r, blse)
        keep = lambda lse: jnp.where(jnp.isfinite(lse), jnp.exp(lse - new), 0.0)  # noqa: E731
        mean_r = mean_r * keep(lse_r) + bmean * keep(blse)
        lse_l = jnp.logaddexp(lse_l, jax.nn.logsumexp(t * sim(anchor, chunk), axis=1))
        return home, (lse_l, new, mean_r)

    init = (jnp.full((b,), _NEG_INF), jnp.full((b,), _NEG_INF), jnp.zeros((b,)))
    _, out = ring(axis_name, step, (cands, ids), (), init)
    return out


def _weights(r, pos, lse_r, conf, k):
    """a [b, c]: 1 on the positive, min(K c_i p_ij, 1) elsewhere."""
    return jnp.where(pos, 1.0, jnp.minimum(k * conf[:, None] * jnp.exp(r - lse_r[:, None]), 1.0))


def _fwd(anchor, key, cands, t, axis_name, tau, k):
    b = anchor.shape[0]
    _, n = axis_info(axis_name)
    ids = _ids(axis_name, b)
    lse_l, lse_r, mean_r = _pass_one(anchor, key, cands, t, axis_name, tau)
    conf = _confidence(lse_r, mean_r, b * n - 1.0)

    def step(travel, home, acc):
        chunk, cids = travel
        r, pos = _relation_block(key, chunk, ids, cids, tau)
        a = _weights(r, pos, lse_r, conf, k)
        return home, (acc[0] + jnp.sum(a * t * sim(anchor, chunk), axis=1), acc[1] + jnp.sum(a, axis=1))

    _, (weighted, norm) = ring(axis_name, step, (cands, ids), (), (jnp.zeros((b,)), jnp.zeros((b,))))
    value = jnp.sum(lse_l - weighted / norm)
    return value, (anchor, key, cands, t, lse_l, lse_r, conf, norm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_partial(anchor, key, cands, t, axis_name, tau, k):
    """Sum over this device's anchors of one direction's loss (key: the anchors' own candidates,
    the relation's side, carrying no gradient through the targets)."""
    return _fwd(anchor, key, cands, t, axis_name, tau, k)[0]


def _bwd(axis_name, tau, k, res, ct):
    """d loss_i / d L_ij = softmax_j(L_i)_j - y_ij; the blocks recomputed as the candidates travel."""
    anchor, key, cands, t, lse_l, lse_r, conf, norm = res
    ids = _ids(axis_name, anchor.shape[0])

    def step(travel, dchunk, local):
        chunk, cids = travel
        danchor, dt = local
        r, pos = _relation_block(key, chunk, ids, cids, tau)
        y = _weights(r, pos, lse_r, conf, k) / norm[:, None]
        g = ct * (jnp.exp(t * sim(anchor, chunk) - lse_l[:, None]) - y)
        ga, gc, gt = block_grads(anchor, chunk, t, g)
        return dchunk + gc, (danchor + ga, dt + gt)

    zero = jnp.zeros(anchor.shape, jnp.float32)
    dcands, (danchor, dt) = ring(axis_name, step, (cands, ids), zero, (zero, jnp.float32(0.0)))
    danchor, dcands, dt = ring_cotangents(anchor, cands, t, danchor, dcands, dt)
    return danchor, jnp.zeros_like(key), dcands, dt


_ring_partial.defvjp(_fwd, _bwd)


def ascl_loss(zimg, ztxt, t, axis_name=None, impl="all_gather", relation_temperature=0.05, neighbours=1.0):
    """ASCL's adaptive soft targets in CLIP's symmetric softmax loss (module docstring: equations,
    source, the image-text mapping).

    Args:
      zimg, ztxt: [b, D] L2-normalised embeddings (this device's shard with axis_name); t: scalar
        logit scale (ASCL's 1 / T1).
      axis_name: mesh axis (or axes) the batch is split over, or None.
      impl: "all_gather" (memory O(b * B)) or "ring" (O(b^2), the same value and gradients).
      relation_temperature: T2, the relation's temperature (the official code's default 0.05).
      neighbours: K, the target mass the relation may add (the code's nn_num; default 1).

    Returns:
      Scalar, mean over the global batch and both directions.
    """
    check_pair(zimg, ztxt, t)
    check_impl(impl)
    check_options(relation_temperature, neighbours)
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    if b * n < 3:
        raise ValueError(f"ascl_loss needs a global batch of at least 3 (log(B - 1) > 0), got {b} x {n}")
    tau, k = float(relation_temperature), float(neighbours)
    if axis_name is not None and impl == "ring":
        tv = varying(t, axis_name)  # t enters the custom_vjp per device; the cast's transpose psums it
        local = (_ring_partial(zimg, ztxt, ztxt, tv, axis_name, tau, k)
                 + _ring_partial(ztxt, zimg, zimg, tv, axis_name, tau, k))
        return lax.psum(local, axis_name) / (2 * b * n)
    local = (_direction(zimg, ztxt, gather(ztxt, axis_name), t, idx, tau, k)
             + _direction(ztxt, zimg, gather(zimg, axis_name), t, idx, tau, k))
    return psum(local, axis_name) / (2 * b * n)


# The losses of this family, by config name, with their inputs.
LOSSES = {"ascl": dict(fn=ascl_loss, inputs=("zimg", "ztxt", "t"))}
