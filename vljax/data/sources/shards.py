"""Shard lists for the sharded source kinds (webdataset tars, parquet files): a config entry's
`urls` expanded to the files it names, in order, each checked to exist before any work.

`urls` is a brace pattern as webdataset and img2dataset write them (`data-{00000..09999}.tar`,
expanded by the `braceexpand` package, which webdataset itself uses), a glob (`shards/*.tar`), or a
list of either; paths are local or any scheme etils.epath opens (`gs://...`). Existence is checked
with a thread pool (a remote bucket answers one stat per shard), and a missing shard is an error
naming its path and the config key.
"""
from __future__ import annotations

from concurrent import futures

from braceexpand import braceexpand
from etils import epath

_GLOB_CHARS = "*?["
_STAT_THREADS = 32


def _glob(pattern: str, where: str) -> list[str]:
    """The files matching `pattern` (glob characters only in the last path components), sorted."""
    parts = pattern.split("/")
    first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = "/".join(parts[:first_glob]) or "."
    matches = sorted(str(p) for p in epath.Path(root).glob("/".join(parts[first_glob:])))
    if not matches:
        raise FileNotFoundError(f"config key `{where}.urls`: no file matches {pattern!r}")
    return matches


def expand(urls, where: str = "input.data") -> list[str]:
    """The shard paths `urls` names (module docstring), in the order given (globs sorted).

    Raises ValueError for an empty `urls` and FileNotFoundError naming the first missing shard
    (and how many are missing) or a glob that matches nothing; `where` names the config entry.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls or ())
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"config key `{where}.urls`: give a path pattern or a list of them, "
                         f"not {urls!r}")
    paths = []
    for pattern in patterns:
        for path in braceexpand(pattern):
            paths.extend(_glob(path, where) if any(c in path for c in _GLOB_CHARS) else [path])
    with futures.ThreadPoolExecutor(min(_STAT_THREADS, len(paths))) as pool:
        exists = list(pool.map(lambda p: epath.Path(p).exists(), paths))
    missing = [p for p, ok in zip(paths, exists) if not ok]
    if missing:
        raise FileNotFoundError(f"config key `{where}.urls`: {len(missing)} of {len(paths)} shards "
                                f"do not exist; the first: {missing[0]}")
    return paths
