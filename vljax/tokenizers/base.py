"""The shared contract of every tokenizer kind: `tok(texts) -> int32 [N, max_len]`.

Attributes: `max_len`, `vocab_size` (ids are < vocab_size), `pad_id`, `eot_id` (the
end-of-text / eos id), `sot_id` (start id, or None for kinds that add none), `padding_side`
("right", or "left" where transformers pads a family on the left). Subclasses
implement `encode(texts) -> list[list[int]]`: special tokens included; a row longer than
`max_len` is cut and its last token set back to `eot_id` (the default rule, CLIP's and
BERT's); kinds with another rule return rows already cut to `max_len`.
"""
import numpy as np


def check_texts(texts) -> list:
    """A lone str is [str]; anything but str in the list is refused, naming its index."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    return texts


class Tokenizer:
    """Packs per-text id lists into a fixed-length int32 array, padded with pad_id."""

    padding_side = "right"
    pad_id: int
    sot_id: int | None
    eot_id: int
    vocab_size: int

    def __init__(self, max_len, min_len=2):
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < min_len:
            raise ValueError(f"max_len must be an int >= {min_len} (room for the special tokens), "
                             f"got {max_len!r}")
        self.max_len = max_len

    def _set_padding_side(self, side):
        if side not in ("right", "left"):
            raise ValueError(f"padding_side={side!r}: expected 'right' or 'left'")
        self.padding_side = side

    def encode(self, texts):
        raise NotImplementedError

    def __call__(self, texts):
        """texts: list[str] (a lone str is treated as [str]) -> int32 [N, max_len]."""
        texts = check_texts(texts)
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        for row, ids in zip(out, self.encode(texts)):
            if len(ids) > self.max_len:
                ids = ids[: self.max_len - 1] + [self.eot_id]
            if self.padding_side == "right":
                row[: len(ids)] = ids
            elif ids:
                row[self.max_len - len(ids):] = ids
        return out
