"""Multi-label losses on image-label-prompt logits: per-element BCE, ASL and WAN, and the
mean over labeled images (`multilabel_loss`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vljax.losses.collectives import psum
from vljax.losses.common import check_scalar


def bce_elementwise(logits, targets):
    """Binary cross-entropy per (image, label): -[y log p + (1 - y) log(1 - p)], p = sigmoid(logits)."""
    return optax.sigmoid_binary_cross_entropy(logits, targets)


def asl_elementwise(logits, targets, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    margin: float = 0.05, eps: float = 1e-8):
    """Asymmetric loss per (image, label) (Ridnik et al., ICCV 2021, Eq. 6-8): positives
    (1 - p)^gamma_pos log p; negatives p_m^gamma_neg log(1 - p_m) with p_m = max(p - m, 0), so easy
    negatives are down-weighted and those under the margin (often missing positives) discarded.
    gamma_pos defaults to 1, not the paper's 0 (their Table 4: close)."""
    p = jax.nn.sigmoid(logits)
    p_m = jnp.maximum(p - margin, 0.0)
    pos = targets * (1 - p) ** gamma_pos * jnp.log(jnp.maximum(p, eps))
    neg = (1 - targets) * p_m ** gamma_neg * jnp.log(jnp.maximum(1 - p_m, eps))
    return -(pos + neg)


def wan_elementwise(logits, targets):
    """Weak assume-negative per (image, label) (Cole et al., CVPR 2021, Sec. 3.2): unobserved
    labels are negatives weighted 1 / (L - 1), L the number of labels."""
    weight = 1.0 / max(targets.shape[-1] - 1, 1)
    per = bce_elementwise(logits, targets)
    return targets * per + weight * (1 - targets) * per


MULTILABEL = {"bce": bce_elementwise, "asl": asl_elementwise, "wan": wan_elementwise}


def multilabel_loss(zimg, zlabels, t, b, labels, axis_name=None, kind="wan",
                    gamma_neg: float = 4.0, gamma_pos: float = 1.0, margin: float = 0.05):
    """Multi-label training on image–label-prompt logits (the trainer's `loss.name="multilabel"`).

        l_ij = t <zimg_i, zlabels_j> + b,   loss = mean over labeled images i of
               1/K sum_j ell(l_ij, y_ij),

    zlabels [K, D]: the text tower's embeddings of one prompt per label of the label space
    (`vljax.objective.label_prompts`: `loss.template` filled with each label name), embedded
    by the trained text tower inside the step, so the tower learns from the tags), the same
    on every device; labels [B, K] the batch's multi-hot label sets (`input.labels=True`). ell
    (`kind`): "bce", "asl" (Ridnik et al. 2021; `gamma_neg`, `gamma_pos`, `margin`) or "wan"
    (Cole et al. 2021, the positive-unlabelled weak assume-negative loss). A record with an empty
    label set carries no information about which tags are absent and is left out of the mean (the
    value is 0 for a batch without any labeled record). t and b are the model's logit scale and
    bias (SigLIP's parameterisation: set `model.bias_init`, e.g. -10).
    """
    if kind not in MULTILABEL:
        raise ValueError(f"config key `loss.kind`: {kind!r} is not one of {sorted(MULTILABEL)}")
    check_scalar("t", t)
    check_scalar("b", b)
    if zlabels.ndim != 2 or labels.shape[-1] != zlabels.shape[0]:
        raise ValueError(f"labels {labels.shape} must be [B, K] for the K = {zlabels.shape[0]} label "
                         f"prompts")
    y = labels.astype(jnp.float32)
    logits = t * zimg @ zlabels.T + b
    opts = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, margin=margin) if kind == "asl" else {}
    per_image = MULTILABEL[kind](logits, y, **opts).mean(axis=-1)
    labeled = (y.sum(axis=-1) > 0).astype(jnp.float32)
    total = psum(jnp.sum(per_image * labeled), axis_name)
    count = psum(jnp.sum(labeled), axis_name)
    return total / jnp.maximum(count, 1.0)



# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them). `template` (config `loss.template`) is the label prompt that vljax.objective
# embeds into `labels/ztxt`. Per-label probabilities: a model trained on independent binary
# decisions scores with sigmoid.
LOSSES = {
    "multilabel": dict(fn=multilabel_loss, inputs=("zimg", "labels/ztxt", "t", "b", "batch/labels"),
                       config_keys=("template",), logits="sigmoid"),
}
