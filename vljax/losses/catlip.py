"""CatLIP's classification loss on the logits of a large-vocabulary head (Mehta et al. 2024, arXiv
2404.15653, Sec. 3: pre-training "as a classification task" with the binary cross-entropy over the
caption-derived labels; vljax/catlip.py makes the head and its logits, vljax/caption_labels.py the
labels).

    loss = mean over labeled images i of 1/V sum_v ell(l_iv, y_iv),

l [B, V] the head's logits (`catlip/logits`), y [B, V] the multi-hot caption labels
(`batch/caption_labels`), ell (`kind`) the per-element losses of vljax/losses/multilabel.py: "bce"
(CatLIP's), "asl" (Ridnik et al. 2021; `gamma_neg`, `gamma_pos`, `margin`) or "wan". As in
`multilabel_loss`, an image whose caption holds no vocabulary term is left out of the mean (the value
is 0 for a batch without any); CatLIP's PyTorch BCE averages over every element, which weights such
images as all-negative: our choice keeps a caption that names nothing from teaching "nothing here".
With `axis_name` the batch rows are split over devices and the value is the global batch's.
"""
from __future__ import annotations

import jax.numpy as jnp

from vljax.losses.collectives import psum
from vljax.losses.multilabel import MULTILABEL


def catlip_loss(logits, targets, axis_name=None, kind: str = "bce", gamma_neg: float = 4.0,
                gamma_pos: float = 1.0, margin: float = 0.05):
    """logits: [B, V] float; targets: [B, V] bool / {0, 1} -> scalar (module docstring)."""
    if kind not in MULTILABEL:
        raise ValueError(f"config key `loss.kind`: {kind!r} is not one of {sorted(MULTILABEL)}")
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(f"catlip_loss: logits {logits.shape} and targets {targets.shape} must both be [B, V]")
    y = targets.astype(jnp.float32)
    opts = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, margin=margin) if kind == "asl" else {}
    per_image = MULTILABEL[kind](logits.astype(jnp.float32), y, **opts).mean(axis=-1)
    labeled = (y.sum(axis=-1) > 0).astype(jnp.float32)
    total = psum(jnp.sum(per_image * labeled), axis_name)
    count = psum(jnp.sum(labeled), axis_name)
    return total / jnp.maximum(count, 1.0)


# Scored per label with a sigmoid at inference (independent binary decisions), as `multilabel`.
LOSSES = {
    "catlip": dict(fn=catlip_loss, inputs=("catlip/logits", "batch/caption_labels"), logits="sigmoid"),
}
