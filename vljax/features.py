"""LiT features as data: a locked image trunk's features, written once as an array_record store and
read like images, by the training pipeline and by evaluation of a locked trunk.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", Sec. 3) trains the
text tower against a LOCKED image tower: every record then has the same trunk features in every
epoch, so the trunk (everything before the trainable projection head, `TwoTowers.image_trunk`) runs
once per record and view, and the step applies only the head (`TwoTowers.image_head`).

Views: augmentations with few outcomes are stored as views. With `input.augment.greyscale = p > 0`
each record holds [2, F] (colour, grey) and the pipeline picks the grey view with probability p,
with the same random draw the image augmentation makes (vljax/data/preprocess.py), so training on
the store equals training on the images. Continuous augmentations (random crops, colour jitter)
cannot be stored (`check_cacheable`).

Store layout, `<root>/<fingerprint>/` (etils.epath paths, so gs:// workdirs work as local ones):

    features-<p>-of-<P>.array_record   written by process p of P: process p's rows of every global
                                       batch, each the float32 bytes of [V, F] (pre_logits), then,
                                       in a store with tokens, the float16 bytes of [V, N, W] (the
                                       trunk's final tokens); b"" if unreadable
    index.json                         {"fingerprint", "num_records": N, "views", "num_features": F,
                                        "dtype": "float32", "tokens": [N, W] or null,
                                        "tokens_dtype": "float16", "num_files": P, "unreadable": {i: reason}}

Tokens (`tokens=True`, for a loss or evaluator that takes `img/` token inputs, e.g. FILIP): the
trunk's out["tokens"] are stored too, in float16 (half the bytes; EfficientNet-Lite0 at 112 px:
16 x 1280 per view, 40 KiB). float16 keeps 11 significant bits, so the stored tokens are the
trunk's to a relative 2^-11 (~5e-4); the pooled features stay float32. A value beyond float16's
range is refused when written (naming the store), never stored as inf.

Each process writes only its rows (`pipeline.make_eval_batches` gives process p rows [p*b, (p+1)*b)
of every global batch);
the trunk runs jitted on the mesh with the params as they are sharded and the batch split over the
batch axes. The index is written last (temp name, then rename): a store is complete when its index
exists, and a complete store with the same fingerprint is never rewritten (resumes reuse it).

The fingerprint covers the source, the trunk (its configuration and a digest of its parameter
values) and the preprocessing (image size, value range, views): `ensure_features` is the one entry
point for any consumer (training: `training_stores`; evaluation of a locked trunk: call it with the
eval source and read `FeatureSource(...)[i]["features"]` instead of decoding images).
A teacher CLIP's embeddings are stored as data the same way (vljax/teacher_features.py, sharing
`write_atomic` and `params_digest`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from vljax import logs, objective, sharding, towers
from vljax.data import pipeline, sources
from vljax.data.batching import global_batch_size, pad_rows
from vljax.data.preprocess import Preprocess, canonical_value_range

INDEX = "index.json"
VIEWS = ("colour", "grey")
TOKENS_DTYPE = "float16"


def image_trunk_locked(trainable_mask_flat: dict) -> bool:
    """Whether the image tower has a trunk (img/ parameters outside img/head/) and every one of
    them is locked (False in the flat trainable mask {"img/...": bool}): its features are fixed."""
    trunk = [v for k, v in trainable_mask_flat.items() if k.startswith("img/") and not k.startswith("img/head/")]
    return bool(trunk) and not any(trunk)


def check_cacheable(config, trainable_mask_flat: dict) -> None:
    """Raises naming the config key when storing features would change what is trained."""
    if not image_trunk_locked(trainable_mask_flat):
        raise ValueError("config key `lit_cache`: the image tower's trunk (every img/ parameter outside "
                         "img/head/) must be locked by `schedule` (None) to store its features")
    aug = config.input.get("augment") or {}
    for key in ("random_resized_crop", "colour_jitter"):
        if aug.get(key):
            raise ValueError(f"config key `lit_cache`: image augmentation `input.augment.{key}` changes "
                             "the locked tower's features every epoch; disable it or lit_cache")


def views_of(config) -> tuple[str, ...]:
    """The views the training augmentation needs: colour, and grey when input.augment.greyscale > 0."""
    grey = float((config.input.get("augment") or {}).get("greyscale", 0.0) or 0.0)
    return VIEWS if grey > 0 else VIEWS[:1]


def _trunk_params(params):
    return {k: v for k, v in params["img"].items() if k != "head"}


def _leaf_digest(x):
    x = x.astype(jnp.float32)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    return jnp.stack([x.sum(), jnp.abs(x).sum(), (x * w).sum()])


@functools.cache
def _digest_fn(mesh):
    """One jitted digest per mesh: a store's fingerprint is taken at every evaluation of every
    eval set (`ensure_features`), and a new jit there recompiled the whole trunk's digest each time
    (seconds per evaluator on a CPU)."""
    return jax.jit(lambda t: jax.tree.map(_leaf_digest, t), out_shardings=NamedSharding(mesh, P()))


def params_digest(tree, mesh) -> list[str]:
    """Per leaf: sum, sum of |x| and a position-weighted sum, to 6 digits (reduction order may vary)."""
    with jax.set_mesh(mesh):
        values = jax.device_get(_digest_fn(mesh)(tree))
    return [f"{v:.5e}" for v in np.concatenate([np.ravel(x) for x in jax.tree.leaves(values)])]


def needs_tokens(config) -> bool:
    """Whether the configured loss takes the image tower's token outputs (FILIP's
    `img/tokens_proj`), so the store must keep the trunk's tokens (`objective.needs_tokens`)."""
    return objective.needs_tokens(config.loss)


def fingerprint(model, params, source, *, mesh, image_size, value_range, views, tokens=False) -> str:
    """16 hex digits naming what determines the features: source (its records' cache key,
    vljax/data/sources/base.py), trunk and preprocessing."""
    image_cfg = {k: v for k, v in (model.image or {}).items() if k not in ("num_classes", "head_bias")}
    parts = dict(source=sources.cache_key(source), n=len(source), image_model=model.image_model,
                 image=image_cfg, trunk=params_digest(_trunk_params(params), mesh), image_size=int(image_size),
                 value_range=canonical_value_range(value_range), views=list(views))
    if tokens:  # a store without tokens is never taken for one with them (or back)
        parts["tokens"] = TOKENS_DTYPE
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _local_rows(j: int, n: int, batch: int, local_batch: int, p: int) -> range:
    """Records of global batch j that process p reads (`pipeline.make_eval_batches`)."""
    lo = j * batch + p * local_batch
    return range(min(lo, n), min(lo + local_batch, n))


def _file_name(p: int, count: int) -> str:
    return f"features-{p:05d}-of-{count:05d}.array_record"


def _read_index(path: epath.Path) -> dict | None:
    f = path / INDEX
    return json.loads(f.read_text()) if f.exists() else None


def write_atomic(dst: epath.Path, write) -> None:
    """write(local_path) then move the file to dst: a reader sees all of it or nothing."""
    if "://" not in str(dst):
        tmp = dst.parent / f".{dst.name}.tmp{os.getpid()}"
        write(str(tmp))
        tmp.rename(dst)
        return
    with tempfile.TemporaryDirectory() as d:  # array_record writes local files; copy them up
        local = os.path.join(d, dst.name)
        write(local)
        tmp = dst.parent / f".{dst.name}.tmp"
        epath.Path(local).copy(tmp, overwrite=True)
        tmp.rename(dst)


def trunk_parts(mesh) -> int:
    """How many independent slices the trunk's batch runs as, inside one jit: on one CPU device, one
    per core (up to 4), which XLA:CPU runs concurrently (EfficientNet-Lite0's convolutions keep about
    one core busy: 64 images in 0.43 s whole, 0.31 s as two halves, on 2 cores); else 1. Each row is
    computed exactly as in the whole batch (rows of a batch are independent and bitwise equal at
    any batch size, tests/test_features.py), so the stored features do not depend on it."""
    if mesh.devices.size != 1 or mesh.devices.flat[0].platform != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 4))


_TRUNKS: list = []  # [((model, tokens, parts, mesh), jitted trunk)], the most recent last
_TRUNKS_KEPT = 4


def _jitted_trunk(model, tokens: bool, parts: int, mesh):
    """The trunk jitted once per (equal model, tokens, parts, mesh): every store written in a run
    (the training sets', each evaluation set's) reuses one compilation per batch shape. Flax
    modules holding dicts are not hashable: equal ones are found as towers.TowerCache finds them."""
    for i, ((m, t, p, me), fn) in enumerate(_TRUNKS):
        if (t, p, me) == (tokens, parts, mesh) and towers.same_module(m, model):
            _TRUNKS.append(_TRUNKS.pop(i))
            return fn
    bspec = P(sharding.batch_axes(mesh))
    fn = jax.jit(_trunk(model, tokens, parts), out_shardings=NamedSharding(mesh, bspec))
    _TRUNKS.append(((model, tokens, parts, mesh), fn))
    del _TRUNKS[:-_TRUNKS_KEPT]
    return fn


def _trunk(model, tokens: bool, parts: int):
    """params, images [B, ...] -> the trunk's outputs, the batch run as `parts` slices (B % parts == 0)."""
    def whole(p, x):
        return model.apply({"params": p}, x, tokens=tokens, method=model.image_trunk)

    def sliced(p, x):
        outs = [whole(p, xi) for xi in jnp.split(x, parts)]
        return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
    return whole if parts == 1 else sliced


def write_features(model, params, source, path, *, mesh, image_size, value_range, views=VIEWS[:1],
                   batch_size: int = 64, progress: bool = True, tokens: bool = False) -> dict:
    """Writes the store of `source` at `path` (module docstring) unless a complete one with the same
    fingerprint is there; returns its index. Called by every process (the trunk runs on the mesh).

    params: the model's params as they are (global arrays, sharded as training shards them).
    views: names in VIEWS ("colour", "grey"); batch_size: global, rounded up to the batch shards.
    tokens: also store the trunk's final tokens (float16; module docstring).
    """
    fp = fingerprint(model, params, source, mesh=mesh, image_size=image_size, value_range=value_range,
                     views=views, tokens=tokens)
    return _write(model, params, source, epath.Path(path), fp, mesh=mesh, image_size=image_size,
                  value_range=value_range, views=views, batch_size=batch_size, progress=progress,
                  tokens=tokens)


def _write(model, params, source, path, fp, *, mesh, image_size, value_range, views, batch_size, progress,
           tokens=False):
    index = _read_index(path)
    if index is not None and index["fingerprint"] == fp:
        logging.debug("LiT features: reusing %s (%d records x %s)", path, index["num_records"], index["views"])
        return index
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"LiT features: unknown views {unknown} (known: {VIEWS})")
    pi, pc = jax.process_index(), jax.process_count()
    batch_size = global_batch_size(batch_size, mesh)
    bspec = P(sharding.batch_axes(mesh))
    parts = trunk_parts(mesh)
    parts = parts if batch_size % parts == 0 else 1
    trunk = _jitted_trunk(model, tokens, parts, mesh)
    passes = [pipeline.make_eval_batches(source, batch_size=batch_size, image_size=image_size,
                                         value_range=value_range, greyscale=v == "grey") for v in views]
    n, local_b = len(source), passes[0].batch
    n_local = sum(len(_local_rows(i, n, batch_size, local_b, pi)) for i in range(passes[0].num_batches))
    reasons = Preprocess(image_size=image_size, value_range=canonical_value_range(value_range),
                         require_caption=False)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    unreadable, num_features, token_shape = {}, None, None

    def write(local_file):
        nonlocal num_features, token_shape
        writer = ArrayRecordWriter(local_file, "group_size:1")
        bar = None
        if progress and pi == 0:
            bar = tqdm(total=n_local, desc=f"LiT features {source!r}", unit="img", dynamic_ncols=True)
        with jax.set_mesh(mesh):
            for batches in zip(*passes):
                rows, toks = [], []
                for b in batches:  # every process takes part, with its (padded) rows
                    x = jax.make_array_from_process_local_data(
                        sharding.batch_sharding(mesh), pad_rows(b["image"], local_b),
                        (batch_size,) + b["image"].shape[1:])
                    out = multihost_utils.global_array_to_host_local_array(trunk(params, x), mesh, bspec)
                    rows.append(out[0] if tokens else out)
                    if tokens:
                        toks.append(_to_tokens_dtype(np.asarray(out[1], np.float32), path))
                rows = np.stack([np.asarray(r, np.float32) for r in rows], axis=1)  # [b, V, F]
                num_features = rows.shape[-1]
                if tokens:
                    toks = np.stack(toks, axis=1)  # [b, V, N, W]
                    token_shape = list(toks.shape[2:])
                for j, (i, ok) in enumerate(zip(batches[0]["index"], batches[0]["mask"])):
                    if ok:
                        writer.write(rows[j].tobytes() + (toks[j].tobytes() if tokens else b""))
                    else:  # an unreadable record: its reason, as the image pipeline would give it
                        writer.write(b"")
                        unreadable[int(i)] = reasons.eval(source[int(i)]).get("skip", "decode_error")
                if bar is not None:
                    bar.update(len(batches[0]["index"]))
        writer.close()
        if bar is not None:
            bar.close()

    write_atomic(path / _file_name(pi, pc), write)
    (path / f"unreadable-{pi:05d}.json").write_text(json.dumps(unreadable))
    multihost_utils.sync_global_devices(f"lit features written {fp}")
    if pi == 0:
        merged = {}
        for p in range(pc):
            side = path / f"unreadable-{p:05d}.json"
            merged.update(json.loads(side.read_text()))
            side.unlink()
        index = dict(fingerprint=fp, num_records=n, views=list(views), num_features=num_features,
                     dtype="float32", tokens=token_shape, tokens_dtype=TOKENS_DTYPE, num_files=pc, global_batch=batch_size, source=repr(source),
                     unreadable=merged)
        write_atomic(path / INDEX, lambda f: epath.Path(f).write_text(json.dumps(index, indent=1)))
    multihost_utils.sync_global_devices(f"lit features indexed {fp}")
    index = _read_index(path)
    (logs.info if progress else logging.debug)(
        "LiT features: wrote %s, %d records x %d views x %d features in %.1f s (%d unreadable)",
                 path, n, len(views), num_features, time.perf_counter() - t0, len(index["unreadable"]))
    return index


def _to_tokens_dtype(x: np.ndarray, path) -> np.ndarray:
    y = x.astype(TOKENS_DTYPE)
    if not np.all(np.isfinite(y)) and np.all(np.isfinite(x)):
        raise ValueError(f"LiT features {path}: the trunk's tokens exceed {TOKENS_DTYPE}'s range "
                         f"(max |x| = {np.abs(x).max():.3g}); they cannot be stored")
    return y


class FeatureSource:
    """A complete store as a random-access source: `len`, `[i] -> {"features": f32 [V, F]}`
    (and `"tokens": f16 [V, N, W]` in a store with tokens) or `{"error": reason}` for a record
    whose image could not be read. Picklable (grain workers)."""

    def __init__(self, path):
        self.path = epath.Path(path)
        index = _read_index(self.path)
        if index is None:
            raise FileNotFoundError(f"LiT features: {self.path / INDEX} does not exist (an incomplete "
                                    "or missing store; `ensure_features` writes it)")
        self.index = index
        self.num_records, self.views = index["num_records"], tuple(index["views"])
        self.num_features, self._files = index["num_features"], index["num_files"]
        self.token_shape = tuple(index["tokens"]) if index.get("tokens") else None
        self._unreadable = {int(k): v for k, v in index["unreadable"].items()}
        self._batch = index["global_batch"]
        self._local_batch = self._batch // self._files
        batches = -(-self.num_records // self._batch)
        sizes = [sum(len(_local_rows(j, self.num_records, self._batch, self._local_batch, p))
                     for j in range(batches)) for p in range(self._files)]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._records = grain.sources.ArrayRecordDataSource(
            [str(self.path / _file_name(p, self._files)) for p in range(self._files)])
        if len(self._records) != self.num_records:
            raise ValueError(f"LiT features: {self.path} holds {len(self._records)} records, its "
                             f"{INDEX} says {self.num_records}")

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, i: int) -> dict:
        if i in self._unreadable:
            return {"error": self._unreadable[i]}
        # Global batch j of B records, process p's rows [p*b, (p+1)*b) of it (make_eval_batches):
        # record i is row (i // B) * b + i % B - p * b of process p's file.
        j, r = divmod(int(i), self._batch)
        p = r // self._local_batch
        raw = self._records[int(self._offsets[p] + j * self._local_batch + r - p * self._local_batch)]
        v, f = len(self.views), self.num_features
        rec = {"features": np.frombuffer(raw, np.float32, count=v * f).reshape(v, f)}
        if self.token_shape is not None:
            rec["tokens"] = np.frombuffer(raw, TOKENS_DTYPE, offset=4 * v * f).reshape(v, *self.token_shape)
        return rec

    def __repr__(self):
        return f"FeatureSource({str(self.path)!r}, n={self.num_records}, views={self.views})"


def ensure_features(model, params, source, store_root, *, mesh, image_size, value_range, views=VIEWS[:1],
                    batch_size: int = 64, progress: bool = True, tokens: bool = False) -> FeatureSource:
    """The store of `source`'s trunk features under `store_root/<fingerprint>/`, written if missing.

    For evaluation of a locked trunk: `fs = ensure_features(model, params, eval_source, root, ...)`,
    then `model.apply({"params": p}, fs[i]["features"][0][None], method=model.image_head)` embeds
    record i with any head `p` on top of the same trunk (with `tokens`, `method=model.image_head_tokens`
    on `fs[i]["features"]` and `fs[i]["tokens"]` gives the projected tokens too).
    """
    fp = fingerprint(model, params, source, mesh=mesh, image_size=image_size, value_range=value_range,
                     views=views, tokens=tokens)
    path = epath.Path(store_root) / fp
    _write(model, params, source, path, fp, mesh=mesh, image_size=image_size, value_range=value_range,
           views=views, batch_size=batch_size, progress=progress, tokens=tokens)
    return FeatureSource(path)


def training_stores(config, model, params, trainable_mask_flat: dict, mesh, workdir) -> list[FeatureSource]:
    """One store per entry of `config.input.data` (in order) under `<workdir>/features/`, with the
    views the augmentation needs, and the trunk's tokens when the loss takes them (`needs_tokens`);
    raises naming the config key when the trunk cannot be stored."""
    check_cacheable(config, trainable_mask_flat)
    tokens = needs_tokens(config)
    data_dir = config.input.get("data_dir")
    return [ensure_features(model, params, sources.get_source(entry, data_dir=data_dir),
                            epath.Path(workdir) / "features", mesh=mesh, image_size=config.input.image_size,
                            value_range=config.input.get("value_range", "efficientnet"), views=views_of(config),
                            batch_size=config.get("eval_batch_size", 64), tokens=tokens)
            for entry in config.input.data]
