"""A registry of classes by the name a config entry gives them: source kinds (`source=`,
vljax/data/sources/base.py) and evaluator kinds (`type=`, vljax/evaluators/registry.py).

A `Registry` is a dict {name: class}; `register` adds one (a decorator too) and `lookup` finds one,
with an error naming the config key. Registering a name again with another class is refused; the
same class again (a reloaded module) replaces it. Imports nothing from vljax: every floor may use it.
"""
from __future__ import annotations

from collections.abc import Callable


class Registry(dict):
    """{config name: class} of one kind of thing (`what`, e.g. "source kind"), chosen by config key
    `key` (e.g. "source"). `on_register(name, cls)` checks or annotates a class as it is added."""

    def __init__(self, what: str, key: str, on_register: Callable[[str, type], None] | None = None):
        super().__init__()
        self.what, self.key, self._on_register = what, key, on_register

    def register(self, name: str, cls: type | None = None):
        """Registers `cls` under `name`; as a decorator, `@registry.register(name)`."""
        def add(c):
            old = self.get(name, c)
            if (old.__module__, old.__qualname__) != (c.__module__, c.__qualname__):
                raise ValueError(f"{self.what} {name!r} is already registered ({old.__module__}.{old.__qualname__})")
            if self._on_register is not None:
                self._on_register(name, c)
            self[name] = c
            return c
        return add if cls is None else add(cls)

    def lookup(self, name, where: str) -> type:
        """The class registered as `name`; an unknown one is an error naming `<where>.<key>`."""
        if name not in self:
            raise ValueError(f"config key `{where}.{self.key}`: {name!r} is not one of {sorted(self)}")
        return self[name]
