"""The training order of sharded sources (webdataset tars, parquet files): each process reads only
its own shards, the global batches do not depend on the process count, and the order is a pure
function of the element index (grain's index state is the whole iterator state: exact resume, no
shuffle buffer to checkpoint).

With L lanes (`input.shard_lanes`) and global batch B (B % L == 0, b_l = B / L rows a lane):

  * lane l owns the shards k with k % L == l of every source;
  * per epoch e of the lane (its records once), the lane's shards are permuted (seeded from the
    run seed, the source, e, l), and the records of each window of W (`input.shard_window`)
    consecutive shards of that order are permuted together (grain's index_shuffle, a bijection
    computed per index): a shuffle across shards and within a W-shard buffer, as webdataset's
    shard shuffle + sample shuffle buffer give (open_clip's `get_wds_dataset`), without the buffer;
  * several sources: a weighted mix inside each lane (grain's `MapDataset.mix`);
  * global element g (batch i = g // B, row r = g % B) is element i * b_l + r % b_l of lane
    r // b_l.

Process p of P (L % P == 0) takes rows [p*B/P, (p+1)*B/P) of every global batch (pipeline's
`ProcessSlice`), i.e. lanes [p*L/P, (p+1)*L/P): only their shards are ever opened there.
"""
from __future__ import annotations

import bisect
import sys

import grain
import numpy as np
# grain's own per-index permutation (what MapDataset.shuffle uses); not exported by `grain`.
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

_EPOCHS_CACHED = 4


def seed32(*parts: int) -> int:
    """A 32-bit seed from several ints (index_shuffle and grain take 32-bit seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


MAX_DEFAULT_LANES = 64


def default_lanes(batch_size: int, shard_sizes: list[list[int]]) -> int:
    """The lanes when `input.shard_lanes` is not set: the largest power of two that divides the
    global batch, holds at most MAX_DEFAULT_LANES and no more than the non-empty shards of the
    source with fewest. It does not depend on the process count, so any power-of-two number of
    processes up to it reads only its own shards and trains on the same global batches (2 x 4
    devices exactly as 1 x 8); another process count needs `input.shard_lanes` set to a multiple of it."""
    fewest = min(sum(1 for n in sizes if n > 0) for sizes in shard_sizes)
    lanes = 1
    while (lanes * 2 <= MAX_DEFAULT_LANES and batch_size % (lanes * 2) == 0
           and lanes * 2 <= max(fewest, 1)):
        lanes *= 2
    return lanes


def check_lanes(lanes: int, batch_size: int, process_count: int) -> None:
    """ValueError naming `input.shard_lanes` unless lanes divide the global batch and the
    processes divide the lanes."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes <= 0:
        raise ValueError(f"config key `input.shard_lanes` must be a positive integer, got {lanes!r}")
    if batch_size % lanes:
        raise ValueError(f"config key `input.shard_lanes`={lanes} does not divide "
                         f"input.batch_size={batch_size} (each lane fills batch_size / shard_lanes rows)")
    if lanes % process_count:
        raise ValueError(f"config key `input.shard_lanes`={lanes} is not a multiple of the "
                         f"{process_count} processes (each process reads whole lanes)")


class LaneOrder(grain.MapDataset):
    """Lane `lane` of `lanes` over one sharded source: an endless stream (len sys.maxsize, like
    `.repeat()`) of `parent`'s records (module docstring), parent index = shard_starts[k] + j."""

    def __init__(self, parent: grain.MapDataset, shard_sizes, lane: int, lanes: int, window: int,
                 seed: int, where: str = "input.data"):
        super().__init__(parent)
        sizes = [int(s) for s in shard_sizes]
        self._starts = np.cumsum([0] + sizes)[:-1]
        self._shards = np.array([k for k in range(lane, len(sizes), lanes) if sizes[k] > 0], np.int64)
        if not len(self._shards):
            raise ValueError(f"config key `input.shard_lanes`={lanes}: {where} has no record in lane "
                             f"{lane} (its shards k with k % {lanes} == {lane}; {sum(s > 0 for s in sizes)} "
                             f"of its {len(sizes)} shards hold records): use at most as many lanes as shards")
        self._sizes = np.array(sizes, np.int64)
        self._lane_len = int(self._sizes[self._shards].sum())
        self._lane, self._window, self._seed = lane, int(window), int(seed)
        self._epochs = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _epoch(self, epoch: int):
        """(shards in this epoch's order, their cumulative sizes [S+1]) of the lane."""
        got = self._epochs.get(epoch)
        if got is None:
            rng = np.random.default_rng(seed32(self._seed, epoch, self._lane))
            order = rng.permutation(self._shards)
            got = (order, np.concatenate([[0], np.cumsum(self._sizes[order])]))
            if len(self._epochs) >= _EPOCHS_CACHED:  # threads read mostly one epoch at a time
                self._epochs = {}
            self._epochs[epoch] = got
        return got

    def record(self, position: int) -> int:
        """The parent index at lane position `position`."""
        epoch, offset = divmod(int(position), self._lane_len)
        order, cum = self._epoch(epoch)
        shard_pos = bisect.bisect_right(cum, offset) - 1
        w = shard_pos // self._window
        lo, hi = int(cum[w * self._window]), int(cum[min((w + 1) * self._window, len(order))])
        if hi - lo > 1:
            offset = lo + index_shuffle_module.index_shuffle(
                offset - lo, max_index=hi - lo - 1, seed=seed32(self._seed, epoch, self._lane, w), rounds=4)
            shard_pos = bisect.bisect_right(cum, offset) - 1
        shard = int(order[shard_pos])
        return int(self._starts[shard]) + offset - int(cum[shard_pos])

    def shard_of(self, position: int) -> int:
        """The shard lane position `position` reads (for tests and inspection)."""
        index = self.record(position)
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.record(index)]

    def __getstate__(self):
        return {**self.__dict__, "_epochs": {}}

    def __str__(self) -> str:
        return f"LaneOrder(lane {self._lane}, {len(self._shards)} shards, window {self._window})"


class LaneInterleave(grain.MapDataset):
    """Global element g = lane (g % B) // b_l, position (g // B) * b_l + (g % B) % b_l, b_l = B / L."""

    def __init__(self, lanes: list, batch_size: int):
        super().__init__(list(lanes))
        self._batch, self._per = int(batch_size), int(batch_size) // len(lanes)

    def __len__(self) -> int:
        return sys.maxsize

    def locate(self, index: int) -> tuple[int, int]:
        """(lane, position in the lane) of global element `index`."""
        i, r = divmod(int(index), self._batch)
        lane, k = divmod(r, self._per)
        return lane, i * self._per + k

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        lane, position = self.locate(index)
        return self._parents[lane][position]

    def __str__(self) -> str:
        return f"LaneInterleave({len(self._parents)} lanes, batch {self._batch})"


def shard_ordered(parts: list, shard_sizes: list, weights: list[float], *, lanes: int, window: int,
                  batch_size: int, process_count: int, seed: int) -> grain.MapDataset:
    """The global example stream of sharded sources (module docstring): `parts[s]` a MapDataset of
    source s's records with `shard_sizes[s]` its records per shard, `weights[s]` its mixing
    weight; `batch_size` global. Endless (len sys.maxsize)."""
    check_lanes(lanes, batch_size, process_count)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"config key `input.shard_window` must be a positive integer, got {window!r}")
    lane_sets = []
    for lane in range(lanes):
        per_source = [LaneOrder(part, sizes, lane, lanes, window, seed32(seed, s), where=f"input.data[{s}]")
                      for s, (part, sizes) in enumerate(zip(parts, shard_sizes))]
        lane_sets.append(per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, weights))
    return LaneInterleave(lane_sets, batch_size)
