"""Mixing augmentation with soft targets, made in the update step from the global batch:

    config.mixing = dict(kind="mixup" | "cutmix" | "timix" | "m3col", alpha=1.0, prob=1.0)
    config.loss = dict(name="mix_softmax")     # vljax/losses/mixing.py: the soft-target loss

Each mixed image i is made of image i (share lam_i) and image partner(i) (share 1 - lam_i); the
step hands the loss batch["mix_lam"] (f32 [B]) and batch["mix_partner"] (i32 [B], global row
indices), and the loss's targets put lam_i on text i and 1 - lam_i on text partner(i).

Kinds (`mix`):
  * "mixup"  (Zhang et al. 2018, "mixup"): x_i' = lam x_i + (1 - lam) x_partner(i), one
             lam ~ Beta(alpha, alpha) per step.
  * "cutmix" (Yun et al. 2019, "CutMix", Alg. A1, and timm's `rand_bbox`) at the granularity of
             the image tower's patches: a box of cut ratio sqrt(1 - lam), lam ~ Beta(alpha, alpha),
             centred uniformly on the patch grid and clipped to it, takes the partner's patches
             at the same place; lam is then the exact share of the image's own patches.
  * "timix"  (Jiang et al. AAAI 2024, arXiv 2312.08846; official code chaoyajiang/TiMiX
             `TPMix.py`): a square region of s x s patches, s uniform over
             [int(side * min_side), int(side * max_side)] (the code's 0.25 / 0.75), is cut from
             the partner and pasted over a region of the image; lam = 1 - s^2 / side^2 (the
             code's `lam`, "the area ratio of the target image"). Deviation, named: TiMix places
             the partner's MOST text-relevant region over the image's LEAST relevant one, the
             relevance coming from its Text-aware Patch Predictor, trained by a patch-text
             alignment task on region-annotated data (Visual Genome boxes) that vljax does not
             have; here both regions are placed uniformly at random (so this is TiMix's
             region size law and soft labels without its text-aware placement). The code's soft
             targets are also not one-hot: lam P(i) + (1 - lam) P(partner(i)) with P the
             unmixed batch's i2t softmax, from a second, unmixed forward pass and optimizer step
             (`pretrain_mplug.py`); here the mixed loss replaces the unmixed one on the steps that
             mix (prob) and the targets are the mixing ratios (the one-hot case of that form).
  * "m3col"  (Kumar et al. 2024, "Harnessing Shared Relations via Multimodal Mixup Contrastive
             Learning", arXiv 2409.17777; official code RaghavSinghal10/M3CoL `model/utils.py`
             `mixco_image`): pixel mixup with one lam_i ~ Beta(alpha, alpha) PER EXAMPLE, each
             example mixed with probability `prob` (lam_i = 1 otherwise); the code's defaults
             are alpha=0.15, prob=0.5. M3CoL also mixes the other modality's features; only the
             image side is done here (a caption's tokens cannot be mixed).
We could read the papers' abstracts and the official code, not their method sections: the
formulas above are the code's. For mixup, cutmix and timix the step mixes with probability
`prob` (one draw per step, timm's per-batch mode) and otherwise trains on the clean batch with
lam = 1 (the loss is then exactly CLIP's).

The partner: partner(i) = B - 1 - i, the batch reversed (TiMix's code: `x.flip(0)`; M3CoL's
draws a random permutation). The data are shuffled, so the reversed batch pairs random examples;
on a mesh the reversal is one collective permute (device k's rows go to device n - 1 - k) and,
unlike a roll by one device's rows, does not depend on the number of devices, so 1 device and 8
give the same mixed batch. Every random draw comes from the step's rng (the train state's,
checkpointed), so a resumed run mixes as the uninterrupted one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vljax import config_args, objective
from vljax.models.registry import get_model

KINDS = ("mixup", "cutmix", "timix", "m3col")
DEFAULTS = dict(kind=None, alpha=1.0, prob=1.0, min_side=0.25, max_side=0.75)
# The loss inputs that only a mixing step provides (batch fields the step adds).
INPUTS = ("batch/mix_lam", "batch/mix_partner")


def _takes_mixing(config) -> bool:
    return any(k in INPUTS for k in objective.spec(config.loss).inputs)


def options(config) -> dict | None:
    """`config.mixing` over DEFAULTS, or None when unset; ValueError naming the key when a value is
    bad, when the loss and `mixing` do not go together (a loss without soft targets for mixed
    images, SigLIP's sigmoid included: neither paper defines a sigmoid form), or when the batch's
    images cannot be mixed (stored LiT features, NaFlex patch sequences)."""
    raw = config.get("mixing")
    name = config.loss.get("name")
    if raw is None:
        if _takes_mixing(config):
            raise ValueError(f"config key `mixing`: loss {name!r} takes the mixed images' soft targets "
                             f"(batch mix_lam, mix_partner); set config.mixing = dict(kind=..., alpha=..., "
                             f"prob=...) with kind one of {list(KINDS)}")
        return None
    o = config_args.over_defaults(raw, "mixing", DEFAULTS)
    if o["kind"] not in KINDS:
        raise ValueError(f"config key `mixing.kind`: {o['kind']!r} is not one of {list(KINDS)}")
    if not _takes_mixing(config):
        raise ValueError(f"config key `mixing`: loss {name!r} does not take the mixed images' soft targets; "
                         "use loss.name='mix_softmax' (TiMix and M3CoL define the softmax form only, "
                         "no sigmoid loss with soft labels) or remove `mixing`")
    if not float(o["alpha"]) > 0:
        raise ValueError(f"config key `mixing.alpha` must be > 0 (lam ~ Beta(alpha, alpha)), got {o['alpha']!r}")
    if not 0.0 <= float(o["prob"]) <= 1.0:
        raise ValueError(f"config key `mixing.prob` must be in [0, 1], got {o['prob']!r}")
    if not 0.0 < float(o["min_side"]) <= float(o["max_side"]) < 1.0:
        raise ValueError(f"config keys `mixing.min_side` / `mixing.max_side`: need 0 < min_side <= "
                         f"max_side < 1, got {o['min_side']!r}, {o['max_side']!r}")
    if config.loss.get("multilabel_weight"):
        raise ValueError("config key `loss.multilabel_weight`: the added multi-label loss would score the "
                         "mixed images against their unmixed label sets; set it to 0 or remove `mixing`")
    if config.get("lit_cache", False):
        raise ValueError("config key `lit_cache`: `mixing` mixes the batch's images, and the stored "
                         "features of a locked image tower (the feature store) cannot be mixed; set "
                         "lit_cache=False (the locked trunk then runs on the mixed images) or remove `mixing`")
    if config.input.get("naflex") or config.input.get("max_num_patches"):
        raise ValueError("config key `mixing`: NaFlex batches (`input.max_num_patches` / `input.naflex`) "
                         "are patch sequences of varying shapes, which `mixing` does not mix; remove one")
    return o


# ----------------------------------------------------------------------------------------------
# The mixing (a pure function of the global batch's images and a key)
# ----------------------------------------------------------------------------------------------


def partner_of(batch_size: int) -> jnp.ndarray:
    """partner(i) = B - 1 - i: i32 [B] (the batch reversed; see the module docstring)."""
    return jnp.arange(batch_size - 1, -1, -1, dtype=jnp.int32)


def _grid_mask(rows, cols, y0, y1, x0, x1):
    """bool [rows, cols]: True on the patch rows [y0, y1) and columns [x0, x1)."""
    r, c = jnp.arange(rows)[:, None], jnp.arange(cols)[None, :]
    return (r >= y0) & (r < y1) & (c >= x0) & (c < x1)


def _to_pixels(mask, patch):
    """[gh, gw] patch mask -> [1, gh * ph, gw * pw, 1] pixel mask."""
    m = jnp.repeat(jnp.repeat(mask, patch[0], axis=0), patch[1], axis=1)
    return m[None, :, :, None]


def _cutmix_region(rng, lam, grid):
    """CutMix's box on the patch grid: (mask [gh, gw], exact share of the image's own patches)."""
    gh, gw = grid
    ky, kx = jax.random.split(rng)
    ratio = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.round(gh * ratio).astype(jnp.int32), jnp.round(gw * ratio).astype(jnp.int32)
    cy, cx = jax.random.randint(ky, (), 0, gh), jax.random.randint(kx, (), 0, gw)
    y0, y1 = jnp.clip(cy - ch // 2, 0, gh), jnp.clip(cy + ch // 2, 0, gh)
    x0, x1 = jnp.clip(cx - cw // 2, 0, gw), jnp.clip(cx + cw // 2, 0, gw)
    mask = _grid_mask(gh, gw, y0, y1, x0, x1)
    return mask, 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (gh * gw)


def _timix_regions(rng, grid, min_side, max_side):
    """TiMix's square: (side s, target corner (r1, c1), source corner (r2, c2), lam = 1 - s^2 / side^2)."""
    side = min(grid)
    lo, hi = max(1, int(side * min_side)), max(1, int(side * max_side))
    ks, k1, k2 = jax.random.split(rng, 3)
    s = jax.random.randint(ks, (), lo, hi + 1)
    corner = lambda k: jax.random.randint(k, (2,), 0, jnp.array(grid) - s + 1)  # noqa: E731
    c1, c2 = corner(k1), corner(k2)
    return s, c1, c2, 1.0 - (s * s).astype(jnp.float32) / (grid[0] * grid[1])


def mix(images, rng, kind, alpha=1.0, prob=1.0, patch=(1, 1), min_side=0.25, max_side=0.75):
    """images: [B, H, W, C] (the global batch) -> (mixed [B, H, W, C] same dtype, lam f32 [B],
    partner i32 [B]); mixed image i is lam_i of image i and 1 - lam_i of image partner(i) (by
    area for cutmix / timix, by pixel weight for mixup / m3col). `patch` = (ph, pw), the image
    tower's patch size: cutmix's and timix's regions are whole patches (H, W multiples of it).
    Deterministic in `rng`; on a sharded batch the same values as on one device."""
    if kind not in KINDS:
        raise ValueError(f"mixing kind {kind!r} is not one of {list(KINDS)}")
    b, h, w, _ = images.shape
    partner = partner_of(b)
    x = images.astype(jnp.float32)
    other = jnp.flip(x, axis=0)
    k_apply, k_lam, k_region = jax.random.split(rng, 3)
    if kind == "m3col":  # one lam per example, each example mixed with probability prob
        lam = jax.random.beta(k_lam, alpha, alpha, (b,))
        lam = jnp.where(jax.random.uniform(k_apply, (b,)) < prob, lam, 1.0)
        mixed = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * other
        return mixed.astype(images.dtype), lam.astype(jnp.float32), partner
    if h % patch[0] or w % patch[1]:
        raise ValueError(f"mixing kind {kind!r}: images {h}x{w} are not a whole number of "
                         f"{patch[0]}x{patch[1]} patches")
    grid = (h // patch[0], w // patch[1])
    if kind == "mixup":
        lam = jax.random.beta(k_lam, alpha, alpha)
        mixed = lam * x + (1.0 - lam) * other
    elif kind == "cutmix":
        mask, lam = _cutmix_region(k_region, jax.random.beta(k_lam, alpha, alpha), grid)
        mixed = jnp.where(_to_pixels(mask, patch), other, x)
    else:  # timix: the partner's square at c2 pasted over the image's square at c1
        s, c1, c2, lam = _timix_regions(k_region, grid, min_side, max_side)
        mask = _grid_mask(grid[0], grid[1], c1[0], c1[0] + s, c1[1], c1[1] + s)
        shift = (c1 - c2) * jnp.array(patch)
        moved = jnp.roll(other, (shift[0], shift[1]), axis=(1, 2))
        mixed = jnp.where(_to_pixels(mask, patch), moved, x)
    apply = jax.random.uniform(k_apply) < prob
    lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
    mixed = jnp.where(apply, mixed, x)
    return mixed.astype(images.dtype), jnp.full((b,), lam), partner


# ----------------------------------------------------------------------------------------------
# In the step
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mixing:
    """The configured mixing (`build`), applied by the update step (`apply`)."""
    kind: str
    alpha: float
    prob: float
    patch: tuple[int, int]
    min_side: float
    max_side: float

    @classmethod
    def build(cls, config, model) -> Mixing | None:
        """From config.mixing (checked by `options`) and the patch size of `model`'s image tower
        (a `TwoTowers`; 1 x 1 for a tower without patches: cutmix then cuts pixels); None without
        config.mixing."""
        o = options(config)
        if o is None:
            return None
        tower = get_model(model.image_model)(**(model.image or {}))
        # A tower without patches (a CNN, without `config()`): pixels are the grid.
        patch = tower.config().get("patch_size", (1, 1)) if hasattr(tower, "config") else (1, 1)
        if o["kind"] == "timix" and tuple(patch) == (1, 1):
            raise ValueError(f"config key `mixing.kind`: 'timix' mixes regions of patches, and image "
                             f"tower {model.image_model!r} has none; use 'cutmix' or 'mixup'")
        return cls(o["kind"], float(o["alpha"]), float(o["prob"]), tuple(int(p) for p in patch),
                   float(o["min_side"]), float(o["max_side"]))

    def apply(self, batch: dict, rng) -> dict:
        """The batch with its images mixed and the loss's `mix_lam` / `mix_partner`."""
        if "image" not in batch or not hasattr(batch["image"], "shape"):
            raise ValueError("config key `mixing`: the batch has no image array to mix (stored "
                             "features or NaFlex patches)")
        image, lam, partner = mix(batch["image"], rng, self.kind, self.alpha, self.prob, self.patch,
                                  self.min_side, self.max_side)
        return {**batch, "image": image, "mix_lam": lam, "mix_partner": partner}
