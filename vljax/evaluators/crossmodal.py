"""Cross-modal linear probe (Lin, Yu, Ramanan, Pathak, Ramanan, "Multimodality Helps Unimodality:
Cross-Modal Few-Shot Learning with Multimodal Models", CVPR 2023).

Image and text embeddings share one space, so a class name's text embedding is one more
labelled training sample of that class: the few-shot train set {(phi_img(x_i), y_i)} is
extended with {(phi_txt(t_c), c)} (Sec. 3, "cross-modal adaptation") and one linear classifier
is fitted on the union and applied to test images. Lin et al. fit it by SGD on cross-entropy;
vljax fits the same linear classifier in closed form, as its image-only probe does (ridge
regression, `fewshot.RidgeProbe`, l2 chosen on held-out train images), so the two probes
differ only in the text samples.
"""
import numpy as np

from vljax.evaluators import fewshot


def crossmodal_probe(ximg: np.ndarray, labels: np.ndarray, ztxt: np.ndarray, l2_regs,
                     text_repeats: int = 1, standardize: bool = False) -> fewshot.RidgeProbe:
    """A ridge probe on image samples plus class text samples.

    Args:
      ximg: [N, D] image embeddings, labels: [N].
      ztxt: [C, D] one text embedding per class (row c is a sample of class c), or
        [T, C, D] (T text samples per class, e.g. one per prompt template).
      text_repeats: each text sample counts this many times (its weight in the squared loss).
    """
    ztxt = np.asarray(ztxt, np.float32)
    if ztxt.ndim == 2:
        ztxt = ztxt[None]
    num_classes = ztxt.shape[1]
    xtxt = np.repeat(ztxt.reshape(-1, ztxt.shape[-1]), text_repeats, axis=0)
    ytxt = np.repeat(np.tile(np.arange(num_classes), ztxt.shape[0]), text_repeats)
    x = np.concatenate([np.asarray(ximg, np.float32), xtxt])
    y = np.concatenate([np.asarray(labels, np.int64), ytxt])
    return fewshot.RidgeProbe(x, y, num_classes, l2_regs, standardize)
