"""The jitted tower functions of a two-tower model on a mesh, and the cache that shares them.

`TowerCache.get(model, mesh)` returns the jitted towers of an equal model on the same mesh, so
every Embedder (vljax/embedder.py) of an equal model compiles nothing after the first. Image
inputs may be arrays [B, S, S, 3] or NaFlex dicts (one compilation per patch budget).
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def _pick(out: dict, *keys):
    return tuple(out[k] for k in keys)


class _Towers:
    """The jitted tower functions of `model` on `mesh`, outputs replicated."""

    def __init__(self, model, mesh):
        replicated = NamedSharding(mesh, P())
        self.img = jax.jit(lambda p, x, m: (model.apply({"params": p}, x, None)[0], m),
                           out_shardings=(replicated, replicated))
        self.txt = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1],
                           out_shardings=replicated)
        # The same from the states after the k locked lowest text blocks (a `TextMemo`).
        self.txt_upper = jax.jit(lambda p, t, s, k: model.apply({"params": p}, None, t, text_lower=(k, s))[1],
                                 out_shardings=replicated, static_argnums=3)
        self.head = jax.jit(lambda p, f, m: (model.apply({"params": p}, f, method=model.image_head), m),
                            out_shardings=(replicated, replicated))
        # Late interaction: the projected tokens (and the text masks) instead of the pooled z.
        self.img_tok = jax.jit(lambda p, x, m: (model.apply({"params": p}, x, None)[2]["img/tokens_proj"], m),
                               out_shardings=(replicated, replicated))
        self.txt_tok = jax.jit(lambda p, t: _pick(model.apply({"params": p}, None, t)[2],
                                                  "txt/tokens_proj", "txt/mask"),
                               out_shardings=replicated)
        self.txt_tok_upper = jax.jit(
            lambda p, t, s, k: _pick(model.apply({"params": p}, None, t, text_lower=(k, s))[2],
                                     "txt/tokens_proj", "txt/mask"),
            out_shardings=replicated, static_argnums=3)
        self.head_tok = jax.jit(lambda p, f, t, m: (model.apply({"params": p}, f, t.astype(f.dtype),
                                                                method=model.image_head_tokens)[1], m),
                                out_shardings=(replicated, replicated))


def same_module(a, b) -> bool:
    """Equal modules; one whose fields cannot be compared (arrays in its config) only to itself."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class TowerCache:
    """The jitted towers of the `size` most recently used (model, mesh) pairs.

    `get` returns the towers of an equal model (flax modules compare by their fields; they are
    not hashable) on the same mesh, jitted once: jax caches compilations per jitted function, so
    Embedders made afresh for each evaluation with the same cache reuse them. A few models at
    most (soups, WiSE-FT) are evaluated in one process, hence the small default size.
    """

    def __init__(self, size: int = 4):
        self.size = int(size)
        self._entries = []  # [(model, mesh, _Towers)], the most recent last

    def get(self, model, mesh) -> _Towers:
        for i, (m, me, t) in enumerate(self._entries):
            if me == mesh and same_module(m, model):
                self._entries.append(self._entries.pop(i))
                return t
        self._entries.append((model, mesh, _Towers(model, mesh)))
        del self._entries[:-self.size]
        return self._entries[-1][2]
