"""Checks a training config before anything heavy runs: unknown keys, wrong types, missing keys.

ml_collections already refuses command-line overrides of keys the config file does not define and
overrides of the wrong type; this module catches what the config file itself gets wrong (a typo such
as `totl_steps`, a string where a number belongs), naming the key.
"""
from __future__ import annotations

import numbers

# key -> (required, allowed types); nested ConfigDicts are checked one level down where listed.
_TOP = {
    "seed": (True, (int,)),
    "total_steps": (True, (int,)),
    "log_every": (False, (int,)),
    "eval_every": (False, (int,)),
    "ckpt_every": (False, (int,)),
    "keep_ckpts": (False, (int,)),
    "mesh": (True, (list, tuple)),
    "sharding_rules": (False, (list, tuple)),
    "input": (True, (dict,)),
    "tokenizer": (True, (dict,)),
    "model": (True, (dict,)),
    "model_init": (False, (dict, type(None))),
    "loss": (True, (dict,)),
    "optax": (True, (dict,)),
    "lr": (True, (numbers.Real,)),
    "wd": (False, (numbers.Real,)),
    "schedule": (True, (list, tuple, dict)),
    "grad_clip_norm": (False, (numbers.Real, type(None))),
    "grad_accum_steps": (False, (int,)),
    "total_steps_eval": (False, (int,)),
    "lit_cache": (False, (bool, dict)),
    "evals": (False, (dict,)),
    "select_metric": (False, (str, type(None))),
    "early_stop_patience": (False, (int,)),
    "eval_batch_size": (False, (int,)),
    "dtype": (False, (str,)),
    "remat": (False, (bool,)),
    "plot": (False, (bool,)),
    "progress": (False, (bool,)),
    "nonfinite": (False, (str,)),
}
_INPUT = {
    "data": (True, (list, tuple)),
    "batch_size": (True, (int,)),
    "image_size": (True, (int,)),
}
_LOSS = {"name": (True, (str,))}
_MODEL = {"image_model": (True, (str,)), "text_model": (True, (str,)),
          "image": (True, (dict,)), "text": (True, (dict,))}


def _is(value, types):
    from ml_collections import ConfigDict, FrozenConfigDict
    if dict in types and isinstance(value, (dict, ConfigDict, FrozenConfigDict)):
        return True
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int in Python; a boolean is never a step count.
    return isinstance(value, tuple(t for t in types if t is not dict))


def _check(cfg, schema, prefix, strict):
    keys = set(cfg.keys())
    for key, (required, types) in schema.items():
        if key not in keys:
            if required:
                raise ValueError(f"config key `{prefix}{key}` is missing")
            continue
        value = cfg[key]
        if not _is(value, types):
            names = "/".join(t.__name__ for t in types)
            raise ValueError(f"config key `{prefix}{key}` must be {names}, got {type(value).__name__}: {value!r}")
    if strict:
        unknown = sorted(keys - set(schema))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                             f"(known: {', '.join(sorted(schema))})")


def validate(config) -> None:
    """Raises ValueError naming the first offending key."""
    _check(config, _TOP, "", strict=True)
    _check(config.input, _INPUT, "input.", strict=False)
    _check(config.loss, _LOSS, "loss.", strict=False)
    _check(config.model, _MODEL, "model.", strict=False)
    if config.total_steps <= 0:
        raise ValueError(f"config key `total_steps` must be positive, got {config.total_steps}")
    if config.input.batch_size <= 0:
        raise ValueError(f"config key `input.batch_size` must be positive, got {config.input.batch_size}")
    for i, entry in enumerate(config.input.data):
        if "source" not in entry:
            raise ValueError(f"config key `input.data[{i}]` has no `source`")


def parse_arg(arg: str | None, where: str, **defaults) -> dict:
    """A config file's argument (`--config=configs/x.py:steps=50,img=B/16`) -> dict over `defaults`,
    each value cast to its default's type; an unknown name is an error naming the config file."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"{where}: bad config argument {item!r} (known: {', '.join(defaults)}; "
                             f"form: name=value,name=value)")
        out[key] = type(defaults[key])(value)
    return out
