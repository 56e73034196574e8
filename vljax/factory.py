"""One model bundle: the model, its tokenizer and its image preprocessing, built from one spec.

The trainer writes the spec (`model_spec.json`) into every workdir; inference, evaluation and
soups rebuild the model from it and restore only the params of a checkpoint (no optimizer, no
training config needed), or load another library's checkpoint instead:

    bundle = factory.load("/tmp/vljax_lit")            # a workdir: its latest checkpoint
    bundle = factory.load("hf_clip_dir/")              # config.json + model.safetensors
    bundle = factory.load("google_siglip2_naflex_dir/", max_num_patches=256)
    bundle = factory.load("siglip2.npz", tokenizer="gemma.model")   # big_vision
    zimg, ztxt, out = bundle.model.apply({"params": bundle.params}, images, bundle.tokenizer(texts))

Checkpoints of other libraries (transformers CLIP / SigLIP / SigLIP 2 directories, big_vision
SigLIP npz) are read by `read_checkpoint` (vljax/foreign.py) into the same (spec, params);
`export(bundle, dir)` writes a transformers directory back. `write_spec` copies the tokenizer
files a spec names into workdir/tokenizer/ and records them relative to the workdir
(`read_spec` resolves them), so a workdir outlives the directory it was initialised from.

The spec (a JSON-able dict):

    {"model": TwoTowers kwargs (tower dtypes as strings), "tokenizer": get_tokenizer kwargs,
     "image_size": 112, "value_range": "efficientnet" | [lo, hi] | "clip" | ...,
     "resize": "crop" | "squash", "resample": "bilinear" | "bicubic",  # absent: "crop"
     "naflex": {"patch_size": P, "max_num_patches": N},  # NaFlex towers, instead of image_size
     "logits": "softmax" | "sigmoid",
     "similarity": "global" | "filip"}    # how evaluators score by default: the trained loss's
                                          # (a FILIP model by late interaction); absent = "global"
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vljax import checkpoints, objective, stages, tokenizers
from vljax.data.eval_transform import EvalImage
from vljax.data.preprocess import canonical_value_range
from vljax.foreign import clip_tokenizer, is_transformers_dir, plain, read_checkpoint, with_budget
from vljax.models.naflex import example_input
from vljax.models.two_towers import TwoTowers
from vljax.models.vit import ViT

__all__ = ["SPEC_FILE", "Bundle", "abstract_params", "build_model", "build_tokenizer", "export",
           "load", "portable_spec", "read_checkpoint", "read_spec", "resolved_spec",
           "restore_params", "spec_from_config", "value_range", "with_budget", "write_spec"]

SPEC_FILE = "model_spec.json"


def spec_from_config(config) -> dict:
    """The model spec of a training config (`config.model`, `tokenizer`, `input`, `dtype`, `remat`)."""
    model = plain(config.model)
    # The caption decoder (when there is one) computes in the run's dtype like the towers.
    for tower in ("image", "text") + (("decoder",) if model.get("decoder") else ()):
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
    value_range = plain(config.input.get("value_range", "efficientnet"))
    spec = {"model": model, "tokenizer": plain(config.tokenizer),
            "image_size": int(config.input.image_size), "value_range": value_range,
            **objective.inference_spec(config.loss)}  # "logits", "similarity": the trained loss's
    # A run from a checkpoint (vljax/init_from.py) keeps its preprocessing: SigLIP's squash
    # resize, or the NaFlex patch budget in place of a fixed image size.
    for key in ("resize", "resample"):
        if config.input.get(key):
            spec[key] = str(config.input[key])
    if config.input.get("naflex"):
        del spec["image_size"]
        # The model's budget; the training-only keys (budgets, vljax/data/naflex_train.py) stay out.
        spec["naflex"] = {k: plain(config.input.naflex[k]) for k in ("patch_size", "max_num_patches")}
    return spec


def build_model(spec: dict) -> TwoTowers:
    kw = dict(spec["model"])
    for tower in ("image", "text") + (("decoder",) if kw.get("decoder") else ()):
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


# The tokenizer kinds' file arguments (vljax/tokenizers): copied beside the spec, so a workdir
# or an export keeps working when the checkpoint it came from moves or is deleted.
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE_KEYS = ("tokenizer_file", "model_file", "vocab", "merges", "vocab_file")


def portable_spec(spec: dict, root) -> dict:
    """The spec with every tokenizer file it names copied into root/tokenizer/ and referenced
    relative to root ("tokenizer/spiece.model"); files already there are not copied again."""
    tok = dict(spec.get("tokenizer") or {})
    root = epath.Path(root)
    for key in TOKENIZER_FILE_KEYS:
        if key not in tok or not tok[key]:
            continue
        if _in_tokenizer_dir(tok[key]):
            continue  # already relative to a spec's root: travels with it
        src = epath.Path(tok[key])
        src = src if src.is_absolute() else epath.Path(os.path.abspath(tok[key]))
        dst = root / TOKENIZER_DIR / src.name
        if str(src) != str(dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
        tok[key] = f"{TOKENIZER_DIR}/{src.name}"
    return dict(spec, tokenizer=tok) if "tokenizer" in spec else spec


def _in_tokenizer_dir(file: str) -> bool:
    return not epath.Path(file).is_absolute() and str(file).startswith(f"{TOKENIZER_DIR}/")


def resolved_spec(spec: dict, root) -> dict:
    """The spec with its "tokenizer/..." files made absolute under root (`portable_spec`'s
    inverse); other paths (specs written before) are kept."""
    tok = dict(spec.get("tokenizer") or {})
    for key in TOKENIZER_FILE_KEYS:
        if tok.get(key) and _in_tokenizer_dir(tok[key]):
            tok[key] = str(epath.Path(root) / tok[key])
    return dict(spec, tokenizer=tok) if "tokenizer" in spec else spec


def write_spec(workdir, spec: dict) -> None:
    """workdir/model_spec.json, with the tokenizer files copied into workdir/tokenizer/
    (`portable_spec`): the workdir reloads unchanged wherever the original files go."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(portable_spec(spec, path), indent=1))


def read_spec(workdir) -> dict:
    """The workdir's model spec (tokenizer files resolved under it); workdirs written before the
    spec existed: from config.json."""
    path = epath.Path(workdir)
    if (path / SPEC_FILE).exists():
        return resolved_spec(json.loads((path / SPEC_FILE).read_text()), path)
    if (path / "config.json").exists():
        return spec_from_config(ml_collections.ConfigDict(json.loads((path / "config.json").read_text())))
    raise FileNotFoundError(f"{path}: no {SPEC_FILE} (and no config.json): not a vljax workdir")


def abstract_params(model: TwoTowers, spec: dict):
    """The params' structure, shapes and dtypes, without computing anything."""
    if "naflex" in spec:
        images = example_input(spec["model"]["image"])
    else:
        s = spec["image_size"]
        images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    texts = jax.ShapeDtypeStruct((1, spec["tokenizer"]["max_len"]), jnp.int32)
    return jax.eval_shape(lambda r, x, y: model.init(r, x, y)["params"], jax.random.key(0), images, texts)


@dataclasses.dataclass
class Bundle:
    """A model ready to use: `model.apply({"params": params}, images, texts)`; `tokenizer(texts)`
    gives int32 [N, L] ids; images are preprocessed by `preprocess` (fixed resolution: shorter
    side to `image_size` and centre crop, or the whole image to S x S for "resize": "squash";
    then `value_range`; NaFlex: the patch dict of `vljax.data.naflex`)."""
    model: TwoTowers
    params: Any
    tokenizer: Any
    spec: dict

    @property
    def image_size(self) -> int:
        if "naflex" in self.spec:
            raise ValueError("a NaFlex model has no fixed image_size: its inputs are patch "
                             f"sequences of budget {self.spec['naflex']['max_num_patches']}")
        return int(self.spec["image_size"])

    @property
    def eval_image(self) -> EvalImage:
        """The spec's eval transform (vljax/data/eval_transform.py)."""
        return EvalImage.from_spec(self.spec)

    @property
    def naflex(self) -> dict | None:
        """{"patch_size": P, "max_num_patches": N} of a NaFlex image tower, else None."""
        return self.spec.get("naflex")

    @property
    def value_range(self):
        return value_range(self.spec)

    @property
    def sigmoid(self) -> bool:
        return self.spec.get("logits") == "sigmoid"

    @property
    def similarity(self) -> str:
        return self.spec.get("similarity", "global")

    def preprocess(self, image):
        """One image (path, bytes, PIL image or uint8 array, any mode and size) -> f32 [S, S, 3]
        (`eval_image`), or for a NaFlex model the dict {"patches" f32 [N, P*P*3], "mask" bool
        [N], "shapes" int32 [2]} (stack a batch with `eval_image.stack`). Raises ValueError
        (`transforms.UnreadableImage`) naming the image and the reason when it cannot be read."""
        return self.eval_image(image)


def load(path, *, step: int | None = None, shardings=None, tokenizer=None,
         max_num_patches: int | None = None) -> Bundle:
    """A vljax workdir (params of its latest checkpoint, or of `step`), a transformers CLIP /
    SigLIP / SigLIP 2 directory or a big_vision SigLIP npz (`read_checkpoint`; `tokenizer`: its
    SentencePiece model or a directory overriding the checkpoint's). `max_num_patches`: the
    NaFlex patch budget (default: the checkpoint's). `shardings`: a pytree of shardings for the
    params (default: host numpy arrays). Nothing of the optimizer is read."""
    path = epath.Path(path).expanduser()
    if (path / SPEC_FILE).exists() or ((path / "config.json").exists()
                                       and not is_transformers_dir(path)):
        spec = with_budget(read_spec(path), max_num_patches)
        model = build_model(spec)
        params = restore_params(path, model, spec, step=step, shardings=shardings)
        return Bundle(model, params, build_tokenizer(spec), spec)
    if is_transformers_dir(path) or path.suffix == ".npz":
        spec, params = read_checkpoint(path, tokenizer=tokenizer, max_num_patches=max_num_patches)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        return Bundle(build_model(spec), params, build_tokenizer(spec), spec)
    raise FileNotFoundError(f"{path}: neither a vljax workdir ({SPEC_FILE} + checkpoints/) nor a "
                            "transformers directory (config.json + model.safetensors) nor a "
                            "big_vision .npz")


# The file names transformers' tokenizers read in a directory, per (kind, canonicalize).
HF_TOKENIZER_NAMES = {("sentencepiece", "siglip"): {"model_file": "spiece.model"},
                      ("sentencepiece", "none"): {"model_file": "tokenizer.model"},
                      ("hf", None): {"tokenizer_file": "tokenizer.json"},
                      ("clip", None): {"tokenizer_file": "tokenizer.json", "vocab": "vocab.json",
                                       "merges": "merges.txt"},
                      ("bert", None): {"vocab_file": "vocab.txt"}}
TOKENIZER_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json")


def encoder_only(model_kw: dict, params):
    """(TwoTowers kwargs, params) less the caption decoder (`decoder`, `decoder_model`, params
    `dec`), the self-distillation heads (params `ssl`, vljax/teacher.py), SLIP's SimCLR head
    (params `simclr`, vljax/slip.py) and CatLIP's vocabulary head (params `catlip`, vljax/catlip.py):
    the encoder a recipe with them (LocCa, SigLIP 2, SLIP, CatLIP) exports; unchanged without them."""
    return ({k: v for k, v in model_kw.items() if k not in ("decoder", "decoder_model")},
            {k: v for k, v in params.items() if k not in ("dec", "ssl", "simclr", "catlip")})


def export(bundle: Bundle, out_dir, arch: str | None = None) -> None:
    """A bundle -> a transformers directory that `factory.load` (and transformers) read back with
    the same tokenizer and outputs: `convert.to_hf.export_hf`'s config.json, model.safetensors
    (+ preprocessor_config.json), the tokenizer files under transformers' names with their
    tokenizer_config.json / special_tokens_map.json, and for arch "siglip" a SigLIP processor
    (squash resize with the spec's resample). arch: "clip" | "siglip" | "siglip2" (default:
    "siglip2" for NaFlex, "siglip" for sigmoid models, else "clip"). Refused before anything is
    written, naming the keys: a tokenizer the directory would not reproduce (e.g. big_vision's
    rule, which no transformers tokenizer applies), a text tower with Prefix Conditioning
    (`model.text.prefix_conditioning`: no transformers slot for its prefix) or with LLM2CLIP's
    adapter (`model.text.adapter_layers`: transformers projects with one Linear). A caption decoder is left out
    (`encoder_only`): the exported model is the two encoders."""
    # Imported on use: to_hf imports transformers (about 2 s), which loading a model never needs.
    from vljax.convert import to_hf  # noqa: PLC0415

    if (bundle.spec["model"].get("text") or {}).get("prefix_conditioning"):
        # transformers' text towers have no slot for the learned prefix token
        raise ValueError(f"{out_dir}: a transformers directory cannot hold the text tower's prefix "
                         "conditioning (config key `model.text.prefix_conditioning`, "
                         "txt/prefix_embedding); use the vljax workdir itself (`python -m "
                         "vljax.inference --model=WORKDIR` embeds texts with its eval prefix)")
    if (bundle.spec["model"].get("text") or {}).get("adapter_layers"):
        # transformers' CLIP / SigLIP text towers project the pooled state with one Linear
        raise ValueError(f"{out_dir}: a transformers directory cannot hold the text tower's LLM2CLIP "
                         "adapter (config key `model.text.adapter_layers`, txt/adapter_*, "
                         "txt/adapter_norm); use the vljax workdir itself (`vljax.factory.load`, "
                         "`python -m vljax.inference --model=WORKDIR`)")
    arch = arch or ("siglip2" if bundle.naflex else "siglip" if bundle.sigmoid else "clip")
    tok = bundle.spec["tokenizer"]
    out = epath.Path(out_dir)
    names = HF_TOKENIZER_NAMES.get((tok["kind"], tok.get("canonicalize")), {})
    files = {key: epath.Path(tok[key]) for key in names if tok.get(key)}
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(epath.Path(tmp), files, names, arch)
        if not files:
            again = dict(tok)
        elif arch == "clip":
            again = clip_tokenizer(tmp, None, tok["max_len"])
        else:
            try:
                again = tokenizers.from_directory(tmp, tok["max_len"])
            except ValueError as e:  # the files alone are no tokenizer transformers reads
                again = {"error": str(e).replace(tmp, "<dir>")}
    differ = sorted(k for k in set(tok) | set(again) if k not in TOKENIZER_FILE_KEYS
                    and tok.get(k) != again.get(k))
    if differ or set(again) & set(TOKENIZER_FILE_KEYS) != set(files):
        raise ValueError(f"{out}: a transformers {arch!r} directory would not reproduce the "
                         f"tokenizer {tok}: it would read {again} (differing: {differ})")
    model_kw, params = encoder_only(bundle.spec["model"], bundle.params)
    to_hf.export_hf(model_kw, params, str(out), arch=arch)
    _write_tokenizer(out, files, names, arch)
    if arch == "siglip":
        resample = {"bilinear": 2, "bicubic": 3}[bundle.spec.get("resample", "bicubic")]
        lo, hi = bundle.value_range if not isinstance(bundle.value_range, str) else (None, None)
        if (lo, hi) != (-1.0, 1.0) or bundle.spec.get("resize") != "squash":
            raise ValueError(f"{out}: transformers' SiglipImageProcessor resizes the whole image "
                             "to [-1, 1]; this model's spec preprocesses with resize="
                             f"{bundle.spec.get('resize', 'crop')!r}, value_range "
                             f"{bundle.spec.get('value_range')}")
        s = bundle.image_size
        (out / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
             "size": {"height": s, "width": s}, "resample": resample, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "do_convert_rgb": True}, indent=1))


def _write_tokenizer(root, files: dict, names: dict, arch: str) -> None:
    """The tokenizer files under transformers' names, with the sidecars found beside them."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "config.json").exists():
        (root / "config.json").write_text(json.dumps({"model_type": arch}))
    for key, src in files.items():
        (root / names[key]).write_bytes(src.read_bytes())
        for side in TOKENIZER_SIDECARS:
            if (src.parent / side).exists():
                (root / side).write_bytes((src.parent / side).read_bytes())


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
