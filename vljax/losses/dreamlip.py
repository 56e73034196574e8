"""DreamLIP's loss over sub-captions (Zheng et al., ECCV 2024, arXiv 2403.17007): multi-positive
contrastive terms and the subcaption-specific grouping loss.

What was read: the official code (github.com/zyf0619sjtu/DreamLIP, open_clip/loss.py `ClipLoss.forward`
with text features [B, K, D], `use_declip_loss`, `use_multipos_loss` and `use_finegrained_loss`,
`pairwise_circleloss`, `pairwise_contrastive_loss`; open_clip/model.py and transformer.py for the
inputs; training/params.py for the defaults); the paper's text was not reachable from here (abstract
only), so no equation number is cited. Each image i has K texts (its raw caption and K - 1
sub-captions, vljax.data.subcaptions), embedded as ztxt[i, k]. The loss is

    L = 1/K sum_k CLIP(zimg, ztxt[:, k])  +  w * 1/B sum_i softplus(lse_{p in P(i)} l_p + lse_{n not in P(i)} l_n)
          + w_sgl * L_sgl

CLIP's symmetric softmax loss once per text slot (the slot's texts are the negatives; the code's
CLIP_loss plus its "(De)CLIP" terms, each / 2K), and Circle loss (Sun et al., CVPR 2020) of every image
against all B K texts, the K texts of the same image its positives P(i), on the cosines s:

    l_p = -gamma * relu(1 + m - s_p) * (s_p - (1 - m)),   l_n = gamma * relu(s_n + m) * (s_n - m),

the relu factors without gradient (the code's `.detach()`), gamma = 32, m = 0.25 (params.py) and
w = 1/10 (the code's I2mT_loss / 10).

The subcaption-specific grouping loss L_sgl (loss.py `use_finegrained_loss` block, lines 360-394 of
the read commit d2aeea8; `pairwise_contrastive_loss`, lines 257-268): with x[i, p] image i's patch
tokens and u[i, k] its texts, both L2-normalised, s[i, k, p] = <u[i, k], x[i, p]>, per (i, k)

    a = (s - min_p s) / (max_p s - min_p s + 1e-10)   (`sgl_norm` "minmax"; "softmax": softmax_p s)
    a = 0 where a < delta                              (`sgl_delta`; delta < 0: 1 / patches)
    g[i, k] = normalize(sum_p a_p / (sum_q a_q) x[i, p])

and L_sgl is CLIP's symmetric softmax loss between the B K groupings g and the B K texts u, each
(i, k) pair its own positive (labels eye(B K)), at the logit scale. Defaults are the code's
(params.py: sgl_delta 0.0, which drops nothing, "minmax"), except the weight: `sgl_weight` 0 keeps
the grouping off (and the loss bit-identical to the loss without it); the code's sgl_lossweight is
1.0 when `--use_finegrained_loss` is on (configs/clip.py `sgl=`). Logged unweighted as `train/sgl`.

Deviations of the grouping loss, named (the released code cannot run it as written):
  * the logit scale: the code passes `logit_scale_local`, which its model sets to None
    (model.py `self.logit_scale_local = None`, the Parameter commented out), so the product fails;
    here it is the model's own learned logit scale t, the one the CLIP terms use.
  * the patch tokens: the code's vision tower returns its tokens unprojected (ViT width; the
    projection `#@ self.proj2` is commented out in transformer.py), while the texts live in the
    joint space; here the patches go through the image tower's own head into the joint space,
    per-token normalised (`img/patches_proj`: vljax.models.two_towers, the tokens FILIP uses less
    the class token, which the code's `_global_pool` also leaves out of its tokens).
  * the texts' pairing: the code stacks the gathered texts slot-major ([K, B, D] -> [K B, D]) and
    reads them back image-major (`.view(bs, number_text, c)`), so for K > 1 text (i, k) of the view
    is a text of another image, grouped over image i's patches; here each image's own K texts are
    grouped over its patches, as the method describes.
  * all patches below the threshold: the code divides 0 by 0 (NaN); here that text's grouping is
    the zero vector (its logits 0). With "minmax" and delta < 1 the best patch is always kept, and
    delta >= 1 is refused.
  * devices: the code gathers every rank's local features and keeps the first image view
    (`[:, 0:1]`) only when world_size > 1, and computes the loss on the whole gathered batch on every
    rank; vljax has one view per image, and the sharded form here (each device groups its own images,
    the CLIP term over the global batch, all-gather or ring) equals the one-device form.

Not built: the unused OT / tagging variants. The CLIP terms (the grouping's included) have a ring form
(`impl="ring"`, losses.softmax_contrastive's); the circle term, with no ring sibling in vljax, gathers
the texts: [b, B K] per device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_impl, check_scalar, sim
from vljax.losses.contrastive import softmax_contrastive

_NEG_INF = -jnp.inf
SGL_NORMS = ("minmax", "softmax")


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


def check_grouping(sgl_weight, sgl_delta, sgl_norm):
    """Raises ValueError naming the config key (`loss.sgl_weight`, ...) of a bad grouping option."""
    if not float(sgl_weight) >= 0.0:
        raise ValueError(f"config key `loss.sgl_weight`: the grouping loss's weight must be >= 0 "
                         f"(0: off), got {sgl_weight}")
    if not float(sgl_delta) < 1.0:
        raise ValueError(f"config key `loss.sgl_delta`: the grouping threshold must be < 1 (a "
                         f"normalised similarity at or above 1 drops every patch; < 0: 1 / patches), "
                         f"got {sgl_delta}")
    if sgl_norm not in SGL_NORMS:
        raise ValueError(f"config key `loss.sgl_norm`: {sgl_norm!r} is not one of {SGL_NORMS}")


def _l2_normalize(x):
    """x / max(|x|, 1e-12) along the last axis (torch's F.normalize); a finite gradient at 0."""
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def grouped_patches(patches, ztxt_sub, delta=0.0, norm="minmax"):
    """Each text's grouping of its own image's patches (module docstring): [b, K, D], unit rows.

    patches: [b, P, D] an image's patch tokens in the joint space; ztxt_sub: [b, K, D]."""
    tok, txt = _l2_normalize(patches.astype(jnp.float32)), _l2_normalize(ztxt_sub.astype(jnp.float32))
    s = jnp.einsum("bkd,bpd->bkp", txt, tok)
    if norm == "minmax":
        lo, hi = jnp.min(s, axis=-1, keepdims=True), jnp.max(s, axis=-1, keepdims=True)
        w = (s - lo) / (hi - lo + 1e-10)
    else:
        w = jax.nn.softmax(s, axis=-1)
    w = jnp.where(w < (1.0 / s.shape[-1] if delta < 0 else delta), 0.0, w)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)  # all dropped: no grouping
    return _l2_normalize(jnp.einsum("bkp,bpd->bkd", w, tok))


def subcaption_grouping(patches, ztxt_sub, t, axis_name=None, impl="all_gather", delta=0.0, norm="minmax"):
    """DreamLIP's subcaption-specific grouping loss (module docstring): CLIP's symmetric softmax
    loss between the global batch's B K grouped embeddings and its B K texts, the (image, text)
    pair each grouping was made for its positive, at logit scale t.

    patches: [b, P, D]; ztxt_sub: [b, K, D]; t: scalar; delta, norm: the code's sgl_delta, sgl_norm."""
    check_scalar("t", t)
    check_grouping(0.0, delta, norm)
    if patches.ndim != 3 or ztxt_sub.ndim != 3 or patches.shape[0] != ztxt_sub.shape[0] \
            or patches.shape[2] != ztxt_sub.shape[2]:
        raise ValueError(f"the patch tokens must be [B, P, D] and the sub-caption embeddings [B, K, D], "
                         f"got {patches.shape} and {ztxt_sub.shape}")
    g = grouped_patches(patches, ztxt_sub, delta, norm)
    b, k, d = g.shape
    txt = _l2_normalize(ztxt_sub.astype(jnp.float32))
    return softmax_contrastive(g.reshape(b * k, d), txt.reshape(b * k, d), t, axis_name=axis_name, impl=impl)


def dreamlip_loss(zimg, ztxt_sub, t, patches=None, axis_name=None, impl="all_gather", multipos_weight=0.1,
                  gamma=32.0, margin=0.25, sgl_weight=0.0, sgl_delta=0.0, sgl_norm="minmax"):
    """DreamLIP's loss (module docstring): CLIP per text slot, averaged, + multipos_weight * Circle
    + sgl_weight * the subcaption-specific grouping loss.

    Args:
      zimg: [b, D] image embeddings; ztxt_sub: [b, K, D] the embeddings of each image's K texts
        (raw caption first, then its sub-captions); t: scalar logit scale.
      patches: [b, P, D] the image tower's projected patch tokens (`img/patches_proj`), taken when
        sgl_weight > 0.
      axis_name: mesh axis (or axes) the batch is split over, or None.
      impl: the CLIP terms' form, "all_gather" or "ring" (the grouping loss's too).
      multipos_weight, gamma, margin: the circle term's weight (code: 1/10), scale and relaxation.
      sgl_weight, sgl_delta, sgl_norm: the grouping loss's weight (code: sgl_lossweight 1.0 when on;
        0 here: off), threshold and normalisation (code: 0.0, "minmax").
    """
    check_scalar("t", t)
    check_impl(impl)
    check_options(multipos_weight, gamma, margin)
    check_grouping(sgl_weight, sgl_delta, sgl_norm)
    if zimg.ndim != 2 or ztxt_sub.ndim != 3 or ztxt_sub.shape[0] != zimg.shape[0] \
            or ztxt_sub.shape[2] != zimg.shape[1]:
        raise ValueError(f"zimg must be [B, D] and the sub-caption embeddings [B, K, D], got {zimg.shape} "
                         f"and {ztxt_sub.shape}")
    if sgl_weight and patches is None:
        raise ValueError("config key `loss.sgl_weight`: the grouping loss takes the image tower's patch "
                         "tokens (img/patches_proj), and none were given")
    k = ztxt_sub.shape[1]
    loss = sum(softmax_contrastive(zimg, ztxt_sub[:, i], t, axis_name=axis_name, impl=impl) for i in range(k)) / k
    if multipos_weight:
        loss = loss + multipos_weight * circle_multi_positive(zimg, ztxt_sub, axis_name, gamma, margin)
    if sgl_weight:
        loss = loss + sgl_weight * subcaption_grouping(patches, ztxt_sub, t, axis_name, impl, sgl_delta, sgl_norm)
    return loss


def _grouping_options(options):
    w, delta, norm = (options.get(k, v) for k, v in (("sgl_weight", 0.0), ("sgl_delta", 0.0),
                                                      ("sgl_norm", "minmax")))
    check_grouping(w, delta, norm)
    return float(w), float(delta), norm


def grouping_input(options) -> tuple[str, ...]:
    """The input the options (config.loss) choose: the projected patch tokens when sgl_weight > 0."""
    return ("img/patches_proj",) if _grouping_options(options)[0] > 0 else ()


def grouping_part(options) -> dict:
    """The grouping loss, unweighted, logged as `train/sgl` when sgl_weight > 0 (objective.make_parts)."""
    w, delta, norm = _grouping_options(options)
    if not w:
        return {}
    impl = options.get("impl", "all_gather")
    fn = functools.partial(subcaption_grouping, impl=impl, delta=delta, norm=norm)
    return {"sgl": (fn, ("img/patches_proj", "sub/ztxt", "t"))}


# The losses of this family, by config name, with their inputs: "sub/ztxt" is the text tower's
# embedding of the batch's "subcaptions" (config.input.subcaptions; vljax/step.py); with
# loss.sgl_weight > 0 also "img/patches_proj" (the grouping loss, logged as train/sgl).
LOSSES = {"dreamlip": dict(fn=dreamlip_loss, inputs=("zimg", "sub/ztxt", "t"), chosen=grouping_input,
                           parts=grouping_part)}
