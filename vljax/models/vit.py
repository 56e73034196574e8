"""Vision Transformer (big_vision layout, with the options CLIP / SigLIP checkpoints need)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.models.common import Encoder, MAPHead, posemb_sincos_2d
from vljax.models.posemb import resize_grid

Dtype = Any

# Reference: Table 2 of https://arxiv.org/abs/2106.04560 (and big_vision's decode_variant).
_WIDTH = {"Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152, "H": 1280,
          "g": 1408, "G": 1664, "e": 1792}
_DEPTH = {"Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27, "H": 32, "g": 40, "G": 48,
          "e": 56}
_MLP = {"Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096, "So400m": 4304, "H": 5120,
        "g": 6144, "G": 8192, "e": 15360}
_HEADS = {"Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16, "g": 16, "G": 16,
          "e": 16}

POOL_TYPES = ("cls", "gap", "map", "none")


def decode_variant(variant: str | None) -> dict:
    """"B/16" -> {width: 768, depth: 12, mlp_dim: 3072, num_heads: 12, patch_size: (16, 16)}.

    The patch part is optional ("So400m" alone gives the transformer sizes only).
    """
    if variant is None:
        return {}
    name, _, patch = variant.partition("/")
    if name not in _WIDTH:
        raise ValueError(f"Unknown ViT variant {variant!r}; sizes are {sorted(_WIDTH)}, "
                         "optionally followed by /patch, e.g. 'B/16'")
    out = dict(width=_WIDTH[name], depth=_DEPTH[name], mlp_dim=_MLP[name],
               num_heads=_HEADS[name])
    if patch:
        if not patch.isdigit():
            raise ValueError(f"Bad patch size in ViT variant {variant!r}")
        out["patch_size"] = (int(patch), int(patch))
    return out


def resolve_sizes(tower, name: str) -> dict:
    """A ViT-like tower's sizes: its `variant` (`decode_variant`) overlaid with the fields it sets
    (width, depth, mlp_dim, num_heads, patch_size); a missing size is an error naming the tower."""
    cfg = decode_variant(tower.variant)
    for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
        if getattr(tower, k) is not None:
            cfg[k] = getattr(tower, k)
    missing = [k for k in ("width", "depth", "num_heads", "patch_size") if k not in cfg]
    if missing:
        raise ValueError(f"{name} needs {missing}: give a variant such as 'B/16' or set them")
    return cfg


def keep_random_patches(x, rate: float, rng):
    """FLIP's random masking (Li et al. 2023, Sec. 3): keep a random subset of patch tokens.

    x: [B, N, W] patch tokens (position embedding already added) -> [B, K, W] with
    K = round((1 - rate) * N) (half up, at least 1), the same K for every example so shapes
    stay static; each example keeps its own uniformly random subset (the first K of an argsort
    of uniform noise), in that random order: the encoder is permutation-equivariant once the
    position terms are in.
    """
    b, n, _ = x.shape
    keep = max(1, int((1.0 - rate) * n + 0.5))
    order = jnp.argsort(jax.random.uniform(rng, (b, n)), axis=1)[:, :keep]  # [B, K]
    return jnp.take_along_axis(x, order[:, :, None], axis=1)


def _pair(p) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else tuple(p)


class ViT(nn.Module):
    """Vision Transformer returning (features, out).

    variant: big_vision size string ("B/16", "So400m/14", ...); explicit width / depth / mlp_dim /
      num_heads / patch_size override it.
    pool_type: "cls" (a learned class token, CLIP), "gap" (mean of patch tokens), "map"
      (attention pooling, SigLIP) or "none" (features are all tokens).
    posemb: "learn" (added to the patch tokens only; a class token carries its own position
      term folded into `cls`, as in big_vision) or "sincos2d" (fixed).
    num_registers: extra learned tokens (Darcet et al. 2023), dropped before pooling.
    ln_pre: LayerNorm before the transformer (CLIP). patch_bias: bias in the patch stem.
    num_classes: > 0 adds the Dense `head` (the projection in a two-tower model).
    posemb_grid: (h, w) patches of the learned position embedding (default: the input's grid);
      inputs on another grid use it resampled bilinearly (training stages at a lower resolution).
    patch_dropout: fraction of patch tokens dropped per example in training (FLIP), after the
      position embedding and before the encoder; class and register tokens are always kept,
      pooling sees the kept tokens only. Uses the "dropout" rng stream; off at evaluation.
    """
    variant: str | None = "B/16"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | tuple[int, int] | None = None
    pool_type: str = "cls"
    posemb: str = "learn"
    num_registers: int = 0
    num_classes: int = 0
    head_bias: bool = True
    ln_pre: bool = False
    patch_bias: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    patch_dropout: float = 0.0
    posemb_grid: tuple[int, int] | None = None
    remat: bool = False
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def config(self) -> dict:
        """The resolved transformer sizes: the variant overlaid with explicit overrides."""
        cfg = resolve_sizes(self, "ViT")
        cfg["patch_size"] = _pair(cfg["patch_size"])
        cfg.setdefault("mlp_dim", 4 * cfg["width"])
        return cfg

    @nn.compact
    def __call__(self, images=None, train: bool = False, patch_dropout: float | None = None,
                 features=None, token_mask=None):
        """images: [B, H, W, C] -> (features [B, num_classes or width], out).

        patch_dropout: overrides the attribute for this call (0.0: every patch, e.g. FLIP's
        unmasked tuning steps at the end of a schedule); applies only with train=True.
        out["tokens"]: [B, N, width] after the final norm, registers dropped (class token first
        when pool_type="cls"; N the kept patches under patch dropout); out["pre_logits"]:
        pooled [B, width]; out["logits"] with a head.
        features: [B, width] pre_logits computed before (a locked trunk's stored features,
        vljax/features.py): only the head is applied, with the same parameters (`head/...`).
        token_mask: optional (mask bool [B, h*w], token [width]): the masked patches' embeddings
        replaced by the token before the position embedding is added (iBOT / TIPS masked view,
        vljax/teacher.py; the token is a parameter of the caller's, `ssl/mask_token`).
        """
        if features is None:
            features, out = self._trunk(images, train, patch_dropout, token_mask)
        else:
            out = {"pre_logits": features}
        x = features
        if self.num_classes:
            x = out["logits"] = nn.Dense(self.num_classes, use_bias=self.head_bias,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="head")(x)
        return x, out

    def _trunk(self, images, train: bool, patch_dropout: float | None, token_mask=None):
        """Everything before the head: (pre_logits [B, width], out)."""
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        if images.ndim != 4:
            raise ValueError(f"ViT expects images [B, H, W, C], got shape {images.shape}")
        cfg = self.config()
        width, p = cfg["width"], cfg["patch_size"]
        if images.shape[1] % p[0] or images.shape[2] % p[1]:
            raise ValueError(f"Image size {images.shape[1:3]} is not a multiple of patch {p}")
        out = {}

        x = nn.Conv(width, p, strides=p, padding="VALID", use_bias=self.patch_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(
                        jnp.asarray(images, self.dtype))
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, width)
        if token_mask is not None:
            mask, token = token_mask
            x = jnp.where(mask[..., None], jnp.asarray(token, x.dtype), x)

        if self.posemb == "learn":
            gh, gw = self.posemb_grid or (h, w)
            pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                            (1, gh * gw, width), self.param_dtype)
            if (gh, gw) != (h, w):  # a smaller training stage (vljax/stages.py): resampled
                pe = resize_grid(pe.reshape(gh, gw, width), (h, w), xp=jnp).reshape(1, h * w, width)
        elif self.posemb == "sincos2d":
            pe = posemb_sincos_2d(h, w, width, dtype=self.param_dtype)
        else:
            raise ValueError(f"Unknown posemb {self.posemb!r}; expected 'learn' or 'sincos2d'")
        x = x + pe.astype(x.dtype)
        rate = self.patch_dropout if patch_dropout is None else patch_dropout
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {rate}")
        if train and rate > 0.0:
            x = keep_random_patches(x, rate, self.make_rng("dropout"))

        # Prefix tokens: [cls] then registers, neither with a position term of their own.
        prefix = []
        if self.pool_type == "cls":
            prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, width),
                                     self.param_dtype))
        if self.num_registers:
            prefix.append(self.param("registers", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                                     (1, self.num_registers, width), self.param_dtype))
        if prefix:
            prefix = [jnp.broadcast_to(t.astype(x.dtype), (b,) + t.shape[1:]) for t in prefix]
            x = jnp.concatenate(prefix + [x], axis=1)

        if self.ln_pre:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="ln_pre")(x)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x, _ = Encoder(depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
                       act=self.act, ln_eps=self.ln_eps, dropout=self.dropout, remat=self.remat,
                       scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="Transformer")(x, not train)

        n_cls = int(self.pool_type == "cls")
        if self.num_registers:
            x = jnp.concatenate([x[:, :n_cls], x[:, n_cls + self.num_registers:]], axis=1)
        out["tokens"] = x

        if self.pool_type == "cls":
            x = x[:, 0]
        elif self.pool_type == "gap":
            x = x.mean(axis=1)
        elif self.pool_type == "map":
            x = MAPHead(num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], act=self.act,
                        ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="MAPHead_0")(x)
        out["pre_logits"] = x
        return x, out
