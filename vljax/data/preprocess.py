"""Record -> example preprocessing and a batcher that skips bad examples and counts them.

A record that cannot be used (missing file, undecodable image, no non-empty caption, unreadable
source entry) becomes `{"skip": reason}` instead of raising. `SkipCountingBatch` leaves those out of
the batches and attaches to each batch how many were left out since the previous batch, per reason
(`batch["_skipped"]`, int64 [len(SKIP_REASONS)]). The counts travel inside the batches, so they
survive grain's worker processes and need no shared state.
"""
import dataclasses
import os

import grain
import numpy as np
from PIL import Image

from vljax.data import transforms as T
from vljax.data.naflex import naflex_image

SKIP_REASONS = ("missing_file", "decode_error", "empty_caption", "read_error")
SKIPPED_KEY = "_skipped"


def canonical_value_range(v):
    """A value range as configs and model specs give it -> the one form preprocessing uses: a
    name ("efficientnet", "clip", ...) as is, (lo, hi) as a tuple of floats (ConfigDict and JSON
    turn tuples into lists; `Preprocess` is frozen, hence hashable, so back to a tuple)."""
    return v if isinstance(v, str) else tuple(float(x) for x in v)


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def read_rgb(image, name=None) -> Image.Image:
    """One image (path, encoded bytes, PIL image or uint8 array; any mode) -> RGB PIL image.
    Raises `transforms.UnreadableImage` with one line naming the image (`name`, else a path as
    given, else "image") and why: "photo.png: cannot read image (file not found)"."""
    try:
        return T.to_rgb(image) if hasattr(image, "convert") else T.decode_image(image)
    except FileNotFoundError:
        raise T.UnreadableImage(f"{image}: cannot read image (file not found)") from None
    except T.UnreadableImage as e:
        name = name or (image if isinstance(image, (str, os.PathLike)) else "image")
        raise T.UnreadableImage(f"{name}: cannot read image ({e})") from None


def eval_image(image, image_size: int, value_range, name=None, *, resize: str = "crop",
               resample: str = "bilinear") -> np.ndarray:
    """One image (path, encoded bytes, PIL image or uint8 array; any mode, any size) -> float32
    [S, S, 3], then `value_range`. resize="crop": shorter side to `image_size`, centre crop (the
    eval transform of `Preprocess`); resize="squash": the whole image to S x S with PIL's
    `resample` filter, no crop (transformers' SiglipImageProcessor: bicubic; big_vision's
    `resize(S)`). Unreadable images: `read_rgb`'s error."""
    pil = read_rgb(image, name)
    if resize == "crop":
        pil = T.resize_small_center_crop(pil, image_size)
    elif resize == "squash":
        if resample not in RESAMPLE:
            raise ValueError(f"resample={resample!r}: expected one of {sorted(RESAMPLE)}")
        if pil.size != (image_size, image_size):
            pil = pil.resize((image_size, image_size), RESAMPLE[resample])
    else:
        raise ValueError(f"resize={resize!r}: expected 'crop' or 'squash'")
    return T.normalize(pil, canonical_value_range(value_range))


def naflex_eval_image(image, patch_size: int, max_num_patches: int, name=None) -> dict:
    """One image (as `eval_image` takes it) -> the NaFlex dict {"patches": f32 [N, P*P*3],
    "mask": bool [N], "shapes": int32 [2]} with N = max_num_patches: aspect-preserving resize to
    the budget, value range [-1, 1] (`vljax.data.naflex.naflex_image`, transformers'
    Siglip2ImageProcessor)."""
    return naflex_image(np.asarray(read_rgb(image, name)), patch_size, max_num_patches)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """record -> {"image": float32 [S, S, 3], "caption": str, "label": int, "labels": list[int]}
    or {"skip": reason}.

    Train mode (called by grain's random_map with an rng): random resized crop with area fraction
    in `crop_scale`, greyscale with probability `greyscale`, colour jitter of `colour_jitter`
    strength, a random caption. No horizontal flip: captions say "left" and "right".
    Eval mode (rng None): resize shorter side + centre crop, the first caption.
    A record with stored trunk features (`sources.WithFeatures`) gives {"image_features": f32 [F],
    "caption", "label", "labels"} instead (and "image_tokens" f16 [N, W] from a store with tokens): no
    image is decoded.
    """
    image_size: int
    value_range: object = "efficientnet"
    crop_scale: tuple | None = None  # None: eval crop even with an rng
    greyscale: float = 0.0
    colour_jitter: float = 0.0
    require_caption: bool = True  # False for image-only evals (classification)
    force_greyscale: bool = False  # every image greyscale (the stored LiT features' grey view)

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        if "error" in record:
            return {"skip": record["error"]}
        caption = T.choose_caption(record["captions"], rng)
        if caption is None and self.require_caption:
            return {"skip": "empty_caption"}
        if "features_skip" in record:
            return {"skip": record["features_skip"]}
        if "features" in record:
            return self._stored_features(record, caption, rng)
        try:
            img = T.decode_image(record["image"])
        except FileNotFoundError:
            return {"skip": "missing_file"}
        except T.DECODE_ERRORS:
            return {"skip": "decode_error"}
        if rng is not None and self.crop_scale is not None:
            img = T.random_resized_crop(img, self.image_size, rng, scale=tuple(self.crop_scale))
        else:
            img = T.resize_small_center_crop(img, self.image_size)
        if rng is not None:
            img = T.colour_jitter(img, rng, self.colour_jitter)
            img = T.random_greyscale(img, rng, self.greyscale)
        if self.force_greyscale:
            img = img.convert("L").convert("RGB")
        return {"image": T.normalize(img, self.value_range), "caption": caption or "", **_labels(record)}

    def _stored_features(self, record: dict, caption, rng) -> dict:
        """A locked trunk's stored views [V, F] (colour, grey; vljax/features.py) in place of the
        image: the grey view is taken on the same random draw as `T.random_greyscale` (crops and
        colour jitter are off when features are stored, so they draw nothing), hence the stored
        path trains on exactly the features the image path computes."""
        feats = record["features"]
        grey = rng is not None and self.greyscale > 0 and rng.uniform() < self.greyscale
        if grey and len(feats) < 2:
            raise ValueError("input.augment.greyscale > 0 but the feature store has no grey view")
        ex = {"image_features": feats[int(grey)], "caption": caption or "", **_labels(record)}
        if "tokens" in record:  # the trunk's tokens, same view (a token-level loss: FILIP)
            ex["image_tokens"] = record["tokens"][int(grey)]
        return ex

    def eval(self, record: dict) -> dict:
        """Deterministic variant for MapDataset.map."""
        return self(record, None)


def _labels(record: dict) -> dict:
    """The record's class label (-1: none) and label set ([]: none), carried to the batch."""
    return {"label": int(record.get("label", -1)), "labels": list(record.get("labels", []))}


def count_skips(examples) -> np.ndarray:
    counts = np.zeros(len(SKIP_REASONS), np.int64)
    for ex in examples:
        counts[SKIP_REASONS.index(ex["skip"])] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class Collate:
    """Stacks valid examples and tokenises their captions:
    {"image" | "image_features", "image_tokens"?, "text", "label"?, "labels"?, "caption"?, "_skipped"};
    "labels" (with num_labels = K) is the label sets multi-hot, bool [B, K]."""
    tokenizer: object  # tok(list[str]) -> int32 [N, L]
    with_label: bool = False
    keep_captions: bool = False
    num_labels: int | None = None

    def __call__(self, examples, skipped: np.ndarray) -> dict:
        captions = [ex["caption"] for ex in examples]
        key = "image_features" if "image_features" in examples[0] else "image"
        batch = {key: np.stack([ex[key] for ex in examples]),
                 "text": np.asarray(self.tokenizer(captions), np.int32)}
        if "image_tokens" in examples[0]:
            batch["image_tokens"] = np.stack([ex["image_tokens"] for ex in examples])
        if self.with_label:
            batch["label"] = np.asarray([ex["label"] for ex in examples], np.int32)
        if self.num_labels is not None:
            hot = np.zeros((len(examples), self.num_labels), bool)
            for row, ex in zip(hot, examples):
                row[ex["labels"]] = True
            batch["labels"] = hot
        if self.keep_captions:
            batch["caption"] = np.asarray(captions, dtype=object)
        batch[SKIPPED_KEY] = skipped
        return batch


class SkipCountingBatch(grain.IterDataset):
    """Batches of exactly `batch_size` valid examples; skipped ones are counted, not batched."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Collate):
        super().__init__(parent)
        self._batch_size, self._collate = batch_size, collate

    def __iter__(self):
        return _SkipCountingBatchIterator(self._parent.__iter__(), self._batch_size, self._collate)

    def __str__(self):
        return f"SkipCountingBatch(batch_size={self._batch_size})"


class _SkipCountingBatchIterator(grain.DatasetIterator):

    def __init__(self, parent, batch_size: int, collate: Collate):
        super().__init__(parent)
        self._batch_size, self._collate = batch_size, collate

    def __next__(self) -> dict:
        valid, bad = [], []
        while len(valid) < self._batch_size:
            ex = next(self._parent)  # StopIteration ends the dataset; the remainder is dropped
            (bad if "skip" in ex else valid).append(ex)
        return self._collate(valid, count_skips(bad))

    # A batch boundary is a parent position: nothing is buffered between batches.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)
