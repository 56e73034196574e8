"""NaFlex preprocessing (SigLIP 2): an image at its own aspect ratio -> a padded patch sequence.

Host-side numpy (and PIL for the resize), no JAX. Matches transformers' `Siglip2ImageProcessor`
(models/siglip2/image_processing_siglip2.py and its PIL backend, the one transformers falls back to
without torchvision): the largest aspect-preserving size whose sides are multiples of the patch
size with at most `max_num_patches` patches (`get_image_size_for_max_num_patches`), PIL bilinear
resize of the uint8 image, rescale to [0, 1] and normalise with mean = std = 0.5 (value range
[-1, 1]), patches flattened (row, column, channel) in raster order, zero-padded to the budget.
big_vision's `pp/proj/image_text/ops_naflex.py` does the same steps with TF ops; the checkpoints
on the Hugging Face hub ship the transformers processor, which this follows exactly.

Output contract (vljax.models.naflex): {"patches": float32 [N, P*P*3], "mask": bool [N] (True =
a real patch), "shapes": int32 [2] (patch rows, cols)} per image; `naflex_batch` stacks them.
"""
import math

import numpy as np
from PIL import Image


def target_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """(height', width'): the image scaled by one factor, each side rounded up to a multiple of
    `patch_size` (at least one patch), the factor the largest (binary search to `eps`, from 1e-6
    to 100) with (height' / p) * (width' / p) <= max_num_patches. transformers'
    `get_image_size_for_max_num_patches`, step for step, so sizes agree to the pixel."""
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches={max_num_patches}: the patch budget must allow at "
                         "least one patch")
    if height < 1 or width < 1 or patch_size < 1:
        raise ValueError(f"image size {(height, width)} / patch_size {patch_size} must be positive")

    def side(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] (H, W multiples of p) -> [(H/p) * (W/p), p * p * C]: patches in raster order,
    each flattened row, column, channel (transformers' convert_image_to_patches)."""
    h, w, c = image.shape
    p = patch_size
    x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // p) * (w // p), p * p * c)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [..] -> float32 in [-1, 1]: x / 255 (in float64, as transformers' rescale), then
    (x - 0.5) / 0.5 in float32 (its normalize)."""
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (x - half) / half


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"NaFlex preprocessing expects a uint8 RGB image [H, W, 3], got "
                         f"{image.dtype} {image.shape}")
    return image


def naflex_image(image: np.ndarray, patch_size: int, max_num_patches: int) -> dict:
    """One uint8 RGB image [H, W, 3] -> {"patches": float32 [max_num_patches, p*p*3],
    "mask": bool [max_num_patches], "shapes": int32 [2]} (see the module docstring)."""
    image = _check_image(image)
    h, w = target_size(image.shape[0], image.shape[1], patch_size, max_num_patches)
    if (h // patch_size) * (w // patch_size) > max_num_patches:
        raise ValueError(f"image {image.shape[:2]} needs {(h // patch_size) * (w // patch_size)} "
                         f"patches of {patch_size} px, over max_num_patches={max_num_patches}")
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    patches = patchify(normalize(image), patch_size)
    return pad_patches(patches, (h // patch_size, w // patch_size), max_num_patches)


def pad_patches(patches: np.ndarray, shape: tuple[int, int], max_num_patches: int) -> dict:
    """patches [n, F] of a (rows, cols) grid, n = rows * cols -> the padded per-image dict.
    Refuses n over the budget (naming both) rather than truncating an image."""
    patches = np.asarray(patches, np.float32)
    n = patches.shape[0]
    if n != shape[0] * shape[1]:
        raise ValueError(f"{n} patches do not make a {tuple(shape)} grid")
    if n > max_num_patches:
        raise ValueError(f"a NaFlex input of {n} patches ({shape[0]} x {shape[1]}) is over the "
                         f"patch budget max_num_patches={max_num_patches}")
    out = np.zeros((max_num_patches, patches.shape[1]), np.float32)
    out[:n] = patches
    mask = np.arange(max_num_patches) < n
    return {"patches": out, "mask": mask, "shapes": np.asarray(shape, np.int32)}


def naflex_batch(images, patch_size: int, max_num_patches: int) -> dict:
    """A list of uint8 RGB images (any sizes) -> {"patches": float32 [B, N, p*p*3], "mask": bool
    [B, N], "shapes": int32 [B, 2]} with N = max_num_patches: one static shape per budget."""
    return stack([naflex_image(im, patch_size, max_num_patches) for im in images])


def stack(examples) -> dict:
    """Per-image dicts (same budget) -> the batch dict; refuses mixed budgets, naming them."""
    if not examples:
        raise ValueError("a NaFlex batch needs at least one image")
    lengths = sorted({e["mask"].shape[0] for e in examples})
    if len(lengths) != 1:
        raise ValueError(f"NaFlex examples padded to different budgets {lengths}: pad every "
                         "image of a batch to one max_num_patches")
    return {k: np.stack([e[k] for e in examples]) for k in ("patches", "mask", "shapes")}


def square_patches(image: np.ndarray, patch_size: int) -> dict:
    """A preprocessed square image float [S, S, C] (S a multiple of p) -> the per-image dict of
    its full (S/p) x (S/p) grid at budget N = (S/p)**2 (every patch real): the fixed-resolution
    input of a NaFlex tower, which then computes the fixed-resolution ViT (with
    `vljax.models.naflex.params_from_vit`'s parameters) exactly."""
    s, w = image.shape[:2]
    if s != w or s % patch_size:
        raise ValueError(f"a fixed-resolution NaFlex input must be square with sides a multiple "
                         f"of patch_size={patch_size}, got {image.shape}")
    g = s // patch_size
    return pad_patches(patchify(np.asarray(image, np.float32), patch_size), (g, g), g * g)


def budget_at(budgets, seed: int, index: int) -> int:
    """The patch budget of global batch `index`: one of `budgets`, uniformly, from
    numpy.random.SeedSequence([seed, index]) alone, so every process (and a resumed run) draws
    the same budget for the same batch without any state. SigLIP 2 (Sec. 2.4.2, as the brief
    and its secondary sources give it): the sequence length sampled per batch from
    {128, 256, 576, 784, 1024} in the NaFlex stage."""
    budgets = tuple(budgets)
    if len(budgets) == 1:
        return int(budgets[0])
    k = int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]) % len(budgets)
    return int(budgets[k])
