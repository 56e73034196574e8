"""Image-text retrieval recall@k with several captions per image (COCO / Flickr30k style,
as in CLIP_benchmark's zeroshot_retrieval and big_vision's image_text retrieval):

  image -> text: an image is a hit at k if ANY of its captions is among its k best texts;
  text -> image: a caption is a hit at k if ITS image is among its k best images.

Ties rank the lower index first (deterministic; see `base.ranks_of`).
"""
import re
from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base
from vljax.evaluators import data as data_lib


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
    DATA_KEYS = ("name", "split", "data_dir", "max_examples", "exclude")  # the keys of `evals.<name>.data` (checked by config_check too)

    def __init__(self, data, captions: Sequence[Sequence[str]], *, name: str,
                 ks: Sequence[int] = (1, 5, 10)):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py).
          captions: N lists of captions, captions[i] describing record i of `data` (a str is one
            caption); every record needs at least one.
        """
        if len(data) != len(captions):
            raise ValueError(f"{name}: {len(data)} records but {len(captions)} caption lists")
        self.data = data
        self.captions = [[c] if isinstance(c, str) else list(c) for c in captions]
        if not all(self.captions):
            raise ValueError(f"{name}: every image needs at least one caption")
        self.name, self.ks = name, tuple(ks)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="retrieval", data=dict(name=..., split=...,
        exclude=..., max_examples=...), ks=...).

        `exclude`: a regex; records with a caption that matches it are left out (e.g. "skin tone"
        keeps one image per emoji instead of near-duplicates that differ only in skin tone).
        `max_examples` then keeps the first records, and of those, the ones without a non-empty
        caption are left out (text cannot retrieve them).
        """
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        source = data_lib.open_source(data["name"], data.get("split", "test"), data.get("data_dir"))
        pattern = re.compile(data["exclude"]) if data.get("exclude") else None
        candidates = []  # (record, its captions) after `exclude`, then the first max_examples
        for i in range(len(source)):
            caps = data_lib.field(source, i, source.caption_key)
            caps = [data_lib.text(c) for c in ([caps] if isinstance(caps, (bytes, str)) else caps)]
            if pattern is None or not any(pattern.search(c) for c in caps):
                candidates.append((i, [c.strip() for c in caps if c.strip()]))
        candidates = [(i, caps) for i, caps in candidates[:data.get("max_examples")] if caps]
        kept, captions = [i for i, _ in candidates], [caps for _, caps in candidates]
        return cls(data_lib.Subset(source, kept), captions, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        captions = [self.captions[i] for i in index]  # of the readable images
        texts = [c for cs in captions for c in cs]
        text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        ztxt = base.text_embeddings(embedder, texts)
        metrics = recall_at_k(zimg, ztxt, text_to_image, self.ks)
        return {f"retrieval/{self.name}/{k}": v for k, v in metrics.items()}
