"""`config.init_from = PATH`: a run that starts from a checkpoint a user brings.

PATH is anything `factory.read_checkpoint` reads (vljax/foreign.py): a transformers CLIP / SigLIP /
SigLIP 2 (fixed-resolution or NaFlex) directory with its tokenizer, or a big_vision SigLIP /
SigLIP 2 `.npz` with its SentencePiece `.model`. The checkpoint's spec decides the run's model,
tokenizer, image preprocessing and value range; its params (both towers, their projection heads,
the logit scale `t` and bias `b`) replace the random init on a fresh run.

Config keys (the training config's; vljax/config_check.py):
  init_from            PATH (None / absent: an ordinary run)
  init_from_tokenizer  a tokenizer directory or SentencePiece `.model` overriding the checkpoint's
                       (`read_checkpoint(tokenizer=)`; a big_vision npz without one beside it)
  input.max_num_patches  the NaFlex patch budget (default: the checkpoint's); the budget is no
                       weight, so one checkpoint trains at any budget
  dtype, remat         training choices, as in every run (not weights)
What the checkpoint decides, a config may repeat but not change: `model.*`, `tokenizer.*`,
`input.image_size`, `input.value_range`; a given value that differs from the checkpoint's is
refused naming the key. One exception: `tokenizer.max_len` may be shorter than the checkpoint's
position table (shorter captions; the text tower reads the first positions). `model_init` and
`init_from` exclude each other.

The resolved config (`resolve`) carries the checkpoint's choices as ordinary keys, so the trainer,
the pipeline and `factory.spec_from_config` read them as for any run: `model`, `tokenizer`,
`input.image_size`, `input.value_range`, and `input.resize` / `input.resample` (fixed
resolution: SigLIP's squash resize) or `input.naflex` = {"patch_size", "max_num_patches"}
(NaFlex; `input.image_size` is then the nominal side P * floor(sqrt(N)), which only the
fixed-size code paths would read, and those are refused for NaFlex: `stages` changing the image,
`lit_cache`).

Resumed runs: a workdir with a checkpoint and its model_spec.json restores its own state and
spec; the source checkpoint is not read again (it may even be gone).
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from etils import epath

from vljax import factory, pretrained

# Keys of config.model that are training choices, not weights: the config's value wins.
TRAINING_CHOICES = ("dtype", "remat")


def requested(config) -> str | None:
    """config.init_from as a string, or None for an ordinary run."""
    path = config.get("init_from")
    return str(path) if path else None


def check_path(config) -> None:
    """Refuses a missing `init_from` / `init_from_tokenizer` path, naming the key and the path
    (a fresh run, before anything is written; a resumed run does not need the source)."""
    path = requested(config)
    if path is None:
        return
    if "://" not in path and not epath.Path(path).expanduser().exists():
        raise ValueError(f"config key `init_from`: {path} does not exist")
    tok = config.get("init_from_tokenizer")
    if tok and "://" not in str(tok) and not epath.Path(str(tok)).expanduser().exists():
        raise ValueError(f"config key `init_from_tokenizer`: {tok} does not exist")


def check_exclusive(config) -> None:
    """Refuses `model_init` beside `init_from` (config_check runs this)."""
    if requested(config) and any((config.get("model_init") or {}).values()):
        raise ValueError("config keys `init_from` and `model_init` exclude each other: init_from "
                         "loads both towers from one checkpoint")


def read_source(config, workdir) -> tuple[dict, dict | None]:
    """(spec, params) of the run's checkpoint: from the workdir (model_spec.json, params None)
    when it holds a checkpoint to resume, else `factory.read_checkpoint(init_from, ...)`.
    Refusals of read_checkpoint (no tokenizer, ids past the table, bad budget) come before any
    weight is read and name the file / value."""
    check_exclusive(config)
    work = epath.Path(workdir)
    ckpts = work / "checkpoints"
    if (work / factory.SPEC_FILE).exists() and ckpts.exists() and any(
            p.name.isdigit() for p in ckpts.iterdir()):
        return factory.read_spec(work), None
    check_path(config)
    budget = config.input.get("max_num_patches")
    return factory.read_checkpoint(requested(config), tokenizer=config.get("init_from_tokenizer"),
                                   max_num_patches=budget)


def resolve(config, spec: dict) -> ml_collections.ConfigDict:
    """`config` with the checkpoint's `spec` written into its model / tokenizer / input keys
    (module docstring); refuses a config value that disagrees, naming the key."""
    out = ml_collections.ConfigDict(config.to_dict())
    model = {k: v for k, v in spec["model"].items()}
    given_model = factory.plain(config.get("model") or {})
    for tower in ("image", "text"):
        model[tower] = {k: v for k, v in model[tower].items() if k not in TRAINING_CHOICES}
        if tower in given_model:  # the config's training choices (dtype, remat) are kept
            choices = {k: given_model[tower].pop(k) for k in TRAINING_CHOICES
                       if k in given_model[tower]}
            model[tower] = dict(model[tower], **choices)
    _agree(given_model, model, "model")
    tok = dict(spec["tokenizer"])
    given = dict(config.get("tokenizer") or {})
    max_len = given.pop("max_len", tok["max_len"])
    if not 1 <= int(max_len) <= int(tok["max_len"]):
        raise ValueError(f"config key `tokenizer.max_len`: {max_len} must be between 1 and the "
                         f"checkpoint's {tok['max_len']} text positions")
    _agree(given, tok, "tokenizer")
    inp = {"value_range": factory.plain(spec["value_range"])}
    if "naflex" in spec:
        naf = dict(spec["naflex"])
        inp["image_size"] = naf["patch_size"] * math.isqrt(naf["max_num_patches"])
        if config.input.get("image_size") is not None:
            raise ValueError("config key `input.image_size`: a NaFlex checkpoint takes images at "
                             "their own aspect ratio; set input.max_num_patches (the patch budget)")
    else:
        inp["image_size"] = int(spec["image_size"])
    _agree({k: config.input.get(k) for k in inp if config.input.get(k) is not None}, inp, "input")
    if "naflex" in spec:
        if config.get("lit_cache", False):
            raise ValueError("config key `lit_cache`: stored image features are not available "
                             "for a NaFlex image tower (variable patch sequences); set it False")
        if any(set(dict(st)) - {"until", "max_len"} for st in (config.get("stages") or [])):
            raise ValueError("config key `stages`: with a NaFlex image tower stages may only "
                             "change max_len (image_size / patch_dropout are fixed-size notions)")
        given = config.input.get("max_num_patches")
        if given is not None and int(given) != naf["max_num_patches"]:
            raise ValueError(f"config key `input.max_num_patches`: {given} differs from the "
                             f"resumed run's budget {naf['max_num_patches']}")
        inp["naflex"] = naf
        inp["max_num_patches"] = naf["max_num_patches"]
    else:
        inp.update(resize=spec.get("resize", "crop"), resample=spec.get("resample", "bilinear"))
    out.model = model
    out.tokenizer = dict(tok, max_len=int(max_len))
    for k, v in inp.items():
        out.input[k] = v
    out.model_init = None
    return out


def _agree(given, expected, where: str) -> None:
    """Every leaf of `given` (a possibly partial dict) equals `expected`'s, else ValueError naming it."""
    for key, value in (given or {}).items():
        name = f"{where}.{key}"
        if key not in expected:
            raise ValueError(f"config key `{name}`: {value!r} is not part of the init_from "
                             f"checkpoint's {where} (it has: {sorted(expected)})")
        want = expected[key]
        if isinstance(want, dict) and hasattr(value, "items"):
            _agree(dict(value), want, name)
        elif factory.plain(value) != want and not _close(factory.plain(value), want):
            raise ValueError(f"config key `{name}`: {value!r} differs from the init_from "
                             f"checkpoint's {want!r} (leave it out: the checkpoint decides it)")


def _close(a, b) -> bool:
    try:
        return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6))
    except (TypeError, ValueError):
        return False


def write_params(params: dict, loaded: dict) -> dict:
    """Every leaf of `params` (jax.Arrays in their shards) replaced by the checkpoint's, each
    written straight into its shards (`pretrained.write_tower`: towers leaf by leaf, heads kept;
    the top-level scalars `t` / `b` likewise). A model leaf the checkpoint lacks, or one it has
    that the model lacks, is refused naming it: a fine-tuning run starts from the whole model."""
    missing, unknown = sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params))
    if missing or unknown:
        raise ValueError(f"init_from checkpoint: top-level params {sorted(loaded)} do not match "
                         f"the model's {sorted(params)}")
    out = dict(params)
    for key, value in loaded.items():
        if isinstance(params[key], dict):
            out = pretrained.write_tower(out, value, key, skip=())
            kept = pretrained.kept_leaves(params[key], out[key])
            if kept:
                raise ValueError(f"init_from checkpoint: the {key} tower lacks model parameters "
                                 f"{kept[:5]}")
        else:
            target = params[key]
            if tuple(np.shape(value)) != tuple(target.shape):
                raise ValueError(f"init_from checkpoint: parameter {key}: shape {np.shape(value)}"
                                 f" != model's {tuple(target.shape)}")
            v = np.asarray(value, dtype=target.dtype)
            out[key] = jax.make_array_from_callback(target.shape, target.sharding,
                                                    lambda idx, v=v: v[idx])
    return out
