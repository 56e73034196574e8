"""The label space split over a mesh axis (`config.loss.label_axis`): the label prompts, their
embeddings `labels/ztxt` and the batch's label-set columns `batch/labels` live in slices of K / n
rows on the n devices of that axis, so that no device holds the [K, D] label embeddings (DEXML's
extreme label spaces, vljax/losses/dexml.py; the design holds for K = 100k:
experiments/bench_dexml_memory.py).

The contract with the trainer and the loss:

  * `axis(config)` the configured axis or None; a ValueError naming `loss.label_axis` when it is
    not an axis of `config.mesh` or when the multi-label regulariser (`loss.multilabel_weight`,
    which takes the prompts replicated) is added;
  * `place(config, mesh, label_text)` -> (label_text [K_pad, L], sharding | None): the prompts
    padded to K_pad, the next multiple of the axis size, by repeating prompt 0 (a valid prompt:
    a tower never sees an all-padding text), and the NamedSharding P(axis) of their rows that the
    step constrains the prompts, their embeddings and their locked blocks' states to;
  * `layout(mesh, split)` -> (row axes, spec_of): inside the loss's shard_map the batch's rows are
    split over the batch axes less the label axis (and gathered along it), `labels/...` rows over
    the label axis, `batch/labels` over both (rows, columns);
  * `padded_labels(labels [B, K], k_pad)` -> (labels [B, K_pad], label_mask [K_pad]): the padding
    columns are no label of any image and are masked out of the loss (`label_mask` False), so the
    split loss equals the replicated one on the K real labels.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

KEY = "label_axis"


def axis(config) -> str | None:
    """`config.loss.label_axis` checked against `config.mesh`, or None when it is not set."""
    name = config.loss.get(KEY)
    if name is None:
        return None
    names = [a for a, _ in config.get("mesh") or ()]
    if name not in names:
        raise ValueError(f"config key `loss.{KEY}`: {name!r} is not an axis of config.mesh {names}; "
                         f"name one of them (the label space is split over that axis's devices)")
    if config.loss.get("multilabel_weight"):
        raise ValueError(f"config key `loss.{KEY}`: the multi-label regulariser (`loss.multilabel_weight`) "
                         "takes the label prompts replicated; leave one of the two out")
    return name


def place(config, mesh, label_text):
    """(label_text padded to a multiple of the label axis's size, the rows' NamedSharding), or
    (label_text, None) without `loss.label_axis` or label prompts."""
    split = axis(config)
    if split is None or label_text is None:
        return label_text, None
    n = mesh.shape[split]
    pad = -len(label_text) % n
    text = np.concatenate([label_text, np.repeat(label_text[:1], pad, axis=0)]) if pad else label_text
    return text, NamedSharding(mesh, P(split))


def layout(batch_axes, split):
    """(the axes the loss's rows are split over, spec_of(name, value) -> PartitionSpec): without
    `split` the batch axes and every batched input over them, `labels/...` and scalars
    replicated; with it, as the module docstring says."""
    rows = tuple(batch_axes) if split is None else tuple(a for a in batch_axes if a != split)
    row_spec = rows if rows else None

    def spec_of(name, value):
        if np.ndim(value) == 0:
            return P()
        if name.startswith("labels/"):
            return P() if split is None else P(split)
        if name == "batch/labels" and split is not None:
            return P(row_spec, split)
        return P(row_spec)

    return rows, spec_of


def padded_labels(labels, k_pad: int):
    """labels [B, K] -> (labels [B, k_pad] with zero columns appended, label_mask [k_pad] bool:
    True on the K real columns)."""
    k = labels.shape[-1]
    if k > k_pad:
        raise ValueError(f"batch/labels has {k} columns, more than the {k_pad} label prompts (labels/ztxt)")
    mask = jnp.arange(k_pad) < k
    return jnp.pad(labels, ((0, 0), (0, k_pad - k))), mask
