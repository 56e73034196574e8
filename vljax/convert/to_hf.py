"""vljax TwoTowers -> a transformers CLIPModel / SiglipModel / Siglip2Model directory (config.json +
safetensors; a Siglip2Model directory also gets the preprocessor_config.json of its patch budget).

Uses the key tables of vljax.convert.hf in reverse. Only models that transformers can express
are exported; anything else (sincos position embeddings, registers, gap pooling, a bidirectional
CLIP text tower, ...) is refused with the option that has no equivalent.
"""
import dataclasses
import os
from collections.abc import Mapping

import numpy as np
import transformers
from safetensors.numpy import save_file

from vljax.convert import flatten
from vljax.convert.hf import VLJAX_TO_HF_ACT, clip_rows, siglip_rows
from vljax.convert.hf_siglip2 import siglip2_rows
from vljax.models import TextTransformer, ViT
from vljax.models.naflex import NaFlexViT

ARCHS = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}


def _require(ok: bool, arch: str, what: str):
    if not ok:
        raise ValueError(f"Cannot export as transformers {arch!r}: {what}")


def _fields(module) -> dict:
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)}


def _resolved(model_kwargs: Mapping, image_model: str = "vit") -> tuple[dict, dict, dict, dict]:
    """Tower kwargs with every default filled in, plus their resolved sizes."""
    if model_kwargs.get("image_model", "vit") != image_model or \
            model_kwargs.get("text_model", "text_transformer") != "text_transformer":
        raise ValueError(f"Cannot export to transformers: only the {image_model!r} + "
                         "'text_transformer' towers have an equivalent here, got "
                         f"{model_kwargs.get('image_model')!r} + "
                         f"{model_kwargs.get('text_model')!r}")
    image_cls = {"vit": ViT, "naflex_vit": NaFlexViT}[image_model]
    vit = image_cls(**model_kwargs.get("image", {}))
    txt = TextTransformer(**model_kwargs.get("text", {}))
    return _fields(vit), vit.config(), _fields(txt), txt.config()


def _hf_act(act: str, arch: str) -> str:
    _require(act in VLJAX_TO_HF_ACT, arch, f"activation {act!r}")
    return VLJAX_TO_HF_ACT[act]


def _sizes(c: dict) -> dict:
    return dict(hidden_size=c["width"], num_hidden_layers=c["depth"],
                intermediate_size=c["mlp_dim"], num_attention_heads=c["num_heads"])


def _check_common(v: dict, vc: dict, t: dict, arch: str):
    _require(v["posemb"] == "learn", arch, f"image posemb={v['posemb']!r} (needs 'learn')")
    _require(v["num_registers"] == 0, arch, "register tokens")
    _require(vc["patch_size"][0] == vc["patch_size"][1], arch,
             f"non-square patches {vc['patch_size']}")
    _require(not v["scan"] and not t["scan"], arch,
             "scan=True parameters (unstack them: export a scan=False model)")


def _image_size(params: Mapping, patch: int) -> int:
    n = np.shape(params["img"]["pos_embedding"])[1]
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"Cannot export: img/pos_embedding has {n} positions, not a square grid")
    return side * patch


def clip_config(model_kwargs: Mapping, params: Mapping):
    arch = "clip"
    v, vc, t, tc = _resolved(model_kwargs)
    _check_common(v, vc, t, arch)
    _require(v["pool_type"] == "cls" and v["ln_pre"] and not v["patch_bias"], arch,
             "the image tower needs pool_type='cls', ln_pre=True, patch_bias=False")
    _require(t["causal"] and t["pool_type"] in ("eot", "argmax"), arch,
             "the text tower needs causal=True and pool_type 'eot' or 'argmax'")
    _require(v["num_classes"] > 0 and v["num_classes"] == t["num_classes"] and
             not v["head_bias"] and not t["head_bias"], arch,
             "both towers need bias-free heads (num_classes > 0) of the same size")
    _require(model_kwargs.get("bias_init") is None and "b" not in params, arch,
             "CLIP has no logit bias")
    # HF CLIP pools at argmax(ids) exactly when eos_token_id == 2 (its legacy rule).
    eos = 2 if t["pool_type"] == "argmax" else t["eot_id"]
    _require(t["pool_type"] == "argmax" or eos != 2, arch,
             "eot_id=2 would switch transformers to argmax pooling")
    text = dict(**_sizes(tc), vocab_size=t["vocab_size"], max_position_embeddings=t["max_len"],
                hidden_act=_hf_act(t["act"], arch), layer_norm_eps=t["ln_eps"],
                eos_token_id=eos, pad_token_id=t["pad_id"] if t["pad_id"] is not None else 1,
                projection_dim=t["num_classes"])
    vision = dict(**_sizes(vc), patch_size=vc["patch_size"][0],
                  image_size=_image_size(params, vc["patch_size"][0]),
                  hidden_act=_hf_act(v["act"], arch), layer_norm_eps=v["ln_eps"],
                  projection_dim=v["num_classes"])
    logit_scale = float(np.asarray(params["t"]))
    return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=v["num_classes"],
                                   logit_scale_init_value=logit_scale)


def siglip_config(model_kwargs: Mapping, params: Mapping):
    arch = "siglip"
    v, vc, t, tc = _resolved(model_kwargs)
    _check_common(v, vc, t, arch)
    _require(v["pool_type"] == "map" and not v["ln_pre"] and v["patch_bias"] and
             v["num_classes"] == 0, arch,
             "the image tower needs pool_type='map', ln_pre=False, patch_bias=True, no head")
    text = _siglip_text(t, tc, vc, arch)
    vision = dict(**_sizes(vc), patch_size=vc["patch_size"][0],
                  image_size=_image_size(params, vc["patch_size"][0]),
                  hidden_act=_hf_act(v["act"], arch), layer_norm_eps=v["ln_eps"])
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def _siglip_text(t: dict, tc: dict, vc: dict, arch: str) -> dict:
    """The text_config of SigLIP and SigLIP 2 (the same text tower)."""
    _require(not t["causal"] and t["pool_type"] == "last", arch,
             "the text tower needs causal=False and pool_type='last'")
    _require(t["num_classes"] == vc["width"] and t["head_bias"], arch,
             "the text head needs a bias and num_classes equal to the image width")
    return dict(**_sizes(tc), vocab_size=t["vocab_size"], max_position_embeddings=t["max_len"],
                hidden_act=_hf_act(t["act"], arch), layer_norm_eps=t["ln_eps"],
                projection_size=t["num_classes"],
                pad_token_id=t["pad_id"] if t["pad_id"] is not None else 1,
                eos_token_id=t["eot_id"] if t["eot_id"] is not None else 1)


def siglip2_config(model_kwargs: Mapping, params: Mapping):
    """Siglip2Config of a NaFlexViT + SigLIP text tower model."""
    arch = "siglip2"
    v, vc, t, tc = _resolved(model_kwargs, image_model="naflex_vit")
    _require(not v["scan"] and not t["scan"], arch,
             "scan=True parameters (unstack them: export a scan=False model)")
    _require(v["pool_type"] == "map" and v["num_classes"] == 0, arch,
             "the image tower needs pool_type='map' and no head")
    g = v["posemb_grid"]
    _require(np.shape(params["img"]["pos_embedding"]) == (g, g, vc["width"]), arch,
             f"img/pos_embedding {np.shape(params['img']['pos_embedding'])} is not the "
             f"[{g}, {g}, {vc['width']}] grid of posemb_grid={g}")
    text = _siglip_text(t, tc, vc, arch)
    vision = dict(**_sizes(vc), patch_size=vc["patch_size"], num_patches=g * g,
                  num_channels=v["num_channels"], hidden_act=_hf_act(v["act"], arch),
                  layer_norm_eps=v["ln_eps"])
    return transformers.Siglip2Config(text_config=text, vision_config=vision)


def _invert(flat: dict, rows, arch: str) -> dict:
    hf = {}
    for hf_key, our_key, _, to_hf in rows:
        if our_key not in flat:
            raise ValueError(f"Cannot export as {arch!r}: parameter {our_key!r} is missing")
        hf[hf_key] = np.ascontiguousarray(to_hf(np.asarray(flat.pop(our_key), np.float32)))
    return hf


def export_hf(model_kwargs: Mapping, params: Mapping, out_dir: str, arch: str = "clip") -> None:
    """Writes out_dir/config.json + out_dir/model.safetensors for transformers' CLIPModel
    (arch="clip"), SiglipModel (arch="siglip", also fixed-resolution SigLIP 2) or Siglip2Model
    (arch="siglip2", a "naflex_vit" image tower; also out_dir/preprocessor_config.json with its
    patch_size and max_num_patches); load them with `<Model>.from_pretrained`.

    model_kwargs: TwoTowers kwargs; params: its parameter tree {"img", "txt", "t"[, "b"]}.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown export arch {arch!r}: transformers equivalents exist for "
                         + ", ".join(f"{a!r} ({m})" for a, m in ARCHS.items()))
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    if arch == "clip":
        config = clip_config(model_kwargs, params)
        hf = _invert(flat, clip_rows(config), arch)
        cls, pe = flat.pop("img/cls"), flat.pop("img/pos_embedding")
        # vljax's cls already carries CLIP's class position term: that row becomes zero.
        hf["vision_model.embeddings.class_embedding"] = np.asarray(cls, np.float32).reshape(-1)
        hf["vision_model.embeddings.position_embedding.weight"] = np.concatenate(
            [np.zeros_like(pe[0, :1]), pe[0]]).astype(np.float32)
        hf["logit_scale"] = np.asarray(flat.pop("t"), np.float32).reshape(())
    else:
        if arch == "siglip":
            config = siglip_config(model_kwargs, params)
            hf = _invert(flat, siglip_rows(config), arch)
        else:
            config = siglip2_config(model_kwargs, params)
            hf = _invert(flat, siglip2_rows(config), arch)
        head = "vision_model.head.attention"
        hf[f"{head}.in_proj_weight"] = np.concatenate(
            [hf.pop(f"{head}.{n}_proj.weight") for n in "qkv"])
        hf[f"{head}.in_proj_bias"] = np.concatenate(
            [hf.pop(f"{head}.{n}_proj.bias") for n in "qkv"])
        hf["logit_scale"] = np.asarray(flat.pop("t"), np.float32).reshape(1)
        hf["logit_bias"] = np.asarray(flat.pop("b", 0.0), np.float32).reshape(1)
    if flat:
        raise ValueError(f"Cannot export as {arch!r}: parameters with no transformers "
                         f"equivalent: {sorted(flat)}")
    os.makedirs(out_dir, exist_ok=True)
    config.architectures = [ARCHS[arch]]
    config.save_pretrained(out_dir)
    if arch == "siglip2":
        image = NaFlexViT(**model_kwargs.get("image", {}))
        transformers.Siglip2ImageProcessor(
            patch_size=image.config()["patch_size"],
            max_num_patches=image.max_num_patches).save_pretrained(out_dir)
    save_file(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
