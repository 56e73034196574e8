"""Multi-label training of a light label head on frozen image embeddings: losses and the head.

Logits of image i and label j come from the image–label-prompt similarity,
    l_ij = s cos(z_i, w_j) + b_j,
with w_j initialised from the label's prompt-ensemble embedding (the zero-shot classifier), a
per-label bias b_j and a scale s (initialised from the model's logit scale); p_ij = sigmoid(l_ij).

Losses (each a mean over images and labels, targets y in {0, 1}):

  bce   binary cross-entropy: -[y log p + (1 - y) log(1 - p)].
  asl   asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV
        2021, Eq. 7-8): L+ = (1 - p)^gamma_pos log(p), L- = p_m^gamma_neg log(1 - p_m) with the
        shifted probability p_m = max(p - m, 0) (Eq. 6): easy negatives are down-weighted and
        very easy ones (p < m) discarded, which also discards negatives that are likely missing
        positives. Paper defaults gamma_neg = 4, gamma_pos = 0 (here 1: their best with
        gamma_pos > 0 in Table 4 is close), m = 0.05.
  wan   weak assume-negative, the positive-unlabelled loss of Cole et al. ("Multi-Label Learning
        from Single Positive Labels", CVPR 2021, Sec. 3.2): unobserved labels are treated as
        negatives but weighted gamma = 1 / (L - 1), since many of them are unannotated positives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vljax import losses


def bce(logits, targets):
    return losses.bce_elementwise(logits, targets).mean()


def asl(logits, targets, gamma_neg: float = 4.0, gamma_pos: float = 1.0, margin: float = 0.05,
        eps: float = 1e-8):
    return losses.asl_elementwise(logits, targets, gamma_neg, gamma_pos, margin, eps).mean()


def wan(logits, targets):
    return losses.wan_elementwise(logits, targets).mean()


LOSSES = {"bce": bce, "asl": asl, "wan": wan}


def head_logits(params, z):
    """z [N, D] normalised -> [N, L] logits s cos(z, w_j) + b_j."""
    w = params["w"] / jnp.linalg.norm(params["w"], axis=-1, keepdims=True)
    return jnp.exp(params["log_scale"]) * z @ w.T + params["b"]


def init_head(ztxt, logit_scale: float) -> dict:
    """The zero-shot label classifier as the head's starting point."""
    ztxt = jnp.asarray(ztxt, jnp.float32)
    return {"w": ztxt, "b": jnp.zeros(len(ztxt), jnp.float32),
            "log_scale": jnp.asarray(np.log(logit_scale), jnp.float32)}


def train_head(zimg, targets, ztxt, logit_scale: float, *, loss: str = "asl", steps: int = 300,
               lr: float = 1e-3, batch_size: int = 256, seed: int = 0, **loss_kwargs) -> dict:
    """The head after `steps` AdamW steps on images zimg [N, D] with multi-hot targets [N, L]."""
    if loss not in LOSSES:
        raise ValueError(f"unknown multi-label loss {loss!r} (known: {sorted(LOSSES)})")
    loss_fn = LOSSES[loss]
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)

    @jax.jit
    def step(p, state, z, y):
        value, g = jax.value_and_grad(lambda q: loss_fn(head_logits(q, z), y, **loss_kwargs))(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, value

    params = init_head(ztxt, logit_scale)
    state, rng = opt.init(params), np.random.default_rng(seed)
    zimg, targets = np.asarray(zimg, np.float32), np.asarray(targets, np.float32)
    b = min(batch_size, len(zimg))
    for _ in range(steps):
        idx = rng.choice(len(zimg), b, replace=False)
        params, state, _ = step(params, state, zimg[idx], targets[idx])
    return params
