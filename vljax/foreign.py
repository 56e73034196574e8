"""Checkpoints other libraries wrote -> (model spec, params): what `factory.load` runs on them.

`read_checkpoint(path, *, tokenizer=None, max_num_patches=None) -> (spec, params)` reads
  - a transformers directory (config.json + model.safetensors + its tokenizer files):
    model_type "clip" (CLIPModel), "siglip" (SigLIP and fixed-resolution SigLIP 2) and
    "siglip2" (SigLIP 2 NaFlex);
  - a big_vision two-tower `.npz` (SigLIP, SigLIP 2 fixed-resolution or NaFlex) with its
    SentencePiece `.model` (`tokenizer=`, else the one `.model` file beside the npz).
The spec is factory's JSON-able dict (see vljax/factory.py), rebuilt from nothing else:
  "model": TwoTowers kwargs; "tokenizer": `tokenizers.from_directory` kwargs with max_len = the
  text tower's max_len (position table); "value_range": [-1, 1] for SigLIP; "logits": "sigmoid"
  for SigLIP, "softmax" for CLIP; "similarity": "global"; and the image preprocessing:
  fixed resolution: "image_size": S, "resize": "squash" (the whole image to S x S, no crop:
    transformers' SiglipImageProcessor, big_vision's `resize(S)`) with "resample":
    "bicubic" | "bilinear" (the processor's); absent "resize" = "crop" (shorter side, centre crop);
  NaFlex: "naflex": {"patch_size": P, "max_num_patches": N} (vljax.data.naflex; N also in
    model.image.max_num_patches). The budget is not a weight: `max_num_patches=` overrides the
    directory's (preprocessor_config.json) so one checkpoint serves several budgets.
Refused before the weights are read (ValueError naming the file / value): a directory with no
tokenizer, a tokenizer whose ids reach past the text tower's embedding table, a budget < 1.
"""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from vljax import tokenizers
from vljax.convert import big_vision, hf, hf_siglip2
from vljax.data.eval_transform import EvalImage

SIGLIP_VALUE_RANGE = [-1.0, 1.0]  # (x / 255 - 0.5) / 0.5: every SigLIP / SigLIP 2 processor
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # transformers' `resample` (PIL's codes)
MODEL_TYPES = ("clip", "siglip", "siglip2")


def plain(x):
    """ConfigDict / tuple / numpy / dtype values -> JSON-able plain values (the spec's form)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    return jnp.dtype(x).name  # a dtype (np.dtype, jnp.float32, ...): anything else is refused here


def is_transformers_dir(path) -> bool:
    cfg = pathlib.Path(path) / "config.json"
    if not cfg.is_file():
        return False
    raw = json.loads(cfg.read_text())
    return "model_type" in raw or "architectures" in raw


def with_budget(spec: dict, max_num_patches: int | None) -> dict:
    """The spec with its NaFlex patch budget set to `max_num_patches` (None: unchanged).
    Refuses a budget < 1 and a budget on a fixed-resolution spec, naming the value."""
    if max_num_patches is None:
        return spec
    if "naflex" not in spec:
        raise ValueError(f"max_num_patches={max_num_patches}: the model is not NaFlex (fixed "
                         f"image_size {spec.get('image_size')})")
    n = check_budget(max_num_patches)
    model = dict(spec["model"], image=dict(spec["model"]["image"], max_num_patches=n))
    return dict(spec, model=model, naflex=dict(spec["naflex"], max_num_patches=n))


def check_budget(max_num_patches) -> int:
    """The patch budget as an int; refuses one below 1, naming the value."""
    n = int(max_num_patches)
    if n < 1:
        raise ValueError(f"max_num_patches={max_num_patches}: the patch budget must allow at "
                         "least one patch")
    return n


def read_checkpoint(path, *, tokenizer=None, max_num_patches=None) -> tuple[dict, dict]:
    """A transformers CLIP / SigLIP / SigLIP 2 directory or a big_vision SigLIP npz ->
    (spec, params) (module docstring). tokenizer: a directory or `.model` file overriding the
    checkpoint's own; max_num_patches: the NaFlex patch budget (default: the checkpoint's)."""
    path = pathlib.Path(path).expanduser().resolve()
    if path.is_file() and path.suffix == ".npz":
        return _big_vision(path, tokenizer, max_num_patches)
    if not is_transformers_dir(path):
        raise ValueError(f"{path}: not a transformers directory (config.json with model_type) "
                         "nor a big_vision .npz")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not one of "
                         f"{MODEL_TYPES}")
    config = hf.load_hf_config(str(path), model_type)
    text_len = config.text_config.max_position_embeddings
    if model_type == "clip":
        tok = clip_tokenizer(path, tokenizer, text_len)
    else:
        tok = tokenizers.from_directory(tokenizer or path, text_len, family=model_type)
    check_vocab(tok, config.text_config.vocab_size, tokenizer or path)
    if max_num_patches is not None and model_type != "siglip2":
        raise ValueError(f"{path}: max_num_patches={max_num_patches} given for a {model_type} "
                         "(fixed-resolution) checkpoint")
    spec = {"tokenizer": tok, "similarity": "global", **_hf_preprocessing(path, model_type, config)}
    if "naflex" in spec and max_num_patches is not None:
        spec["naflex"]["max_num_patches"] = check_budget(max_num_patches)
    EvalImage.from_spec(spec)  # refuses a preprocessing it cannot apply, before the weights
    loader = {"clip": hf.load_hf_clip, "siglip": hf.load_hf_siglip,
              "siglip2": hf_siglip2.load_hf_siglip2}[model_type]
    kwargs, params = loader(str(path))
    spec["model"] = plain(kwargs)
    if "naflex" in spec:
        spec = with_budget(spec, spec["naflex"]["max_num_patches"])
    return spec, params


def _hf_preprocessing(path: pathlib.Path, model_type: str, config) -> dict:
    """The spec's preprocessing and scoring entries of a transformers directory."""
    image = config.vision_config
    if model_type == "clip":
        return dict(image_size=int(image.image_size), value_range="clip", logits="softmax")
    pp = _read_json(path / "preprocessor_config.json")
    if model_type == "siglip":
        return dict(image_size=int(image.image_size), resize="squash", resample=_resample(pp, path),
                    value_range=_value_range(pp, path), logits="sigmoid")
    budget = hf_siglip2.read_max_num_patches(str(path), image.patch_size)
    return dict(naflex={"patch_size": int(image.patch_size), "max_num_patches": budget},
                value_range=_value_range(pp, path), logits="sigmoid")


def check_vocab(tok_spec: dict, rows: int, where) -> None:
    """Refuses a tokenizer whose ids reach past the text tower's `rows` embeddings (they would be
    clamped silently by the embedding lookup)."""
    tok = tokenizers.get_tokenizer(**tok_spec)
    if tok.vocab_size > rows:
        raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the text "
                         f"tower's embedding table only {rows} rows: give the model's own "
                         "tokenizer")


def _big_vision(path: pathlib.Path, tokenizer, max_num_patches):
    model_file = pathlib.Path(tokenizer).expanduser() if tokenizer else _beside(path)
    with np.load(path, allow_pickle=False) as npz:
        emb = [k for k in npz.files if k.removeprefix("params/") == "txt/Embed_0/embedding"]
        if not emb:
            raise ValueError(f"{path}: no txt/Embed_0/embedding: not a two-tower checkpoint")
        rows, _ = npz[emb[0]].shape
        pos = [k for k in npz.files if k.removeprefix("params/") == "txt/pos_embedding"]
        text_len = int(npz[pos[0]].shape[1]) if pos else None
    tok = tokenizers.from_directory(model_file, text_len)
    check_vocab(tok, rows, model_file)
    if max_num_patches is not None:
        check_budget(max_num_patches)
    kwargs, params = big_vision.load_big_vision(str(path))
    spec = {"model": plain(kwargs), "tokenizer": tok, "value_range": SIGLIP_VALUE_RANGE,
            "logits": "sigmoid", "similarity": "global"}
    img = kwargs["image"]
    if kwargs["image_model"] == "naflex_vit":
        spec["naflex"] = {"patch_size": int(img["patch_size"]),
                          "max_num_patches": int(img["max_num_patches"])}
        return with_budget(spec, max_num_patches), params
    if max_num_patches is not None:
        raise ValueError(f"{path}: max_num_patches={max_num_patches} given for a fixed-resolution "
                         "image tower")
    side = int(round(np.sqrt(params["img"]["pos_embedding"].shape[1])))
    # big_vision's SigLIP evaluations: `resize(S)` (tf.image.resize, bilinear) of the whole image.
    spec.update(image_size=side * int(img["patch_size"][0]), resize="squash", resample="bilinear")
    return spec, params


def _beside(npz: pathlib.Path) -> pathlib.Path:
    """The SentencePiece model next to a big_vision npz: same stem, else the only `.model`."""
    same = npz.with_suffix(".model")
    if same.is_file():
        return same
    found = sorted(npz.parent.glob("*.model"))
    if len(found) != 1:
        raise ValueError(f"{npz}: no tokenizer: give tokenizer=<the SentencePiece .model> "
                         f"(found {len(found)} .model files beside it: "
                         f"{[f.name for f in found]})")
    return found[0]


def clip_tokenizer(path, tokenizer, max_len) -> dict:
    """A CLIP directory's own vocabulary (tokenizer.json, or vocab.json + merges.txt), else
    OpenAI's, which every CLIP uses (kind "clip": open_clip's cleaning and padding)."""
    root = pathlib.Path(tokenizer or path)
    if (root / "tokenizer.json").exists():
        return dict(kind="clip", max_len=max_len, tokenizer_file=str(root / "tokenizer.json"))
    if (root / "vocab.json").exists() and (root / "merges.txt").exists():
        return dict(kind="clip", max_len=max_len, vocab=str(root / "vocab.json"),
                    merges=str(root / "merges.txt"))
    return dict(kind="clip", max_len=max_len)


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _resample(pp: dict, where) -> str:
    code = pp.get("resample", 3)
    if code not in PIL_RESAMPLE:
        raise ValueError(f"{where}/preprocessor_config.json: resample={code} is not bilinear (2) "
                         "or bicubic (3)")
    return PIL_RESAMPLE[code]


def _value_range(pp: dict, where) -> list[float]:
    """[lo, hi] of the processor's (x * rescale_factor - mean) / std with one mean / std for
    every channel (SigLIP's 0.5 / 0.5: [-1, 1])."""
    mean, std = pp.get("image_mean", [0.5] * 3), pp.get("image_std", [0.5] * 3)
    mean = [mean] * 3 if np.isscalar(mean) else mean
    std = [std] * 3 if np.isscalar(std) else std
    if len(set(mean)) != 1 or len(set(std)) != 1 or abs(pp.get("rescale_factor", 1 / 255)
                                                        - 1 / 255) > 1e-9:
        raise ValueError(f"{where}/preprocessor_config.json: image_mean {mean} / image_std {std} "
                         "/ rescale_factor differ per channel or from 1/255: no value range")
    lo, hi = (0 - mean[0]) / std[0], (1 - mean[0]) / std[0]
    return [float(lo), float(hi)]
