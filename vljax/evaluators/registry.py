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

EVALUATORS: dict[str, type] = {}


def register(kind: str, cls: type | None = None):
    """Registers evaluator class `cls` under config name `kind` (`type=kind`); as a decorator,
    `@register(kind)`. The class must have `from_config(name, spec, *, plot_dir)` and `run(embedder)`.
    Registering a taken name with another class is an error (the same class again, e.g. from a
    reloaded module, replaces it)."""
    def add(c):
        missing = [m for m in ("from_config", "run") if not callable(getattr(c, m, None))]
        if not isinstance(c, type) or missing:
            raise TypeError(f"evaluator kind {kind!r}: {c!r} is not an evaluator class "
                            f"(it lacks {', '.join(missing) or 'being a class'})")
        old = EVALUATORS.get(kind, c)
        if (old.__module__, old.__qualname__) != (c.__module__, c.__qualname__):
            raise ValueError(f"evaluator kind {kind!r} is already registered "
                             f"({old.__module__}.{old.__qualname__})")
        EVALUATORS[kind] = c
        return c
    return add if cls is None else add(cls)


def evaluator_class(kind, where: str = "evals") -> type:
    """The class registered as `kind`; an unknown kind is an error naming `<where>.type`."""
    if kind not in EVALUATORS:
        raise ValueError(f"config key `{where}.type`: {kind!r} is not one of {sorted(EVALUATORS)}")
    return EVALUATORS[kind]
