"""Hardness-weighted negatives, false-negative masking and label smoothing in the softmax (CLIP)
and sigmoid (SigLIP) losses, all-gather and ring forms.

Three changes to which negatives a row sees and how much each counts, with s_ij = <zimg_i, ztxt_j>
the cosine similarity of anchor i and candidate j, and L_ij = t s_ij the logits:

* Hardness weighting (Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021:
  negatives drawn from a distribution tilted by exp(beta * similarity to the anchor), estimated from
  the uniform batch by importance weights normalised over the negatives). Negative j of anchor i
  is weighted by

      w_ij = N_i exp(beta s_ij) / sum_{k in N(i)} exp(beta s_ik)        (normalise=True)
      w_ij = exp(beta s_ij)                                             (normalise=False)

  with N(i) the kept negatives of i and N_i their number, so the normalised weights average 1 over
  the negatives. The weights carry no gradient (stop-gradient). normalise=False is LLaVE's
  hardness-weighted contrastive loss (Lan et al. 2025, Eq. 5: beta sg(s_ij) added to each negative
  logit), on which RzenEmbed (arXiv 2510.27350) and UniME (arXiv 2504.17432) build.
  What was read, and what was not: the full texts of Robinson et al., RzenEmbed and UniME were not
  reachable from here (abstracts only), so no equation number of theirs is cited; the normalised
  form is the issue's statement of Robinson's weighting (w_ij ~ exp(beta s_ij), normalised over the
  negatives, stop-gradient), LLaVE's Eq. 5 as its sentence-transformers port (PR #3667) quotes it.
  Choices, named: beta multiplies the cosine s_ij (as LLaVE's Eq. 5 is quoted), not the logit
  t s_ij; Robinson's debiasing of false negatives (their tau^+, after Chuang et al. 2020) is not
  included (tau^+ = 0): masking below is the false-negative treatment here.
* False-negative masking: a negative with s_ij > threshold, or (mask_labels=True, labels given)
  that shares the anchor's class label (y_i = y_j >= 0), is removed from the denominator: the
  elimination of likely false negatives from the negative set (as in false-negative cancellation
  for MoCo-style contrastive learning, Huynh et al. 2022, recalled, not re-read here; their
  detection votes with support views, here a similarity threshold or a shared label decides).
  A pair (image i, text j) is masked in both directions of the softmax loss alike.
* Label smoothing (softmax only; Szegedy et al. 2016, "Rethinking the Inception Architecture"):
  the target of row i puts 1 - eps on its positive and eps spread uniformly over the candidates it
  sees (the positive and its kept negatives: eps / (N_i + 1) each; without masking, eps / B, the
  usual uniform smoothing over the B classes of the row).

Softmax form, each direction (image->text rows, text->image columns), with adjusted logits
L'_ii = L_ii, L'_ij = L_ij + sg(log w_ij) for kept negatives (-inf for masked ones):

    loss_i = -sum_j q_ij log softmax_j(L'_ij),  q_ij = (1 - eps) [j = i] + eps [j seen] / (N_i + 1)

For eps = 0 this is the importance-weighted InfoNCE
-log e^{L_ii} / (e^{L_ii} + sum_{j in N(i)} w_ij e^{L_ij}). loss = 1/2B sum over both
directions. Sigmoid form (image anchors, as SigLIP sums each image's B binary terms):

    loss = 1/B sum_i [softplus(-x_ii) + sum_{j in N(i)} w_ij softplus(x_ij)],  x = t s + b.

With beta = 0, normalise either way, threshold = inf, no labels and eps = 0 both equal the plain
losses (losses.softmax_contrastive / losses.sigmoid_loss). The ring forms (`impl="ring"`) pass text
chunks around the axis (collectives.ring) with the chunk's global ids and labels, accumulate the
per-anchor statistics (log-sum-exps, counts) online in the forward pass and recompute every block
in the backward pass under a custom_vjp: memory O(b^2) at any device count, the same value and
gradients as the all-gather form.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, block_grads, gather, psum, ring, ring_cotangents, varying
from vljax.losses.common import check_impl, check_pair, check_scalar, is_positive, pair_logits, sim

_NEG_INF = -jnp.inf


def check_options(beta, threshold, smoothing, labels, mask_labels):
    """Raises ValueError naming the config key (`loss.beta`, ...) of a bad option."""
    if not math.isfinite(float(beta)):
        raise ValueError(f"config key `loss.beta`: the hardness weight must be finite, got {beta}")
    if math.isnan(float(threshold)):
        raise ValueError("config key `loss.threshold`: a cosine similarity (or inf), got nan")
    if not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"config key `loss.smoothing`: label smoothing eps in [0, 1), got {smoothing}")
    if mask_labels and labels is None:
        raise ValueError("config key `loss.mask_labels`: masking negatives that share a label takes the "
                         "batch's class labels (`input.label=True`); none were given")


def labels_input(options) -> tuple[str, ...]:
    """The input the loss takes when its options (config.loss) mask negatives by label."""
    return ("batch/label",) if options.get("mask_labels", False) else ()


def _same_label(labels, cand_labels):
    """[rows, cols] bool: both labeled (>= 0) and equal."""
    return (labels[:, None] == cand_labels[None, :]) & (labels[:, None] >= 0)


def _kept(s, pos, labels, cand_labels, threshold):
    """[rows, cols] bool: the negatives the anchor keeps (not its positive, at most `threshold`,
    not of its class)."""
    keep = ~pos & (s <= threshold)
    return keep & ~_same_label(labels, cand_labels)


def _log_weights(s, keep, beta, normalise, axis):
    """sg(log w) on the kept entries of a full row (axis=-1) of similarities s; 0 elsewhere."""
    z = beta * s
    if not normalise:
        return lax.stop_gradient(jnp.where(keep, z, 0.0))
    count = jnp.sum(keep, axis=axis, keepdims=True)
    lse = jax.nn.logsumexp(jnp.where(keep, z, _NEG_INF), axis=axis, keepdims=True)
    logw = z - jnp.where(count > 0, lse, 0.0) + jnp.log(jnp.maximum(count, 1))
    return lax.stop_gradient(jnp.where(keep, logw, 0.0))


def _labels_or_none(labels, b, axis_name):
    """The class labels the mask reads: the given ones, else -1 (none) for every row, made
    per-device with an axis (the ring's custom_vjp takes them as per-device values)."""
    if labels is not None:
        return labels
    none = jnp.full((b,), -1, jnp.int32)
    return none if axis_name is None else varying(none, axis_name)


# ----------------------------------------------------------------------------- softmax, all-gather


def _softmax_direction(anchor, cands, t, idx, labels, cand_labels, beta, normalise, threshold, eps):
    """Sum over the local anchors of the soft cross-entropy over adjusted logits: anchor [b, D]
    against all candidates cands [B, D]."""
    b, nb = anchor.shape[0], cands.shape[0]
    s = sim(anchor, cands)  # [b, B]
    pos = is_positive(b, nb, idx * b)
    keep = _kept(s, pos, labels, cand_labels, threshold)
    seen = keep | pos
    adj = jnp.where(pos, t * s, jnp.where(keep, t * s + _log_weights(s, keep, beta, normalise, -1), _NEG_INF))
    logp = jnp.where(seen, jax.nn.log_softmax(adj, axis=-1), 0.0)
    count = jnp.sum(keep, axis=-1, keepdims=True)
    q = jnp.where(pos, 1.0 - eps, 0.0) + jnp.where(seen, eps / (count + 1.0), 0.0)
    return -jnp.sum(q * logp)


# ----------------------------------------------------------------------------- softmax, ring


def _stats(a, z, keep, axis):
    """Per-anchor accumulators of one block along `axis` (1: image rows, 0: text columns):
    (lse of a = (t + beta) s, lse of z = beta s, count, sum of a) over the kept negatives."""
    return (jax.nn.logsumexp(jnp.where(keep, a, _NEG_INF), axis=axis),
            jax.nn.logsumexp(jnp.where(keep, z, _NEG_INF), axis=axis),
            jnp.sum(keep, axis=axis).astype(jnp.float32),
            jnp.sum(jnp.where(keep, a, 0.0), axis=axis))


def _merge(x, y):
    return (jnp.logaddexp(x[0], y[0]), jnp.logaddexp(x[1], y[1]), x[2] + y[2], x[3] + y[3])


def _empty(b):
    return (jnp.full((b,), _NEG_INF), jnp.full((b,), _NEG_INF), jnp.zeros((b,)), jnp.zeros((b,)))


def _finish(stats, lpos, normalise, eps):
    """-> (loss [b], log-denominator D [b], shift [b]): log w_ij = beta s_ij + shift_i."""
    lse_a, lse_b, count, sum_a = stats
    shift = jnp.zeros_like(lpos)
    if normalise:
        shift = jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)) - lse_b, 0.0)
    log_den = jnp.logaddexp(lpos, lse_a + shift)
    sum_adj = lpos + sum_a + count * shift  # sum of the adjusted logits the anchor sees
    return log_den - (1.0 - eps) * lpos - eps * sum_adj / (count + 1.0), log_den, shift


def _block(zimg, chunk, ids, cids, labels, clabels, threshold):
    s = sim(zimg, chunk)  # [b, b_chunk]
    pos = ids[:, None] == cids[None, :]
    return s, pos, _kept(s, pos, labels, clabels, threshold)


def _softmax_fwd(zimg, ztxt, t, labels, axis_name, beta, normalise, threshold, eps):
    idx, n = axis_info(axis_name)
    nb = zimg.shape[0]
    ids = idx * nb + jnp.arange(nb)

    def step(travel, col, row):
        chunk, cids, clabels = travel
        s, pos, keep = _block(zimg, chunk, ids, cids, labels, clabels, threshold)
        a, z = (t + beta) * s, beta * s
        return _merge(col, _stats(a, z, keep, 0)), _merge(row, _stats(a, z, keep, 1))

    col, row = ring(axis_name, step, (ztxt, ids, labels), _empty(nb), _empty(nb))
    lpos = t * pair_logits(zimg, ztxt)
    loss_row, den_row, shift_row = _finish(row, lpos, normalise, eps)
    loss_col, den_col, shift_col = _finish(col, lpos, normalise, eps)
    value = (jnp.sum(loss_row) + jnp.sum(loss_col)) / (2 * nb * n)
    res = (zimg, ztxt, t, labels, (den_row, shift_row, row[2]), (den_col, shift_col, col[2]))
    return value, res


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _softmax_ring_partial(zimg, ztxt, t, labels, axis_name, beta, normalise, threshold, eps):
    """This device's share of the loss: its images' rows and its texts' columns, / 2B."""
    return _softmax_fwd(zimg, ztxt, t, labels, axis_name, beta, normalise, threshold, eps)[0]


def _grad_part(logits, z, keep, pos, log_den, shift, count, eps):
    """d loss_anchor / d L for one direction: softmax of the adjusted logits minus the target."""
    u = eps / (count + 1.0)
    p_neg = jnp.exp(logits + z + shift - log_den)
    p_pos = jnp.exp(logits - log_den)
    return jnp.where(keep, p_neg - u, jnp.where(pos, p_pos - (1.0 - eps) - u, 0.0))


def _softmax_bwd(axis_name, beta, normalise, threshold, eps, res, ct):
    zimg, ztxt, t, labels, row, col = res
    idx, n = axis_info(axis_name)
    nb = zimg.shape[0]
    ids = idx * nb + jnp.arange(nb)
    scale = ct / (2 * nb * n)

    def step(travel, dchunk, local):
        chunk, cids, clabels, cden, cshift, ccount = travel
        dzimg, dt = local
        s, pos, keep = _block(zimg, chunk, ids, cids, labels, clabels, threshold)
        logits, z = t * s, beta * s
        g = (_grad_part(logits, z, keep, pos, *(r[:, None] for r in row), eps)
             + _grad_part(logits, z, keep, pos, cden[None, :], cshift[None, :], ccount[None, :], eps))
        gi, gc, gt = block_grads(zimg, chunk, t, scale * g)
        return dchunk + gc, (dzimg + gi, dt + gt)

    zero = jnp.zeros(zimg.shape, jnp.float32)
    dztxt, (dzimg, dt) = ring(axis_name, step, (ztxt, ids, labels, *col), zero, (zero, jnp.float32(0.0)))
    return (*ring_cotangents(zimg, ztxt, t, dzimg, dztxt, dt), None)


_softmax_ring_partial.defvjp(_softmax_fwd, _softmax_bwd)


def hard_negative_softmax(zimg, ztxt, t, labels=None, axis_name=None, impl="all_gather", beta=0.0,
                          normalise=True, threshold=float("inf"), mask_labels=False, smoothing=0.0):
    """CLIP's symmetric InfoNCE with hardness-weighted negatives, false negatives masked and label
    smoothing (the module docstring gives the equations and their sources).

    Args:
      zimg, ztxt: [b, D] embeddings (this device's shard with axis_name); t: scalar logit scale.
      labels: [b] int class ids (-1 = none), the batch's `label`; taken when mask_labels.
      axis_name: mesh axis (or axes) the batch is split over, or None.
      impl: "all_gather" (memory O(b * B)) or "ring" (O(b^2), the same value and gradients).
      beta: hardness of the negatives' weights w_ij ~ exp(beta s_ij); 0 weighs all alike.
      normalise: weights normalised to mean 1 over the kept negatives (Robinson et al.); False:
        w_ij = exp(beta s_ij) (LLaVE's Eq. 5).
      threshold: negatives with cosine similarity above it are removed (inf: none).
      mask_labels: negatives sharing the anchor's class label are removed.
      smoothing: label smoothing eps of the image-text targets.

    Returns:
      Scalar, mean over the global batch and both directions.
    """
    check_pair(zimg, ztxt, t)
    check_impl(impl)
    check_options(beta, threshold, smoothing, labels, mask_labels)
    b = zimg.shape[0]
    labels = _labels_or_none(labels if mask_labels else None, b, axis_name)
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B] class ids with B = {b}, got {labels.shape}")
    beta, threshold, eps, normalise = float(beta), float(threshold), float(smoothing), bool(normalise)
    if axis_name is not None and impl == "ring":
        # t enters the custom_vjp per device; the transpose of this cast psums its gradient.
        return lax.psum(_softmax_ring_partial(zimg, ztxt, varying(t, axis_name), labels, axis_name,
                                              beta, normalise, threshold, eps), axis_name)
    idx, n = axis_info(axis_name)
    all_labels = gather(labels, axis_name)
    local = sum(_softmax_direction(a, gather(c, axis_name), t, idx, labels, all_labels, beta, normalise,
                                   threshold, eps) for a, c in ((zimg, ztxt), (ztxt, zimg)))
    return psum(local, axis_name) / (2 * b * n)


# ----------------------------------------------------------------------------- sigmoid


def _log_softplus(x):
    """log softplus(x), finite where softplus underflows (x << 0: log softplus(x) = x + O(e^x))."""
    return jnp.where(x < -20.0, x, jnp.log(jax.nn.softplus(jnp.maximum(x, -20.0))))


def _sigmoid_fwd(zimg, ztxt, t, bias, labels, axis_name, beta, normalise, threshold):
    idx, n = axis_info(axis_name)
    nb = zimg.shape[0]
    ids = idx * nb + jnp.arange(nb)

    def step(travel, home, acc):
        chunk, cids, clabels = travel
        s, _, keep = _block(zimg, chunk, ids, cids, labels, clabels, threshold)
        z = beta * s
        lse_n = jax.nn.logsumexp(jnp.where(keep, z + _log_softplus(t * s + bias), _NEG_INF), axis=1)
        lse_b = jax.nn.logsumexp(jnp.where(keep, z, _NEG_INF), axis=1)
        return home, (jnp.logaddexp(acc[0], lse_n), jnp.logaddexp(acc[1], lse_b),
                      acc[2] + jnp.sum(keep, axis=1).astype(jnp.float32))

    init = (jnp.full((nb,), _NEG_INF), jnp.full((nb,), _NEG_INF), jnp.zeros((nb,)))
    _, (lse_n, lse_b, count) = ring(axis_name, step, (ztxt, ids, labels), (), init)
    shift = jnp.zeros((nb,))
    if normalise:
        shift = jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)) - lse_b, 0.0)
    negatives = jnp.where(count > 0, jnp.exp(lse_n + shift), 0.0)
    positives = jax.nn.softplus(-(t * pair_logits(zimg, ztxt) + bias))
    value = jnp.sum(positives + negatives) / (nb * n)
    return value, (zimg, ztxt, t, bias, labels, shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sigmoid_ring_partial(zimg, ztxt, t, bias, labels, axis_name, beta, normalise, threshold):
    """This device's share of the weighted SigLIP sum: its images against all B texts, / B."""
    return _sigmoid_fwd(zimg, ztxt, t, bias, labels, axis_name, beta, normalise, threshold)[0]


def _sigmoid_bwd(axis_name, beta, normalise, threshold, res, ct):
    """d loss / d x_ij = scale w_ij sigmoid(x_ij) on kept negatives, -scale sigmoid(-x_ii) on the
    positives; blocks recomputed as the text chunks travel the ring again."""
    zimg, ztxt, t, bias, labels, shift = res
    idx, n = axis_info(axis_name)
    nb = zimg.shape[0]
    ids = idx * nb + jnp.arange(nb)
    scale = ct / (nb * n)

    def step(travel, dchunk, local):
        chunk, cids, clabels = travel
        dzimg, dt, db = local
        s, pos, keep = _block(zimg, chunk, ids, cids, labels, clabels, threshold)
        x = t * s + bias
        g = scale * jnp.where(keep, jnp.exp(beta * s + shift[:, None]) * jax.nn.sigmoid(x),
                              jnp.where(pos, -jax.nn.sigmoid(-x), 0.0))
        gi, gc, gt = block_grads(zimg, chunk, t, g)
        return dchunk + gc, (dzimg + gi, dt + gt, db + jnp.sum(g))

    zero = jnp.zeros(zimg.shape, jnp.float32)
    dztxt, (dzimg, dt, db) = ring(axis_name, step, (ztxt, ids, labels), zero,
                                  (zero, jnp.float32(0.0), jnp.float32(0.0)))
    return (*ring_cotangents(zimg, ztxt, t, dzimg, dztxt, dt), db.astype(jnp.result_type(bias)), None)


_sigmoid_ring_partial.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def hard_negative_sigmoid(zimg, ztxt, t, b, labels=None, axis_name=None, impl="all_gather", beta=0.0,
                          normalise=True, threshold=float("inf"), mask_labels=False):
    """SigLIP's pairwise sigmoid loss with each image's negative terms hardness-weighted and likely
    false negatives masked (module docstring: equations, sources; the weights are normalised over
    each image's kept negatives, SigLIP summing each image's terms).

    Args as hard_negative_softmax, plus b: the scalar logit bias (no label smoothing here).
    """
    check_pair(zimg, ztxt, t)
    check_scalar("b", b)
    check_impl(impl)
    check_options(beta, threshold, 0.0, labels, mask_labels)
    nb = zimg.shape[0]
    labels = _labels_or_none(labels if mask_labels else None, nb, axis_name)
    if labels.shape != (nb,):
        raise ValueError(f"labels must be [B] class ids with B = {nb}, got {labels.shape}")
    beta, threshold, normalise = float(beta), float(threshold), bool(normalise)
    if axis_name is not None and impl == "ring":
        return lax.psum(_sigmoid_ring_partial(zimg, ztxt, varying(t, axis_name), varying(b, axis_name),
                                              labels, axis_name, beta, normalise, threshold), axis_name)
    idx, n = axis_info(axis_name)
    s = sim(zimg, gather(ztxt, axis_name))  # [b, B]
    pos = is_positive(nb, s.shape[1], idx * nb)
    keep = _kept(s, pos, labels, gather(labels, axis_name), threshold)
    w = jnp.exp(_log_weights(s, keep, beta, normalise, -1))
    local = (jnp.sum(jax.nn.softplus(-(t * pair_logits(zimg, ztxt) + b)))
             + jnp.sum(jnp.where(keep, w * jax.nn.softplus(t * s + b), 0.0)))
    return psum(local, axis_name) / (nb * n)


# The losses of this family, by config name, with their inputs; `mask_labels=True` adds the batch's
# class labels (`labels_input`).
LOSSES = {
    "hard_negative_softmax": dict(fn=hard_negative_softmax, inputs=("zimg", "ztxt", "t"), chosen=labels_input),
    "hard_negative_sigmoid": dict(fn=hard_negative_sigmoid, inputs=("zimg", "ztxt", "t", "b"),
                                  chosen=labels_input, logits="sigmoid"),
}
