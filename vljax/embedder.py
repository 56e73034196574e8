"""Embedder: a two-tower model's towers, jitted once on the training mesh, streaming eval data.

It implements the protocol evaluators use (vljax/evaluators/base.py): `embed_images(data)`,
`embed_texts(texts)`, `logit_scale`, `logit_bias`.

- Parameters stay as they are: global jax.Arrays with any sharding over `mesh` (the training
  state's, e.g. FSDP-sharded; nothing is gathered to the host), or host arrays (then put on
  the mesh replicated).
- Images stream from the data pipeline (`pipeline.make_eval_batches`): each process reads only
  its rows of every global batch, the batch runs sharded over `sharding.batch_sharding(mesh)`,
  and the tower's output comes back replicated, so every process holds the [B, D] embeddings of
  each global batch. Only z [N, D] float32 is kept: no [N, S, S, 3] array exists anywhere, and
  the result does not depend on the number of processes or devices.
- Results are cached per data (images) and per tuple of texts for the Embedder's lifetime (one
  evaluation round: params are fixed), so evaluators over the same data or class prompts share
  one forward pass.
- The last batch is padded to the batch size in one place, `_pad`, so each tower compiles once.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import logs, sharding
from vljax.data import pipeline
from vljax.data import sources as sources_lib


@dataclasses.dataclass
class Embedded:
    """Image embeddings of the readable records of a source, in record order.

    z: [M, D] float32 (L2-normalised by the model). index: [M] int, their record indices.
    """
    z: np.ndarray
    index: np.ndarray


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    """x [m, ...] -> [n, ...], zero rows appended (m <= n): the one place batches are padded."""
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x


def _local(x: jax.Array) -> np.ndarray:
    """A replicated global array as numpy (this process's copy)."""
    return np.asarray(x.addressable_data(0))


def _name(data) -> str:
    if isinstance(data, (dict, ml_collections.ConfigDict)):
        return f"{data.get('name', data.get('path', '?'))}/{data.get('split', '')}".rstrip("/")
    return getattr(data, "name", type(data).__name__)


def data_key(data):
    """A hashable key naming which images `data` holds (labels and captions do not matter)."""
    if isinstance(data, (dict, ml_collections.ConfigDict)):
        return data_key(sources_lib.get_source(dict(data)))
    if isinstance(data, sources_lib.TfdsSource):
        return ("tfds", data.name, data.split, data.data_dir, data.image_key)
    if isinstance(data, sources_lib.JsonlSource):
        return ("jsonl", str(data.path))
    if isinstance(data, sources_lib.FolderSource):
        return ("folder", str(data.root))
    if hasattr(data, "source") and hasattr(data, "indices"):  # a subset of records
        return ("subset", data_key(data.source), tuple(data.indices))
    return ("object", id(data))


class Embedder:
    """Embeds eval data and texts with fixed params on `mesh` (see the module docstring).

    Args:
      model: a TwoTowers. params: its parameters (global jax.Arrays on `mesh`, or host arrays).
      tokenizer: `tok(list[str]) -> int32 [N, L]`.
      mesh: the device mesh (the trainer's); the batch is split over its data axes.
      image_size, value_range: preprocessing, as `config.input` says for the model.
      batch_size: the global batch; rounded up to a multiple of the batch shards and processes.
      data_dir: TFDS data dir for data given as config entries.
    """

    def __init__(self, model, params, tokenizer, *, mesh, image_size: int, value_range,
                 batch_size: int = 64, data_dir=None, feature_store=None, progress: bool = True):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.progress = progress
        self.feature_store = feature_store
        self.image_size, self.value_range, self.data_dir = int(image_size), value_range, data_dir
        shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
        step = math.lcm(shards, jax.process_count())
        self.batch_size = -(-int(batch_size) // step) * step
        self._batch_sharding = sharding.batch_sharding(mesh)
        self.params = self._on_mesh(params)
        replicated = NamedSharding(mesh, P())
        self._img = jax.jit(lambda p, x, m: (model.apply({"params": p}, x, None)[0], m),
                            out_shardings=(replicated, replicated))
        self._txt = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1],
                            out_shardings=replicated)
        self._head = jax.jit(lambda p, f, m: (model.apply({"params": p}, f, method=model.image_head), m),
                             out_shardings=(replicated, replicated))
        self._images, self._texts = {}, {}

    def with_params(self, params) -> "Embedder":
        """The same towers (compiled once) over other params, with empty caches: the trainer's
        evaluations at every eval step reuse one compilation."""
        new = copy.copy(self)
        new.params = self._on_mesh(params)
        new._images, new._texts = {}, {}
        return new

    def _on_mesh(self, params):
        devices = set(self.mesh.devices.flat)
        replicated = NamedSharding(self.mesh, P())

        def put(x):
            if isinstance(x, jax.Array) and x.sharding.device_set == devices:
                return x  # already a global array on this mesh, whatever its sharding
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, replicated, lambda idx: x[idx])
        return jax.tree.map(put, params)

    @property
    def logit_scale(self) -> float:
        return float(np.exp(_local(self.params["t"])))

    @property
    def logit_bias(self) -> float | None:
        return float(_local(self.params["b"])) if "b" in self.params else None

    # -- images of a data set ------------------------------------------------------------------
    def embed_images(self, data) -> Embedded:
        """data: a source config entry (dict(source="tfds", name=..., split=...)) or a source
        object -> the embeddings of its readable records (see `Embedded`)."""
        key = data_key(data)
        if key not in self._images:
            self._images[key] = (self._stream(data), data)  # data kept: an id() key stays unique
        return self._images[key][0]

    def _stream(self, data) -> Embedded:
        if self.feature_store is not None:
            return self._stream_features(data)
        batches = pipeline.make_eval_batches(
            data, batch_size=self.batch_size, image_size=self.image_size,
            value_range=self.value_range, data_dir=self.data_dir)
        n, b, s = batches.num_examples, batches.batch, self.image_size
        z = mask = None
        bar = logs.progress(batches, desc=f"embed {_name(data)}", total=len(batches), unit="batch",
                            leave=False, enabled=self.progress)
        for j, batch in enumerate(bar):
            x = jax.make_array_from_process_local_data(
                self._batch_sharding, _pad(batch["image"], b), (self.batch_size, s, s, 3))
            m = jax.make_array_from_process_local_data(
                self._batch_sharding, _pad(batch["mask"], b), (self.batch_size,))
            zb, mb = self._img(self.params, x, m)
            zb, mb = _local(zb), _local(mb)
            if z is None:
                z, mask = np.zeros((n, zb.shape[1]), np.float32), np.zeros((n,), bool)
            lo, hi = j * self.batch_size, min((j + 1) * self.batch_size, n)
            z[lo:hi], mask[lo:hi] = zb[:hi - lo], mb[:hi - lo]
        if z is None:
            raise ValueError(f"nothing to embed: {data!r} has no records")
        index = np.flatnonzero(mask)
        if not len(index):
            raise ValueError(f"no record of {data!r} could be read (skipped: {batches.skipped})")
        return Embedded(z=z[index] if len(index) < n else z, index=index)

    def _stream_features(self, data) -> Embedded:
        """A locked trunk: its features of `data` come from the feature store (written once, on
        the first evaluation; vljax/features.py), and each evaluation runs only the image head."""
        from vljax import features
        source = sources_lib.get_source(dict(data), data_dir=self.data_dir) if isinstance(
            data, (dict, ml_collections.ConfigDict)) else data
        store = features.ensure_features(self.model, self.params, source, self.feature_store,
                                         mesh=self.mesh, image_size=self.image_size,
                                         value_range=self.value_range, batch_size=self.batch_size,
                                         progress=self.progress)
        n, pi, pc = len(store), jax.process_index(), jax.process_count()
        b = self.batch_size // pc
        z = mask = None
        for j in logs.progress(range(-(-n // self.batch_size)), desc=f"embed {_name(data)}", unit="batch",
                               leave=False, enabled=self.progress):
            rows = range(min(j * self.batch_size + pi * b, n), min(j * self.batch_size + (pi + 1) * b, n))
            recs = [store[i] for i in rows]
            ok = np.asarray([("features" in r) for r in recs], bool)
            f = np.stack([r["features"][0] if "features" in r else np.zeros(store.num_features, np.float32)
                          for r in recs]) if recs else np.zeros((0, store.num_features), np.float32)
            x = jax.make_array_from_process_local_data(self._batch_sharding, _pad(f, b),
                                                       (self.batch_size, store.num_features))
            m = jax.make_array_from_process_local_data(self._batch_sharding, _pad(ok, b), (self.batch_size,))
            zb, mb = (_local(a) for a in self._head(self.params, x, m))
            if z is None:
                z, mask = np.zeros((n, zb.shape[1]), np.float32), np.zeros((n,), bool)
            lo, hi = j * self.batch_size, min((j + 1) * self.batch_size, n)
            z[lo:hi], mask[lo:hi] = zb[:hi - lo], mb[:hi - lo]
        index = np.flatnonzero(mask)
        if not len(index):
            raise ValueError(f"no record of {data!r} could be read")
        return Embedded(z=z[index] if len(index) < n else z, index=index)

    # -- texts and in-memory images ------------------------------------------------------------
    def _host_batches(self, fn, x: np.ndarray) -> np.ndarray:
        """fn over host rows x [N, ...] (the same on every process) in padded global batches."""
        out = []
        for lo in range(0, len(x), self.batch_size):
            chunk = _pad(x[lo:lo + self.batch_size], self.batch_size)
            g = jax.make_array_from_callback(chunk.shape, self._batch_sharding,
                                             lambda idx, c=chunk: c[idx])
            out.append(_local(fn(g))[:len(x) - lo])
        if not out:
            raise ValueError("nothing to embed: got no rows")
        return np.concatenate(out).astype(np.float32)

    def embed_texts(self, texts) -> np.ndarray:
        """texts: N strings -> [N, D] float32 L2-normalised; cached per tuple of texts."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got one string")
        key = tuple(texts)
        if key not in self._texts:
            ids = np.asarray(self.tokenizer(list(key)), np.int32)
            self._texts[key] = self._host_batches(lambda t: self._txt(self.params, t), ids)
        return self._texts[key]

    def embed_image_array(self, images: np.ndarray) -> np.ndarray:
        """images: float32 [N, S, S, 3], preprocessed, the same on every process -> [N, D].
        For a few photos in memory (vljax/inference.py); data sets go through `embed_images`."""
        images = np.asarray(images, np.float32)
        ones = np.ones((self.batch_size,), bool)
        mask = jax.make_array_from_callback(ones.shape, self._batch_sharding, lambda idx: ones[idx])
        return self._host_batches(lambda x: self._img(self.params, x, mask)[0], images)
