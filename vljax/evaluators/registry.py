"""The one place an evaluator kind is declared: the registry of `config.evals.<name>.type` names.

A kind is an evaluator class registered under the name a config entry gives in `type=`
(`@register("zeroshot")` in its own module; vljax/evaluators/__init__.py imports every module of
the package, so an in-tree evaluator is one file). A test or user module adds a kind by calling
`register(kind, cls)` before the config is read; nothing in vljax changes.

Everyone reads the class: `eval_builder.build_one` calls `cls.from_config(name, spec, plot_dir=...)`,
`config_check.validate_evals` checks `evals.<name>.<key>` against the keyword arguments of
`cls.__init__` and `evals.<name>.data.<key>` against `cls.DATA_KEYS` (see evaluators/data.py).
"""
from __future__ import annotations

from vljax.registry import Registry


def _check_evaluator(kind: str, cls) -> None:
    missing = [m for m in ("from_config", "run") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        raise TypeError(f"evaluator kind {kind!r}: {cls!r} is not an evaluator class "
                        f"(it lacks {', '.join(missing) or 'being a class'})")


EVALUATORS = Registry("evaluator kind", "type", on_register=_check_evaluator)


def register(kind: str, cls: type | None = None):
    """Registers evaluator class `cls` under config name `kind` (`type=kind`); as a decorator,
    `@register(kind)`. The class must have `from_config(name, spec, *, plot_dir)` and `run(embedder)`.
    Registering a taken name with another class is an error (the same class again, e.g. from a
    reloaded module, replaces it)."""
    return EVALUATORS.register(kind, cls)


def evaluator_class(kind, where: str = "evals") -> type:
    """The class registered as `kind`; an unknown kind is an error naming `<where>.type`."""
    return EVALUATORS.lookup(kind, where)
