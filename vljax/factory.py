"""One model bundle: the model, its tokenizer and its image preprocessing, built from one spec.

The trainer writes the spec (`model_spec.json`) into every workdir; inference, evaluation and
soups rebuild the model from it and restore only the params of a checkpoint (no optimizer, no
training config needed), or load a transformers CLIP directory instead:

    bundle = factory.load("/tmp/vljax_lit")            # a workdir: its latest checkpoint
    bundle = factory.load("hf_clip_dir/")              # config.json + model.safetensors
    zimg, ztxt, out = bundle.model.apply({"params": bundle.params}, images, bundle.tokenizer(texts))

The spec (a JSON-able dict):

    {"model": TwoTowers kwargs (tower dtypes as strings), "tokenizer": get_tokenizer kwargs,
     "image_size": 112, "value_range": "efficientnet" | [lo, hi] | "clip" | ...,
     "logits": "softmax" | "sigmoid",
     "similarity": "global" | "filip"}    # how evaluators score by default: the trained loss's
                                          # (a FILIP model by late interaction); absent = "global"
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vljax import checkpoints, objective, stages, tokenizers
from vljax.convert import hf
from vljax.data.preprocess import canonical_value_range, eval_image
from vljax.models.two_towers import TwoTowers
from vljax.models.vit import ViT

SPEC_FILE = "model_spec.json"


def _plain(x):
    """ConfigDict / tuple / dtype values -> JSON-able plain values."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    return jnp.dtype(x).name  # a dtype (np.dtype, jnp.float32, ...): anything else is refused here


def spec_from_config(config) -> dict:
    """The model spec of a training config (`config.model`, `tokenizer`, `input`, `dtype`, `remat`)."""
    model = _plain(config.model)
    for tower in ("image", "text"):
        model[tower] = dict(model.get(tower) or {})
        model[tower].setdefault("dtype", str(config.get("dtype", "float32")))
        if config.get("remat", False):
            model[tower].setdefault("remat", True)
    if model.get("image_model") == "vit" and config.get("stages"):
        # Training stages at a lower resolution (vljax/stages.py): the learned position embedding
        # lives at the final resolution's grid and is resampled for the smaller stages.
        if stages.changes_image_size(config) and model["image"].get("posemb", "learn") == "learn":
            p = ViT(**{k: v for k, v in model["image"].items() if k != "dtype"}).config()["patch_size"]
            size = int(config.input.image_size)
            model["image"].setdefault("posemb_grid", [size // p[0], size // p[1]])
    value_range = _plain(config.input.get("value_range", "efficientnet"))
    return {"model": model, "tokenizer": _plain(config.tokenizer),
            "image_size": int(config.input.image_size), "value_range": value_range,
            **objective.inference_spec(config.loss)}  # "logits", "similarity": the trained loss's


def build_model(spec: dict) -> TwoTowers:
    kw = dict(spec["model"])
    for tower in ("image", "text"):
        kw[tower] = dict(kw.get(tower) or {})
        if "dtype" in kw[tower]:
            kw[tower]["dtype"] = jnp.dtype(kw[tower]["dtype"])
    return TwoTowers(**kw)


def build_tokenizer(spec: dict):
    kw = dict(spec["tokenizer"])
    return tokenizers.get_tokenizer(kw.pop("kind"), **kw)


def value_range(spec: dict):
    """The spec's value range as preprocessing takes it (`preprocess.canonical_value_range`)."""
    return canonical_value_range(spec.get("value_range", "efficientnet"))


def write_spec(workdir, spec: dict) -> None:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def read_spec(workdir) -> dict:
    """The workdir's model spec; workdirs written before the spec existed: from config.json."""
    path = epath.Path(workdir)
    if (path / SPEC_FILE).exists():
        return json.loads((path / SPEC_FILE).read_text())
    if (path / "config.json").exists():
        return spec_from_config(ml_collections.ConfigDict(json.loads((path / "config.json").read_text())))
    raise FileNotFoundError(f"{path}: no {SPEC_FILE} (and no config.json): not a vljax workdir")


def abstract_params(model: TwoTowers, spec: dict):
    """The params' structure, shapes and dtypes, without computing anything."""
    s = spec["image_size"]
    images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    texts = jax.ShapeDtypeStruct((1, spec["tokenizer"]["max_len"]), jnp.int32)
    return jax.eval_shape(lambda r, x, y: model.init(r, x, y)["params"], jax.random.key(0), images, texts)


@dataclasses.dataclass
class Bundle:
    """A model ready to use: `model.apply({"params": params}, images, texts)`; `tokenizer(texts)`
    gives int32 [N, L] ids; images are preprocessed by `preprocess` (shorter side to
    `image_size`, centre crop, `value_range`)."""
    model: TwoTowers
    params: Any
    tokenizer: Any
    spec: dict

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def value_range(self):
        return value_range(self.spec)

    @property
    def sigmoid(self) -> bool:
        return self.spec.get("logits") == "sigmoid"

    @property
    def similarity(self) -> str:
        return self.spec.get("similarity", "global")

    def preprocess(self, image) -> np.ndarray:
        """One image (path, bytes, PIL image or uint8 array, any mode and size) -> f32 [S, S, 3]
        (`preprocess.eval_image`). Raises ValueError (`transforms.UnreadableImage`) naming the
        image and the reason when it cannot be read."""
        return eval_image(image, self.image_size, self.value_range)


def load(path, *, step: int | None = None, shardings=None) -> Bundle:
    """A vljax workdir (params of its latest checkpoint, or of `step`) or a transformers
    CLIP / SigLIP directory. `shardings`: a pytree of shardings for the params (default: host
    numpy arrays). Nothing of the optimizer is read."""
    path = epath.Path(path).expanduser()
    cfg = path / "config.json"
    if (path / SPEC_FILE).exists() or (cfg.exists() and not _is_transformers(cfg)):
        spec = read_spec(path)
        model = build_model(spec)
        params = restore_params(path, model, spec, step=step, shardings=shardings)
        return Bundle(model, params, build_tokenizer(spec), spec)
    if cfg.exists():
        return _load_transformers(path, json.loads(cfg.read_text()))
    raise FileNotFoundError(f"{path}: neither a vljax workdir ({SPEC_FILE} + checkpoints/) nor a "
                            "transformers directory (config.json + model.safetensors)")


def restore_params(workdir, model, spec, *, step=None, shardings=None, subdir: str = "checkpoints"):
    """Only the params item of a checkpoint in `workdir/subdir`, as host numpy (or on `shardings`)."""
    abstract = abstract_params(model, spec)
    if shardings is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
        host = True
    else:
        host = False
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with checkpoints.Checkpointer(epath.Path(workdir) / subdir) as ckpt:
        params = ckpt.restore_params(step, target)
    return jax.tree.map(np.asarray, params) if host else params


def _is_transformers(cfg_path) -> bool:
    raw = json.loads(epath.Path(cfg_path).read_text())
    return "model_type" in raw or "architectures" in raw


def _load_transformers(path, raw) -> Bundle:
    kind = raw.get("model_type", "")
    if kind == "clip":
        kwargs, params = hf.load_hf_clip(str(path))
        tok_kw = dict(kind="clip", max_len=kwargs["text"].get("max_len", 77), **_hf_vocab(path))
        tok = build_tokenizer({"tokenizer": tok_kw})
        if tok.vocab_size > kwargs["text"]["vocab_size"]:  # ids past the table would be clamped silently
            raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the text tower "
                             f"only {kwargs['text']['vocab_size']}; save the model's tokenizer beside it "
                             "(tokenizer.json, or vocab.json + merges.txt)")
        spec = {"model": _plain(kwargs), "tokenizer": tok_kw,
                "image_size": int(raw.get("vision_config", {}).get("image_size", 224)),
                "value_range": "clip", "logits": "softmax"}
        return Bundle(TwoTowers(**kwargs), params, tok, spec)
    if kind == "siglip":
        raise ValueError(f"{path}: SigLIP checkpoints use a SentencePiece tokenizer, which no "
                         "package installs offline; load the model with vljax.convert.hf.load_hf_siglip "
                         "and tokenise yourself")
    raise ValueError(f"{path}: model_type {kind!r} is not a CLIP or SigLIP checkpoint")


def _hf_vocab(path) -> dict:
    """The directory's own CLIP vocabulary if it has one, else {} (OpenAI's, which every CLIP uses)."""
    path = epath.Path(path)
    if (path / "tokenizer.json").exists():
        return dict(tokenizer_file=str(path / "tokenizer.json"))
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return dict(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    return {}
