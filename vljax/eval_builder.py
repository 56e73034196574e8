"""Builds the evaluators of `config.evals` (name -> dict(type=..., data=dict(...), **kwargs)).

Data are loaded once per run (vljax/data/eval_sets.py), preprocessed the way the training input is
(`config.input.image_size`, `config.input.value_range`); evaluator kwargs pass through unchanged.

    config.evals.fashion_mnist = dict(type="zeroshot", data=dict(name="vljax_fashion_mnist", split="test"),
                                      templates="clip80")
"""
from __future__ import annotations

from vljax.data import eval_sets
from vljax.evaluators import EVALUATORS

# evaluator type -> the eval_sets loader whose dict feeds it
_LOADERS = {
    "zeroshot": "classification_set",
    "gzsl": "classification_set",
    "retrieval": "retrieval_set",
    "multilabel": "multilabel_set",
    "fewshot": "fewshot_set",
}


def build_one(name: str, spec: dict, *, image_size: int, value_range, plot_dir: str | None):
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in EVALUATORS:
        raise ValueError(f"config key `evals.{name}.type`: {kind!r} is not one of {sorted(EVALUATORS)}")
    data_spec = dict(spec.pop("data", {}))
    if "name" not in data_spec:
        raise ValueError(f"config key `evals.{name}.data.name` is missing")
    loader = getattr(eval_sets, _LOADERS[kind])
    data = loader(image_size=image_size, value_range=value_range, **data_spec)
    if kind == "zeroshot":  # the evaluator that plots confusion matrices
        spec.setdefault("plot_dir", plot_dir)
    return EVALUATORS[kind](**data, name=name, **spec)


def build(config, plot_dir: str | None = None, *, image_size: int | None = None, value_range=None,
          only=None) -> dict:
    """All evaluators of `config.evals` (or the names in `only`), in config order.

    Images are preprocessed as `config.input` says unless `image_size` / `value_range` are given:
    a converted checkpoint (vljax/evaluate.py) has its own input size and normalisation.
    """
    evals = dict(config.get("evals") or {})
    if only is not None:
        unknown = sorted(set(only) - set(evals))
        if unknown:
            raise ValueError(f"no evals named {unknown} in the config (it has {sorted(evals)})")
        evals = {k: v for k, v in evals.items() if k in only}
    if value_range is None:
        value_range = config.input.get("value_range", "efficientnet")
    if isinstance(value_range, list):  # a tuple that went through config.json
        value_range = tuple(value_range)
    image_size = image_size or config.input.image_size
    return {name: build_one(name, spec, image_size=image_size, value_range=value_range,
                            plot_dir=plot_dir)
            for name, spec in evals.items()}
