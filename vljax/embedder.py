"""Embedder: a two-tower model's towers, jitted once on the training mesh, streaming eval data.

It implements the protocol evaluators use (vljax/evaluators/base.py): `embed_images(data)`,
`embed_texts(texts)`, `logit_scale`, `logit_bias`, `similarity`, and for late interaction (FILIP,
vljax/evaluators/late_interaction.py) `embed_image_tokens(data)` / `embed_text_tokens(texts)`:
the projected, per-token normalised tokens (out["img/tokens_proj"], out["txt/tokens_proj"]),
streamed the same way; only the set's tokens [N, T, D] are kept. For the dense probe
(vljax/evaluators/dense_probe.py) `embed_patch_tokens(data)`: the image tower's own tokens; for a
model with a caption decoder (vljax/evaluators/captioning.py) `caption_loglik(data, texts)`:
its log-likelihood of texts given the images.

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
- The batch size is rounded up and the last batch padded by vljax/data/batching.py (the helper
  the feature store uses too), so each tower compiles once.
- Nothing waits per batch: batches are decoded ahead in threads or grain worker processes
  (`workers`, config.input.eval_workers), each batch's tower call is dispatched before the
  previous batch's result is copied to the host (`_one_behind`), and the jitted towers are
  shared by every Embedder of an equal model on the same mesh (a `TowerCache`, by default the
  class's `Embedder.shared_towers`), so a fresh Embedder per evaluation compiles nothing after
  the first.
- A locked image trunk (LiT with `lit_cache`) is embedded from the feature store
  (vljax/features.py: this module imports it, never the other way).

Build one with `Embedder.from_bundle(bundle, mesh=...)`: a model bundle (`factory.Bundle`, an
`inference.Predictor`) carries the model, params, tokenizer, image preprocessing and similarity.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import features, logs, sharding, towers
from vljax.data import pipeline
from vljax.data import sources as sources_lib
from vljax.data.batching import global_batch_size, pad_rows
from vljax.data.eval_transform import EvalImage
from vljax.towers import TowerCache  # noqa: F401  (public here since it began)


@dataclasses.dataclass
class Embedded:
    """Image embeddings of the readable records of a source, in record order.

    z: [M, D] float32 (L2-normalised by the model), or [M, N, D] projected tokens
    (`embed_image_tokens`). index: [M] int, their record indices.
    """
    z: np.ndarray
    index: np.ndarray


def _local(x: jax.Array) -> np.ndarray:
    """A replicated global array as numpy (this process's copy)."""
    return np.asarray(x.addressable_data(0))


def _one_behind(outputs):
    """outputs: an iterator of dispatched tower calls (pytrees of replicated global arrays) ->
    their host copies (numpy, this process's copy), in order. Call j+1 is dispatched (the next
    batch made and put on the mesh) before call j's result is waited for, so the host prepares
    batch j+1 while the devices run batch j and the device->host copy starts as soon as j ends."""
    prev = None
    for out in outputs:
        local = jax.tree.map(lambda a: a.addressable_data(0), out)
        for a in jax.tree.leaves(local):
            a.copy_to_host_async()
        if prev is not None:
            yield jax.tree.map(np.asarray, prev)
        prev = local
    if prev is not None:
        yield jax.tree.map(np.asarray, prev)


class _Rows:
    """Per-batch outputs [B, ...] of a streamed set, gathered into [N, ...] rows in record order
    (the one accumulator of `_stream` and `_stream_features`)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size, self.z, self.mask = n, batch_size, None, None

    def put(self, j: int, zb: np.ndarray, mb: np.ndarray) -> None:
        if self.z is None:
            self.z, self.mask = np.zeros((self.n,) + zb.shape[1:], np.float32), np.zeros((self.n,), bool)
        lo, hi = j * self.batch_size, min((j + 1) * self.batch_size, self.n)
        self.z[lo:hi], self.mask[lo:hi] = zb[:hi - lo], mb[:hi - lo]

    def result(self, data, why: str) -> Embedded:
        if self.z is None:
            raise ValueError(f"nothing to embed: {data!r} has no records")
        index = np.flatnonzero(self.mask)
        if not len(index):
            raise ValueError(f"no record of {data!r} could be read{why}")
        return Embedded(z=self.z[index] if len(index) < self.n else self.z, index=index)


def _name(data) -> str:
    if isinstance(data, (dict, ml_collections.ConfigDict)):
        return f"{data.get('name', data.get('path', '?'))}/{data.get('split', '')}".rstrip("/")
    return getattr(data, "name", type(data).__name__)


def data_key(data, data_dir=None) -> str:
    """The cache key naming which images `data` holds (labels and captions do not matter): its
    source's `cache_key()` (vljax/data/sources/base.py; a config entry is opened, TFDS under
    `data_dir` unless it names one); anything else is a TypeError naming its type."""
    if isinstance(data, (dict, ml_collections.ConfigDict)):
        return sources_lib.cache_key(sources_lib.get_source(dict(data), data_dir=data_dir))
    return sources_lib.cache_key(data)


class Embedder:
    """Embeds eval data and texts with fixed params on `mesh` (see the module docstring).

    `Embedder.from_bundle(bundle, mesh=...)` is the usual way to make one.

    Args:
      model: a TwoTowers. params: its parameters (global jax.Arrays on `mesh`, or host arrays).
      tokenizer: `tok(list[str]) -> int32 [N, L]`.
      mesh: the device mesh (the trainer's); the batch is split over its data axes.
      image_size, value_range: preprocessing, as `config.input` says for the model; or
        eval_image: the model's eval transform (`EvalImage.from_spec(spec)`: a SigLIP squash
        resize, a NaFlex tower's patch dicts, streamed as padded batches of its budget).
      batch_size: the global batch; rounded up to a multiple of the batch shards and processes.
      data_dir: TFDS data dir for data given as config entries.
      similarity: how evaluators score by default: "global" (cosine of the pooled embeddings) or
        "filip" (late interaction; a model trained with loss "filip", vljax/factory.py's spec).
      read_threads, workers: batches decoded ahead by this many threads, or by `workers` grain
        worker processes when > 0 (config.input.eval_workers; the tokenizer must be picklable).
      feature_store: the root of a locked trunk's feature stores (vljax/features.py), or None.
      towers: the cache of jitted towers to draw from (default: `Embedder.shared_towers`).
      text_memo: a `text_memo.TextMemo` of these params' locked lowest text blocks (the trainer's,
        config.text_cache): texts then run only the blocks above them, and the memo outlives
        `with_params` (those blocks are locked, so their states stay valid).
    """

    shared_towers: ClassVar[TowerCache] = TowerCache()

    def __init__(self, model, params, tokenizer, *, mesh, image_size: int | None = None,
                 value_range="efficientnet", eval_image: EvalImage | None = None, batch_size: int = 64, data_dir=None, feature_store=None, progress: bool = True,
                 similarity: str = "global", read_threads: int = 4, workers: int = 0,
                 towers: TowerCache | None = None, text_memo=None):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.similarity = similarity
        self.progress = progress
        self.read_threads, self.workers = int(read_threads), int(workers)
        self.feature_store, self.text_memo = feature_store, text_memo
        self.eval_image = eval_image or EvalImage(image_size, value_range)
        if feature_store is not None and self.eval_image.naflex is not None:
            raise ValueError(f"feature_store={feature_store}: stored trunk features are for "
                             "fixed-resolution image towers, not NaFlex")
        self.image_size, self.value_range = self.eval_image.image_size, self.eval_image.value_range
        self.data_dir = data_dir
        self.batch_size = global_batch_size(batch_size, mesh)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self.params = self._on_mesh(params)
        self._fn = (self.shared_towers if towers is None else towers).get(model, mesh)
        self._images = {}
        self._texts: dict[bool, dict[str, np.ndarray]] = {}  # tokens? -> text -> its row(s)

    @classmethod
    def from_bundle(cls, bundle, *, mesh, params=None, **kwargs) -> "Embedder":
        """The Embedder of a model bundle: anything with `model`, `params`, `tokenizer`,
        `eval_image` (or `image_size` and `value_range`) and `similarity` (`factory.Bundle`,
        `inference.Predictor`), so images are preprocessed and scored as the model's spec says.

        params: other params of the same model (default: the bundle's). kwargs: the other
        `Embedder` arguments (batch_size, workers, feature_store, progress, data_dir, ...).
        """
        ev = getattr(bundle, "eval_image", None) or EvalImage(bundle.image_size, bundle.value_range)
        return cls(bundle.model, bundle.params if params is None else params, bundle.tokenizer,
                   mesh=mesh, eval_image=ev, similarity=bundle.similarity, **kwargs)

    def with_params(self, params) -> "Embedder":
        """The same towers over other params, with empty caches (one per evaluation)."""
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
        return self._cached(data, "z")

    def embed_image_tokens(self, data) -> Embedded:
        """Like `embed_images`, with z the projected, per-token L2-normalised image tokens
        [M, N, D] (out["img/tokens_proj"]; every image token is real: no mask)."""
        return self._cached(data, "tokens")

    def embed_patch_tokens(self, data) -> Embedded:
        """Like `embed_images`, with z the image tower's own tokens out["img/tokens"] [M, N, W]
        (after its final norm, before any head; a class token first for pool_type="cls"; NaFlex:
        every row of the patch budget, padding included): the dense probe's features
        (vljax/evaluators/dense_probe.py). Always computed from the images (a LiT feature store
        keeps no tokens unless its loss takes them). A tower without tokens is refused."""
        return self._cached(data, "patch")

    def caption_loglik(self, data, texts, *, paired: bool = False) -> tuple[Embedded, np.ndarray]:
        """The caption decoder's log-likelihood of `texts` given the images of `data` (teacher
        forcing, autoregressive; `towers.decoder_loglik`), streamed like `embed_images`.

        paired=False: every text with every image -> z [M, T] (CapPa's scoring classifier);
        paired=True: text i with record i (len(texts) == len(data)) -> z [M].
        Returns (Embedded(z, index [M] the readable records), counts int [T] (paired: [N]): the
        real tokens of each text, ids != the decoder's pad_id); z is the sum of their log p.
        A model without a caption decoder is refused, naming `model.decoder`."""
        towers.check_decoder(self.model)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("caption_loglik: got no texts")
        ids = np.asarray(self.tokenizer(texts), np.int32)
        counts = (ids != int(self.model.decoder.get("pad_id", 0))).sum(axis=1)
        if paired:
            if len(texts) != len(data):
                raise ValueError(f"caption_loglik(paired=True): {len(texts)} texts for {len(data)} "
                                 f"records of {data!r}")

            def texts_of(j):  # global batch j's texts, padded (every process holds them all)
                chunk = pad_rows(ids[j * self.batch_size:(j + 1) * self.batch_size], self.batch_size)
                return jax.make_array_from_callback(chunk.shape, self._batch_sharding, lambda idx: chunk[idx])
            fn = self._fn.dec_loglik_paired
            return self._stream(data, lambda x, m, j: fn(self.params, x, m, texts_of(j))), counts
        all_ids = jax.make_array_from_callback(ids.shape, NamedSharding(self.mesh, P()), lambda idx: ids[idx])
        return self._stream(data, lambda x, m, j: self._fn.dec_loglik(self.params, x, m, all_ids)), counts

    def _cached(self, data, what: str) -> Embedded:
        key = (data_key(data, self.data_dir), what)
        if key not in self._images:
            if self.feature_store is not None and what != "patch":
                self._images[key] = self._stream_features(data, what == "tokens")
            else:
                fn = {"z": self._fn.img, "tokens": self._fn.img_tok, "patch": self._fn.img_patch}[what]
                self._images[key] = self._stream(data, lambda x, m, j: fn(self.params, x, m))
        return self._images[key]

    def _stream(self, data, call) -> Embedded:
        """Streams the images of `data` through `call(x, m, j)` (x the global batch j, m its mask
        of real rows; returns the dispatched (out [B, ...], m)) -> the readable records' rows."""
        batches = pipeline.make_eval_batches(
            data, batch_size=self.batch_size, eval_image=self.eval_image, data_dir=self.data_dir,
            read_threads=self.read_threads, workers=self.workers)
        b = batches.batch
        rows = _Rows(batches.num_examples, self.batch_size)
        bar = logs.progress(batches, desc=f"embed {_name(data)}", total=len(batches), unit="batch",
                            leave=False, enabled=self.progress)

        def dispatched():
            for j, batch in enumerate(bar):
                x = jax.tree.map(lambda a: jax.make_array_from_process_local_data(
                    self._batch_sharding, pad_rows(a, b), (self.batch_size,) + a.shape[1:]),
                    batch["image"])  # an array [b, S, S, 3] or a NaFlex dict of [b, ...]
                m = jax.make_array_from_process_local_data(
                    self._batch_sharding, pad_rows(batch["mask"], b), (self.batch_size,))
                yield call(x, m, j)
        for j, out in enumerate(_one_behind(dispatched())):
            rows.put(j, *out)
        return rows.result(data, f" (skipped: {batches.skipped})")

    def _stream_features(self, data, tokens: bool) -> Embedded:
        """A locked trunk: its features of `data` (and tokens, for late interaction) come from the
        feature store (written once, on the first evaluation; vljax/features.py), and each
        evaluation runs only the image head (and its token projection)."""
        source = sources_lib.get_source(dict(data), data_dir=self.data_dir) if isinstance(
            data, (dict, ml_collections.ConfigDict)) else data
        store = features.ensure_features(self.model, self.params, source, self.feature_store,
                                         mesh=self.mesh, image_size=self.image_size,
                                         value_range=self.value_range, batch_size=self.batch_size,
                                         progress=self.progress, tokens=tokens)
        n, pi, pc = len(store), jax.process_index(), jax.process_count()
        b = self.batch_size // pc
        rows = _Rows(n, self.batch_size)
        shapes = {"features": (store.num_features,), "tokens": store.token_shape}

        def dispatched(j):
            recs = [store[i] for i in range(min(j * self.batch_size + pi * b, n),
                                            min(j * self.batch_size + (pi + 1) * b, n))]
            ok = np.asarray([("features" in r) for r in recs], bool).reshape(len(recs))

            def stacked(k):  # this process's rows of the global batch, view 0 (colour), padded
                dtype = np.float32 if k == "features" else features.TOKENS_DTYPE
                f = np.zeros((len(recs),) + shapes[k], dtype)
                for r, rec in enumerate(recs):
                    if "features" in rec:
                        f[r] = rec[k][0]
                return jax.make_array_from_process_local_data(self._batch_sharding, pad_rows(f, b),
                                                              (self.batch_size,) + shapes[k])
            m = jax.make_array_from_process_local_data(self._batch_sharding, pad_rows(ok, b), (self.batch_size,))
            return (self._fn.head_tok(self.params, stacked("features"), stacked("tokens"), m) if tokens
                    else self._fn.head(self.params, stacked("features"), m))
        steps = logs.progress(range(-(-n // self.batch_size)), desc=f"embed {_name(data)}", unit="batch",
                              leave=False, enabled=self.progress)
        for j, out in enumerate(_one_behind(map(dispatched, steps))):
            rows.put(j, *out)
        return rows.result(data, "")

    # -- texts and in-memory images ------------------------------------------------------------
    def _host_batches(self, fn, *xs: np.ndarray):
        """fn over host rows xs [N, ...] (the same on every process; several arrays of N rows go
        in batch by batch together) in padded global batches; fn returns an array or a tuple of
        arrays (float outputs come back float32)."""
        n = len(xs[0])

        def put(chunk):
            return jax.make_array_from_callback(chunk.shape, self._batch_sharding, lambda idx: chunk[idx])

        def dispatched():
            for lo in range(0, n, self.batch_size):
                yield fn(*(put(pad_rows(x[lo:lo + self.batch_size], self.batch_size)) for x in xs))
        out = list(_one_behind(dispatched()))
        if not out:
            raise ValueError("nothing to embed: got no rows")
        cat = lambda *a: np.concatenate(a).astype(np.float32 if np.issubdtype(a[0].dtype, np.floating)  # noqa: E731
                                                 else a[0].dtype)
        return jax.tree.map(lambda *a: cat(*a)[:n], *out)

    def embed_texts(self, texts) -> np.ndarray:
        """texts: N strings -> [N, D] float32 L2-normalised; cached per tuple of texts."""
        return self._text_cached(texts, tokens=False)

    def embed_text_tokens(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """texts: N strings -> (tokens [N, L, D] float32, the projected per-token L2-normalised
        text tokens, out["txt/tokens_proj"]; mask [N, L] bool, True = a real token); cached."""
        return self._text_cached(texts, tokens=True)

    def _text_cached(self, texts, tokens: bool):
        """Embeds each distinct text once per Embedder (per evaluation): evaluators that share
        texts (a retrieval subset's captions, repeated captions, one set's prompts in several
        evaluators) reuse its rows. A row is the same whatever texts share its batch (every batch
        is padded to the same shape; docs/TOOLCHAIN.md, "JAX")."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got one string")
        texts = list(texts)
        if not texts:
            raise ValueError("nothing to embed: got no texts")
        rows = self._texts.setdefault(tokens, {})
        new = [t for t in dict.fromkeys(texts) if t not in rows]
        if new:
            out = self._embed_texts_now(new, tokens)
            for i, text in enumerate(new):
                rows[text] = jax.tree.map(lambda a, i=i: a[i], out)
        return jax.tree.map(lambda *r: np.stack(r), *(rows[t] for t in texts))

    def _embed_texts_now(self, texts: list[str], tokens: bool):
        ids = np.asarray(self.tokenizer(texts), np.int32)
        if self.text_memo is None:
            fn = self._fn.txt_tok if tokens else self._fn.txt
            return self._host_batches(lambda t: fn(self.params, t), ids)
        # only the blocks above the memoised locked ones run, a few batches at a time
        fn, k = (self._fn.txt_tok_upper if tokens else self._fn.txt_upper), self.text_memo.blocks
        step = 8 * self.batch_size  # bounds the [rows, L, W] states held at once
        parts = [self._host_batches(lambda t, s: fn(self.params, t, s, k), sub, self.text_memo(sub))
                 for sub in (ids[lo:lo + step] for lo in range(0, len(ids), step))]
        return jax.tree.map(lambda *a: np.concatenate(a), *parts)

    def embed_image_array(self, images) -> np.ndarray:
        """images: float32 [N, S, S, 3], preprocessed, the same on every process (NaFlex: the dict
        of [N, ...] arrays, `EvalImage.stack`; one over the patch budget is refused) -> [N, D].
        For a few photos in memory (vljax/inference.py); data sets go through `embed_images`."""
        self.eval_image.check_batch(images)
        ones = np.ones((self.batch_size,), bool)
        mask = jax.make_array_from_callback(ones.shape, self._batch_sharding, lambda idx: ones[idx])
        if isinstance(images, dict):
            keys = sorted(images)
            return self._host_batches(
                lambda *xs: self._fn.img(self.params, dict(zip(keys, xs)), mask)[0],
                *(np.asarray(images[k]) for k in keys))
        return self._host_batches(lambda x: self._fn.img(self.params, x, mask)[0],
                                  np.asarray(images, np.float32))
