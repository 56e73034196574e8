"""open_clip ViT CLIP state dicts -> vljax TwoTowers.

Covers open_clip's standard `CLIP` model (VisionTransformer + TextTransformer: fused in_proj
attention, ln_pre / ln_post, `proj` / `text_projection` matrices, causal text mask, logit_scale
and the optional logit_bias). Architecture options are not in the state dict: they come from the
open_clip model config (the JSON of open_clip/model_configs), given as a dict, a .json path or a
config name such as "ViT-B-32-quickgelu".
"""
import importlib.util
import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load_file

from vljax.convert import StateDict, check_two_towers, unflatten
from vljax.convert.hf import (
    Row, apply_rows, attention_rows, fold_cls_posemb, layer_norm_rows, linear_rows, patch_rows,
    pop_scalar, split_in_proj)
from vljax.convert.torch_pickle import load_torch_pickle

# open_clip config options vljax reproduces; any other value for these keys is refused.
_VISION_DEFAULTS = dict(head_width=64, mlp_ratio=4.0, ls_init_value=None, attentional_pool=False,
                        no_ln_pre=False, pos_embed_type="learnable", pool_type="tok",
                        act_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                        scale_heads=False, scale_attn_inner=False, scale_attn=False,
                        scale_fc=False, timm_model_name=None)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                      mlp_ratio=4.0, ls_init_value=None, embed_cls=False, pad_id=0, eos_id=2,
                      no_causal_mask=False, pool_type="argmax", proj_bias=False,
                      proj_type="linear", act_kwargs=None, block_type=None, qk_norm=False,
                      scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                      scale_attn=False, scale_fc=False, hf_model_name=None)
# Options that change nothing in inference (or only what open_clip returns).
_HARMLESS = {"image_size", "layers", "width", "patch_size", "patch_dropout", "output_tokens",
             "final_ln_after_pool", "norm_kwargs", "attn_pooler_queries", "attn_pooler_heads",
             "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
             "timm_drop_path", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
             "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_SUPPORTED = {"vision": {"head_width", "mlp_ratio", "no_ln_pre", "pool_type"},
              "text": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                       "pad_id", "eos_id", "no_causal_mask", "pool_type", "proj_bias",
                       "proj_type"}}
_TEXT_POOLS = {"argmax": "argmax", "eos": "eot", "first": "first", "last": "last"}


def read_open_clip_config(model_cfg: str | Mapping) -> dict:
    """A config dict, a path to a .json, or the name of a config shipped with open_clip."""
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    path = model_cfg
    if not os.path.exists(path):
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"open_clip config {model_cfg!r}: no such file, and open_clip is "
                             "not installed to look it up by name")
        path = os.path.join(spec.submodule_search_locations[0], "model_configs", f"{path}.json")
        if not os.path.exists(path):
            raise ValueError(f"open_clip config {model_cfg!r}: no such file or config name")
    with open(path) as f:
        return json.load(f)


def _check_options(cfg: Mapping, defaults: dict, tower: str):
    for key, value in cfg.items():
        if key in _HARMLESS or key in _SUPPORTED[tower]:
            continue
        if key not in defaults:
            raise ValueError(f"open_clip {tower}_cfg option {key!r} is unknown to this converter")
        if value != defaults[key]:
            raise ValueError(f"open_clip {tower}_cfg {key}={value!r} is not supported "
                             f"(only {defaults[key]!r}): this is not a standard ViT CLIP")


def _ln_eps(cfg: Mapping) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))   # torch LayerNorm default


def open_clip_model_kwargs(model_cfg: str | Mapping, quick_gelu: bool | None = None) -> dict:
    """TwoTowers kwargs for an open_clip ViT CLIP config.

    quick_gelu: overrides the config's `quick_gelu` (OpenAI-pretrained weights need True; open_clip
      marks this with the '-quickgelu' config names).
    """
    cfg = read_open_clip_config(model_cfg)
    unknown = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                          "init_logit_bias", "custom_text",
                          "cast_dtype"}
    if unknown:
        raise ValueError(f"open_clip config keys {sorted(unknown)} are not supported "
                         "(only the standard ViT CLIP: embed_dim, vision_cfg, text_cfg, "
                         "quick_gelu)")
    v = {**_VISION_DEFAULTS, "layers": 12, "width": 768, "patch_size": 16, "image_size": 224,
         **cfg["vision_cfg"]}
    t = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
    _check_options(cfg["vision_cfg"], _VISION_DEFAULTS, "vision")
    _check_options(cfg["text_cfg"], _TEXT_DEFAULTS, "text")
    if not isinstance(v["layers"], int):
        raise ValueError(f"open_clip vision_cfg layers={v['layers']!r} is a ResNet: not supported")
    if v["pool_type"] != "tok":
        raise ValueError(f"open_clip vision_cfg pool_type={v['pool_type']!r}: only 'tok' is "
                         "supported")
    if t["pool_type"] not in _TEXT_POOLS or t["proj_type"] not in ("linear", "none"):
        raise ValueError(f"open_clip text_cfg pool_type={t['pool_type']!r} / proj_type="
                         f"{t['proj_type']!r}: supported {sorted(_TEXT_POOLS)} / linear, none")
    act = "quick_gelu" if (cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu) \
        else "gelu"
    embed_dim = cfg["embed_dim"]
    image = dict(variant=None, width=v["width"], depth=v["layers"],
                 mlp_dim=int(v["width"] * v["mlp_ratio"]), num_heads=v["width"] // v["head_width"],
                 patch_size=v["patch_size"], pool_type="cls", posemb="learn",
                 ln_pre=not v["no_ln_pre"], patch_bias=False, num_classes=embed_dim,
                 head_bias=False, act=act, ln_eps=_ln_eps(v))
    text = dict(variant=None, width=t["width"], depth=t["layers"],
                mlp_dim=int(t["width"] * t["mlp_ratio"]), num_heads=t["heads"],
                vocab_size=t["vocab_size"], max_len=t["context_length"],
                causal=not t["no_causal_mask"], pool_type=_TEXT_POOLS[t["pool_type"]],
                eot_id=t["eos_id"], pad_id=t["pad_id"],
                num_classes=embed_dim if t["proj_type"] == "linear" else 0,
                head_bias=t["proj_bias"], act=act, ln_eps=_ln_eps(t))
    return dict(image_model="vit", image=image, text_model="text_transformer", text=text)


def _resblock_rows(hf: str, ours: str, depth: int, width: int, heads: int) -> list[Row]:
    rows = []
    for i in range(depth):
        h, o = f"{hf}.resblocks.{i}", f"{ours}/encoderblock_{i}"
        rows += layer_norm_rows(f"{h}.ln_1", f"{o}/LayerNorm_0")
        rows += attention_rows(f"{h}.attn", f"{o}/MultiHeadDotProductAttention_0", width, heads)
        rows += layer_norm_rows(f"{h}.ln_2", f"{o}/LayerNorm_1")
        rows += linear_rows(f"{h}.mlp.c_fc", f"{o}/MlpBlock_0/Dense_0")
        rows += linear_rows(f"{h}.mlp.c_proj", f"{o}/MlpBlock_0/Dense_1")
    return rows


def _same(x):
    return x


def convert_open_clip_state_dict(state_dict: Mapping[str, np.ndarray],
                                 model_cfg: str | Mapping, quick_gelu: bool | None = None,
                                 source: str = "open_clip state dict") -> tuple[dict, dict]:
    """An open_clip CLIP state dict ({name: array}) -> (TwoTowers kwargs, params)."""
    kwargs = open_clip_model_kwargs(model_cfg, quick_gelu)
    img, txt = kwargs["image"], kwargs["text"]
    # DDP training checkpoints prefix every key with "module.".
    arrays = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}
    if any(k.startswith(("visual.trunk.", "text.transformer.embeddings.")) for k in arrays):
        raise ValueError(f"{source}: timm / HF towers (visual.trunk.*, text.transformer."
                         "embeddings.*) are not supported, only open_clip's own ViT CLIP")
    if "text.token_embedding.weight" in arrays:   # CustomTextCLIP nests the text tower in `text.`
        arrays = {k.removeprefix("text."): v for k, v in arrays.items()}
    sd = StateDict(arrays, source=source, ignore=("attn_mask",))
    for tower, depth in (("visual.transformer", img["depth"]), ("transformer", txt["depth"])):
        for i in range(depth):
            split_in_proj(sd, f"{tower}.resblocks.{i}.attn")

    rows = patch_rows("visual.conv1", "img/embedding", bias=False)
    if img["ln_pre"]:
        rows += layer_norm_rows("visual.ln_pre", "img/ln_pre")
    rows += _resblock_rows("visual.transformer", "img/Transformer", img["depth"], img["width"],
                           img["num_heads"])
    rows += layer_norm_rows("visual.ln_post", "img/Transformer/encoder_norm")
    # open_clip's projections are [D, E] matrices applied as x @ proj: already a flax kernel.
    rows.append(("visual.proj", "img/head/kernel", _same, _same))
    rows.append(("token_embedding.weight", "txt/Embed_0/embedding", _same, _same))
    rows.append(("positional_embedding", "txt/pos_embedding", lambda x: x[None], lambda x: x[0]))
    rows += _resblock_rows("transformer", "txt/Encoder_0", txt["depth"], txt["width"],
                           txt["num_heads"])
    rows += layer_norm_rows("ln_final", "txt/Encoder_0/encoder_norm")
    if txt["num_classes"]:
        rows += (linear_rows("text_projection", "txt/head") if txt["head_bias"]
                 else [("text_projection", "txt/head/kernel", _same, _same)])
    flat = apply_rows(sd, rows)
    flat["img/cls"], flat["img/pos_embedding"] = fold_cls_posemb(
        sd.pop("visual.class_embedding"), sd.pop("visual.positional_embedding"), source)
    flat["t"] = pop_scalar(sd, "logit_scale")
    kwargs["temperature_init"] = float(np.exp(flat["t"]))
    if "logit_bias" in sd:
        flat["b"] = pop_scalar(sd, "logit_bias")
        kwargs["bias_init"] = float(flat["b"])
    sd.finish()
    params = unflatten(flat)
    check_two_towers(kwargs, params)
    return kwargs, params


def load_open_clip(path: str, model_cfg: str | Mapping,
                   quick_gelu: bool | None = None) -> tuple[dict, dict]:
    """An open_clip checkpoint file -> (TwoTowers kwargs, params).

    path: .safetensors (read without torch), or a legacy torch pickle (.pt / .pth / .bin, read by
      vljax.convert.torch_pickle's restricted unpickler, never plain pickle).
    model_cfg: the open_clip model config (dict, .json path, or name like "ViT-B-32").
    """
    if not os.path.exists(path):
        raise ValueError(f"open_clip checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        state_dict = load_file(path)
    else:
        state_dict = load_torch_pickle(path)
        # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
        if any(k.startswith("state_dict.") for k in state_dict):
            state_dict = {k.removeprefix("state_dict."): v for k, v in state_dict.items()
                          if k.startswith("state_dict.")}
    return convert_open_clip_state_dict(state_dict, model_cfg, quick_gelu, source=path)
