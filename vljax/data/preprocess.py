"""Record -> example preprocessing and a batcher that skips bad examples and counts them.

A record that cannot be used (missing file, undecodable image, no non-empty caption, unreadable
source entry) becomes `{"skip": reason}` instead of raising. `SkipCountingBatch` leaves those out of
the batches and attaches to each batch how many were left out since the previous batch, per reason
(`batch["_skipped"]`, int64 [len(SKIP_REASONS)]). The counts travel inside the batches, so they
survive grain's worker processes and need no shared state.
"""
import dataclasses

import grain
import numpy as np

from vljax.data import transforms as T
from vljax.data.locca import Locca, center_crop_rect, follow_crop
from vljax.data.subcaptions import SubCaptions
from vljax.data.text_aug import TextAug
# canonical_value_range / eval_image: imported from here since they began (now in eval_transform).
from vljax.data.eval_transform import EvalImage, canonical_value_range, eval_image  # noqa: F401

SKIP_REASONS = ("missing_file", "decode_error", "empty_caption", "read_error")
SKIPPED_KEY = "_skipped"


@dataclasses.dataclass(frozen=True)
class MultiCrop:
    """The multi-crop views of self-distillation (DINO, Caron et al. 2021, Sec. 3.1; SILC, Naeem et
    al. 2023: two global views of area (0.4, 1) and eight local views of area (0.05, 0.4); sizes
    and counts from `vljax.teacher.multi_crop`): `global_views` random resized crops of
    `global_size` and `local_views` of `local_size`, each then colour-jittered and greyscaled as the
    main view (DINO's blur and solarisation are not applied). Drawn from the example's rng after
    the main view, so the main view does not depend on whether crops are made; grain's random_map
    seeds that rng by the example's index, so the crops are part of the resumable input state.
    `colour_jitter` / `greyscale` (None: the main view's) set the views' own strengths (SLIP's
    SimCLR views, vljax/slip.py).
    Returns {"sd_global": float32 [Vg, S, S, 3], "sd_local": float32 [Vl, s, s, 3]}."""
    global_size: int
    local_size: int
    global_views: int = 2
    local_views: int = 8
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    colour_jitter: float | None = None
    greyscale: float | None = None

    def __call__(self, img, rng: np.random.Generator, finish) -> dict:
        def views(n, size, scale):
            out = [finish(T.random_resized_crop(img, size, rng, scale=tuple(scale))) for _ in range(n)]
            return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)
        return {"sd_global": views(self.global_views, self.global_size, self.global_scale),
                "sd_local": views(self.local_views, self.local_size, self.local_scale)}


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
    # Eval mode: the model's own eval transform (a SigLIP "squash" resize, a NaFlex patch dict as
    # "image"), in place of the centre crop; None: `image_size` / `value_range` as above.
    eval_transform: EvalImage | None = None
    multi_crop: MultiCrop | None = None  # train mode: also the self-distillation views
    subcaptions: SubCaptions | None = None  # train mode: also DreamLIP's texts, "subcaptions" [1 + num]
    text_aug: TextAug | None = None  # train mode: the caption augmented (input.text_aug), last draw
    # train mode: LocCa's task drawn, the record's regions following the crop (vljax/data/locca.py)
    locca: Locca | None = None

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        ex = self._example(record, rng)
        if "teacher_zimg" in record and "skip" not in ex:  # a teacher's stored embeddings
            ex.update(teacher_fields(record, ex["caption"]))
        if rng is not None and self.subcaptions is not None and "skip" not in ex:  # drawn after the view
            ex["subcaptions"] = self.subcaptions(ex["caption"], record["captions"], rng)
        if rng is not None and self.text_aug is not None and "skip" not in ex:
            ex["caption"] = self.text_aug(ex["caption"], rng)
        if rng is not None and self.locca is not None and "skip" not in ex:  # drawn last
            ex["locca"] = self.locca.draw(ex.pop("_regions", []), rng)
        ex.pop("_regions", None)
        if "prefix_id" in record and "skip" not in ex:  # Prefix Conditioning (vljax/data/prefix.py)
            ex["prefix_id"] = record["prefix_id"]
        return ex

    def _example(self, record: dict, rng: np.random.Generator | None) -> dict:
        if "error" in record:
            return {"skip": record["error"]}
        caption = T.choose_caption(record["captions"], rng)
        if caption is None and self.require_caption:
            return {"skip": "empty_caption"}
        if "features_skip" in record:
            return {"skip": record["features_skip"]}
        if "features" in record:
            return self._stored_features(record, caption, rng)
        img, why = T.decode_or_reason(record["image"])
        if why:
            return {"skip": why}
        decoded = img  # the multi-crop views are cut from the whole image
        if rng is None and self.eval_transform is not None:
            return {"image": self.eval_transform(img, greyscale=self.force_greyscale), "caption": caption or "",
                    **_labels(record)}
        regions = None
        if rng is not None and self.locca is not None:  # the same draws as below, the crop known
            img, regions = self._crop_regions(img, record.get("regions") or [], rng)
        elif rng is not None and self.crop_scale is not None:
            img = T.random_resized_crop(img, self.image_size, rng, scale=tuple(self.crop_scale))
        else:
            img = T.resize_small_center_crop(img, self.image_size)
        if rng is not None:
            img = T.colour_jitter(img, rng, self.colour_jitter)
            img = T.random_greyscale(img, rng, self.greyscale)
        if self.force_greyscale:
            img = img.convert("L").convert("RGB")
        ex = {"image": T.normalize(img, self.value_range), "caption": caption or "", **_labels(record)}
        if regions is not None:
            ex["_regions"] = regions
        if rng is not None and self.multi_crop is not None:
            mc = self.multi_crop
            jitter = self.colour_jitter if mc.colour_jitter is None else mc.colour_jitter
            grey = self.greyscale if mc.greyscale is None else mc.greyscale
            ex.update(mc(decoded, rng, lambda v: T.normalize(
                T.random_greyscale(T.colour_jitter(v, rng, jitter), rng, grey), self.value_range)))
        return ex

    def _crop_regions(self, img, regions, rng):
        """The train crop (`T.random_resized_crop`'s draws and result, or the centre crop) and the
        regions' boxes in its coordinates (vljax/data/locca.py `follow_crop`)."""
        w, h = img.size
        box = None
        if self.crop_scale is not None:
            box = T.random_crop_box(w, h, rng, scale=tuple(self.crop_scale))
        if box is None:
            rect, img = center_crop_rect(w, h, self.image_size), T.resize_small_center_crop(img, self.image_size)
        else:
            rect, img = box, img.resize((self.image_size,) * 2, T.Image.Resampling.BICUBIC, box=box)
        return img, follow_crop(regions, rect, w, h)

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


def usable_captions(captions) -> list[str]:
    """The captions `T.choose_caption` draws from, in order: the non-empty ones, stripped."""
    return [c.strip() for c in captions if c and c.strip()]


def teacher_fields(record: dict, caption: str) -> dict:
    """A teacher's stored embeddings of the record (vljax/teacher_features.py): its image's, and of
    its captions the row of `caption` (one row per `usable_captions`, in order)."""
    row = usable_captions(record["captions"]).index(caption)
    return {"teacher_zimg": record["teacher_zimg"], "teacher_ztxt": record["teacher_ztxt"][row],
            "teacher_t": record["teacher_t"]}


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
    {"image" | "image_features", "image_tokens"?, "text", "prefix_id"?, "label"?, "labels"?, "caption"?,
    "_skipped"};
    "labels" (with num_labels = K) is the label sets multi-hot, bool [B, K]."""
    tokenizer: object  # tok(list[str]) -> int32 [N, L]
    with_label: bool = False
    keep_captions: bool = False
    num_labels: int | None = None
    locca: Locca | None = None  # builds the examples' LocCa rows ("dec_tokens", "dec_target", "dec_task")

    def __call__(self, examples, skipped: np.ndarray) -> dict:
        captions = [ex["caption"] for ex in examples]
        key = "image_features" if "image_features" in examples[0] else "image"
        batch = {key: np.stack([ex[key] for ex in examples]),
                 "text": np.asarray(self.tokenizer(captions), np.int32)}
        if "image_tokens" in examples[0]:
            batch["image_tokens"] = np.stack([ex["image_tokens"] for ex in examples])
        if "locca" in examples[0]:  # LocCa's decoder rows (vljax/data/locca.py)
            batch.update(self.locca.collate(examples, batch["text"], self.tokenizer))
        if "subcaptions" in examples[0]:  # [B, 1 + num, L]
            texts = [t for ex in examples for t in ex["subcaptions"]]
            tokens = np.asarray(self.tokenizer(texts), np.int32)
            batch["subcaptions"] = tokens.reshape(len(examples), -1, tokens.shape[-1])
        # MultiCrop's views; a teacher's stored embeddings (vljax/teacher_features.py); CatLIP's
        # caption labels (vljax/caption_labels.py)
        for k in ("sd_global", "sd_local", "teacher_zimg", "teacher_ztxt", "teacher_t", "caption_labels"):
            if k in examples[0]:
                batch[k] = np.stack([ex[k] for ex in examples])
        if "prefix_id" in examples[0]:  # Prefix Conditioning: each text's prefix row, int32 [B]
            batch["prefix_id"] = np.asarray([ex["prefix_id"] for ex in examples], np.int32)
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
