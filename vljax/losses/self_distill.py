"""Self-distillation losses of SigLIP 2's last stage (Tschannen et al. 2025, arXiv 2502.14786,
Sec. 2.3): SILC's local-to-global consistency (Naeem et al. 2023, arXiv 2310.13355) and TIPS'
masked prediction (Maninis et al. 2024, arXiv 2410.16512), both in the DINO / iBOT form (Caron
et al. 2021, `dino/main_dino.py` DINOLoss; Zhou et al. 2022, `ibot/main_ibot.py` iBOTLoss):
a cross-entropy between the EMA teacher's centred, sharpened softmax and the student's softmax
over K prototype logits of a projection head (vljax/models/ssl_heads.py).

Equations (per example; the value is the mean over the GLOBAL batch):

    P_t(x) = softmax((g_t(x) - c) / tau_t)          teacher, centre c, no gradient
    P_s(x) = softmax(g_s(x) / tau_s)                 student
    H(a, b) = -sum_k a_k log b_k

    consistency (SILC / DINO): mean over pairs (teacher global view i, student view v), v != i,
        of H(P_t(x_i), P_s(x_v)); the student's views are its global views (index i = the same
        view as the teacher's i-th, skipped) followed by its local crops.
    masked prediction (TIPS / iBOT): mean over masked patches p of the student's masked global
        view of H(P_t(x)_p, P_s(x~)_p), the teacher seeing the same view unmasked; an image with
        no masked patch counts 0 (iBOT: `sum(mask * H) / max(sum(mask), 1)`, then the batch mean).
    centre update (DINO): c <- m c + (1 - m) mean over the global batch (and views / patches) of
        the teacher's logits.

Every function takes `axis_name` (None: the arrays are the whole batch; inside `jax.shard_map`
on per-device rows: the value and gradients equal the single-device ones on the gathered batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, psum


def _check(name, student, teacher, center):
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[0] != teacher.shape[0] \
            or student.shape[-1] != teacher.shape[-1] or center.shape != student.shape[-1:]:
        raise ValueError(f"{name}: student [b, V, K], teacher [b, V', K] and center [K], got "
                         f"{student.shape}, {teacher.shape}, {center.shape}")


def teacher_probs(teacher_logits, center, teacher_temp):
    """softmax((teacher_logits - center) / teacher_temp) over the last axis, gradient stopped."""
    t = (teacher_logits.astype(jnp.float32) - center) / teacher_temp
    return jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))


def consistency_loss(student_logits, teacher_logits, center, axis_name=None,
                     student_temp=0.1, teacher_temp=0.04):
    """SILC's local-to-global consistency (DINO's multi-crop loss).

    student_logits: [b, Vs, K], the student's head on its views: the Vg global views first (in
    the teacher's order), then the local crops; teacher_logits: [b, Vg, K] on the global views;
    center: [K]. Returns the mean over the global batch and the Vg * Vs - Vg pairs (v != i) of
    H(P_t, P_s). Temperatures: DINO's (student 0.1; teacher 0.04, which DINO warms up to 0.07;
    SILC and SigLIP 2 do not state theirs in what we could read)."""
    _check("consistency_loss", student_logits, teacher_logits, center)
    vg, vs = teacher_logits.shape[1], student_logits.shape[1]
    if vs < vg:
        raise ValueError(f"consistency_loss: the student's views must start with the {vg} global ones")
    pt = teacher_probs(teacher_logits, center, teacher_temp)                       # [b, Vg, K]
    logps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    h = -jnp.einsum("bik,bvk->biv", pt, logps)                                     # [b, Vg, Vs]
    keep = 1.0 - jnp.eye(vg, vs, dtype=h.dtype)                                    # v != i
    pairs = vg * vs - vg
    _, n = axis_info(axis_name)
    return psum(jnp.sum(h * keep), axis_name) / (pairs * student_logits.shape[0] * n)


def masked_patch_loss(student_logits, teacher_logits, mask, center, axis_name=None,
                      student_temp=0.1, teacher_temp=0.04):
    """TIPS' masked prediction (iBOT's patch loss).

    student_logits: [b, N, K], the student's patch head on its masked global view; teacher_logits:
    [b, N, K], the teacher's on the same view unmasked; mask: bool [b, N] (True = masked in the
    student's input); center: [K]. Returns the batch mean of each image's mean over its masked
    patches of H(P_t, P_s) (an image without masked patches: 0). Temperatures as
    `consistency_loss` (iBOT: student 0.1, teacher 0.04 -> 0.07)."""
    _check("masked_patch_loss", student_logits, teacher_logits, center)
    if mask.shape != student_logits.shape[:2] or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"masked_patch_loss: student and teacher [b, N, K] and mask [b, N], got "
                         f"{student_logits.shape}, {teacher_logits.shape}, {mask.shape}")
    pt = teacher_probs(teacher_logits, center, teacher_temp)
    logps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    h = -jnp.sum(pt * logps, axis=-1)                                              # [b, N]
    m = mask.astype(h.dtype)
    per_image = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    _, n = axis_info(axis_name)
    return psum(jnp.sum(per_image), axis_name) / (student_logits.shape[0] * n)


def updated_center(center, teacher_logits, momentum=0.9, axis_name=None):
    """DINO's centre update: m * center + (1 - m) * the mean of `teacher_logits` ([b, ..., K])
    over the global batch and every axis but the last (views, patches). DINO and iBOT: m = 0.9."""
    x = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    rows = x.reshape(-1, x.shape[-1])
    _, n = axis_info(axis_name)
    mean = psum(jnp.sum(rows, axis=0), axis_name) / (rows.shape[0] * n)
    return momentum * center + (1.0 - momentum) * mean
