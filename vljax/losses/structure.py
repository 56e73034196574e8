"""STRUCTURE (Gröger, Wen, Le & Brbić, NeurIPS 2025, "With Limited Data for Multimodal Alignment,
Let the STRUCTURE Guide You", arXiv 2506.16895): a regulariser that keeps the multi-scale
neighbourhood geometry of a frozen unimodal encoder's latent space in the aligned (joint) space,
added with a weight to the alignment loss (vljax/objective.py `with_regularisers`,
`loss.structure_*`).

Followed: the authors' code, `src/loss/clip_loss.py` of the official repository (read from the
copy hhxk233/STRUCTURE, commits by the first author): `structure_reg` (lines 58-142) with
`center_embeddings` (18-29), `compute_similarity` (38-55, cosine), `safe_normalize`
(`src/utils/utils.py` 111-128), and `CLIPLoss` (145-301: `step()`'s warmup at 201-205, called
before each forward by `src/trainers/alignment_trainer.py` line 1250; `forward`'s two modalities at
253-298); the settings of `configs/default.yaml` and `configs/losses_lin/clip_structure_{1,2,3,5}.yaml`
(temperature 0.05, lambda 10, warmup 1000 steps, levels 1 / 2 / 3 / 5 with weighting "none" at 1
and "inverse" above, margin 0, mean centring, cosine). For one modality, with X the frozen
encoder's features and Z the aligned embeddings of the batch (B rows):

    X~ = centre(normalise(X)),  Z~ = centre(normalise(Z))     (L2 rows; then centring over the batch)
    P = row-softmax(X~ X~^T / tau),  Q = row-softmax(Z~ Z~^T / tau)     (the diagonal included)
    M_l = (P^l + Q^l) / 2                                        (P^l the l-th matrix power)
    js_l = 1/2 [ 1/B sum_ij (M_l+eps) (log(M_l+eps) - log(Q^l+eps))
               + 1/B sum_ij (M_l+eps) (log(M_l+eps) - log(P^l+eps)) ]
    R = 1/L sum_{l=1..L} w_l relu(js_l - margin),   w_l = 1 ("none") or 1/l ("inverse")

centre: "mean" subtracts the batch mean (the code's default, used by every config), "standard" also
divides by the batch's standard deviation (unbiased, torch's `std`; a feature constant over the
batch gives 0/0 there as in the code), "none" leaves the normalised rows. js_l is the code's
`0.5 * (F.kl_div(log(Q+eps), M+eps, "batchmean") + F.kl_div(log(P+eps), M+eps, "batchmean"))`:
PyTorch's kl_div(input, target) is sum target (log target - input), so this is 1/2 [KL(M||Q) +
KL(M||P)] per row, NOT the textbook Jensen-Shannon 1/2 [KL(P||M) + KL(Q||M)] that the code's
comment names; followed as written. The margin applies to the batch's js_l (after the mean over
rows). The frozen side has no gradient; the gradient reaches Z through Q^l and through M_l.
The objective adds lambda(step) * mean over the regularised sides of R, lambda(step) =
`structure_weight` * min(1, step / `structure_warmup`) (the code's `CLIPLoss.step()`, called
before each step's forward: lambda is 0 at the first step), step counting optimizer steps.

Deviations from the code, each small:
  * Normalisation is always applied. The code's `safe_normalize` skips it when every row already
    has norm 1 within 1e-6 (a data-dependent branch, taken for the code's aligned embeddings,
    which `normalize_latents` has normalised); normalising such a row again changes its value by
    < 1e-6, and its gradient not at all when the row is itself a normalisation's output (vljax's
    embeddings are: the projection onto the sphere's tangent is idempotent).
  * tau is its own option (`loss.structure_temperature`, default the configs' 0.05); in the code it
    is the contrastive loss's fixed temperature, vljax's contrastive temperature is learnt.
  * The code regularises both modalities and averages them, `lambda * (R_img + R_txt) / 2`; here
    `loss.structure_sides` chooses image, text or both (mean over the chosen ones), because a side
    is only regularised when its encoder is frozen (`objective.check`). One side alone is
    therefore weighted lambda, not lambda / 2.
  * `structure_warmup = 0` turns the ramp off (full weight from the first step); the code divides
    by zero there.
  * eps = 1e-12 is kept, as are float32 matrices (the code disables autocast); added to float32
    values above ~1e-5 it is below their resolution, as in the code.
Not implemented: the code's ablation options (`center_first`, the RBF and Spearman similarities),
its extra unimodal data (`add_image_features`, `structure_use_only_unimodal`, `fixed_structure`).
The paper's second component, choosing which layer of each frozen encoder to align by
cross-modal representation similarity, is vljax/layer_selection.py's (its CLI writes the choice;
`configs/lit.py:img_block=,txt_layers=` cut the towers there): the frozen side here is whatever
features the objective passes (the towers' `pre_logits`, LiT's stored features).

Sharded (`axis_name`): the batch statistics (the centring mean and deviation, P and Q) are those of
the GLOBAL batch (all-gathered); each device scores its own rows of P^l, Q^l and the per-row sums
are summed over the axis before the margin, so value and gradient equal the single-device call on
the gathered batch. Memory O(B^2) per device, like the all-gather contrastive losses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import sim

CENTERINGS = ("mean", "none", "standard")
WEIGHTINGS = ("none", "inverse")
EPS = 1e-12  # the code's eps of the logs (structure_reg) and of normalisation (safe_normalize)


def _centred(x, centering):
    """[B, W] global batch -> L2-normalised rows, centred over the batch (the code's order,
    `center_first=False`)."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)  # F.normalize
    if centering == "none":
        return x
    x = x - jnp.mean(x, axis=0, keepdims=True)
    if centering == "standard":
        x = x / jnp.std(x, axis=0, ddof=1, keepdims=True)
    return x


def _transition(x, temperature, centering):
    """[B, W] -> [B, B] row-softmax of the centred rows' dot products / temperature (diagonal in)."""
    x = _centred(x, centering)
    return jax.nn.softmax(sim(x, x) / temperature, axis=-1)


def _divergence_rows_sum(p, q):
    """The code's js times the rows it is averaged over: 1/2 sum over these rows of
    KL(m+eps || q+eps) + KL(m+eps || p+eps), m = (p + q) / 2 (torch's kl_div(log(.+eps), m+eps))."""
    m = (p + q) / 2 + EPS
    log_m = jnp.log(m)
    return (jnp.sum(m * (log_m - jnp.log(q + EPS))) + jnp.sum(m * (log_m - jnp.log(p + EPS)))) / 2


def structure_loss(z, frozen, axis_name=None, levels=1, temperature=0.05, weighting="none",
                   margin=0.0, centering="mean"):
    """STRUCTURE's regulariser R of one modality (module docstring) over the GLOBAL batch.

    z: [b, D] aligned embeddings (the trained side); frozen: [b, W] the frozen encoder's features
    of the same records (any width; gradient stopped). levels: L >= 1 scales (matrix powers);
    temperature: tau > 0; weighting: "none" | "inverse" (level l weighted 1/l); margin >= 0,
    subtracted from each level's divergence before relu; centering: "mean" | "none" | "standard".
    Defaults: the code's settings at levels 1 (`configs/default.yaml`).
    """
    levels = int(levels)
    if levels < 1 or not temperature > 0 or not margin >= 0:
        raise ValueError(f"structure_loss: levels must be >= 1, temperature > 0 and margin >= 0, got "
                         f"{levels}, {temperature}, {margin}")
    if weighting not in WEIGHTINGS or centering not in CENTERINGS:
        raise ValueError(f"structure_loss: weighting must be one of {WEIGHTINGS} and centering one of "
                         f"{CENTERINGS}, got {weighting!r}, {centering!r}")
    if z.ndim != 2 or frozen.ndim != 2 or z.shape[0] != frozen.shape[0]:
        raise ValueError(f"structure_loss: z [b, D] and frozen [b, W] must have the same rows, got "
                         f"{z.shape} and {frozen.shape}")
    idx, n = axis_info(axis_name)
    b = z.shape[0]
    p_all = jax.lax.stop_gradient(_transition(gather(jax.lax.stop_gradient(frozen), axis_name),
                                              temperature, centering))  # [B, B]
    q_all = _transition(gather(z, axis_name), temperature, centering)
    rows = lambda m: jax.lax.dynamic_slice_in_dim(m, idx * b, b, axis=0)  # noqa: E731
    p_l, q_l = rows(p_all), rows(q_all)  # this device's rows of P^1, Q^1
    sums = [_divergence_rows_sum(p_l, q_l)]
    for _ in range(levels - 1):
        p_l, q_l = p_l @ p_all, q_l @ q_all  # rows of P^(l+1) = P^l P
        sums.append(_divergence_rows_sum(p_l, q_l))
    js = psum(jnp.stack(sums), axis_name) / (b * n)  # [L], the code's batchmean over the global B
    weights = jnp.ones(levels) if weighting == "none" else 1.0 / jnp.arange(1, levels + 1)
    return jnp.sum(weights * jax.nn.relu(js - margin)) / levels
