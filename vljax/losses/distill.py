"""Distillation from a teacher CLIP whose embeddings are data (CLIP-KD, Yang et al. CVPR 2024,
"CLIP-KD: An Empirical Study of CLIP Model Distillation", arXiv 2307.12732).

The teacher's L2-normalised image and text embeddings of every training record are stored once
(vljax/features.py `teacher_stores`, keyed by the source's cache key) and carried by the batch
(`teacher_zimg` [B, Dt], `teacher_ztxt` [B, Dt]: the embedding of the caption the batch drew,
`teacher_t` [B]: the teacher's logit scale, equal in every row); the objective gives them to a loss
as `teacher/zimg`, `teacher/ztxt` and the scalar `teacher/t` (vljax/objective.py).

`clip_kd` is the paper's task loss plus its embedding-level distillation terms, each weighted as
the paper's unified objective adds them (Sec. 3.4, L = L_task + sum of weighted KD terms):

  * FD, feature distillation (Sec. 3.2): mean squared error between the student's and the
    teacher's normalised embeddings, image and text, as the reference code computes it
    (winycg/CLIP-KD src/open_clip/loss.py, `KDClipLoss`: `F.mse_loss` means over B x D):
        FD = 1/(B D) sum_i ||v_i^s - v_i^t||^2 + 1/(B D) sum_i ||s_i^s - s_i^t||^2.
  * CRD, contrastive relational distillation (Sec. 3.1): KL between the teacher's and the
    student's contrastive distributions, image->text and text->image, each with its own logit
    scale, averaged over the two directions (the reference `ckd_loss`, temperature 1,
    `batchmean`):
        CRD = 1/(2B) sum_i [KL(p^t_{i,:} || p^s_{i,:}) + KL(q^t_{i,:} || q^s_{i,:})],
        p^s = softmax_j(t v_i^s . s_j^s), p^t = softmax_j(t_T v_i^t . s_j^t), q the transposes.
  * ICL, interactive contrastive learning (Sec. 3.3): the student's embeddings as anchors
    contrasted against the teacher's of the other modality:
        ICL = 1/(2B) sum_i [CE_j(t v_i^s . s_j^t, i) + CE_j(t s_i^s . v_j^t, i)].
    Deviation: the reference code learns a separate logit scale for ICL (`cross_logit_scale`);
    here it is the student's own `t` (no parameter outside the model).

The feature terms (FD, ICL) compare embeddings coordinate by coordinate, so they need the
student's embedding width to equal the teacher's; the paper then adds a learned linear projection
of the student's embeddings (Sec. 3.2). That projection would be a parameter outside the two
towers: not built here, and a width mismatch is refused (ValueError naming both widths). CRD
compares B x B similarity distributions and works at any widths.

Not built: the paper's gradient (GD), masked-feature (MFD) and fusion (AFD) terms (they need the
teacher to run on the student's masked / augmented views, or fusion parameters), DC-CLIP (its
equations were not read here; Dynamic Contrastive Distillation is vljax/losses/dcd.py, from its
official code). An LLM2CLIP-style frozen text teacher is not a loss here but a model: the text
tower itself is the frozen encoder (its trunk locked and run once per caption, vljax/text_memo.py)
with a trainable adapter before its head (vljax/models/text_adapter.py), so the exported bundle
scores with the teacher's text side; configs/clip.py:llm2clip=on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_scalar, hard_ce_sum, sim
from vljax.losses.contrastive import softmax_contrastive


def _check(zimg, ztxt, teacher_zimg, teacher_ztxt, needs_equal_width):
    for name, x in (("zimg", zimg), ("ztxt", ztxt), ("teacher_zimg", teacher_zimg),
                    ("teacher_ztxt", teacher_ztxt)):
        if x.ndim != 2 or x.shape[0] != zimg.shape[0]:
            raise ValueError(f"{name} must be [B, D] with B = {zimg.shape[0]}, got {x.shape}")
    if needs_equal_width and zimg.shape[1] != teacher_zimg.shape[1]:
        raise ValueError(f"loss clip_kd: the feature terms (fd_weight, icl_weight) compare the student's "
                         f"embeddings (width {zimg.shape[1]}) with the teacher's (width "
                         f"{teacher_zimg.shape[1]}); give the student the teacher's embed width or "
                         "use only crd_weight (CLIP-KD's projection for unequal widths is not built)")


def _kl_rows_sum(teacher_logits, student_logits):
    """sum over rows of KL(softmax(teacher) || softmax(student)); [b, B] -> scalar float32."""
    log_pt = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits, axis=-1)
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps))


def feature_distill(zimg, ztxt, teacher_zimg, teacher_ztxt, axis_name=None):
    """FD (CLIP-KD Sec. 3.2, module docstring): mean squared error over B x D, image + text."""
    _, n = axis_info(axis_name)
    d = lambda a, c: jnp.sum(jnp.square(a.astype(jnp.float32) - c.astype(jnp.float32)))  # noqa: E731
    local = d(zimg, teacher_zimg) + d(ztxt, teacher_ztxt)
    return psum(local, axis_name) / (zimg.shape[0] * n * zimg.shape[1])


def relational_distill(zimg, ztxt, t, teacher_zimg, teacher_ztxt, teacher_t, axis_name=None):
    """CRD (CLIP-KD Sec. 3.1, module docstring): KL(teacher || student) of the image->text and
    text->image softmax over the global batch, averaged over rows and the two directions."""
    _, n = axis_info(axis_name)
    b = zimg.shape[0]
    all_txt, all_img = gather(ztxt, axis_name), gather(zimg, axis_name)
    t_txt = jax.lax.stop_gradient(gather(teacher_ztxt, axis_name))
    t_img = jax.lax.stop_gradient(gather(teacher_zimg, axis_name))
    teacher_t = jax.lax.stop_gradient(teacher_t)
    i2t = _kl_rows_sum(teacher_t * sim(teacher_zimg, t_txt), t * sim(zimg, all_txt))
    t2i = _kl_rows_sum(teacher_t * sim(teacher_ztxt, t_img), t * sim(ztxt, all_img))
    return psum(i2t + t2i, axis_name) / (2 * b * n)


def interactive_contrastive(zimg, ztxt, t, teacher_zimg, teacher_ztxt, axis_name=None):
    """ICL (CLIP-KD Sec. 3.3, module docstring): student anchors, teacher contrasts, scale t."""
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    t_txt = jax.lax.stop_gradient(gather(teacher_ztxt, axis_name))
    t_img = jax.lax.stop_gradient(gather(teacher_zimg, axis_name))
    local = hard_ce_sum(t * sim(zimg, t_txt), idx * b) + hard_ce_sum(t * sim(ztxt, t_img), idx * b)
    return psum(local, axis_name) / (2 * b * n)


def clip_kd(zimg, ztxt, t, teacher_zimg, teacher_ztxt, teacher_t, axis_name=None, fd_weight=1.0,
            crd_weight=1.0, icl_weight=0.0, task_weight=1.0):
    """CLIP-KD's unified objective on stored teacher embeddings (module docstring):

        task_weight * CLIP(zimg, ztxt, t) + fd_weight * FD + crd_weight * CRD + icl_weight * ICL.

    zimg, ztxt: [b, D] the student's L2-normalised embeddings; t: its logit scale (scalar);
    teacher_zimg, teacher_ztxt: [b, Dt] the teacher's, L2-normalised; teacher_t: its logit scale.
    The teacher's inputs get no gradient. D must equal Dt when fd_weight or icl_weight is non-zero.
    The paper's default weights are tuned per term at its scale (its scripts); here each is a
    config option (`loss.fd_weight`, ...), and 0 removes a term.
    """
    check_scalar("t", t)
    check_scalar("teacher_t", teacher_t)
    _check(zimg, ztxt, teacher_zimg, teacher_ztxt, bool(fd_weight or icl_weight))
    teacher_zimg = jax.lax.stop_gradient(teacher_zimg.astype(jnp.float32))
    teacher_ztxt = jax.lax.stop_gradient(teacher_ztxt.astype(jnp.float32))
    value = jnp.float32(0.0)
    if task_weight:
        value = value + task_weight * softmax_contrastive(zimg, ztxt, t, axis_name)
    if fd_weight:
        value = value + fd_weight * feature_distill(zimg, ztxt, teacher_zimg, teacher_ztxt, axis_name)
    if crd_weight:
        value = value + crd_weight * relational_distill(zimg, ztxt, t, teacher_zimg, teacher_ztxt,
                                                        teacher_t, axis_name)
    if icl_weight:
        value = value + icl_weight * interactive_contrastive(zimg, ztxt, t, teacher_zimg, teacher_ztxt,
                                                             axis_name)
    return value


LOSSES = {
    "clip_kd": dict(fn=clip_kd, inputs=("zimg", "ztxt", "t", "teacher/zimg", "teacher/ztxt", "teacher/t")),
}
