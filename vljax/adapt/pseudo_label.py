"""Label-free transductive adaptation: zero-shot pseudo-labels on the unlabelled target images
train a light part of the model (CoOp's context), after "Enhancing CLIP with CLIP: Exploring
Pseudolabeling for Limited-Label Prompt Tuning" (Menghini, Delworth, Bach, NeurIPS 2023;
its transductive zero-shot setting) and NoLA ("No Labels Attached", Imam et al., 2024), both of
which pseudo-label the target set with the zero-shot classifier and keep the most confident
images per class.

  1. zero-shot probabilities p(c | x) = softmax(logit_scale cos(x, w_c)) of every unlabelled
     target image x (w_c the prompt-ensemble class embedding);
  2. class-balanced confidence filter: for every class c, the `per_class` images predicted c
     with the highest p(c | x) (Menghini et al.'s top-K per class), also above `min_confidence`;
  3. CoOp (vljax/adapt/coop.py) trained on those images with their pseudo-labels.

No label of the target set is read: only its images (their embeddings) and the class names.
"""
import numpy as np


def pseudo_labels(zimg: np.ndarray, ztxt: np.ndarray, logit_scale: float, per_class: int,
                  min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(indices [K], pseudo-labels [K]) of the chosen images (see the module docstring).

    Args: zimg [N, D], ztxt [C, D], both L2-normalised.
    """
    logits = logit_scale * (np.asarray(zimg, np.float32) @ np.asarray(ztxt, np.float32).T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    idx, lab = [], []
    for c in range(ztxt.shape[0]):
        mine = np.flatnonzero((pred == c) & (conf >= min_confidence))
        top = mine[np.argsort(-conf[mine], kind="stable")[:per_class]]
        idx.append(top)
        lab.append(np.full(len(top), c))
    return np.concatenate(idx).astype(np.int64), np.concatenate(lab).astype(np.int64)
