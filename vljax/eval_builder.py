"""Builds the evaluators of `config.evals` (name -> dict(type=..., data=dict(...), **kwargs)).

    config.evals.fashion_mnist = dict(type="zeroshot", data=dict(name="vljax_fashion_mnist", split="test"),
                                      templates="clip80")

`type` picks the evaluator class registered under that name (vljax/evaluators/registry.py; a
user's module adds one with `vljax.evaluators.register(kind, cls)`). Each class reads its own
metadata (labels, class names, captions, tags) from its `data` entry (`from_config`), without
decoding an image. Images are read and preprocessed by the Embedder at run time
(vljax/embedder.py), with the model's image size and normalisation; `run_all(evaluators,
embedder)` runs them all (vljax/evaluators/base.py).
"""
from __future__ import annotations

from vljax.evaluators import evaluator_class
from vljax.evaluators.base import run_all

__all__ = ["build", "build_one", "run_all"]


def build_one(name: str, spec: dict, *, plot_dir: str | None = None):
    """The evaluator of config entry `evals.<name>` = `spec`: the class registered as its `type`
    (vljax.evaluators.register; an unknown type is an error naming `evals.<name>.type`), built by
    its `from_config`."""
    cls = evaluator_class(dict(spec).get("type"), f"evals.{name}")
    return cls.from_config(name, dict(spec), plot_dir=plot_dir)


def build(config, plot_dir: str | None = None, *, only=None) -> dict:
    """All evaluators of `config.evals` (or the names in `only`), in config order."""
    evals = dict(config.get("evals") or {})
    if only is not None:
        unknown = sorted(set(only) - set(evals))
        if unknown:
            raise ValueError(f"no evals named {unknown} in the config (it has {sorted(evals)})")
        evals = {k: v for k, v in evals.items() if k in only}
    return {name: build_one(name, spec, plot_dir=plot_dir) for name, spec in evals.items()}
