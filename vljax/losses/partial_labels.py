"""Multi-label losses for partial labels: the observed tags are positives, every other (image, tag)
pair is unlabeled (a negative or a hidden positive), on the image-label-prompt logits
l_ij = t <zimg_i, zlabels_j> + b of `vljax.losses.multilabel`.

  * `pu_mlc_loss` (config `loss.name="pu_mlc"`): PU-MLC (Yuan, Zhang & Huang 2023, "Positive Label
    Is All You Need for Multi-Label Classification", arXiv 2306.16016). Its abstract names the
    parts: positive-unlabeled learning from positive labels only, an adaptive re-balance factor and
    a temperature coefficient. The stored paper copy gave no more than the abstract, so the
    equations below are those of the authors' code (github TAKELAMAG/PU-MLC,
    src/loss_functions/vpu_loss.py, read whole): a variational PU objective (VPU, Chen et al.,
    NeurIPS 2020) per label j over the batch, every image counted as unlabeled data,

        tau_j = min(alpha * std_i(l_ij), 1)                  (temperature; gradient stopped)
        p_ij  = sigmoid(l_ij / tau_j)
        w_j   = (mean_i p_ij)^gamma                          (re-balance; gradient stopped;
                                                              the code's (1 - mean_i (1 - p_ij))^gamma)
        loss  = sum_j [ w_j log(mean_i p_ij) - (1/|P_j|) sum_{i in P_j} log p_ij ],

    P_j the images whose tag j is observed (a label without one in the batch has no positive term).
    Deviations: tau_j is floored at 1e-6 (the code divides by a zero deviation); the positive
    term is log_sigmoid, exact (the code's log(exp(log(p + 1e-10)) + 1e-10) = log(p + 2e-10) floors
    it near log 2e-10 = -22.3, so the two differ only where p < ~1e-8); the code's MixUp
    consistency regulariser (a second forward pass on mixed images) is not included. The code has
    no non-negative correction; `nnpu_loss` is the estimator with one.
  * `nnpu_loss` (`loss.name="nnpu"`): the non-negative PU risk estimator (Kiryo et al., NeurIPS
    2017, Eq. 5 / 6: R = pi R_p^+ + max(0, R_u^- - pi R_p^-)) per label with the sigmoid loss
    ell(z, y) = sigmoid(-y z) (their choice), the batch as the unlabeled sample, and the class
    prior of label j estimated under "selected completely at random" labels (Elkan & Noto 2008):
    pi_j = (|P_j| / B) / c with c = `label_frequency`, the fraction of positives that are observed
    (1 - the hidden fraction of `input.hide_labels`). Then pi_j R_p = (1 / (c B)) sum_{i in P_j} ell,
    defined even for a label without a positive in the batch. The value is the mean over labels.
    Deviation: Kiryo's Algorithm 1 steps up the negative part's gradient when it falls below
    -beta; here the max clamps it (gradient 0 there, beta = 0).

Both are per-batch estimators: with `axis_name` every batch statistic (means, deviations, counts)
is a psum over the devices, so the value and gradients equal the single-device call on the
gathered batch (tests/test_partial_labels.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import psum
from vljax.losses.common import check_scalar


def _logits(zimg, zlabels, t, b, labels):
    check_scalar("t", t)
    check_scalar("b", b)
    if zlabels.ndim != 2 or labels.shape[-1] != zlabels.shape[0]:
        raise ValueError(f"labels {labels.shape} must be [B, K] for the K = {zlabels.shape[0]} label "
                         f"prompts")
    logits = t * jnp.einsum("bd,kd->bk", zimg, zlabels, preferred_element_type=jnp.float32) + b
    return logits, labels.astype(jnp.float32)


def pu_mlc_loss(zimg, zlabels, t, b, labels, axis_name=None, gamma: float = 1.0,
                alpha: float = 1.0):
    """PU-MLC's loss (module docstring). zimg [B, D], zlabels [K, D] (label prompts), t, b
    scalars, labels [B, K] multi-hot observed positives; gamma: the re-balance exponent, alpha:
    the temperature's multiplier of the logits' deviation (the code's arguments). Scalar."""
    logits, y = _logits(zimg, zlabels, t, b, labels)
    n = psum(jnp.float32(logits.shape[0]), axis_name)
    mean = psum(logits.sum(0), axis_name) / n
    var = psum(jnp.square(logits - mean).sum(0), axis_name) / n
    tau = jax.lax.stop_gradient(jnp.maximum(jnp.minimum(alpha * jnp.sqrt(var), 1.0), 1e-6))
    scaled = logits / tau
    p_mean = psum(jax.nn.sigmoid(scaled).sum(0), axis_name) / n            # [K]
    w = jax.lax.stop_gradient(p_mean) ** gamma
    pos_count = psum(y.sum(0), axis_name)
    pos_log = psum((y * jax.nn.log_sigmoid(scaled)).sum(0), axis_name)
    positive = jnp.where(pos_count > 0, pos_log / jnp.maximum(pos_count, 1.0), 0.0)
    return jnp.sum(w * jnp.log(p_mean + 1e-10) - positive)


def nnpu_loss(zimg, zlabels, t, b, labels, axis_name=None, label_frequency: float = 1.0):
    """The non-negative PU risk per label, averaged over labels (module docstring). zimg [B, D],
    zlabels [K, D], t, b scalars, labels [B, K] observed positives; label_frequency c in (0, 1]:
    the fraction of true positives that are observed. Scalar."""
    if not 0.0 < label_frequency <= 1.0:
        raise ValueError(f"config key `loss.label_frequency`: {label_frequency} is not in (0, 1] "
                         "(the fraction of positive labels that are observed)")
    logits, y = _logits(zimg, zlabels, t, b, labels)
    n = psum(jnp.float32(logits.shape[0]), axis_name)
    as_positive = jax.nn.sigmoid(-logits)   # ell(l, +1)
    as_negative = jax.nn.sigmoid(logits)    # ell(l, -1)
    scale = 1.0 / (label_frequency * n)
    risk_p_pos = psum((y * as_positive).sum(0), axis_name) * scale          # pi_j R_p^+
    risk_p_neg = psum((y * as_negative).sum(0), axis_name) * scale          # pi_j R_p^-
    risk_u_neg = psum(as_negative.sum(0), axis_name) / n                    # R_u^-
    return jnp.mean(risk_p_pos + jnp.maximum(risk_u_neg - risk_p_neg, 0.0))


# Partial-label losses, by config name (inputs as vljax.objective.Loss gives them); label prompts
# from `loss.template` as for `multilabel`; per-label sigmoid scores.
_INPUTS = ("zimg", "labels/ztxt", "t", "b", "batch/labels")
LOSSES = {
    "pu_mlc": dict(fn=pu_mlc_loss, inputs=_INPUTS, config_keys=("template",), logits="sigmoid"),
    "nnpu": dict(fn=nnpu_loss, inputs=_INPUTS, config_keys=("template",), logits="sigmoid"),
}
