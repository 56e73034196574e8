"""Dynamic Contrastive Distillation (DCD; Rao et al., "Dynamic Contrastive Distillation for
Image-Text Retrieval", arXiv 2207.01426) on a teacher CLIP's stored embeddings.

Read from the official code (raojay7/DCD; the paper's method section was not readable here, so the
equations below are the code's, not the paper's numbering):

  * meter/modules/objectives.py `compute_irtr` (the `useHNM` branch): the teacher scores each
    image's positive text and F drawn false texts; the k = 7 false texts it scores highest are the
    hard negatives; the student scores [positive, hard negatives in the teacher's descending order]
    (`student_to_learn`); `distillation_loss(score, answer, teacher_score, T=1, alpha=0.2, k)`.
  * meter/modules/KD_loss.py `distillation_loss`, per image i with teacher scores s^T_i and student
    scores s_i over its k + 1 candidates (column 0 the positive):

        p_i   = softmax_j(s^T_ij)                        (T does not enter)
        w_i   = (sum_j p_ij log p_ij) / (sum_i' sum_j p_i'j log p_i'j)    (>= 0, sum_i w_i = 1:
                                                            the teacher's relative uncertainty)
        r_i   = softmax_i((1 - w_i)^2)                   (over the batch)
        nll   = sum_i w_i * mean_j BCEwithlogits(s_ij, [j = 0])
        d     = T^2 * sum_i MSE(s^T / T, s / T) * r_i   (`F.mse_loss`: ONE scalar, the mean over
                                                            all B x (k + 1) scores)
        loss  = alpha * d + (1 - alpha) * nll,           alpha = 0.2, T = 1.

    Since `F.mse_loss` is already a scalar and sum_i r_i = 1, the code's r weighting is a no-op
    and d = mean over B x (k + 1) of (s^T_ij - s_ij)^2; T cancels too (T^2 MSE(a/T, b/T) = MSE(a, b)),
    so T is not a parameter here.

Choice on the MSE weighting (`mse_weighting`): "code" (the default) follows the code, d is the plain
mean; "per_example" is the evident intent, d = sum_i r_i * mean_j (s^T_ij - s_ij)^2 (r as above).
(With w_i ~ 1/B, r is close to uniform, so the two differ little.)

Deviations from the code, all forced by a dual-encoder student on stored teacher features:
  * Scores: the teacher's are its logit scale times cosines of its stored embeddings,
    teacher_t * <v^T_i, u^T_j> (vljax/teacher_features.py), the student's t * <v_i, u_j>; the code's
    are cross-encoders' ITM head logits.
  * Candidates: the false texts of image i are the other captions of the GLOBAL batch (all-gathered
    over the data axes), not F texts drawn from the dataset; the hard negatives are the teacher's
    top k of them. So k + 1 <= the global batch size (ValueError otherwise). Duplicate captions in
    a batch are not masked (the code's random false texts rarely repeat the positive).
  * Alignment: the code gathers the teacher's scores in ITS sorted order (`teacher_score[..,
    neg_idxs]`), the student's in [positive, negatives] order: the two agree only when the teacher
    ranks the positive first (the code flags the other case, `flag`). Here both are taken at the
    same k + 1 candidates, positive first (the evident intent); w and r are order-invariant.
  * Direction: image -> text only, as `compute_irtr` does (no text -> image term).
  * When every teacher row's entropy is 0 in float32 (a one-hot teacher), the code divides 0 by 0;
    here w = 0 then (the nll term vanishes for that batch).
A ring form is not built: the top k over the global batch needs every row's full teacher scores.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_scalar, positive_cols, sim

MSE_WEIGHTINGS = ("code", "per_example")


def _check_options(alpha, k, mse_weighting, global_batch):
    """Raises ValueError naming the config key (`loss.alpha`, ...) of an option that cannot work."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"config key `loss.alpha`: DCD's distillation weight must be in [0, 1], got {alpha}")
    if int(k) != k or k < 1:
        raise ValueError(f"config key `loss.k`: the number of hard negatives must be a positive integer, got {k}")
    if mse_weighting not in MSE_WEIGHTINGS:
        raise ValueError(f"config key `loss.mse_weighting`: one of {MSE_WEIGHTINGS}, got {mse_weighting!r}")
    if k + 1 > global_batch:
        raise ValueError(f"config key `loss.k`: DCD's k = {k} hard negatives come from the other captions of "
                         f"the global batch, which has {global_batch}; give k <= {global_batch - 1} or a "
                         "larger batch (input.batch_size)")


def check_config(config) -> None:
    """Refuses, before any work, a config whose loss is "dcd" with options that cannot work
    (`_check_options`; k against `input.batch_size`); any other loss passes."""
    loss = config.get("loss") or {}
    if loss.get("name") != "dcd":
        return
    defaults = {n: p.default for n, p in inspect.signature(dcd_loss).parameters.items()}
    opts = {n: loss.get(n, defaults[n]) for n in ("alpha", "k", "mse_weighting")}
    _check_options(**opts, global_batch=config.input.batch_size)


def _check(zimg, ztxt, teacher_zimg, teacher_ztxt):
    for name, x in (("zimg", zimg), ("ztxt", ztxt), ("teacher_zimg", teacher_zimg),
                    ("teacher_ztxt", teacher_ztxt)):
        if x.ndim != 2 or x.shape[0] != zimg.shape[0]:
            raise ValueError(f"loss dcd: {name} must be [B, D] with B = {zimg.shape[0]}, got {x.shape}")
    if zimg.shape[1] != ztxt.shape[1] or teacher_zimg.shape[1] != teacher_ztxt.shape[1]:
        raise ValueError(f"loss dcd: image and text widths differ: student {zimg.shape[1]} / "
                         f"{ztxt.shape[1]}, teacher {teacher_zimg.shape[1]} / {teacher_ztxt.shape[1]}")


def candidates(teacher_logits, offset, k):
    """[b, k + 1] int32 global columns: each row's positive (column offset + i) first, then the
    teacher's k highest-scoring other columns in descending order. teacher_logits: [b, B]."""
    b = teacher_logits.shape[0]
    pos = positive_cols(b, offset)
    masked = jnp.where(jnp.arange(teacher_logits.shape[1])[None, :] == pos[:, None], -jnp.inf, teacher_logits)
    _, hard = jax.lax.top_k(masked, k)
    return jnp.concatenate([pos[:, None], hard.astype(jnp.int32)], axis=1)


def dcd_loss(zimg, ztxt, t, teacher_zimg, teacher_ztxt, teacher_t, axis_name=None, alpha=0.2, k=7,
             mse_weighting="code"):
    """DCD's retrieval distillation loss (module docstring), image -> text over the global batch:

        alpha * d + (1 - alpha) * nll

    zimg, ztxt: [b, D] the student's L2-normalised embeddings, t its logit scale (scalar);
    teacher_zimg, teacher_ztxt: [b, Dt] the teacher's (any width Dt), teacher_t its logit scale.
    k: hard negatives per image (k + 1 <= the global batch); mse_weighting: "code" | "per_example".
    The teacher's inputs, the candidate choice and the weights w, r get no gradient.
    """
    check_scalar("t", t)
    check_scalar("teacher_t", teacher_t)
    _check(zimg, ztxt, teacher_zimg, teacher_ztxt)
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    _check_options(alpha, k, mse_weighting, b * n)
    k = int(k)
    sg = jax.lax.stop_gradient
    teacher_zimg = sg(teacher_zimg.astype(jnp.float32))
    t_txt = sg(gather(teacher_ztxt.astype(jnp.float32), axis_name))
    teacher_logits = sg(teacher_t) * sim(teacher_zimg, t_txt)  # [b, B]
    cols = sg(candidates(teacher_logits, idx * b, k))  # [b, k + 1]
    s_t = jnp.take_along_axis(teacher_logits, cols, axis=1)
    s = t * jnp.take_along_axis(sim(zimg, gather(ztxt, axis_name)), cols, axis=1)

    log_p = jax.nn.log_softmax(s_t, axis=1)
    neg_entropy = jnp.sum(jnp.exp(log_p) * log_p, axis=1)  # [b], sum_j p log p <= 0
    total = psum(jnp.sum(neg_entropy), axis_name)
    w = sg(jnp.where(total < 0, neg_entropy / jnp.minimum(total, -jnp.finfo(jnp.float32).tiny), 0.0))
    onehot = jnp.zeros((k + 1,), jnp.float32).at[0].set(1.0)
    bce = jnp.mean(jax.nn.softplus(s) - onehot * s, axis=1)  # BCE with logits, mean over k + 1
    nll = psum(jnp.sum(w * bce), axis_name)

    sq = jnp.mean(jnp.square(s_t - s), axis=1)  # [b]
    if mse_weighting == "code":
        d = psum(jnp.sum(sq), axis_name) / (b * n)
    else:
        r_logits = jnp.square(1.0 - w)
        lse = jax.nn.logsumexp(gather(r_logits, axis_name))
        d = psum(jnp.sum(jnp.exp(r_logits - lse) * sq), axis_name)
    return alpha * d + (1.0 - alpha) * nll


LOSSES = {
    "dcd": dict(fn=dcd_loss, inputs=("zimg", "ztxt", "t", "teacher/zimg", "teacher/ztxt", "teacher/t")),
}
