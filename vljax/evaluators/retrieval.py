"""Image-text retrieval recall@k with several captions per image (COCO / Flickr30k style,
as in CLIP_benchmark's zeroshot_retrieval and big_vision's image_text retrieval):

  image -> text: an image is a hit at k if ANY of its captions is among its k best texts;
  text -> image: a caption is a hit at k if ITS image is among its k best images.

Ties rank the lower index first (deterministic; see `base.ranks_of`).
"""
from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10), batch_size: int = 1024) -> dict[str, float]:
    """Retrieval recalls for similarities zimg @ ztxt.T, scored a block of rows at a time
    (the full [N_img, N_txt] matrix of COCO's 5k x 25k would take 500 MB).

    Args:
      zimg: [N_img, D], ztxt: [N_txt, D] embeddings (a given similarity matrix S [N_img, N_txt]
        is zimg=S, ztxt=identity).
      text_to_image: [N_txt] index of each caption's image; every image needs >= 1 caption.
    Returns:
      {"i2t_r{k}": ..., "t2i_r{k}": ...} for each k.
    """
    n_img, n_txt = len(zimg), len(ztxt)
    if np.bincount(text_to_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")
    # i2t: the rank of an image's best-ranked caption. Its best caption is the positive with
    # the highest score (lowest index on ties), which every other positive ranks behind.
    i2t_rank = np.empty(n_img, np.int64)
    for s in base.batch_slices(n_img, batch_size):
        block = zimg[s] @ ztxt.T
        positive = text_to_image[None, :] == np.arange(s.start, s.stop)[:, None]
        best = np.argmax(np.where(positive, block, -np.inf), axis=1)
        i2t_rank[s] = base.ranks_of(block, best)
    t2i_rank = np.empty(n_txt, np.int64)
    for s in base.batch_slices(n_txt, batch_size):
        t2i_rank[s] = base.ranks_of(ztxt[s] @ zimg.T, text_to_image[s])
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out


class RetrievalEvaluator(base.Evaluator):
    """Metrics "retrieval/<name>/i2t_r1", ".../t2i_r1", ... for each k of `ks`."""

    def __init__(self, images: np.ndarray, captions: Sequence[Sequence[str]], *, name: str,
                 ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                 text_batch_size: int = 256):
        """
        Args:
          images: [N, H, W, 3] float32, preprocessed.
          captions: N lists of captions, captions[i] describing images[i] (a str is one caption).
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        captions = [[c] if isinstance(c, str) else list(c) for c in captions]
        self.images = images
        self.texts = [c for cs in captions for c in cs]
        self.text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        self.name, self.ks = name, tuple(ks)
        self.batch_size, self.text_batch_size = batch_size, text_batch_size

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg = base.l2_normalize(base.embed_images(embedder, self.images, self.batch_size))
        ztxt = base.l2_normalize(base.embed_texts(embedder, self.texts, self.text_batch_size))
        metrics = recall_at_k(zimg, ztxt, self.text_to_image, self.ks)
        return {f"retrieval/{self.name}/{k}": v for k, v in metrics.items()}
