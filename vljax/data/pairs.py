"""Pairs of examples for LaSO's set-operation training (vljax/adapt/laso.py): a seeded grain
pipeline whose element s is batch s of index pairs (i, j), gathered features and label sets.

Batch s is a pure function of (seed, s): `pair_batch` draws it with `np.random.default_rng((seed, s))`,
so a resumed iterator (grain's `get_state` / `set_state`) or a fresh one started at step s gives
the batches an uninterrupted run would, and reading it in worker threads changes nothing.

Each pair's first example i is uniform over the examples. With probability `shared_fraction` its
partner j is drawn among the examples that share a label with i (a label l of i uniformly, then j
uniformly among the others holding l), else uniformly among all others. The paper draws pairs
at random from COCO, where most pairs of images share a label ("person"); on sparse tag sets (the
demo's openclipart tags: most random pairs share nothing) uniform pairs would leave the
intersection's targets almost always empty, hence the shared half (`shared_fraction=0` gives
the paper's uniform pairs). An example with no label gets a uniform partner.
"""
from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np


def label_index(targets: np.ndarray) -> list[np.ndarray]:
    """Per label, the examples holding it: targets [N, L] multi-hot -> L int64 index arrays."""
    return [np.flatnonzero(targets[:, k]) for k in range(targets.shape[1])]


def pair_batch(seed: int, step: int, batch: int, targets: np.ndarray, holders: Sequence[np.ndarray],
               shared_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(i [batch], j [batch]) int64 index pairs, i != j, of batch `step` (see the module docstring).

    targets: [N, L] multi-hot (N >= 2); holders: `label_index(targets)`.
    """
    n = len(targets)
    if n < 2:
        raise ValueError(f"pairs need at least 2 examples, got {n}")
    rng = np.random.default_rng((seed, step))
    i = rng.integers(0, n, batch)
    shared = rng.random(batch) < shared_fraction
    j = (i + rng.integers(1, n, batch)) % n  # uniform over the others
    for r in np.flatnonzero(shared):
        labels = np.flatnonzero(targets[i[r]])
        if len(labels) == 0:
            continue
        pool = holders[labels[rng.integers(len(labels))]]
        if len(pool) > 1:
            k = rng.integers(len(pool) - 1)  # uniform over the holders other than i
            pick = pool[k]
            j[r] = pick if pick != i[r] else pool[-1]
    return i.astype(np.int64), j.astype(np.int64)


def pair_dataset(features: np.ndarray, targets: np.ndarray, *, batch: int, steps: int, seed: int,
                 shared_fraction: float = 0.5) -> grain.MapDataset:
    """A MapDataset of `steps` batches: element s = {"i", "j" [B] int64, "f_a", "f_b" [B, D] float32,
    "y_a", "y_b" [B, L] float32}, batch s of `pair_batch`. features [N, D], targets [N, L]."""
    features = np.asarray(features, np.float32)
    targets = np.asarray(targets, np.float32)
    if len(features) != len(targets):
        raise ValueError(f"pairs: {len(features)} feature rows for {len(targets)} label sets")
    if not 0.0 <= shared_fraction <= 1.0:
        raise ValueError(f"pairs: shared_fraction must be in [0, 1], got {shared_fraction}")
    holders = label_index(targets)

    def make(step):
        i, j = pair_batch(seed, int(step), batch, targets, holders, shared_fraction)
        return {"i": i, "j": j, "f_a": features[i], "f_b": features[j], "y_a": targets[i], "y_b": targets[j]}
    return grain.MapDataset.range(steps).map(make)
