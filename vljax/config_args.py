"""Config-file arguments: `--config=configs/lit.py:steps=200,batch=64` -> `get_config("steps=200,batch=64")`,
and config sections read over their defaults (`over_defaults`).

Config files import this module, and absl reads a config file while it parses the command line,
before `vljax.main` runs: so it imports nothing that starts JAX (the entry points set up host
memory first, vljax/hostmem.py; `tests/test_imports.py` checks it).
"""
from __future__ import annotations


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


def over_defaults(section, key: str, defaults: dict) -> dict:
    """A config section (`config.<key>`, a dict) over `defaults`; a key not among the defaults is
    a ValueError naming `key` and the known ones."""
    raw = dict(section)
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"config key `{key}`: unknown keys {unknown} (known: {', '.join(defaults)})")
    return {**defaults, **raw}
