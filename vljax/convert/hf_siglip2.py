"""transformers SigLIP 2 NaFlex directories (model_type "siglip2", `Siglip2Model`) <-> vljax.

The towers: vljax.models.naflex.NaFlexViT (image, "naflex_vit") and the SigLIP text tower.
Fixed-resolution SigLIP 2 checkpoints (google/siglip2-*-patch16-224 and the like) are
`model_type: "siglip"` SiglipModel directories with SigLIP's layout: vljax.convert.hf.load_hf_siglip
reads them into the plain ViT.

The key table is SigLIP's (vljax.convert.hf.siglip_rows) with the patch embedding a Linear over
flattened patches ([D, P*P*C] <-> Dense kernel [P*P*C, D]) and the position embedding
[G*G, D] <-> `pos_embedding` [G, G, D] (big_vision's NaFlex layout). The patch budget is not in
config.json: it is the image processor's `max_num_patches` (preprocessor_config.json, default 256).
"""
import json
import os

import numpy as np

from vljax.convert import StateDict, check_params, unflatten
from vljax.convert.hf import (Row, act_from_hf, apply_rows, linear_rows, load_hf_config,
                              pop_scalar, read_safetensors_dir, siglip_model_kwargs, siglip_rows,
                              split_in_proj)
from vljax.models import TwoTowers
from vljax.models.naflex import example_input

# transformers' Siglip2ImageProcessor default when a directory has no preprocessor_config.json.
DEFAULT_MAX_NUM_PATCHES = 256


def grid_side(num_patches: int, where: str) -> int:
    side = int(round(np.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"{where}: num_patches={num_patches} is not a square grid of position "
                         "embeddings")
    return side


def read_max_num_patches(path: str, patch_size: int) -> int:
    """The patch budget of path/preprocessor_config.json (its patch_size must agree), or 256."""
    f = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(f):
        return DEFAULT_MAX_NUM_PATCHES
    with open(f) as fh:
        pp = json.load(fh)
    if pp.get("patch_size", patch_size) != patch_size:
        raise ValueError(f"{f}: patch_size {pp['patch_size']} differs from config.json's "
                         f"vision_config.patch_size {patch_size}")
    n = int(pp.get("max_num_patches", DEFAULT_MAX_NUM_PATCHES))
    if n < 1:
        raise ValueError(f"{f}: max_num_patches={n} allows no patch")
    return n


def siglip2_model_kwargs(config, max_num_patches: int = DEFAULT_MAX_NUM_PATCHES) -> dict:
    """TwoTowers kwargs for a transformers Siglip2Config (text tower as SigLIP's)."""
    v = config.vision_config
    kwargs = siglip_model_kwargs(config)
    image = dict(variant=None, width=v.hidden_size, depth=v.num_hidden_layers,
                 mlp_dim=v.intermediate_size, num_heads=v.num_attention_heads,
                 patch_size=v.patch_size, posemb_grid=grid_side(v.num_patches, "vision_config"),
                 max_num_patches=max_num_patches, num_channels=v.num_channels, pool_type="map",
                 num_classes=0, act=act_from_hf(v.hidden_act, "vision_config"),
                 ln_eps=v.layer_norm_eps)
    return dict(kwargs, image_model="naflex_vit", image=image)


def _grid(x):
    g = grid_side(x.shape[0], "vision_model.embeddings.position_embedding.weight")
    return x.reshape(g, g, x.shape[1])


def _flat_grid(x):
    return x.reshape(-1, x.shape[-1])


def siglip2_rows(config) -> list[Row]:
    """Every Siglip2Model tensor except the logit scale / bias."""
    rows = linear_rows("vision_model.embeddings.patch_embedding", "img/embedding")
    rows.append(("vision_model.embeddings.position_embedding.weight", "img/pos_embedding",
                 _grid, _flat_grid))
    return rows + [r for r in siglip_rows(config)
                   if not (r[1].startswith("img/embedding/") or r[1] == "img/pos_embedding")]


def load_hf_siglip2(path: str) -> tuple[dict, dict]:
    """A transformers Siglip2Model directory -> (TwoTowers kwargs, params).

    kwargs["image"]["max_num_patches"] is the directory's patch budget and
    kwargs["image"]["patch_size"] its patch size (what vljax.data.naflex needs)."""
    config = load_hf_config(path, "siglip2")
    sd = StateDict(read_safetensors_dir(path), source=path, ignore=("position_ids",))
    split_in_proj(sd, "vision_model.head.attention")
    flat = apply_rows(sd, siglip2_rows(config))
    flat["t"] = pop_scalar(sd, "logit_scale")
    flat["b"] = pop_scalar(sd, "logit_bias")
    sd.finish()
    budget = read_max_num_patches(path, config.vision_config.patch_size)
    kwargs = siglip2_model_kwargs(config, budget)
    kwargs["temperature_init"] = float(np.exp(flat["t"]))
    kwargs["bias_init"] = float(flat["b"])
    params = unflatten(flat)
    check_naflex_two_towers(kwargs, params)
    return kwargs, params


def check_naflex_two_towers(kwargs: dict, params: dict) -> None:
    """vljax.convert.check_two_towers for a NaFlex image tower (abstract inputs of its budget)."""
    texts = None
    if "txt" in params:
        texts = np.zeros((1, kwargs["text"].get("max_len", 64)), np.int32)
    check_params(TwoTowers(**kwargs), params, example_input(kwargs["image"]), texts)
