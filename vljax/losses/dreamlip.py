"""DreamLIP's multi-positive loss over sub-captions (Zheng et al., ECCV 2024, arXiv 2403.17007).

What was read: the official code (github.com/zyf0619sjtu/DreamLIP, open_clip/loss.py `ClipLoss.forward`
with text features [B, K, D], `use_declip_loss` and `use_multipos_loss`, and `pairwise_circleloss`;
training/params.py for the defaults); the paper's text was not reachable from here (abstract only),
so no equation number is cited. Each image i has K texts (its raw caption and K - 1 sub-captions,
vljax.data.subcaptions), embedded as ztxt[i, k]. The loss is

    L = 1/K sum_k CLIP(zimg, ztxt[:, k])  +  w * 1/B sum_i softplus(lse_{p in P(i)} l_p + lse_{n not in P(i)} l_n)

CLIP's symmetric softmax loss once per text slot (the slot's texts are the negatives; the code's
CLIP_loss plus its "(De)CLIP" terms, each / 2K), and Circle loss (Sun et al., CVPR 2020) of every image
against all B K texts, the K texts of the same image its positives P(i), on the cosines s:

    l_p = -gamma * relu(1 + m - s_p) * (s_p - (1 - m)),   l_n = gamma * relu(s_n + m) * (s_n - m),

the relu factors without gradient (the code's `.detach()`), gamma = 32, m = 0.25 (params.py) and
w = 1/10 (the code's I2mT_loss / 10). Not built: the subcaption-specific grouping loss (it matches each
sub-caption to the image's patch tokens, which a locked LiT trunk's pooled features do not keep) and
the unused OT / tagging variants.

The CLIP terms have a ring form (`impl="ring"`, losses.softmax_contrastive's); the circle term, with no
ring sibling in vljax, gathers the texts: [b, B K] per device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_impl, check_scalar, sim
from vljax.losses.contrastive import softmax_contrastive

_NEG_INF = -jnp.inf


def check_options(multipos_weight, gamma, margin):
    """Raises ValueError naming the config key (`loss.gamma`, ...) of a bad option."""
    if not float(multipos_weight) >= 0.0:
        raise ValueError(f"config key `loss.multipos_weight`: a weight >= 0, got {multipos_weight}")
    if not float(gamma) > 0.0:
        raise ValueError(f"config key `loss.gamma`: Circle loss's scale must be > 0, got {gamma}")
    if not 0.0 <= float(margin) < 1.0:
        raise ValueError(f"config key `loss.margin`: Circle loss's relaxation in [0, 1), got {margin}")


def circle_multi_positive(zimg, ztxt_sub, axis_name=None, gamma=32.0, margin=0.25):
    """Mean over the global batch's images of Circle loss against all B K texts (module docstring).

    zimg: [b, D]; ztxt_sub: [b, K, D], text k of image i at [i, k]."""
    idx, n = axis_info(axis_name)
    b, k, _ = ztxt_sub.shape
    texts = gather(ztxt_sub, axis_name).reshape(b * n * k, -1)  # row j K + k: text k of image j
    s = sim(zimg, texts)  # [b, B K] cosines
    pos = (idx * b + jnp.arange(b))[:, None] == (jnp.arange(b * n * k) // k)[None, :]
    alpha_p = lax.stop_gradient(jax.nn.relu(1.0 + margin - s))
    alpha_n = lax.stop_gradient(jax.nn.relu(s + margin))
    lp = jnp.where(pos, -gamma * alpha_p * (s - (1.0 - margin)), _NEG_INF)
    ln = jnp.where(pos, _NEG_INF, gamma * alpha_n * (s - margin))
    local = jnp.sum(jax.nn.softplus(jax.nn.logsumexp(lp, axis=-1) + jax.nn.logsumexp(ln, axis=-1)))
    return psum(local, axis_name) / (b * n)


def dreamlip_loss(zimg, ztxt_sub, t, axis_name=None, impl="all_gather", multipos_weight=0.1, gamma=32.0,
                  margin=0.25):
    """DreamLIP's loss (module docstring): CLIP per text slot, averaged, + multipos_weight * Circle.

    Args:
      zimg: [b, D] image embeddings; ztxt_sub: [b, K, D] the embeddings of each image's K texts
        (raw caption first, then its sub-captions); t: scalar logit scale.
      axis_name: mesh axis (or axes) the batch is split over, or None.
      impl: the CLIP terms' form, "all_gather" or "ring".
      multipos_weight, gamma, margin: the circle term's weight (code: 1/10), scale and relaxation.
    """
    check_scalar("t", t)
    check_impl(impl)
    check_options(multipos_weight, gamma, margin)
    if zimg.ndim != 2 or ztxt_sub.ndim != 3 or ztxt_sub.shape[0] != zimg.shape[0] \
            or ztxt_sub.shape[2] != zimg.shape[1]:
        raise ValueError(f"zimg must be [B, D] and the sub-caption embeddings [B, K, D], got {zimg.shape} "
                         f"and {ztxt_sub.shape}")
    k = ztxt_sub.shape[1]
    clip = sum(softmax_contrastive(zimg, ztxt_sub[:, i], t, axis_name=axis_name, impl=impl) for i in range(k)) / k
    if not multipos_weight:
        return clip
    return clip + multipos_weight * circle_multi_positive(zimg, ztxt_sub, axis_name, gamma, margin)


# The losses of this family, by config name, with their inputs: "sub/ztxt" is the text tower's
# embedding of the batch's "subcaptions" (config.input.subcaptions; vljax/step.py).
LOSSES = {"dreamlip": dict(fn=dreamlip_loss, inputs=("zimg", "sub/ztxt", "t"))}
