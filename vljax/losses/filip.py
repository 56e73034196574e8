"""FILIP's token-wise late interaction (Yao et al. 2021): its similarity and its loss."""
from __future__ import annotations

import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_scalar, hard_ce_sum


def filip_similarity(img_tokens, txt_tokens, txt_mask=None, img_mask=None):
    """Token-wise late-interaction similarity of FILIP (Yao et al. 2021).

    With s_bcnm = <img_tokens[b, n], txt_tokens[c, m]> over valid tokens only:
        i2t[b, c] = mean_n max_m s_bcnm   (each image token finds its best text token)
        t2i[b, c] = mean_m max_n s_bcnm   (each text token finds its best image token)

    Args:
      img_tokens: [B, N, D] projected, per-token L2-normalised image tokens.
      txt_tokens: [C, M, D] projected, per-token L2-normalised text tokens.
      txt_mask: [C, M] bool, True for real (non-padding) text tokens; None = all valid.
      img_mask: [B, N] bool, likewise for image tokens; None = all valid.
        Every sequence needs at least one valid token.

    Returns:
      (i2t [B, C], t2i [B, C]), float32. Memory is O(B * C * N * M).
    """
    if img_tokens.ndim != 3 or txt_tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, D] and [C, M, D], got {img_tokens.shape} "
                         f"and {txt_tokens.shape}")
    if img_tokens.shape[-1] != txt_tokens.shape[-1]:
        raise ValueError(f"token widths differ: {img_tokens.shape} vs {txt_tokens.shape}")
    if txt_mask is None:
        txt_mask = jnp.ones(txt_tokens.shape[:2], bool)
    if img_mask is None:
        img_mask = jnp.ones(img_tokens.shape[:2], bool)
    if txt_mask.shape != txt_tokens.shape[:2] or img_mask.shape != img_tokens.shape[:2]:
        raise ValueError(f"masks {img_mask.shape}, {txt_mask.shape} must match tokens' "
                         f"{img_tokens.shape[:2]}, {txt_tokens.shape[:2]}")
    txt_mask = txt_mask.astype(bool)
    img_mask = img_mask.astype(bool)
    s = jnp.einsum("bnd,cmd->bcnm", img_tokens, txt_tokens, preferred_element_type=jnp.float32)
    tm = txt_mask[None, :, None, :]
    im = img_mask[:, None, :, None]
    best_txt = jnp.max(jnp.where(tm, s, -jnp.inf), axis=3)  # [B, C, N]
    best_img = jnp.max(jnp.where(im, s, -jnp.inf), axis=2)  # [B, C, M]

    def masked_mean(x, mask):  # mean over valid positions of the last axis
        return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.sum(mask, axis=-1)

    i2t = masked_mean(best_txt, img_mask[:, None, :])
    t2i = masked_mean(best_img, txt_mask[None, :, :])
    return i2t, t2i


def filip_loss(img_tokens, txt_tokens, txt_mask, t, axis_name=None, img_mask=None):
    """FILIP contrastive loss: (CE over i2t rows + CE over t2i rows) / 2 on late-interaction logits.

    The image->text term uses i2t[image, text]; the text->image term takes, for each text, the
    t2i similarities to all images (softmax over images). Arguments as in filip_similarity
    (shards of the batch with axis_name), t the scalar logit scale.
    """
    check_scalar("t", t)
    if img_tokens.shape[0] != txt_tokens.shape[0]:
        raise ValueError(f"batch sizes differ: {img_tokens.shape} vs {txt_tokens.shape}")
    idx, n = axis_info(axis_name)
    b = img_tokens.shape[0]
    if txt_mask is None:
        txt_mask = jnp.ones(txt_tokens.shape[:2], bool)
    if img_mask is None:
        img_mask = jnp.ones(img_tokens.shape[:2], bool)
    if axis_name is None:
        i2t, t2i = filip_similarity(img_tokens, txt_tokens, txt_mask, img_mask)
        t2i = t2i.T  # rows = texts
    else:
        # Local images against all texts for i2t; all images against local texts for t2i.
        i2t, _ = filip_similarity(img_tokens, gather(txt_tokens, axis_name),
                                  gather(txt_mask, axis_name), img_mask)
        _, t2i = filip_similarity(gather(img_tokens, axis_name), txt_tokens, txt_mask,
                                  gather(img_mask, axis_name))
        t2i = t2i.T  # [b, B]
    local = hard_ce_sum(t * i2t, idx * b) + hard_ce_sum(t * t2i, idx * b)
    return psum(local, axis_name) / (2 * b * n)



# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them); a model trained on FILIP scores with its token-wise similarity.
LOSSES = {
    "filip": dict(fn=filip_loss, inputs=("img/tokens_proj", "txt/tokens_proj", "txt/mask", "t"),
                  similarity="filip"),
}
