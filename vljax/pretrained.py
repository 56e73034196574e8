"""Pretrained tower initialisation: `config.model_init = {"img": NAME_OR_PATH, "txt": NAME_OR_PATH}`.

Names of weights that install offline (../shared/ASSETS.md) map to loaders; a path to a big_vision
ViT `.npz` (e.g. an ImageNet-21k ViT-B/16, the LiT paper's image tower) loads that ViT; a loaded tower replaces
the randomly initialised one leaf by leaf. Leaves the checkpoint lacks (a new projection head) keep
their random init and are listed; a checkpoint leaf of another shape is an error naming it.
"""
from __future__ import annotations

import re

from flax import traverse_util
from absl import logging
import jax
import numpy as np

from vljax.convert.bert import load_minilm
from vljax.convert.big_vision import load_big_vision_vit
from vljax.convert.efficientnet import load_efficientnet_lite


def _efficientnet(variant):
    def load():
        return load_efficientnet_lite(variant)[1]
    return load


def _minilm():
    return load_minilm()[1]


LOADERS = {
    "efficientnet_lite0": _efficientnet("lite0"),
    "minilm": _minilm,
}


def load_tower(spec: str):
    """Params of one tower by name (see LOADERS) or big_vision ViT `.npz` path."""
    if spec.endswith(".npz"):
        return load_big_vision_vit(spec)[1]
    if spec not in LOADERS:
        raise ValueError(f"config key `model_init`: unknown pretrained tower {spec!r} "
                         f"(known: {', '.join(sorted(LOADERS))})")
    return LOADERS[spec]()


# Numbered layers a tower may be cut to (Bert `num_layers`, EfficientNet-Lite `feature_block`), and
# what sits above the last of them and goes with the cut layers (EfficientNet's 1280-channel conv).
_LAYER = re.compile(r"^(encoderblock|blocks)_(\d+)$")
_ABOVE_LAYERS = ("top_conv",)


def lowest_layers(loaded: dict, model_tower: dict, tower: str) -> dict:
    """`loaded` (one tower's checkpoint params) cut to a model configured shallower than the
    checkpoint (STRUCTURE's chosen layer, vljax/layer_selection.py: `model.text.num_layers = k`, or
    `model.image.feature_block = i`): the checkpoint's numbered layers (`encoderblock_<i>`,
    `blocks_<i>`) above the model's highest of that name are left out, with EfficientNet's
    `top_conv` when the model has none, and logged; everything else is kept, so `write_tower` still
    refuses any other mismatch. Unchanged when the model is as deep as the checkpoint."""
    have: dict[str, int] = {}
    for key in model_tower:
        if m := _LAYER.match(key):
            have[m.group(1)] = max(have.get(m.group(1), -1), int(m.group(2)))
    cut = {key for key in loaded if (m := _LAYER.match(key)) and key not in model_tower
           and int(m.group(2)) > have.get(m.group(1), -1)}
    if cut:
        cut |= {key for key in _ABOVE_LAYERS if key in loaded and key not in model_tower}
    kept = {key: value for key, value in loaded.items() if key not in cut}
    dropped = sorted(set(loaded) - set(kept))
    if dropped:
        logging.info("pretrained %s tower: the model is shallower than the checkpoint; its layers %s "
                     "are left out", tower, dropped)
    return kept


def written_keys(loaded: dict, skip: tuple[str, ...] = ("head",)) -> list[str]:
    """The leaves ("a/b/c") of a loaded tower that `write_tower` writes (those under `skip` are not)."""
    return [k for k in traverse_util.flatten_dict(loaded, sep="/") if k.split("/")[0] not in skip]


def write_tower(params: dict, loaded: dict, tower: str, skip: tuple[str, ...] = ("head",)) -> dict:
    """Writes the `loaded` leaves (host arrays of one tower) into `params[tower]`, leaf by leaf.

    `params` are jax.Arrays, possibly sharded over devices of several processes: each loaded
    leaf is cast to its parameter's dtype and placed straight into that parameter's shards
    (`jax.make_array_from_callback`; no full copy of the state is ever made). Loaded leaves under
    a top-level name in `skip` (a checkpoint's own classifier head) are dropped: in a two-tower
    model that name holds the projection into the joint space. A loaded leaf the model lacks, or
    of another shape, is an error naming it; model leaves the file lacks keep their init. A
    `params` leaf may be a `jax.ShapeDtypeStruct` with its sharding (a param not drawn at random
    because it is written here: vljax/state_init.py); one the file lacks is an error.
    """
    flat_init = traverse_util.flatten_dict(params[tower], sep="/")
    written = set(written_keys(loaded, skip))
    flat_loaded = {k: v for k, v in traverse_util.flatten_dict(loaded, sep="/").items() if k in written}
    unknown = sorted(set(flat_loaded) - set(flat_init))
    if unknown:
        raise ValueError(f"pretrained {tower} tower has parameters the model lacks: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    for key, value in flat_loaded.items():
        if tuple(np.shape(value)) != tuple(flat_init[key].shape):
            raise ValueError(f"pretrained {tower} parameter {key}: shape {np.shape(value)} "
                             f"!= model's {tuple(flat_init[key].shape)}")
    missing = sorted(k for k, v in flat_init.items() if isinstance(v, jax.ShapeDtypeStruct) and k not in written)
    if missing:
        raise ValueError(f"pretrained {tower} tower lacks parameters left for it to write: {missing[:5]}")
    merged = dict(flat_init)
    for key in list(flat_loaded):
        target = flat_init[key]
        value = np.asarray(flat_loaded.pop(key), dtype=target.dtype)
        merged[key] = jax.make_array_from_callback(target.shape, target.sharding, lambda idx, v=value: v[idx])
    kept = kept_leaves(params[tower], traverse_util.unflatten_dict(merged, sep="/"))
    logging.info("pretrained %s tower: %d leaves loaded, kept init for %s", tower,
                 len(flat_init) - len(kept), kept)
    out = dict(params)
    out[tower] = traverse_util.unflatten_dict(merged, sep="/")
    return out


def kept_leaves(init: dict, written: dict) -> list[str]:
    """Names ("a/b/c") of the leaves of one tower that `write_tower` left at their init (the very
    same arrays in `init` and `written`)."""
    flat_init = traverse_util.flatten_dict(init, sep="/")
    flat_written = traverse_util.flatten_dict(written, sep="/")
    return sorted(k for k in flat_init if flat_written[k] is flat_init[k])
