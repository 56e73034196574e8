"""LocCa's location-aware decoder targets (Wan et al. 2024, "LocCa: Visual Pretraining with
Location-aware Captioners", arXiv 2403.19596), as SigLIP 2 trains its decoder (Tschannen et al.
2025, Sec. 2.2: LocCa's tasks "when boxes are in the data").

LocCa trains one captioner (image encoder + cross-attending decoder) on three tasks through the
same text interface. What we could read of the paper here (search excerpts of arXiv 2403.19596
v1/v2: the abstract and Fig. 1's caption, and a NeurIPS 2024 review's summary; the method section
itself was not reachable, so the details below are our reading and named as choices):
  * Cap: the image's caption;
  * ARef (automatic referring expression): bounding-box prediction from a region's caption;
  * GCap (grounded captioning): the region's caption from its box (the review summarises GCap as
    "joint box and caption prediction": LocCa may count the box tokens in GCap's loss too; here
    the box is GCap's prompt only, as the issue words the task).
A record may carry `regions`: a list of (box [ymin, xmin, ymax, xmax] in [0, 1] of the image,
region caption). Per example, in the input workers, with the example's rng (grain's random_map
seeds it by the example's index, as every per-example draw of vljax/data/preprocess.py):
  1. the boxes follow the image's crop and resize (`Preprocess._crop_regions`: the random resized
     crop's own draw, or `center_crop_rect`; then `follow_crop`): a box is clipped to the crop
     (its visible part) and dropped when nothing of it is left (our choice; random crops are
     allowed, not refused);
  2. a task is drawn with probabilities `tasks` = (Cap, ARef, GCap) (default equal thirds: our
     reading of LocCa's mix) -- Cap when no region survives -- and, for ARef / GCap, one region
     uniformly;
  3. the decoder's sequence (`Locca.sequence`), L tokens, pad_id behind:
        Cap:  c                          loss on c   (exactly the caption decoder's row today)
        ARef: <aref> c_r <y0><x0><y1><x1>   loss on the 4 box tokens
        GCap: <gcap> <y0><x0><y1><x1> c_r   loss on c_r
     where c / c_r are the tokenizer's ids of the caption / region caption (its own start and end
     tokens included, padding removed). The prompt part is a target of nothing: the model reads
     it by teacher forcing and the loss mask (`dec_target`) leaves it out.
Box tokens: PaliGemma's location tokens (Beyer et al. 2024, arXiv 2407.07726; as public PaliGemma
tooling describes them -- big_vision's own `proj/paligemma` files were not read here: 1024
`<loc0000>`..`<loc1023>` bins, order ymin, xmin, ymax, xmax): `bins` extra ids after the text
vocabulary, coordinate v -> bin floor(v * bins) (clipped to bins - 1), decoded to the bin's centre, so a
round trip is off by at most half a bin. The two task tokens follow the bins. The decoder's
vocabulary is thus `vocab_offset + bins + 2` (configs/siglip2.py sets it).

Deviations (named): box coordinates are extra vocabulary tokens (PaliGemma's way), not digits
written as text; Cap has no task token (its row is the plain caption, so the decoder's caption
evaluators -- caption_nll, CapPa scoring -- read it as before), ARef / GCap one token each; one
region per example and one task per example (LocCa may pack several regions into a sequence);
ARef / GCap rows are always read autoregressively (parallel prediction would hide the prompt),
Cap rows keep CapPa's parallel fraction. Batch fields: "dec_tokens" int32 [B, L], "dec_target"
bool [B, L] (the loss's positions), "dec_task" int32 [B] (0 Cap, 1 ARef, 2 GCap).
Regions come from jsonl records only (`"regions"`); the demo's emoji / openclipart sets have none
(a whole-object region from their alpha channel is not built).
"""
from __future__ import annotations

import dataclasses

import numpy as np

CAP, AREF, GCAP = 0, 1, 2
TASKS = ("cap", "aref", "gcap")


def quantise(box, bins: int) -> np.ndarray:
    """box [ymin, xmin, ymax, xmax] in [0, 1] -> int [4] bins in [0, bins)."""
    return np.clip(np.floor(np.asarray(box, np.float64) * bins), 0, bins - 1).astype(np.int32)


def dequantise(ids, bins: int) -> np.ndarray:
    """int bins -> their centres in [0, 1] (|dequantise(quantise(v)) - v| <= 0.5 / bins)."""
    return (np.asarray(ids, np.float64) + 0.5) / bins


def center_crop_rect(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) in the original pixels that `transforms.
    resize_small_center_crop(img, size)` keeps (the same rounding)."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    left, top = (nw - size) // 2, (nh - size) // 2
    return left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh


def follow_crop(regions, rect, w: int, h: int) -> list:
    """regions [(box [ymin, xmin, ymax, xmax] in [0, 1] of a w x h image, caption)] -> the same in
    [0, 1] of the crop `rect` (left, top, right, bottom pixels), clipped to it; a box with no area
    left in the crop is dropped. A resize of the crop to any size keeps these coordinates."""
    left, top, right, bottom = rect
    out = []
    for box, caption in regions:
        y0, x0, y1, x1 = (float(v) for v in box)
        ny = np.clip((np.array([y0, y1]) * h - top) / (bottom - top), 0.0, 1.0)
        nx = np.clip((np.array([x0, x1]) * w - left) / (right - left), 0.0, 1.0)
        if ny[1] > ny[0] and nx[1] > nx[0]:
            out.append(((float(ny[0]), float(nx[0]), float(ny[1]), float(nx[1])), caption))
    return out


@dataclasses.dataclass(frozen=True)
class Locca:
    """config.input.locca: vocab_offset (the text vocabulary's size: the first box id), bins
    (PaliGemma: 1024), tasks (probabilities of Cap, ARef, GCap for an example with a region),
    pad_id (the tokenizer's)."""
    vocab_offset: int
    bins: int = 1024
    tasks: tuple = (1 / 3, 1 / 3, 1 / 3)
    pad_id: int = 0

    def __post_init__(self):
        if self.bins < 2 or self.vocab_offset < 1:
            raise ValueError(f"config key `input.locca`: bins >= 2 and vocab_offset >= 1, got "
                             f"bins={self.bins}, vocab_offset={self.vocab_offset}")
        p = np.asarray(self.tasks, np.float64)
        if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"config key `input.locca.tasks`: three non-negative probabilities "
                             f"(Cap, ARef, GCap) with a positive sum, got {self.tasks}")

    @property
    def vocab_size(self) -> int:
        """The decoder's vocabulary: text ids, box bins, <aref>, <gcap>."""
        return self.vocab_offset + self.bins + 2

    def task_id(self, task: int) -> int:
        return self.vocab_offset + self.bins + task - 1  # AREF -> first, GCAP -> second

    def box_ids(self, box) -> np.ndarray:
        return quantise(box, self.bins) + self.vocab_offset

    def draw(self, regions, rng: np.random.Generator) -> dict:
        """(regions of the crop, rng) -> {"task", "box" int [4] (token ids), "region" caption}."""
        if not regions:
            return {"task": CAP, "box": np.zeros(4, np.int32), "region": ""}
        p = np.asarray(self.tasks, np.float64)
        task = int(rng.choice(3, p=p / p.sum()))
        box, caption = regions[int(rng.integers(len(regions)))]
        return {"task": task, "box": self.box_ids(box), "region": caption}

    def sequence(self, task: int, caption, region, box, length: int):
        """caption / region: int token ids without padding; box: int [4] ids -> (tokens int32
        [length], target bool [length]) as in the module docstring (truncated to length: the
        caption part is cut, the 4 box tokens kept)."""
        caption, region, box = (np.asarray(a, np.int32) for a in (caption, region, box))
        if task == CAP:
            prompt, target = np.zeros(0, np.int32), caption
        elif task == AREF:
            prompt = np.concatenate([[self.task_id(AREF)], region[:max(0, length - 5)]])
            target = box
        else:
            prompt, target = np.concatenate([[self.task_id(GCAP)], box]), region
        seq = np.concatenate([prompt, target]).astype(np.int32)[:length]
        tokens = np.full(length, self.pad_id, np.int32)
        tokens[:len(seq)] = seq
        mark = np.zeros(length, bool)
        mark[len(prompt):len(seq)] = True
        return tokens, mark & (tokens != self.pad_id)

    def collate(self, examples, text, tokenizer) -> dict:
        """examples' "locca" draws, their captions' tokens `text` int [B, L] -> the batch fields."""
        draws = [ex["locca"] for ex in examples]
        regions = np.asarray(tokenizer([d["region"] for d in draws]), np.int32)
        rows = [self.sequence(d["task"], t[t != self.pad_id], r[r != self.pad_id], d["box"],
                              text.shape[1]) for d, t, r in zip(draws, text, regions)]
        return {"dec_tokens": np.stack([r[0] for r in rows]),
                "dec_target": np.stack([r[1] for r in rows]),
                "dec_task": np.asarray([d["task"] for d in draws], np.int32)}
