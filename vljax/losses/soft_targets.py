"""Contrastive losses with soft targets: several positives per row (UniCL / supervised
contrastive, `multi_positive_contrastive`) and continuous weights from a frozen modality (CWCL)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from vljax.losses.collectives import axis_info, gather, psum
from vljax.losses.common import check_pair, is_positive, sim, soft_ce_sum


def cwcl_loss(zimg, ztxt, t, img_features, txt_features, axis_name=None, ref_modality="image",
              symmetric=False):
    """Continuously Weighted Contrastive Loss (Srinivasa et al., NeurIPS 2023, Sec. 3, Eq. 2-3).

    Cross-modal transfer from a frozen pre-trained modality U to a modality V being trained.
    With p_i the U-side and q_i the V-side embeddings of pair i (ref_modality="image": p = zimg,
    q = ztxt; "text": p = ztxt, q = zimg) and u_i the frozen U model's own features of the same
    input, L2-normalised:

        L_{U->V} = -1/B sum_i 1/(sum_j w_ij) sum_j w_ij log [exp(t <p_i, q_j>) / sum_k exp(t <p_i, q_k>)]
        w_ij     = (1 + <u_i, u_j>) / 2  in [0, 1]                           (intra-modal weights)

    i.e. every candidate q_j is a positive of anchor p_i to the degree u_i and u_j are similar in
    the frozen modality; with w = identity it is the one-directional CLIP loss. The weights come
    from the frozen modality's features (the locked trunk's pre_logits, or the stored LiT
    features), never from a trained head, and carry no gradient. symmetric=True averages in
    L_{V->U} (anchors q_i, softmax over p_j; the same weights, w being symmetric).

    Limitation, measured: the weights are near-uniform when the frozen features are all
    non-negative (a CNN's pooled post-ReLU features, e.g. EfficientNet-Lite's pre_logits: cosines
    0.09-1, mean 0.37, so every w_ij >= 0.5). At batch 128 the targets' entropy is then 4.848 against
    ln 128 = 4.852, the loss is minimised by nearly equal logits, and the LiT demo trained with CWCL
    stays at loss 4.851 with held-out retrieval at chance (experiments/README.md, loss ablation).
    The paper's frozen towers are transformers whose embeddings spread over the sphere.

    Args:
      zimg, ztxt: [b, D] embeddings; t: scalar logit scale.
      img_features: [b, F] the image trunk's features; txt_features: [b, F'] the text tower's;
        only those of `ref_modality` are used.
      axis_name: mesh axis or None.
      ref_modality: "image" or "text", the frozen modality U whose structure is transferred.
      symmetric: add the V->U direction.
    """
    check_pair(zimg, ztxt, t)
    if ref_modality not in ("image", "text"):
        raise ValueError(f"ref_modality must be 'image' or 'text', got {ref_modality!r}")
    u = img_features if ref_modality == "image" else txt_features
    if u.ndim != 2 or u.shape[0] != zimg.shape[0]:
        raise ValueError(f"{ref_modality} features must be [B, F] with B = {zimg.shape[0]}, got {u.shape}")
    _, n = axis_info(axis_name)
    u = lax.stop_gradient(u.astype(jnp.float32))
    u = u / (jnp.linalg.norm(u, axis=-1, keepdims=True) + 1e-8)
    w = (1.0 + sim(u, gather(u, axis_name))) / 2.0  # [b, B], rows = local anchors
    targets = w / jnp.sum(w, axis=-1, keepdims=True)
    p, q = (zimg, ztxt) if ref_modality == "image" else (ztxt, zimg)
    local = soft_ce_sum(t * sim(p, gather(q, axis_name)), targets)
    if symmetric:
        local = (local + soft_ce_sum(t * sim(q, gather(p, axis_name)), targets)) / 2
    return psum(local, axis_name) / (zimg.shape[0] * n)


# ----------------------------------------------------------------------------- multi-positive


# What makes a positive (multi_positive's `positives`) -> the input that gives it (a batch field).
POSITIVE_INPUTS = {"labels": "batch/label", "captions": "batch/text", "label_sets": "batch/labels"}
POSITIVES = tuple(POSITIVE_INPUTS)
WEIGHTINGS = ("uniform", "jaccard")


def check_positives(positives, min_overlap, weighting):
    """Raises ValueError naming the config key (`loss.positives`, ...) of a bad option."""
    if positives not in POSITIVES:
        raise ValueError(f"config key `loss.positives`: {positives!r} is not one of {sorted(POSITIVES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"config key `loss.weighting`: {weighting!r} is not one of {list(WEIGHTINGS)}")
    if not 0.0 < float(min_overlap) <= 1.0:
        raise ValueError(f"config key `loss.min_overlap`: a Jaccard threshold in (0, 1], got {min_overlap}")
    if positives != "label_sets" and (float(min_overlap) != 1.0 or weighting != "uniform"):
        raise ValueError("config keys `loss.min_overlap` / `loss.weighting` apply to positives='label_sets' "
                         f"only, not {positives!r}")


def positives_input(options) -> tuple[str, ...]:
    """The input multi_positive takes for the positives its options (config.loss: `positives`,
    `min_overlap`, `weighting`) choose, e.g. ("batch/label",); checks those options."""
    positives = options.get("positives", "labels")
    check_positives(positives, options.get("min_overlap", 1.0), options.get("weighting", "uniform"))
    return (POSITIVE_INPUTS[positives],)


def positive_weights(labels, all_labels, positives="labels", min_overlap=1.0, weighting="uniform"):
    """w [b, B] float32, w_ij >= 0 the weight of global element j as a positive of local row i
    (the pair itself excluded; see multi_positive_contrastive). Symmetric in (i, j).

      labels:     [b] int class ids; w_ij = [y_i = y_j >= 0].
      captions:   [b, L] token ids; w_ij = [tokens_i = tokens_j] (identical after tokenisation).
      label_sets: [b, K] multi-hot; with J_ij = |Y_i & Y_j| / |Y_i | Y_j| (Jaccard; 0 when both
                  sets are empty), w_ij = [J_ij >= min_overlap] * (1 or J_ij for "jaccard").
    """
    if positives == "labels":
        return ((labels[:, None] == all_labels[None, :]) & (labels[:, None] >= 0)).astype(jnp.float32)
    if positives == "captions":
        return jnp.all(labels[:, None, :] == all_labels[None, :, :], axis=-1).astype(jnp.float32)
    y, ys = labels.astype(jnp.float32), all_labels.astype(jnp.float32)
    inter = sim(y, ys)  # [b, B] |Y_i & Y_j|, exact integers
    union = jnp.sum(y, -1)[:, None] + jnp.sum(ys, -1)[None, :] - inter
    jaccard = inter / jnp.maximum(union, 1.0)
    keep = (inter >= min_overlap * union) & (union > 0)  # exact at min_overlap = 1: equal sets
    return jnp.where(keep, jaccard if weighting == "jaccard" else 1.0, 0.0)


def multi_positive_contrastive(zimg, ztxt, t, labels, axis_name=None, positives="labels",
                               min_overlap=1.0, weighting="uniform"):
    """Contrastive loss with several positives per row, symmetric (soft targets).

    With logits L = t zimg @ ztxt.T over the global batch and target weights q_ij = 1 for j = i,
    q_ij = w_ij otherwise (`positive_weights`), row i's target is p_ij = q_ij / sum_k q_ik and

        L_i2t(i) = -sum_j p_ij log softmax_j(L_ij),  L_t2i(i) = -sum_j p_ij log softmax_j(L_ji),
        loss     = 1/2B sum_i (L_i2t(i) + L_t2i(i)).

    For 0/1 weights this is UniCL (Yang et al., CVPR 2022, "Unified Contrastive Learning in
    Image-Text-Label Space", Eq. 2-4): the image-text form of supervised contrastive learning
    (Khosla et al. 2020, L_out, Eq. 2), each row's target uniform over its positives P(i).
    w is symmetric, so the t2i targets are the same rows. Without extra positives it is exactly
    softmax_contrastive. Unlabeled records (label -1, an empty label set) are positives of
    themselves only, never of each other.

    positives (config `loss.positives`) says what `labels` holds and what makes a positive:
      "labels":     [b] int class ids (-1 = none): a shared class label (UniCL's image-label data).
      "captions":   [b, L] the batch's token ids: identical captions after tokenisation, UniCL's
                    rule for image-text data (one label per unique text description).
      "label_sets": [b, K] multi-hot label sets (tags). Following Lin et al. 2023 ("An Effective
                    Deployment of Contrastive Learning in Multi-label Text Classification",
                    Findings of ACL): min_overlap=1 with uniform weights is their Strict
                    Contrastive Loss (positives have equal sets; the default), weighting="jaccard"
                    their Jaccard Similarity Probability loss (the target of row i proportional to
                    the Jaccard similarity J_ij of the sets), and a lower min_overlap (a Jaccard
                    threshold in (0, 1]) admits overlapping sets; any J > 0 is "shares a tag".
                    On the demo tags (single words such as "face", "cat"), at B = 256 a labeled
                    record has on average 6.2 (emoji) / 11.6 (openclipart) other positives with
                    equal sets, 14 / 20 at J >= 0.5 and 27 / 32 with any shared tag; the Jaccard
                    weights of the others sum to 14 / 19, i.e. the pair itself keeps about 1/15
                    of its row's target (measured on the train splits, 20 random batches).
    Args:
      zimg, ztxt: [b, D] embeddings; t: scalar logit scale; axis_name: mesh axis or None.
      labels: as `positives` says, this device's rows of the batch (with axis_name).
    """
    check_pair(zimg, ztxt, t)
    check_positives(positives, min_overlap, weighting)
    idx, n = axis_info(axis_name)
    b = zimg.shape[0]
    want = {"labels": 1, "captions": 2, "label_sets": 2}[positives]
    if labels.ndim != want or labels.shape[0] != b:
        raise ValueError(f"labels must be {'[B]' if want == 1 else '[B, K]'} with B = {b} for "
                         f"positives={positives!r}, got {labels.shape}")
    w = positive_weights(labels, gather(labels, axis_name), positives, min_overlap, weighting)
    q = jnp.where(is_positive(b, b * n, idx * b), 1.0, w)
    targets = q / jnp.sum(q, axis=-1, keepdims=True)
    local = (soft_ce_sum(t * sim(zimg, gather(ztxt, axis_name)), targets)
             + soft_ce_sum(t * sim(ztxt, gather(zimg, axis_name)), targets))
    return psum(local, axis_name) / (2 * b * n)



# The losses of this family, by config name, with their inputs (names as vljax.objective.Loss
# gives them); multi_positive also takes the input its `positives` option chooses.
LOSSES = {
    "cwcl": dict(fn=cwcl_loss, inputs=("zimg", "ztxt", "t", "frozen/img_features", "frozen/txt_features")),
    "multi_positive": dict(fn=multi_positive_contrastive, inputs=("zimg", "ztxt", "t"),
                           chosen=positives_input),
}
