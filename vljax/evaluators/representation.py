"""What the joint embedding space looks like, on an image-text eval set: the modality gap (Liang
et al. 2022, "Mind the Gap": the distance between the image and the text embedding centroids),
alignment and uniformity (Wang & Isola 2020, Eq. 4-5). Logged like other metrics:
"representation/<name>/modality_gap", ".../alignment", ".../uniformity_img", ".../uniformity_txt".
"""
import numpy as np

from vljax.evaluators import base, registry
from vljax.evaluators.retrieval import RetrievalEvaluator


def modality_gap(zimg: np.ndarray, ztxt: np.ndarray) -> float:
    """||mean_i zimg_i - mean_j ztxt_j||_2 for L2-normalised zimg [N, D], ztxt [M, D]."""
    return float(np.linalg.norm(zimg.astype(np.float64).mean(0) - ztxt.astype(np.float64).mean(0)))


def alignment(zimg: np.ndarray, ztxt: np.ndarray) -> float:
    """E_i ||zimg_i - ztxt_i||^2 over the rows of paired [N, D] arrays (alpha = 2)."""
    return float(np.mean(np.sum((zimg.astype(np.float64) - ztxt.astype(np.float64)) ** 2, axis=1)))


def uniformity(z: np.ndarray, temp: float = 2.0, batch_size: int = 1024) -> float:
    """log mean_{i != j} exp(-temp ||z_i - z_j||^2) for L2-normalised z [N, D] (N >= 2), a block
    of rows at a time (memory O(batch_size * N))."""
    n = len(z)
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {n}")
    z = z.astype(np.float64)
    total = 0.0
    for s in base.batch_slices(n, batch_size):
        sq = np.maximum(2.0 - 2.0 * z[s] @ z.T, 0.0)
        e = np.exp(-temp * sq)
        e[np.arange(s.stop - s.start), np.arange(s.start, s.stop)] = 0.0  # i == j
        total += e.sum()
    return float(np.log(total / (n * (n - 1))))


@registry.register("representation")
class RepresentationEvaluator(RetrievalEvaluator):
    """Config entry `evals.<name>` = dict(type="representation", data=dict(name=..., split=...,
    exclude=..., max_examples=...)): the same images and captions as a retrieval evaluator;
    alignment pairs every caption with its image."""

    def __init__(self, data, captions, *, name: str):
        super().__init__(data, captions, name=name)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        captions = [self.captions[i] for i in index]
        ztxt = base.text_embeddings(embedder, [c for cs in captions for c in cs])
        text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        out = {"modality_gap": modality_gap(zimg, ztxt), "alignment": alignment(zimg[text_to_image], ztxt),
               "uniformity_img": uniformity(zimg), "uniformity_txt": uniformity(ztxt)}
        return {f"representation/{self.name}/{k}": v for k, v in out.items()}
