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
    2017, Eq. 5 / 6: R = pi R_p^+ + max(0, R_u^- - pi R_p^-)) per label with the surrogate loss
    `surrogate`: "sigmoid", ell(z, y) = sigmoid(-y z) (the paper's experiments), or "logistic",
    ell(z, y) = softplus(-y z) (the other loss of its code, kiryor/nnPUlearning `--loss`; its
    gradient does not vanish on a confidently wrong score, where the sigmoid loss's does: a
    recipe whose logit bias starts at -10, as SigLIP's, gives the positives' sigmoid loss a
    gradient of ~e^-10 and nothing trains), the batch as the unlabeled sample, and the class
    prior of label j estimated under "selected completely at random" labels (Elkan & Noto 2008):
    pi_j = (|P_j| / B) / c with c = `label_frequency`, the fraction of positives that are observed
    (1 - the hidden fraction of `input.hide_labels`). Then pi_j R_p = (1 / (c B)) sum_{i in P_j} ell,
    defined even for a label without a positive in the batch. The value is Eq. 6 averaged over
    labels. The gradient is Kiryo's Algorithm 1, label by label: where the negative part
    r_j = R_u^- - pi_j R_p^- is at least -`beta`, the gradient of the whole risk; where it falls
    below, -`gamma` times the gradient of r_j alone (the "defensive" step that pushes r_j back up
    and ignores the positive part: a plain max would leave only the positive part acting, and it
    raises every score). beta = 0 and gamma = 1 are the paper's and its code's defaults
    (kiryor/nnPUlearning). Deviation: Algorithm 1 discounts the learning rate by gamma on such a
    step; here the label's gradient is scaled by gamma, the same for SGD (the code's form), not for
    an adaptive optimiser's normalised step; for beta > 0 the value stays Eq. 6's max(0, r_j),
    where the code reports pi R_p^+ - beta.
  * `comic_loss` (`loss.name="comic"`): COMIC (Zhang et al., ICCV 2023, "Learning in Imperfect
    Environment: Multi-Label Classification with Long-Tailed Distribution and Partial Labels",
    arXiv 2304.10539), its Correction and Modification. The stored paper copy gave the abstract
    only, so the equations are those of the authors' code (github wannature/COMIC, read whole:
    loss/PriorFocalModifierLoss.py, loss/ReflectiveLabelCorrectorLoss.py and how
    models/BalancedlNetwork.py combines them: PFM + 0.2 RLC on a branch's logits). With
    p = sigmoid(l), n_j the number of observed positives of label j, prior_j = n_j / max_k n_k:
      Modification (the multi-focal modifier, PFM): a_i = normalise(mean_{j in P_i} Cn[j]) the
      co-occurrence attention of image i's observed labels (Cn = C / column sums, C = Y^T Y off
      the diagonal: how often two different labels are observed together),
      w_j = (1 - log prior_j)^(1/3), x+ = p (1 - a), x- = min(1 - p + clip, 1) scaled by
      `gamma_class_ng` (and again capped at 1) where a > 0, and
        PFM = - sum_ij w_j [y log x+ + (1 - y) log x-] * sg((1 - pt)^g_ij),
        g_ij = gamma_pos y + (gamma_neg + w_j)(1 - y),   pt = x+ y + x- (1 - y)
      (the focusing factor's gradient stopped, as the code does);
      Correction (the reflective label corrector, RLC): positives' logits lowered by `margin`,
      p' = sigmoid(l - margin y); an unobserved label is recalled as a positive where
      p'_ij > `threshold` and p'_ij > mean_i p'_ij (the class-aware threshold), giving y'; then
      the same focal form with x+ = p', no attention, w'_j = (1 - log prior'_j)^(1/6) from y''s
      counts, gamma_pos 0 and gamma_neg 3, times B / sum_ij y'_ij.
    loss = PFM + `rlc_weight` RLC (rlc_weight 0.2, the code's). Deviations: the class prior and
    the co-occurrence matrix are the (global) batch's observed labels, not the training set's
    files (distribution.txt, co-occurrence.npy) that vljax's losses cannot see, a label without a
    positive counting 1 and an image without one getting no attention (the code would divide by
    zero); the code's co-occurrence file is built outside the repository, so its diagonal is our
    choice: left out (a label's own count is the prior's; with it, a single-label image's
    attention on its label is 1, x+ = 0 and the positive has no gradient); RLC scales by the
    batch size B (the code by its default 32, whatever the batch) and is on from the first step
    (the code's compute_epoch=1, its first epoch); its per-epoch count of recalled labels is the
    batch's. Balance (head and tail branches on re-sampled batches: two more networks and
    samplers) is not included: in the code its balancer term is commented out of the loss, and
    the balanced branch's IRM term (the mean of the three branches' PFM) would, with one branch,
    only double PFM.

All are per-batch estimators: with `axis_name` every batch statistic (means, deviations, counts,
co-occurrences) is a psum over the devices, so the value and gradients equal the single-device
call on the gathered batch (tests/test_partial_labels.py).
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


# nnPU's surrogate losses ell(z, +1) as functions of z (ell(z, -1) = ell(-z, +1)).
_SURROGATES = {"sigmoid": lambda z: jax.nn.sigmoid(-z), "logistic": lambda z: jax.nn.softplus(-z)}


def nnpu_loss(zimg, zlabels, t, b, labels, axis_name=None, label_frequency: float = 1.0,
              beta: float = 0.0, gamma: float = 1.0, surrogate: str = "sigmoid"):
    """The non-negative PU risk per label, averaged over labels, with Kiryo's Algorithm 1 gradient
    (module docstring). zimg [B, D], zlabels [K, D], t, b scalars, labels [B, K] observed
    positives; label_frequency c in (0, 1]: the fraction of true positives that are observed;
    beta >= 0: how far below 0 a label's negative risk may fall before the defensive step; gamma
    > 0: that step's scale; surrogate: "sigmoid" | "logistic", the loss ell. Scalar."""
    if not 0.0 < label_frequency <= 1.0:
        raise ValueError(f"config key `loss.label_frequency`: {label_frequency} is not in (0, 1] "
                         "(the fraction of positive labels that are observed)")
    if beta < 0.0 or gamma <= 0.0:
        raise ValueError(f"config keys `loss.beta` ({beta}) and `loss.gamma` ({gamma}): nnPU needs "
                         "beta >= 0 and gamma > 0 (Kiryo et al.'s Algorithm 1)")
    if surrogate not in _SURROGATES:
        raise ValueError(f"config key `loss.surrogate`: {surrogate!r} is not one of {sorted(_SURROGATES)}")
    logits, y = _logits(zimg, zlabels, t, b, labels)
    n = psum(jnp.float32(logits.shape[0]), axis_name)
    ell = _SURROGATES[surrogate]
    as_positive = ell(logits)    # ell(l, +1)
    as_negative = ell(-logits)   # ell(l, -1)
    scale = 1.0 / (label_frequency * n)
    risk_p_pos = psum((y * as_positive).sum(0), axis_name) * scale          # pi_j R_p^+
    risk_p_neg = psum((y * as_negative).sum(0), axis_name) * scale          # pi_j R_p^-
    risk_u_neg = psum(as_negative.sum(0), axis_name) / n                    # R_u^-
    negative = risk_u_neg - risk_p_neg                                      # [K] r_j
    value = risk_p_pos + jnp.maximum(negative, 0.0)
    defend = jax.lax.stop_gradient(negative < -beta)
    descent = jnp.where(defend, -gamma * negative, risk_p_pos + negative)   # what is differentiated
    return jnp.mean(jax.lax.stop_gradient(value - descent) + descent)


def _focal_log_likelihood(y, x_pos, x_neg, w, gamma_pos, gamma_neg):
    """COMIC's weighted asymmetric-focal log-likelihood per (image, label) (both its losses):
    w [y log x+ + (1 - y) log x-] (1 - pt)^(gamma_pos y + (gamma_neg + w)(1 - y)), the focusing
    factor's gradient stopped; logs floored at 1e-8 (the code's clamp)."""
    log_lik = y * jnp.log(jnp.maximum(x_pos, 1e-8)) + (1 - y) * jnp.log(jnp.maximum(x_neg, 1e-8))
    pt = x_pos * y + x_neg * (1 - y)
    focus = jax.lax.stop_gradient((1 - pt) ** (gamma_pos * y + (gamma_neg + w) * (1 - y)))
    return w * log_lik * focus


def _prior_weight(y, power, axis_name):
    """[K] (1 - log prior_j)^power, prior_j = n_j / max_k n_k, n_j = y's positives of label j over
    the global batch (at least 1)."""
    counts = jnp.maximum(psum(y.sum(0), axis_name), 1.0)
    return (1 - jnp.log(counts / counts.max())) ** power


def comic_loss(zimg, zlabels, t, b, labels, axis_name=None, rlc_weight: float = 0.2,
               gamma_pos: float = 0.0, gamma_neg: float = 3.0, gamma_class_ng: float = 1.2,
               clip: float = 0.05, threshold: float = 0.7, margin: float = 1.0):
    """COMIC's Modification (PFM) + rlc_weight * Correction (RLC) (module docstring). zimg [B, D],
    zlabels [K, D], t, b scalars, labels [B, K] observed positives; the options are the code's
    (PFM: gamma_pos, gamma_neg, gamma_class_ng, clip; RLC: threshold tau, margin). A sum over the
    global batch, as the code's. Scalar."""
    logits, y = _logits(zimg, zlabels, t, b, labels)
    n = psum(jnp.float32(logits.shape[0]), axis_name)
    # Modification: co-occurrence attention of each image's observed labels.
    cooc = psum(jnp.einsum("bj,bk->jk", y, y), axis_name)                   # [K, K]
    cooc = cooc * (1 - jnp.eye(cooc.shape[0], dtype=cooc.dtype))            # pairs of labels
    col = cooc.sum(0)
    cooc = jnp.where(col > 0, cooc / jnp.where(col > 0, col, 1.0), 0.0)
    seen = y.sum(1, keepdims=True)
    att = (y @ cooc) / jnp.maximum(seen, 1.0)                               # [B, K]
    total = att.sum(1, keepdims=True)
    att = jnp.where(total > 0, att / jnp.where(total > 0, total, 1.0), 0.0)
    p = jax.nn.sigmoid(logits)
    x_neg = jnp.minimum(1 - p + clip, 1.0)
    x_neg = jnp.where(att == 0, x_neg, jnp.minimum(x_neg * gamma_class_ng, 1.0))
    w = _prior_weight(y, 1 / 3, axis_name)
    pfm = -psum(_focal_log_likelihood(y, p * (1 - att), x_neg, w, gamma_pos, gamma_neg).sum(), axis_name)
    # Correction: recall unobserved labels above the class-aware threshold.
    p_rlc = jax.nn.sigmoid(logits - margin * y)
    mean = psum(p_rlc.sum(0), axis_name) / n
    recalled = jax.lax.stop_gradient((p_rlc > threshold) & (p_rlc > mean))
    y_rlc = jnp.where(recalled, 1.0, y)
    w_rlc = _prior_weight(y_rlc, 1 / 6, axis_name)
    x_neg = jnp.minimum(1 - p_rlc + clip, 1.0)
    rlc = psum(_focal_log_likelihood(y_rlc, p_rlc, x_neg, w_rlc, 0.0, 3.0).sum(), axis_name)
    rlc = -rlc * n / jnp.maximum(psum(y_rlc.sum(), axis_name), 1.0)
    return pfm + rlc_weight * rlc


# Partial-label losses, by config name (inputs as vljax.objective.Loss gives them); label prompts
# from `loss.template` as for `multilabel`; per-label sigmoid scores.
_INPUTS = ("zimg", "labels/ztxt", "t", "b", "batch/labels")
LOSSES = {
    "pu_mlc": dict(fn=pu_mlc_loss, inputs=_INPUTS, config_keys=("template",), logits="sigmoid"),
    "nnpu": dict(fn=nnpu_loss, inputs=_INPUTS, config_keys=("template",), logits="sigmoid"),
    "comic": dict(fn=comic_loss, inputs=_INPUTS, config_keys=("template",), logits="sigmoid"),
}
