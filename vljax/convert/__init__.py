"""Weights in and out of vljax: transformers, open_clip, big_vision (and BERT / EfficientNet).

Every loader returns `(model_kwargs, params)`: `TwoTowers(**model_kwargs).apply({"params": params},
images, texts)` runs the checkpoint. Loaders check the result against the model's own parameter
shapes and raise ValueError naming any missing / unexpected key or wrong shape.

Helpers shared by the converters live here: flat "a/b/c" key dicts, the read-once `StateDict`
(one reader, one error type: `CheckpointError`), and the check against a model's abstract parameters.
"""
from collections.abc import Mapping

import jax
import numpy as np

from vljax.models import TwoTowers


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "/"))
        else:
            flat[key] = v
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the converter: a missing key (`MissingKeyError`), a shape,
    or keys nobody read. Every message names the checkpoint (`StateDict.source`) and the keys."""

    def __str__(self):  # the message as given (KeyError's str would quote it)
        return str(self.args[0]) if self.args else ""


class MissingKeyError(CheckpointError, KeyError):
    """The converter needs a key the checkpoint lacks (a KeyError too, for `except KeyError`)."""


class StateDict:
    """Read-once view of a checkpoint's {key: array}, the one reader every converter uses: `pop`
    what is used (shape checked, cast to `dtype` when given), then `finish()` raises on every key
    nobody read, so a silently ignored weight cannot slip through.

    ignore: names dropped up front (buffers that carry no weights, e.g. BN's
      `num_batches_tracked`, HF's `position_ids`): a key equal to one or ending in "." + one.
    Raises CheckpointError (MissingKeyError for a missing key), naming `source` and the keys.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str, ignore: tuple = (),
                 dtype=None):
        self._arrays = dict(arrays)
        self.source, self.dtype = source, dtype
        for k in [k for k in self._arrays if any(k == i or k.endswith("." + i) for i in ignore)]:
            del self._arrays[k]

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def keys(self):
        return list(self._arrays)

    def pop(self, key: str, shape: tuple | None = None) -> np.ndarray:
        """The array under `key`, removed from the view; `shape` checked when given."""
        if key not in self._arrays:
            raise MissingKeyError(f"{self.source}: missing key {key!r}")
        v = np.asarray(self._arrays.pop(key), self.dtype)
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: key {key!r} has shape {tuple(v.shape)}, "
                                  f"expected {tuple(shape)}")
        return v

    def put(self, key: str, value: np.ndarray):
        """Adds a derived array (e.g. one third of a fused qkv projection)."""
        self._arrays[key] = value

    def finish(self):
        """Raises CheckpointError naming every key nobody popped (the first in checkpoint order)."""
        if self._arrays:
            first = next(iter(self._arrays))
            listed = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in sorted(self._arrays.items()))
            raise CheckpointError(
                f"{self.source}: {len(self._arrays)} unused checkpoint keys, e.g. '{first}'; "
                f"unexpected keys not used by the model: {listed}")


def check_params(model, params: Mapping, *example_inputs) -> None:
    """Compares `params` to `model.init`'s parameter tree (abstractly, nothing is computed).

    Raises ValueError listing missing keys, unexpected keys and shape mismatches.
    """
    abstract = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs),
                              *example_inputs)["params"]
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    problems = [f"missing key {k!r} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected key {k!r} {have[k]}" for k in sorted(have.keys() - want.keys())]
    problems += [f"key {k!r} has shape {have[k]}, the model expects {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
    if problems:
        raise ValueError("Parameters do not fit the model:\n  " + "\n  ".join(problems))


def check_two_towers(model_kwargs: Mapping, params: Mapping,
                     image_size: tuple[int, int] | None = None) -> None:
    """check_params for a TwoTowers config; image_size (H, W) defaults to the one a square
    learned position embedding implies."""
    images = texts = None
    if image_size is not None:
        images = jax.ShapeDtypeStruct((1, *image_size, 3), np.float32)
    elif "img" in params:
        pe = params["img"].get("pos_embedding")
        kernel = params["img"].get("embedding", {}).get("kernel")
        if pe is not None and kernel is not None:
            side = int(round(np.sqrt(np.shape(pe)[1])))
            p = np.shape(kernel)[:2]
            images = jax.ShapeDtypeStruct((1, side * p[0], side * p[1], 3), np.float32)
    if "txt" in params:
        max_len = model_kwargs["text"].get("max_len", 77)
        texts = jax.ShapeDtypeStruct((1, max_len), np.int32)
    check_params(TwoTowers(**model_kwargs), params, images, texts)
