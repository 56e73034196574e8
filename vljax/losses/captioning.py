"""Captioning losses of a caption decoder (CapPa, Tschannen et al. 2023; LocCa, Wan et al. 2024),
alone or added to SigLIP's sigmoid loss as in SigLIP 2 (Tschannen et al. 2025, Sec. 2.2).

The decoder (vljax/models/decoder.py) gives logits [b, L, V] for every caption position, whether
the row was read autoregressively or by parallel prediction (CapPa's mix is drawn in the model,
it decides the decoder's inputs); the loss is the same token-level cross-entropy for both.
LocCa's referring-expression and grounded-captioning rows (vljax/data/locca.py) are the same
cross-entropy on their target positions only (the mask the batch's "dec_target" limits);
`sigmoid_locca` logs each task's term.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, psum
from vljax.losses.sigmoid import sigmoid_loss


def caption_nll(logits, targets, mask):
    """Per-caption mean negative log-likelihood: [b], float32 (float64 for float64 logits).

        nll_i = sum_l m_il * -log softmax(logits_il)[targets_il] / max(sum_l m_il, tiny)

    logits: [b, L, V]; targets: int [b, L]; mask: bool [b, L] (True = a real token, pad
    positions excluded). A caption without real tokens gives 0. This is big_vision's
    `weighted_softmax_xent(normalize=True, reduction=False)` with weights = (targets != pad), the
    CapPa trainer's loss (`trainers/proj/cappa/generative.py`); also the caption
    log-likelihood an evaluation reports (its negative)."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"caption loss: logits must be [b, L, V] with targets and mask [b, L], got "
                         f"{logits.shape}, {targets.shape}, {mask.shape}")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # at least float32 (bf16 logits)
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(dtype)
    return jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 2e-38)


def caption_loss(logits, targets, mask, axis_name=None):
    """Captioning loss: the mean over the GLOBAL batch of each caption's mean token NLL
    (`caption_nll`), so every caption weighs the same whatever its length (big_vision's
    normalisation: per sentence, then the batch mean). With `axis_name` the inputs are the
    device's rows and the value equals the single-device one on the whole batch."""
    _, n = axis_info(axis_name)
    return psum(jnp.sum(caption_nll(logits, targets, mask)), axis_name) / (logits.shape[0] * n)


def sigmoid_caption_loss(zimg, ztxt, t, b, logits, targets, mask, axis_name=None,
                         impl="all_gather", caption_weight=1.0):
    """SigLIP 2's first stage: sigmoid_loss(zimg, ztxt, t, b) + caption_weight * caption_loss
    (logits, targets, mask); SigLIP 2 weighs the two equally (caption_weight = 1). `impl` is
    the sigmoid loss's ("all_gather" | "ring")."""
    return (sigmoid_loss(zimg, ztxt, t, b, axis_name=axis_name, impl=impl)
            + caption_weight * caption_loss(logits, targets, mask, axis_name))


def task_caption_loss(logits, targets, mask, task, axis_name=None, *, which: int):
    """The captioning loss over the GLOBAL batch's rows of LocCa task `which` only (0 Cap, 1
    ARef, 2 GCap; `task` int [b], the batch's "dec_task", vljax/data/locca.py): the mean of their
    `caption_nll` (on the target positions `mask` marks), 0 when the batch has none. For logging:
    the loss itself is `caption_loss` over all rows."""
    rows = (task == which).astype(jnp.promote_types(logits.dtype, jnp.float32))
    total = psum(jnp.sum(caption_nll(logits, targets, mask) * rows), axis_name)
    return total / jnp.maximum(psum(jnp.sum(rows), axis_name), 1.0)


_DECODER = ("dec/logits", "dec/targets", "dec/mask")
_TASKS = {f"locca_{name}": (partial(task_caption_loss, which=i), (*_DECODER, "batch/dec_task"))
          for i, name in enumerate(("cap", "aref", "gcap"))}

# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them: the decoder's outputs of vljax.models.two_towers); "sigmoid_caption" scores as
# SigLIP does (the decoder is not used at inference).
LOSSES = {
    "caption": dict(fn=caption_loss, inputs=_DECODER),
    "sigmoid_caption": dict(fn=sigmoid_caption_loss, inputs=("zimg", "ztxt", "t", "b", *_DECODER),
                            logits="sigmoid", parts={"caption": (caption_loss, _DECODER)}),
    # SigLIP 2 with LocCa's tasks (input.locca, vljax/data/locca.py): the same loss (the rows'
    # masks keep the target positions only), each task's term logged (train/locca_aref, ...).
    "sigmoid_locca": dict(fn=sigmoid_caption_loss, inputs=("zimg", "ztxt", "t", "b", *_DECODER),
                          logits="sigmoid", parts={"caption": (caption_loss, _DECODER), **_TASKS}),
}
