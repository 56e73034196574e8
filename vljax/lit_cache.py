"""LiT feature cache: a locked image tower gives every record the same features in every epoch, so
they are computed once and the training step reads them from a table.

The table holds the locked trunk's output (`out["pre_logits"]`, before the trainable projection
head), one row per record of `config.input.data`'s sources concatenated in config order; the
training pipeline's `batch["index"]` (`emit_index=True`) points into it. Augmentations with few
outcomes are cached as views: with `input.augment.greyscale = p > 0` the table is [N, 2, F]
(colour, greyscale) and the step takes the greyscale view with probability p, per example, as the
uncached pipeline would; continuous augmentations (random crops, colour jitter) cannot be cached. Records that cannot be
read keep a zero row (the pipeline skips them anyway). The table is saved in the workdir, keyed by
a fingerprint of what determines it, so a resumed run does not recompute it.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from vljax.data import pipeline, sources


def check_cacheable(config, trainable_mask_flat: dict) -> None:
    """Raises naming the config key when caching would change what is trained."""
    trunk = {k: v for k, v in trainable_mask_flat.items() if k.startswith("img/") and not k.startswith("img/head/")}
    if not trunk or any(trunk.values()):
        raise ValueError("config key `lit_cache`: the image tower's trunk (every img/ parameter outside "
                         "img/head/) must be locked by `schedule` (None) to cache its features")
    aug = config.input.get("augment") or {}
    for key in ("random_resized_crop", "colour_jitter"):
        if aug.get(key):
            raise ValueError(f"config key `lit_cache`: image augmentation `input.augment.{key}` changes "
                             "the locked tower's features every epoch; disable it or lit_cache")


def _fingerprint(config) -> str:
    parts = dict(data=[dict(e) for e in config.input.data], size=config.input.image_size, grey=greyscale_prob(config) > 0,
                 value_range=config.input.get("value_range"), image=dict(config.model.image),
                 image_model=config.model.image_model, init=(config.get("model_init") or {}).get("img"),
                 seed=config.seed if not (config.get("model_init") or {}).get("img") else None)
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def greyscale_prob(config) -> float:
    return float((config.input.get("augment") or {}).get("greyscale", 0.0) or 0.0)


def compute(model, params, config, batch_size: int = 64) -> np.ndarray:
    """[N_records, V, F] trunk features of every record (sources in config order) and view."""
    feats_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, None, method=model.image_features))
    data_dir = config.input.get("data_dir")
    views = [False, True] if greyscale_prob(config) > 0 else [False]
    tables = []
    for entry in config.input.data:
        src = sources.get_source(entry, data_dir=data_dir)
        per_view = []
        for grey in views:
            batches = pipeline.make_eval_batches(
                src, batch_size=batch_size, image_size=config.input.image_size,
                value_range=config.input.get("value_range", "efficientnet"), data_dir=data_dir,
                process_index=0, process_count=1, greyscale=grey)
            rows = []
            for b in batches:
                f = np.asarray(feats_fn(params, b["image"]), np.float32)
                rows.append(np.where(b["mask"][:, None], f, 0.0))
            per_view.append(np.concatenate(rows)[:len(src)])
        tables.append(np.stack(per_view, axis=1))
    return np.concatenate(tables)


def select(table, index, rng, grey_p: float):
    """table: [N, V, F], index: int [B] -> [B, F], view 1 (greyscale) with probability grey_p."""
    import jax.numpy as jnp
    rows = jnp.take(table, index, axis=0)
    if table.shape[1] == 1:
        return rows[:, 0]
    grey = jax.random.bernoulli(rng, grey_p, (index.shape[0],)).astype(jnp.int32)
    return jnp.take_along_axis(rows, grey[:, None, None], axis=1)[:, 0]


def build(model, params, config, workdir: str) -> np.ndarray:
    """Loads the workdir's cache if its fingerprint matches, else computes and saves it."""
    path = os.path.join(workdir, f"lit_cache_{_fingerprint(config)}.npy")
    if os.path.exists(path):
        table = np.load(path)
        logging.info("LiT cache: loaded %s %s", path, table.shape)
        return table
    table = compute(model, params, config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, table)
        os.replace(tmp, path)
    logging.info("LiT cache: computed %s for %d records", table.shape, len(table))
    return table
