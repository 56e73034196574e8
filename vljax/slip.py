"""SLIP: image self-supervision beside the contrastive loss (Mu, Kirillov, Wagner, Xie 2022, arXiv
2112.12750, Sec. 3; official code facebookresearch/SLIP `models.py` SLIP, `losses.py` SLIPLoss /
SIMCLRLoss), switched on by `config.ssl`:

    config.ssl = dict(scale=1.0, temperature=0.1, head_width=4096, out=256)   # `options`: DEFAULTS

The step's loss becomes the configured loss (CLIP's softmax in SLIP) + `scale` * SimCLR's NT-Xent
(`losses/simclr.py`) between two augmented views of each image, through a 3-layer MLP head
(`models/ssl_heads.SimCLRHead`) on the image tower's pooled features (`img/pre_logits`, SLIP's
`self.visual(aug)`), its negatives the other views of the global batch. The NT-Xent is logged
unscaled as `train/ssl` (SLIP's `ssl_loss`).

Views: the input workers cut them (`data.preprocess.MultiCrop`, the mechanism of the
self-distillation stage): batch "sd_global" [B, 2, S, S, 3], random resized crops of area
`crop_scale` (SLIP: (0.08, 1)), colour jitter `colour_jitter` and greyscale `greyscale` (SLIP:
ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grey 0.2). The CLIP term keeps the batch's own
"image" (SLIP: a third, weaker view). Not applied, as MultiCrop has neither: SLIP's Gaussian blur
(p 0.5) and horizontal flip; the hue jitter and the jitter's p 0.8 (ours jitters every view).

State: the head's params are params["simclr"], trained by the optimizer with the towers,
sharded by `sharding_rules` and checkpointed like them, and left out of the exported encoder
(`factory.encoder_only`). SLIP trains the image tower from scratch: a recipe whose image trunk is
locked is refused (`check`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from vljax import config_args
from vljax.losses.simclr import simclr_loss
from vljax.models.ssl_heads import SimCLRHead, init_simclr_head

DEFAULTS = dict(scale=1.0, temperature=0.1, head_width=4096, out=256, crop_scale=(0.08, 1.0),
                colour_jitter=0.4, greyscale=0.2)
PARAMS_KEY = "simclr"  # params["simclr"]: the head
INPUTS = ("ssl/z1", "ssl/z2")  # the loss inputs: the head's outputs of the two views, [B, out]


def options(config) -> dict | None:
    """`config.ssl` over DEFAULTS, or None when unset; an unknown key, a bad value or a recipe
    that cannot make the views is a ValueError naming the key."""
    raw = config.get("ssl")
    if raw is None:
        return None
    o = config_args.over_defaults(raw, "ssl", DEFAULTS)
    if not float(o["scale"]) >= 0 or not float(o["temperature"]) > 0:
        raise ValueError(f"config key `ssl`: scale must be >= 0 and temperature > 0, got "
                         f"scale={o['scale']!r}, temperature={o['temperature']!r}")
    if int(o["head_width"]) < 1 or int(o["out"]) < 1:
        raise ValueError(f"config key `ssl`: head_width and out must be >= 1, got "
                         f"{o['head_width']!r}, {o['out']!r}")
    lo, hi = (float(v) for v in o["crop_scale"])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"config key `ssl.crop_scale`: need 0 < lo <= hi <= 1, got {o['crop_scale']!r}")
    if config.get("self_distill") is not None:
        raise ValueError("config keys `ssl` and `self_distill`: both take the views batch['sd_global'] "
                         "cut in the input workers; set one of them")
    if config.get("lit_cache") or (config.get("input") or {}).get("naflex"):
        raise ValueError("config key `ssl`: SLIP's views need images in the batch at a fixed resolution "
                         "(not stored LiT features, `lit_cache`, nor NaFlex patches, `input.naflex`)")
    return o


def check(config, trainable_mask) -> None:
    """Refuses SLIP on an image tower whose trunk `schedule` locks: the SimCLR term trains the
    image tower (SLIP, CLIP from scratch); with it locked only the head would learn."""
    if config.get("ssl") is None:
        return
    flat = traverse_util.flatten_dict(trainable_mask, sep="/")
    trunk = [k for k in flat if k.startswith("img/") and not k.startswith("img/head/")]
    if trunk and not any(flat[k] for k in trunk):
        raise ValueError(f"config keys `ssl` and `schedule`: SLIP's SimCLR term trains the image tower, "
                         f"but `schedule` locks its trunk ({trunk[0]} and {len(trunk) - 1} more); train "
                         f"it (e.g. ('.*', dict(...))) or remove `ssl`")
    if not all(v for k, v in flat.items() if k.startswith(f"{PARAMS_KEY}/")):
        raise ValueError(f"config keys `ssl` and `schedule`: the SimCLR head params['{PARAMS_KEY}'] must "
                         f"be trained; `schedule` locks part of it")


def head(opts) -> SimCLRHead:
    return SimCLRHead(hidden=int(opts["head_width"]), out=int(opts["out"]))


def pooled_width(model, params, images) -> int:
    """The width of the image tower's pooled features (`img/pre_logits`), from shapes only."""
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, None, train=False)[2], params, images)
    return int(out["img/pre_logits"].shape[-1])


def with_head(params, model, opts, images, rng=None) -> dict:
    """`params` plus "simclr": the head's random params (`rng`), or their ShapeDtypeStructs (no
    rng). `images`: an example input of the image tower (its pooled width sets the head's)."""
    width = pooled_width(model, params, images)
    h = head(opts)
    if rng is None:
        return {**params, PARAMS_KEY: jax.eval_shape(lambda r: init_simclr_head(h, width, r), jax.random.key(0))}
    return {**params, PARAMS_KEY: init_simclr_head(h, width, rng)}


def multi_crop(opts, image_size: int) -> dict:
    """The input's `multi_crop` entry (`data.preprocess.MultiCrop` kwargs): two views of the
    training image size, SLIP's augmentation (module docstring)."""
    return dict(global_size=image_size, local_size=image_size, global_views=2, local_views=0,
                global_scale=tuple(float(v) for v in opts["crop_scale"]),
                colour_jitter=float(opts["colour_jitter"]), greyscale=float(opts["greyscale"]))


def term(opts):
    """(fn(z1, z2, axis_name=None) -> the NT-Xent, its inputs): SLIP's term unscaled, for the
    objective (which adds `opts['scale']` times it) and the logged part `train/ssl`."""
    return functools.partial(simclr_loss, temperature=float(opts["temperature"])), INPUTS


@dataclasses.dataclass(frozen=True)
class Slip:
    """The step's side of SLIP: the head's embeddings of a batch's two views."""
    head: SimCLRHead

    @classmethod
    def build(cls, opts) -> Slip:
        return cls(head(opts))

    def embed(self, model, params, batch, rng) -> dict:
        """{"ssl/z1", "ssl/z2": [B, out]}: the views batch["sd_global"] [B, 2, S, S, 3] through the
        image tower (train mode, the step's dropout) and the head (BatchNorm per view)."""
        views = batch.get("sd_global")
        if views is None or views.shape[1] != 2:
            raise ValueError("config key `ssl`: the batch needs SLIP's two views 'sd_global' [B, 2, S, S, 3] "
                             "(input.multi_crop, set by the trainer from config.ssl)")
        b = views.shape[0]
        flat = jnp.swapaxes(views, 0, 1).reshape(2 * b, *views.shape[2:])  # view-major
        _, _, out = model.apply({"params": params}, flat, None, train=True, rngs={"dropout": rng})
        z = self.head.apply({"params": params[PARAMS_KEY]}, out["img/pre_logits"].reshape(2, b, -1))
        return {INPUTS[0]: z[0], INPUTS[1]: z[1]}
