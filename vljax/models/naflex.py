"""NaFlex ViT (SigLIP 2): images at their own aspect ratio as a padded sequence of patches.

References: Tschannen et al. 2025, "SigLIP 2" (Sec. 2.4.2, NaFlex = NaViT + FlexiViT);
google-research/big_vision `models/proj/image_text/naflex_vit.py` (parameter layout: `embedding`
Dense over flattened patches, `pos_embedding` [G, G, D], `Transformer`, `MAPHead_0`);
huggingface/transformers `models/siglip2/modeling_siglip2.py` (`Siglip2VisionEmbeddings`
resizes the learned grid per image with an antialiased bilinear filter, `Siglip2VisionModel`
masks padding keys in every layer and in the attention-pooling head).

Input contract (vljax.data.naflex makes it):
  {"patches": float [B, N, P * P * C] (each patch flattened row, column, channel; rows of patches
   in raster order), "mask": bool [B, N] (True = a real patch, real patches first),
   "shapes": int [B, 2] (patch rows, patch columns of each image; rows * cols <= N)}.
N (the patch budget) is the static sequence length: one compile per N, any mix of aspect ratios.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.models.common import Encoder, MAPHead
from vljax.models.vit import resolve_sizes

Dtype = Any

POOL_TYPES = ("map", "gap", "none")
INPUT_KEYS = ("patches", "mask", "shapes")


def _axis_weights(length, index, grid: int):
    """Antialiased linear-interpolation weights of one axis.

    length: int [B, 1] target sizes, index: int [B, N] output positions -> float32 [B, N, grid].
    Output i of a grid resized to `length` samples source position (i + 0.5) * grid / length - 0.5
    with a triangle kernel widened by the downsampling factor (grid / length when > 1) and
    renormalised: torch F.interpolate(bilinear, align_corners=False, antialias=True), PIL's
    bilinear, jax.image.resize(method="linear", antialias=True) all compute these weights.
    """
    scale = grid / length.astype(jnp.float32)
    support = jnp.maximum(scale, 1.0)
    center = (index.astype(jnp.float32) + 0.5) * scale - 0.5
    source = jnp.arange(grid, dtype=jnp.float32)
    w = jnp.maximum(1.0 - jnp.abs(source - center[..., None]) / support[..., None], 0.0)
    return w / w.sum(-1, keepdims=True)


def resize_posemb(grid, shapes, n: int):
    """The learned grid resized to every image's patch grid, laid out as its patch sequence.

    grid: [G, G, D]; shapes: int [B, 2] (rows, cols), each >= 1; n: the sequence length N.
    Returns [B, N, D]: position k < rows * cols holds the grid resized to (rows, cols) at
    (k // cols, k % cols); padded positions hold its (0, 0) entry, as in transformers.
    Shapes may be traced: the result's shape depends on n only.
    """
    g = grid.shape[0]
    shapes = jnp.asarray(shapes, jnp.int32)
    h, w = shapes[:, :1], shapes[:, 1:]                      # [B, 1]
    k = jnp.arange(n, dtype=jnp.int32)[None, :]              # [1, N]
    valid = k < h * w
    row = jnp.where(valid, k // w, 0)
    col = jnp.where(valid, k % w, 0)
    wy, wx = _axis_weights(h, row, g), _axis_weights(w, col, g)   # [B, N, G] each
    pe = jnp.einsum("bny,yxd->bnxd", wy, grid.astype(jnp.float32))
    return jnp.einsum("bnxd,bnx->bnd", pe, wx).astype(grid.dtype)


def check_inputs(images, patch_dim: int):
    """Raises ValueError naming the key / shape unless `images` follows the input contract (and,
    for host numpy `shapes`, unless every grid has 1 to N patches)."""
    if not isinstance(images, dict) or any(k not in images for k in INPUT_KEYS):
        found = sorted(images) if isinstance(images, dict) else type(images).__name__
        raise ValueError(f"NaFlex ViT expects a dict with keys {list(INPUT_KEYS)} "
                         f"(vljax.data.naflex.naflex_batch makes it), got {found}")
    p, m, s = (np.shape(images[k]) for k in INPUT_KEYS)
    if len(p) != 3 or p[2] != patch_dim:
        raise ValueError(f"NaFlex 'patches' must be [B, N, {patch_dim}] (patch_size**2 * channels)"
                         f", got shape {p}")
    if m != p[:2]:
        raise ValueError(f"NaFlex 'mask' must be [B, N] = {p[:2]}, got shape {m}")
    if s != (p[0], 2):
        raise ValueError(f"NaFlex 'shapes' must be [B, 2] = {(p[0], 2)}, got shape {s}")
    shapes = images["shapes"]
    if isinstance(shapes, np.ndarray):   # host values (not traced): check the budget too
        n = shapes.prod(-1)
        if (shapes < 1).any() or (n > p[1]).any():
            i = int(np.argmax((shapes < 1).any(-1) | (n > p[1])))
            raise ValueError(f"NaFlex image {i} has a {tuple(shapes[i].tolist())} patch grid: "
                             f"it needs 1 to N={p[1]} patches (the patch budget of this batch)")


class NaFlexViT(nn.Module):
    """NaFlex vision tower returning (features, out), like vljax.models.vit.ViT.

    variant / width / depth / mlp_dim / num_heads / patch_size: as ViT (square patches only).
    posemb_grid: side G of the learned position grid `pos_embedding` [G, G, D] (transformers'
      vision_config.num_patches = G * G; big_vision's `nposemb`).
    max_num_patches: the patch budget N the model is normally run at (preprocessing pads to it;
      transformers' preprocessor max_num_patches). Metadata for callers: inputs of any N run.
    pool_type: "map" (attention pooling over real patches, SigLIP 2), "gap" (mean of real
      patches) or "none" (features are all tokens).
    num_classes: > 0 adds the Dense `head`.
    """
    variant: str | None = "B/16"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    posemb_grid: int = 16
    max_num_patches: int = 256
    num_channels: int = 3
    pool_type: str = "map"
    num_classes: int = 0
    head_bias: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    remat: bool = False
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def config(self) -> dict:
        """The resolved sizes: the variant overlaid with explicit overrides; patch_size an int."""
        cfg = resolve_sizes(self, "NaFlexViT")
        p = cfg["patch_size"]
        if not isinstance(p, int):
            if len(p) != 2 or p[0] != p[1]:
                raise ValueError(f"NaFlexViT needs square patches, got patch_size={p}")
            p = int(p[0])
        cfg["patch_size"] = p
        cfg.setdefault("mlp_dim", 4 * cfg["width"])
        return cfg

    def patch_dim(self) -> int:
        return self.config()["patch_size"] ** 2 * self.num_channels

    @nn.compact
    def __call__(self, images=None, train: bool = False, features=None):
        """images: the input dict (module docstring) -> (features [B, num_classes or width], out).

        out["tokens"]: [B, N, width] after the final norm (padded positions hold values nothing
        reads); out["mask"]: bool [B, N]; out["pre_logits"]: pooled [B, width]; out["logits"]
        with a head. features: [B, width] pre_logits computed before: only the head runs.
        """
        if features is None:
            features, out = self._trunk(images, train)
        else:
            out = {"pre_logits": features}
        x = features
        if self.num_classes:
            x = out["logits"] = nn.Dense(self.num_classes, use_bias=self.head_bias,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="head")(x)
        return x, out

    def _trunk(self, images, train: bool):
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        cfg = self.config()
        check_inputs(images, self.patch_dim())
        width, g = cfg["width"], self.posemb_grid
        mask = jnp.asarray(images["mask"], bool)
        x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(
            jnp.asarray(images["patches"], self.dtype))
        grid = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                          (g, g, width), self.param_dtype)
        x = x + resize_posemb(grid, images["shapes"], x.shape[1]).astype(x.dtype)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x, _ = Encoder(depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
                       act=self.act, ln_eps=self.ln_eps, dropout=self.dropout, remat=self.remat,
                       scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="Transformer")(x, not train, mask=mask)
        out = {"tokens": x, "mask": mask}
        if self.pool_type == "map":
            x = MAPHead(num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], act=self.act,
                        ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="MAPHead_0")(x, mask)
        elif self.pool_type == "gap":
            m = mask[..., None].astype(x.dtype)
            x = (x * m).sum(axis=1) / m.sum(axis=1)
        out["pre_logits"] = x
        return x, out


def example_input(image_kwargs: dict, batch: int = 1, num_patches: int | None = None) -> dict:
    """Abstract NaFlex inputs (jax.ShapeDtypeStruct) for `jax.eval_shape` / parameter checks:
    N = num_patches or the tower's max_num_patches."""
    tower = NaFlexViT(**image_kwargs)
    n = num_patches or tower.max_num_patches
    return {"patches": jax.ShapeDtypeStruct((batch, n, tower.patch_dim()), jnp.float32),
            "mask": jax.ShapeDtypeStruct((batch, n), jnp.bool_),
            "shapes": jax.ShapeDtypeStruct((batch, 2), jnp.int32)}


def params_from_vit(vit_params: dict, where: str = "img") -> dict:
    """A fixed-resolution ViT's params (vljax.models.vit.ViT, posemb="learn", no class token,
    registers nor ln_pre: SigLIP's image tower) -> NaFlexViT params computing the same function on
    the ViT's square grid (`vljax.data.naflex.square_patches` inputs): the Conv patch stem's
    kernel [P, P, C, D] flattened to the Dense [P*P*C, D] (row, column, channel: the patch
    layout of `naflex.patchify`), `pos_embedding` [1, G*G, D] to [G, G, D]; every other leaf
    as it is (`Transformer`, `MAPHead_0`, `head`). Host or device arrays; errors name `where`."""
    extra = sorted(set(vit_params) & {"cls", "registers", "ln_pre"})
    if extra:
        raise ValueError(f"{where}: a ViT with {extra} has no NaFlex counterpart (NaFlexViT has "
                         "no class token, registers nor ln_pre)")
    for key in ("embedding", "pos_embedding"):
        if key not in vit_params:
            raise ValueError(f"{where}/{key}: missing; not a ViT with a learned position embedding")
    kernel = vit_params["embedding"]["kernel"]
    if kernel.ndim != 4:
        raise ValueError(f"{where}/embedding/kernel: a Conv kernel [P, P, C, D] expected, got "
                         f"shape {kernel.shape}")
    pe = vit_params["pos_embedding"]
    g = int(round(np.sqrt(pe.shape[1])))
    if pe.ndim != 3 or g * g != pe.shape[1]:
        raise ValueError(f"{where}/pos_embedding: [1, G*G, D] of a square grid expected, got "
                         f"shape {pe.shape}")
    out = dict(vit_params)
    out["embedding"] = dict(vit_params["embedding"],
                            kernel=kernel.reshape(-1, kernel.shape[-1]))
    out["pos_embedding"] = pe.reshape(g, g, pe.shape[-1])
    return out
