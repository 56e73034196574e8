"""Fixed-size eval batches on a mesh: the global batch size and the padding of the last batch.

Streaming evaluation (vljax/embedder.py) and the LiT feature store (vljax/features.py) run the
towers jitted on the mesh over global batches of one size, so each compiles once: the size is
rounded up to a multiple of the batch shards and of the processes (`global_batch_size`), and a
short last batch is padded with zero rows (`pad_rows`). Both import these two functions; neither
imports the other for them.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh

from vljax import sharding


def global_batch_size(batch_size: int, mesh: Mesh, process_count: int | None = None) -> int:
    """batch_size (>= 1) rounded up to a multiple of the mesh's batch shards
    (`sharding.batch_axes`) and of the process count (default: `jax.process_count()`), so every
    process reads the same number of rows and every batch shard gets the same number of them."""
    pc = jax.process_count() if process_count is None else int(process_count)
    step = math.lcm(math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh)), pc)
    return -(-max(int(batch_size), pc) // step) * step


def pad_rows(x_m: np.ndarray, n: int) -> np.ndarray:
    """x [m, ...] -> [n, ...], zero rows appended (m <= n): the one place batches are padded."""
    return np.concatenate([x_m, np.zeros((n - len(x_m),) + x_m.shape[1:], x_m.dtype)]) if len(x_m) < n else x_m
