"""DreamLIP's sub-captions (Zheng et al., ECCV 2024, arXiv 2403.17007): several positives per image,
sampled from its long caption(s) sentence by sentence, made in the input workers.

Read from the official code (github.com/zyf0619sjtu/DreamLIP, training/data.py `split_caption`,
`draw_numbers`, `CsvDataset.__getitem__`; training/params.py for `--num_text` 6 and `--merged_num` 1):
every long caption of the image (there: six MLLM captions, three short and three long) is split at
newlines, "</s>" and full stops into stripped, non-empty sentences; the texts of one example are the
raw caption followed by `num` sub-captions drawn from the pooled sentences, without replacement when
there are at least `num`, with replacement otherwise; with `merged` > 1 a sub-caption is `merged`
consecutive sentences joined by ". ".

Deviations, named: the code draws start indices from range(len(sentences) - merged) (one short of the
last window, and an error when that range is empty); here every window is drawn, and an example whose
captions give no sentence at all repeats its raw caption. The randomness is the worker's explicit
`np.random.Generator` (grain's `random_map` rng), so the draw is part of the resumable input state.

What the demo can and cannot show (from how vljax/data/demo_*.py write the captions; the pool sizes
were not measured here): an emoji's captions are its name, "emoji of <name>" and its short names,
phrases without a full stop, so its sub-captions are rephrasings of one name; an openclipart record
has its title, its description (up to 300 characters, sometimes several sentences) and "title, tags",
so a few of its sub-captions are partial descriptions. Neither is the 10-sentence MLLM description of
a rich image, each sentence a part of it, from which the paper samples: the demo exercises the
mechanism, it cannot show the paper's gain.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

# The official split: newlines, the tokenizer's end marker and full stops.
_SPLIT = re.compile(r"\n|</s>|[.]")


def split_caption(text: str) -> list[str]:
    """A caption -> its sentences, stripped, empty ones dropped (DreamLIP's `split_caption`)."""
    return [s.strip() for s in _SPLIT.split(text) if s.strip()]


def sentence_windows(captions, merged: int = 1) -> list[str]:
    """Every run of `merged` consecutive sentences of each caption's split, joined by ". " (the code
    pools the sentences of all captions before windowing; a window may cross captions there too)."""
    sentences = [s for c in captions if c for s in split_caption(c)]
    return [". ".join(sentences[i:i + merged]) for i in range(len(sentences) - merged + 1)]


@dataclasses.dataclass(frozen=True)
class SubCaptions:
    """(raw caption, the record's captions, rng) -> [raw, sub_1 .. sub_num]: the 1 + num texts of one
    example, each a positive of its image (vljax.losses.dreamlip takes their embeddings [B, 1 + num, D]).

    num: sub-captions per example (the code's --num_text, default 6); merged: sentences per sub-caption
    (--merged_num, default 1)."""
    num: int = 6
    merged: int = 1

    def __post_init__(self):
        if int(self.num) < 1:
            raise ValueError(f"config key `input.subcaptions.num`: at least 1 sub-caption, got {self.num}")
        if int(self.merged) < 1:
            raise ValueError(f"config key `input.subcaptions.merged`: at least 1 sentence per sub-caption, "
                             f"got {self.merged}")

    def __call__(self, raw: str, captions, rng: np.random.Generator) -> list[str]:
        pool = sentence_windows(captions, self.merged) or [raw]
        replace = len(pool) < self.num
        picks = rng.choice(len(pool), size=self.num, replace=replace)
        return [raw, *(pool[i] for i in picks)]
