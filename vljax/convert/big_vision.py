"""big_vision .npz checkpoints (ViT, LiT / SigLIP two towers) -> vljax.

vljax's ViT / TextTransformer use big_vision's parameter names, so loading is reading the
flattened "params/img/Transformer/encoderblock_0/..." keys back into a tree. What a big_vision
config holds but the npz does not is inferred from the shapes (width, depth, heads, mlp_dim,
patch, pooling head, classifier head); what cannot be inferred (text pooling, token ids) has
big_vision's defaults and can be overridden with the `image` / `text` dicts.

SigLIP 2: the fixed-resolution image towers are the plain ViT (a Conv patch stem); a NaFlex tower
(big_vision models/proj/image_text/naflex_vit.py: `embedding` a Dense over flattened patches,
`pos_embedding` [G, G, D]) loads into vljax.models.naflex.NaFlexViT ("naflex_vit").
"""
import os
import re

import numpy as np

from vljax.convert import check_params, check_two_towers, flatten, unflatten
from vljax.convert.hf_siglip2 import DEFAULT_MAX_NUM_PATCHES, check_naflex_two_towers
from vljax.models import ViT

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """{"img/Transformer/...": array} from a big_vision npz; a leading "params/" is dropped and
    optimizer state ("opt/...") is skipped."""
    if not os.path.exists(path):
        raise ValueError(f"big_vision checkpoint {path!r} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if any(k.startswith("params/") for k in arrays):
        arrays = {k.removeprefix("params/"): v for k, v in arrays.items()
                  if k.startswith("params/")}
    if not arrays:
        raise ValueError(f"{path}: no parameters in the npz")
    return arrays


def unscan(encoder: dict) -> dict:
    """A scanned `encoderblock` (leaves with a leading [depth] axis) -> `encoderblock_{i}`."""
    if "encoderblock" not in encoder:
        return encoder
    stacked = flatten(encoder.pop("encoderblock"))
    depths = {v.shape[0] for v in stacked.values()}
    if len(depths) != 1:
        raise ValueError(f"scanned encoderblock leaves disagree on depth: {sorted(depths)}")
    for i in range(depths.pop()):
        encoder[f"encoderblock_{i}"] = unflatten({k: v[i] for k, v in stacked.items()})
    return encoder


def _encoder_sizes(encoder: dict, where: str) -> dict:
    blocks = sorted(int(m.group(1)) for k in encoder if (m := _BLOCK.match(k)))
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"{where}: expected encoderblock_0..N-1, found {sorted(encoder)}")
    b0 = encoder["encoderblock_0"]
    try:
        q = b0["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        mlp = b0["MlpBlock_0"]["Dense_0"]["kernel"]
    except KeyError as e:
        raise ValueError(f"{where}/encoderblock_0: missing {e}") from None
    return dict(variant=None, width=q.shape[0], depth=len(blocks), num_heads=q.shape[1],
                mlp_dim=mlp.shape[1])


def _head(tree: dict) -> dict:
    if "head" not in tree:
        return dict(num_classes=0)
    return dict(num_classes=tree["head"]["kernel"].shape[-1], head_bias="bias" in tree["head"])


def vit_kwargs_from_params(img: dict, where: str = "img") -> dict:
    """ViT kwargs inferred from big_vision ViT params (modified in place: unscan, old posemb)."""
    if "Transformer" not in img or "embedding" not in img:
        raise ValueError(f"{where}: not a big_vision ViT (no 'Transformer' / 'embedding'); "
                         f"found {sorted(img)}")
    if "pre_logits" in img:
        raise ValueError(f"{where}/pre_logits: ViTs with a rep_size layer are not supported")
    unscan(img["Transformer"])
    kernel = img["embedding"]["kernel"]
    kw = _encoder_sizes(img["Transformer"], f"{where}/Transformer")
    pool = "map" if "MAPHead_0" in img else "cls" if "cls" in img else "gap"
    if "pos_embedding" in img:
        pe = img["pos_embedding"]
        # Before 2022, big_vision added the position term after prepending [cls]: fold it in.
        n = pe.shape[1]
        if "cls" in img and int(np.sqrt(n - 1)) ** 2 == n - 1:
            img["cls"] = img["cls"] + pe[:, :1]
            img["pos_embedding"] = pe[:, 1:]
    kw.update(patch_size=tuple(kernel.shape[:2]), pool_type=pool,
              posemb="learn" if "pos_embedding" in img else "sincos2d",
              patch_bias="bias" in img["embedding"], ln_pre="ln_pre" in img,
              act="gelu_tanh", ln_eps=1e-6, **_head(img))
    return kw


def is_naflex(img: dict) -> bool:
    """A NaFlex image tower: its patch stem is a Dense ([P*P*C, D]), not a Conv."""
    return np.ndim(img.get("embedding", {}).get("kernel")) == 2


def naflex_kwargs_from_params(img: dict, where: str = "img") -> dict:
    """NaFlexViT kwargs inferred from big_vision naflex_vit params (unscanned in place); the
    patch budget, which no parameter holds, is transformers' default (override `max_num_patches`).
    """
    if "Transformer" not in img or "pos_embedding" not in img:
        raise ValueError(f"{where}: not a big_vision NaFlex ViT (no 'Transformer' / "
                         f"'pos_embedding'); found {sorted(img)}")
    for extra in ("pre_logits", "patchln_pre", "patchln_post"):
        if extra in img:
            raise ValueError(f"{where}/{extra}: NaFlex ViTs with this layer are not supported")
    unscan(img["Transformer"])
    kw = _encoder_sizes(img["Transformer"], f"{where}/Transformer")
    pe = img["pos_embedding"]
    fan_in = img["embedding"]["kernel"].shape[0]
    p = int(round(np.sqrt(fan_in / 3)))
    if pe.ndim != 3 or pe.shape[0] != pe.shape[1] or 3 * p * p != fan_in:
        raise ValueError(f"{where}: pos_embedding {pe.shape} / embedding kernel "
                         f"{img['embedding']['kernel'].shape} are not a [G, G, D] grid and a "
                         "[P*P*3, D] patch stem")
    kw.update(patch_size=p, posemb_grid=pe.shape[0], max_num_patches=DEFAULT_MAX_NUM_PATCHES,
              pool_type="map" if "MAPHead_0" in img else "gap", act="gelu_tanh", ln_eps=1e-6,
              **_head(img))
    return kw


def text_kwargs_from_params(txt: dict, where: str = "txt") -> dict:
    """TextTransformer kwargs inferred from big_vision text_transformer params."""
    if "Encoder_0" not in txt or "Embed_0" not in txt:
        raise ValueError(f"{where}: not a big_vision text_transformer (no 'Encoder_0' / "
                         f"'Embed_0'); found {sorted(txt)}")
    unscan(txt["Encoder_0"])
    vocab, _ = txt["Embed_0"]["embedding"].shape
    kw = _encoder_sizes(txt["Encoder_0"], f"{where}/Encoder_0")
    # big_vision's text default pools the last position ("sticky" EOS padding).
    kw.update(vocab_size=vocab, max_len=txt["pos_embedding"].shape[1], causal=False,
              pool_type="map" if "MAPHead_0" in txt else "last", eot_id=None, pad_id=None,
              act="gelu_tanh", ln_eps=1e-6, **_head(txt))
    return kw


def _image_size(img: dict, kw: dict) -> tuple[int, int]:
    p = kw["patch_size"]
    side = int(round(np.sqrt(img["pos_embedding"].shape[1]))) if "pos_embedding" in img else 1
    return side * p[0], side * p[1]


def load_big_vision(path: str, image: dict | None = None,
                    text: dict | None = None) -> tuple[dict, dict]:
    """A big_vision two-tower npz (LiT / SigLIP / SigLIP 2 / CLIP-style) -> (TwoTowers kwargs,
    params); a NaFlex image tower gives image_model "naflex_vit".

    image / text: overrides of the inferred tower kwargs, e.g. text=dict(pool_type="first",
      pad_id=0) for a checkpoint trained with another text pooling.
    """
    tree = unflatten(read_npz(path))
    missing = [k for k in ("img", "txt", "t") if k not in tree]
    if missing:
        raise ValueError(f"{path}: not a two-tower checkpoint, missing {missing} "
                         f"(found {sorted(tree)}); use load_big_vision_vit for a plain ViT")
    naflex = is_naflex(tree["img"])
    infer = naflex_kwargs_from_params if naflex else vit_kwargs_from_params
    img_kw = {**infer(tree["img"], f"{path}:img"), **(image or {})}
    txt_kw = {**text_kwargs_from_params(tree["txt"], f"{path}:txt"), **(text or {})}
    params = {"img": tree.pop("img"), "txt": tree.pop("txt")}
    for name in ("t", "b"):
        if name in tree:
            v = np.asarray(tree.pop(name), np.float32)
            if v.size != 1:
                raise ValueError(f"{path}: key {name!r} has shape {v.shape}, expected a scalar")
            params[name] = v.reshape(())
    if tree:
        raise ValueError(f"{path}: unexpected top-level keys {sorted(tree)}")
    kwargs = dict(image_model="naflex_vit" if naflex else "vit", image=img_kw,
                  text_model="text_transformer", text=txt_kw,
                  temperature_init=float(np.exp(params["t"])))
    if "b" in params:
        kwargs["bias_init"] = float(params["b"])
    if naflex:
        check_naflex_two_towers(kwargs, params)
    else:
        check_two_towers(kwargs, params, image_size=_image_size(params["img"], img_kw))
    return kwargs, params


def load_big_vision_vit(path: str, **overrides) -> tuple[dict, dict]:
    """A big_vision ViT npz (classifier or image tower alone) -> (ViT kwargs, params)."""
    params = unflatten(read_npz(path))
    if "img" in params and "Transformer" not in params:
        raise ValueError(f"{path}: a two-tower checkpoint; use load_big_vision")
    kw = {**vit_kwargs_from_params(params, path), **overrides}
    h, w = _image_size(params, kw)
    check_params(ViT(**kw), params, np.zeros((1, h, w, 3), np.float32))
    return kw, params
