"""Image-text retrieval recall@k with several captions per image (COCO / Flickr30k style,
as in CLIP_benchmark's zeroshot_retrieval and big_vision's image_text retrieval):

  image -> text: an image is a hit at k if ANY of its captions is among its k best texts;
  text -> image: a caption is a hit at k if ITS image is among its k best images.

Ties rank the lower index first (deterministic; see `base.ranks_of`).

Similarity (`similarity`, default: the model's, see vljax/evaluators/late_interaction.py):
"global" scores by the cosine of the pooled embeddings; "filip" by FILIP's late interaction
(Yao et al. 2021, Sec. 3.1.1): image -> text ranks texts by the image-to-text similarity
i2t(x, y) = mean over image tokens of the best text token, text -> image ranks images by the
text-to-image similarity t2i(x, y) = mean over text tokens of the best image token, each the
direction the paper's loss (Eqs. 4-5) trains for that query; computed in chunks.
"""
import re
from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base, registry
from vljax.evaluators import data as data_lib
from vljax.evaluators import late_interaction


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
    i2t = ((s, zimg[s] @ ztxt.T) for s in base.batch_slices(len(zimg), batch_size))
    t2i = ((s, ztxt[s] @ zimg.T) for s in base.batch_slices(len(ztxt), batch_size))
    return recall_from_blocks(i2t, t2i, len(zimg), len(ztxt), text_to_image, ks)


def recall_from_blocks(i2t_blocks, t2i_blocks, n_img: int, n_txt: int, text_to_image: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recalls from score blocks: `i2t_blocks` yields (s, [len(s), n_txt]) for slices s
    of the images covering them all, `t2i_blocks` (s, [len(s), n_img]) for slices of the texts."""
    if np.bincount(text_to_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")
    # i2t: the rank of an image's best-ranked caption. Its best caption is the positive with
    # the highest score (lowest index on ties), which every other positive ranks behind.
    i2t_rank = np.empty(n_img, np.int64)
    for s, block in i2t_blocks:
        positive = text_to_image[None, :] == np.arange(s.start, s.stop)[:, None]
        best = np.argmax(np.where(positive, block, -np.inf), axis=1)
        i2t_rank[s] = base.ranks_of(block, best)
    t2i_rank = np.empty(n_txt, np.int64)
    for s, block in t2i_blocks:
        t2i_rank[s] = base.ranks_of(block, text_to_image[s])
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    return out


@registry.register("retrieval")
class RetrievalEvaluator(base.Evaluator):
    """Metrics "retrieval/<name>/i2t_r1", ".../t2i_r1", ... for each k of `ks`."""
    DATA_KEYS = ("name", "split", "data_dir", "max_examples", "exclude", "source")  # the keys of `evals.<name>.data` (checked by config_check too)

    def __init__(self, data, captions: Sequence[Sequence[str]], *, name: str,
                 ks: Sequence[int] = (1, 5, 10), similarity: str | None = None,
                 filip_chunk: Sequence[int] = late_interaction.DEFAULT_CHUNK):
        """
        Args:
          data: the images, a source (vljax/evaluators/data.py).
          captions: N lists of captions, captions[i] describing record i of `data` (a str is one
            caption); every record needs at least one.
          similarity: "global", "filip" (module docstring), or None for the model's.
          filip_chunk: (images, texts) scored per block with "filip".
        """
        self.chunk = late_interaction.check(similarity, filip_chunk)
        self.similarity = similarity
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
        exclude=..., max_examples=...), ks=...); `data` may be a source entry of any kind
        (vljax/evaluators/data.py).

        `exclude`: a regex; records with a caption that matches it are left out (e.g. "skin tone"
        keeps one image per emoji instead of near-duplicates that differ only in skin tone).
        `max_examples` then keeps the first records, and of those, the ones without a non-empty
        caption are left out (text cannot retrieve them).
        """
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        source = data_lib.open_entry(name, data)
        pattern = re.compile(data["exclude"]) if data.get("exclude") else None
        candidates = []  # (record, its captions) after `exclude`, then the first max_examples
        for i in range(len(source)):
            caps = source.captions_of(i)
            if pattern is None or not any(pattern.search(c) for c in caps):
                candidates.append((i, [c.strip() for c in caps if c.strip()]))
        candidates = [(i, caps) for i, caps in candidates[:data.get("max_examples")] if caps]
        kept, captions = [i for i, _ in candidates], [caps for _, caps in candidates]
        return cls(data_lib.Subset(source, kept), captions, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        filip = late_interaction.resolve(self.similarity, embedder) == "filip"
        if filip:
            img, index = late_interaction.image_tokens(embedder, self.data)
        else:
            zimg, index = base.image_embeddings(embedder, self.data)
        captions = [self.captions[i] for i in index]  # of the readable images
        texts = [c for cs in captions for c in cs]
        text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        if filip:
            txt, mask = late_interaction.text_tokens(embedder, texts)
            i2t = late_interaction.blocks(img, txt, mask, "i2t", rows="images", chunk=self.chunk)
            t2i = late_interaction.blocks(img, txt, mask, "t2i", rows="texts", chunk=self.chunk)
            metrics = recall_from_blocks(i2t, t2i, len(img), len(txt), text_to_image, self.ks)
        else:
            metrics = recall_at_k(zimg, base.text_embeddings(embedder, texts), text_to_image, self.ks)
        return {f"retrieval/{self.name}/{k}": v for k, v in metrics.items()}
