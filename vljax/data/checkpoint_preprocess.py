"""Training preprocessing as a loaded checkpoint's processor does it (runs from `config.init_from`).

Two resize rules that `Preprocess` (shorter side + centre crop) does not cover, chosen by the
training config's `input` keys that vljax/init_from.py writes from the checkpoint's spec:

- `input.resize="squash"` (SigLIP, SigLIP 2 fixed resolution: transformers' SiglipImageProcessor,
  big_vision's `resize(S)`): the whole image to S x S with `input.resample`, no crop. With
  `input.augment.random_resized_crop` the random crop (area fraction in the range) is squashed
  instead of the whole image.
- `input.naflex={"patch_size": P, "max_num_patches": N}` (SigLIP 2 NaFlex): the image at its own
  aspect ratio, resized to the largest patch grid within the budget and packed into N patches
  (`vljax.data.naflex.naflex_image`, equal to transformers' Siglip2ImageProcessor). No geometric
  augmentation (a square random crop would discard the aspect ratio NaFlex keeps; SigLIP 2
  pre-trains on the plain resize): `random_resized_crop` is refused, greyscale and colour jitter
  apply as in `Preprocess`. The example's "image" is then the dict {"patches" f32 [N, P*P*3],
  "mask" bool [N], "shapes" int32 [2]}; `NaflexCollate` stacks it into the batch's
  "image" = {"patches" [B, N, P*P*3], "mask" [B, N], "shapes" [B, 2]}: one static shape per
  budget, so the step compiles once whatever the mix of aspect ratios.

Skips (missing file, undecodable image, no caption) are `{"skip": reason}`, as in `Preprocess`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vljax.data import naflex
from vljax.data import transforms as T
from vljax.data.eval_transform import RESAMPLE
from vljax.data.preprocess import Collate, _labels


@dataclasses.dataclass(frozen=True)
class CheckpointPreprocess:
    """record (+ rng: training) -> {"image", "caption", "label", "labels"} or {"skip": reason}."""
    image_size: int
    value_range: object = (-1.0, 1.0)
    resample: str = "bilinear"
    naflex: tuple | None = None  # (patch_size, max_num_patches): NaFlex; None: squash to S x S
    crop_scale: tuple | None = None
    greyscale: float = 0.0
    colour_jitter: float = 0.0

    def __post_init__(self):
        if self.naflex is not None and self.crop_scale:
            raise ValueError(f"config key `input.augment.random_resized_crop`: {self.crop_scale} "
                             "with a NaFlex image tower (images keep their aspect ratio): set it "
                             "to None")
        if self.resample not in RESAMPLE:
            raise ValueError(f"config key `input.resample`: {self.resample!r} is not one of "
                             f"{sorted(RESAMPLE)}")

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        caption, img, why = T.caption_and_image(record, rng)
        if why:
            return {"skip": why}
        if rng is not None and self.crop_scale:
            box = T.random_crop_box(*img.size, rng, scale=tuple(self.crop_scale))
            img = img if box is None else img.crop(box)  # no fitting box: the whole image
        if rng is not None:
            img = T.colour_jitter(img, rng, self.colour_jitter)
            img = T.random_greyscale(img, rng, self.greyscale)
        if self.naflex is not None:
            image = naflex.naflex_image(np.asarray(img.convert("RGB")), *self.naflex)
        else:
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), RESAMPLE[self.resample])
            image = T.normalize(img, self.value_range)
        return {"image": image, "caption": caption, **_labels(record)}


@dataclasses.dataclass(frozen=True)
class NaflexCollate(Collate):
    """`Collate` for NaFlex examples: the per-image patch dicts stacked (`naflex.stack`) into
    the batch's "image" dict; every other key as `Collate` makes it."""

    def __call__(self, examples, skipped: np.ndarray) -> dict:
        images = [ex["image"] for ex in examples]
        batch = super().__call__([dict(ex, image=np.zeros((), np.float32)) for ex in examples],
                                 skipped)
        batch["image"] = naflex.stack(images)
        return batch


def from_config(cfg, crop_scale, greyscale: float, colour_jitter: float,
                value_range) -> CheckpointPreprocess | None:
    """The transform for a `config.input` with `naflex` or `resize="squash"`, else None (the
    ordinary `Preprocess` applies)."""
    naf = cfg.get("naflex")
    if not naf and cfg.get("resize", "crop") != "squash":
        return None
    return CheckpointPreprocess(
        image_size=int(cfg["image_size"]), value_range=value_range,
        resample=str(cfg.get("resample", "bilinear")),
        naflex=(int(naf["patch_size"]), int(naf["max_num_patches"])) if naf else None,
        crop_scale=tuple(crop_scale) if crop_scale else None, greyscale=greyscale,
        colour_jitter=colour_jitter)
