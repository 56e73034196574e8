"""Image and text transforms: decode any PIL mode to RGB, crops, light augmentation, value ranges.

All image functions work on PIL images or uint8 numpy arrays on the host (they run inside grain
worker threads/processes); randomness always comes from an explicit `np.random.Generator` (grain's
`random_map` rng) so that a pipeline is reproducible from its seed.
"""
import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

# Images with more pixels than this are refused before any pixel is decoded (PIL's own default:
# a 30000 x 30000 PNG of a few kB would otherwise expand to 2.7 GB). PIL only warns between this
# and twice this; decode_image refuses them all, so its warning would be noise.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(ValueError):
    """Content that is not a usable image; str(e) is the reason ("empty file", "unknown image
    format", "truncated or corrupt data (...)", "decompression bomb: ...")."""


# What decode_image raises for unreadable content (a missing path raises FileNotFoundError).
DECODE_ERRORS = (UnreadableImage,)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WHITE = (255, 255, 255, 255)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """RGBA (straight alpha) -> RGB over a white background."""
    background = Image.new("RGBA", img.size, _WHITE)
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16 / I / F -> 8-bit L by scaling, not clipping (PIL's convert('L') clips at 255)."""
    x = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        x = x / 257.0  # 65535 -> 255
    elif img.mode == "I":
        x = x / 257.0 if x.max(initial=0) > 255 else x  # 16-bit content stored as I (common for PNG)
    elif img.mode == "F":
        x = x * 255.0 if x.max(initial=0) <= 1.0 else x  # float images are usually in [0, 1]
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit scaled, EXIF orientation applied.

    Handles P (with or without a transparency entry), PA, LA, La, RGBA, RGBa, CMYK, YCbCr, LAB, HSV,
    I;16*, I, F, 1, L and RGB.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette may mark one index (or a per-index alpha table) as transparent.
        return _composite_on_white(img) if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    if mode in ("L", "RGBX") and "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX


def decode_image(data: bytes | str | os.PathLike | np.ndarray) -> Image.Image:
    """Encoded bytes, a file path or a uint8 array ([H, W], [H, W, 1|3|4]) -> RGB PIL image.

    Raises FileNotFoundError for a missing path and UnreadableImage (naming the reason) for
    anything else that cannot be decoded: the bytes are untrusted, and PIL's plugins raise many
    exception types on malformed headers (OSError, SyntaxError, struct.error, IndexError, ...).
    """
    if isinstance(data, np.ndarray):  # already decoded (TFDS Image features)
        if data.dtype != np.uint8 or not (data.ndim == 2 or (data.ndim == 3 and
                                                            data.shape[-1] in (1, 3, 4))):
            raise UnreadableImage(f"image array must be uint8 [H, W(, 1|3|4)], got {data.dtype} {data.shape}")
        return to_rgb(Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data))
    if isinstance(data, (bytes, bytearray, memoryview)):
        src = io.BytesIO(data)
        if not len(data):
            raise UnreadableImage("empty file")
    else:
        src = data
        if isinstance(src, (str, os.PathLike)) and os.path.isfile(src) and os.path.getsize(src) == 0:
            raise UnreadableImage("empty file")
    try:
        with Image.open(src) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{w * h} pixels")
            img.load()  # force full decode here so truncation errors surface now, not later
            return to_rgb(img)
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("unknown image format") from None
    except Image.DecompressionBombError as e:
        n = int(re.search(r"\d+", str(e)).group())  # ours or PIL's message ("Image size (N pixels) ...")
        raise UnreadableImage(f"decompression bomb: {n:,} pixels, more than "
                              f"transforms.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}") from None
    except Exception as e:  # pylint: disable=broad-except  (see the docstring)
        raise UnreadableImage(f"truncated or corrupt data ({type(e).__name__}: {e})") from None



def decode_or_reason(data):
    """`decode_image(data)` -> (image, None), or (None, why) when it cannot be read: "missing_file"
    (a path that does not exist) or "decode_error" (the counts the pipelines keep)."""
    try:
        return decode_image(data), None
    except FileNotFoundError:
        return None, "missing_file"
    except DECODE_ERRORS:
        return None, "decode_error"


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so that the longer side is <= max_side, keeping the aspect ratio."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def resize_small_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Eval transform: resize the shorter side to `size`, then take the central size x size crop."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.8, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of a crop of a w x h image with random area fraction in
    `scale` and aspect ratio in `ratio` (log-uniform); None when 10 draws found none
    (Inception-style: the caller falls back to the central crop)."""
    area = w * h
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    return None


def central_square_box(w: int, h: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central min(w, h) square of a w x h image."""
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Train transform: a crop of random area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform), resized to size x size. Falls back to the central crop (Inception-style)."""
    box = random_crop_box(*img.size, rng, scale, ratio)
    if box is None:
        return resize_small_center_crop(img, size)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def random_greyscale(img: Image.Image, rng: np.random.Generator, p: float) -> Image.Image:
    """With probability p, drop colour (kept as 3 equal channels)."""
    return img.convert("L").convert("RGB") if p > 0 and rng.uniform() < p else img


def colour_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s], random order."""
    if strength <= 0:
        return img
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for i in rng.permutation(len(ops)):
        img = ops[i](img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def normalize(img: Image.Image | np.ndarray, value_range="efficientnet") -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3] in the model's input range.

    value_range: (lo, hi) for a linear map of [0, 255] onto [lo, hi]; "efficientnet" for
    (x - 127) / 128 (also big_vision's value_range(-1, 1) up to 1/255); "clip" / "imagenet" for
    per-channel mean/std after scaling to [0, 1].
    """
    x = np.asarray(img, dtype=np.float32)
    if isinstance(value_range, str):
        if value_range == "efficientnet":
            return (x - 127.0) / 128.0
        stats = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
        if value_range not in stats:
            raise ValueError(f"value_range={value_range!r}: expected (lo, hi), 'efficientnet', "
                             f"'clip' or 'imagenet'")
        mean, std = (np.asarray(v, np.float32) for v in stats[value_range])
        return (x / 255.0 - mean) / std
    lo, hi = value_range
    return x * np.float32((hi - lo) / 255.0) + np.float32(lo)


def caption_and_image(record: dict, rng: np.random.Generator | None):
    """A training record -> (caption, PIL image, None), or (None, None, why) when it gives no
    example: the source's own "error", "empty_caption" (`choose_caption`), or
    `decode_or_reason`'s reason."""
    if "error" in record:
        return None, None, record["error"]
    caption = choose_caption(record["captions"], rng)
    if caption is None:
        return None, None, "empty_caption"
    img, why = decode_or_reason(record["image"])
    return (None, None, why) if why else (caption, img, None)


def choose_caption(captions, rng: np.random.Generator | None) -> str | None:
    """One non-empty caption: random when rng is given, else the first. None if all are empty."""
    usable = [c.strip() for c in captions if c and c.strip()]
    if not usable:
        return None
    return usable[int(rng.integers(len(usable)))] if rng is not None else usable[0]
