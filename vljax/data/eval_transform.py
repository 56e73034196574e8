"""The evaluation image transform of a model: one image -> the image tower's input, as its spec says.

`EvalImage` (frozen, hashable, picklable: it runs in grain workers) is the one object that
carries a model's eval preprocessing (vljax/factory.py's spec keys "image_size", "value_range",
"resize", "resample", "naflex"):
  fixed resolution: float32 [S, S, 3]; resize="crop": shorter side to S, centre crop (vljax's
    own models); resize="squash": the whole image to S x S with `resample` (transformers'
    SiglipImageProcessor: bicubic; big_vision's `resize(S)`: bilinear); then `value_range`;
  NaFlex (SigLIP 2): {"patches": f32 [N, P*P*3], "mask": bool [N], "shapes": int32 [2]}, N the
    patch budget (`vljax.data.naflex.naflex_image`: aspect-preserving resize, value range
    [-1, 1], transformers' Siglip2ImageProcessor). A batch stacks each key: one static shape per
    budget, any mix of aspect ratios.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from vljax.data import naflex as naflex_lib
from vljax.data import transforms as T

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
RESIZE = ("crop", "squash")
NAFLEX_VALUE_RANGE = (-1.0, 1.0)


def canonical_value_range(v):
    """A value range as configs and model specs give it -> the one form preprocessing uses: a
    name ("efficientnet", "clip", ...) as is, (lo, hi) as a tuple of floats (ConfigDict and JSON
    turn tuples into lists; `Preprocess` is frozen, hence hashable, so back to a tuple)."""
    return v if isinstance(v, str) else tuple(float(x) for x in v)


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


def _grey(pil):
    return pil.convert("L").convert("RGB")


@dataclasses.dataclass(frozen=True)
class EvalImage:
    """A model's eval transform (module docstring). naflex: (patch_size, max_num_patches)."""
    image_size: int | None = None
    value_range: object = "efficientnet"
    resize: str = "crop"
    resample: str = "bilinear"
    naflex: tuple | None = None

    def __post_init__(self):
        object.__setattr__(self, "value_range", canonical_value_range(self.value_range))
        if self.naflex is not None:
            p, n = (int(v) for v in self.naflex)
            object.__setattr__(self, "naflex", (p, n))
            if n < 1 or p < 1:
                raise ValueError(f"naflex patch_size={p}, max_num_patches={n}: both must be >= 1")
            if self.value_range != NAFLEX_VALUE_RANGE:
                raise ValueError(f"value_range={self.value_range}: NaFlex preprocessing gives "
                                 f"{list(NAFLEX_VALUE_RANGE)} only")
            return
        if self.image_size is None or int(self.image_size) < 1:
            raise ValueError(f"image_size={self.image_size}: a fixed-resolution model needs one")
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.resize not in RESIZE:
            raise ValueError(f"resize={self.resize!r}: expected one of {RESIZE}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample={self.resample!r}: expected one of {sorted(RESAMPLE)}")

    @classmethod
    def from_spec(cls, spec: dict) -> "EvalImage":
        """The transform of a model spec (vljax/factory.py)."""
        if "naflex" in spec:
            nf = spec["naflex"]
            return cls(value_range=spec.get("value_range", list(NAFLEX_VALUE_RANGE)),
                       naflex=(nf["patch_size"], nf["max_num_patches"]))
        return cls(image_size=spec["image_size"], value_range=spec.get("value_range", "efficientnet"),
                   resize=spec.get("resize", "crop"), resample=spec.get("resample", "bilinear"))

    def __call__(self, image, name=None, greyscale: bool = False):
        """One image (path, bytes, PIL image or uint8 array; any mode and size) -> the tower's
        input for it (float32 [S, S, 3] or the NaFlex dict). Unreadable: `read_rgb`'s error.
        greyscale: the resized image made grey (3 equal channels) before normalising, as the
        training augmentation does after its crop (the grey view of stored LiT features)."""
        pil = read_rgb(image, name)
        if self.naflex is not None:
            return naflex_lib.naflex_image(np.asarray(_grey(pil) if greyscale else pil), *self.naflex)
        if self.resize == "crop":
            pil = T.resize_small_center_crop(pil, self.image_size)
        elif pil.size != (self.image_size, self.image_size):
            pil = pil.resize((self.image_size, self.image_size), RESAMPLE[self.resample])
        return T.normalize(_grey(pil) if greyscale else pil, self.value_range)

    def zeros(self, n: int):
        """n blank rows of a batch (float32 zeros [n, S, S, 3]; NaFlex: one zero patch of a 1 x 1
        grid each, so a row that holds no image still runs without NaN)."""
        if self.naflex is None:
            return np.zeros((n, self.image_size, self.image_size, 3), np.float32)
        p, budget = self.naflex
        mask = np.zeros((n, budget), bool)
        mask[:, 0] = True
        return {"patches": np.zeros((n, budget, p * p * 3), np.float32), "mask": mask,
                "shapes": np.ones((n, 2), np.int32)}

    def stack(self, examples):
        """Per-image inputs -> a batch (np.stack, or `vljax.data.naflex.stack` per key)."""
        return naflex_lib.stack(examples) if self.naflex is not None else np.stack(examples)

    def check_batch(self, images) -> None:
        """Refuses a ready batch that is not this model's input, naming the value: a NaFlex dict
        over the patch budget (or an array for a NaFlex model, and the reverse)."""
        if self.naflex is None:
            if isinstance(images, dict):
                raise ValueError(f"a NaFlex input dict {sorted(images)} for a fixed-resolution "
                                 f"model (image_size {self.image_size})")
            return
        if not isinstance(images, dict) or set(images) != {"patches", "mask", "shapes"}:
            raise ValueError("a NaFlex model takes {'patches', 'mask', 'shapes'} batches, got "
                             f"{type(images).__name__}")
        n = np.shape(images["patches"])[1]
        if n > self.naflex[1]:
            raise ValueError(f"a NaFlex input of {n} patches is over the model's patch budget "
                             f"max_num_patches={self.naflex[1]}")


def eval_image(image, image_size: int, value_range, name=None, *, resize: str = "crop",
               resample: str = "bilinear") -> np.ndarray:
    """One image (path, encoded bytes, PIL image or uint8 array; any mode, any size) -> float32
    [S, S, 3] (`EvalImage` with these fields). Raises `transforms.UnreadableImage` with one line
    naming the image and why: "photo.png: cannot read image (file not found)"."""
    return EvalImage(image_size, value_range, resize, resample)(image, name)


def naflex_eval_image(image, patch_size: int, max_num_patches: int, name=None) -> dict:
    """One image (as `eval_image` takes it) -> the NaFlex dict {"patches": f32 [N, P*P*3],
    "mask": bool [N], "shapes": int32 [2]}, N = max_num_patches (`EvalImage` with naflex)."""
    return EvalImage(value_range=NAFLEX_VALUE_RANGE, naflex=(patch_size, max_num_patches))(image, name)
