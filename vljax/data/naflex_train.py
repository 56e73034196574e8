"""NaFlex training input (SigLIP 2, Sec. 2.4.2): a patch budget sampled per batch, and the
fixed-resolution stage before it fed to the same NaFlex tower.

`config.input.naflex` (the model's image tower is then "naflex_vit"):

    naflex=dict(patch_size=16,         # P
                max_num_patches=256,   # N: the model's budget (evaluation, export, init shapes),
                                       # and the training budget when `budgets` is absent
                budgets=(128, 256, 576, 784, 1024),  # optional: one drawn per global batch
                budget_seed=None)      # optional: the draws' seed (default: the stream's seed)

Three input modes, chosen by the keys and, per training stage, by `fixed_resolution` (which the
trainer writes from the stage's `naflex` setting, vljax/stages.py; not a user key):

- fixed_resolution=True: the stage's square images (`Preprocess`: random resized crop to S x S,
  `input.value_range`) as their full (S/P)^2-patch grid (`naflex.square_patches`). The NaFlex tower
  then computes exactly the fixed-resolution ViT (vljax/models/naflex.py `params_from_vit`), so
  one parameter tree serves both stages: nothing is converted at the switch.
- no `budgets`: every image at its own aspect ratio in N patches (`CheckpointPreprocess`, as for
  a NaFlex checkpoint's `init_from` run).
- `budgets`: global batch t (the t-th batch of the stage's stream, the same on every process)
  gets the budget `naflex.budget_at(budgets, budget_seed, t)`; its images are resized to fit it
  (`naflex.naflex_image`) and padded to it in the input workers (`BudgetBatch`). Batch shapes
  then differ between batches and the jitted step compiles once per budget: keep the set small.

The per-image work before the batch (decode, caption, colour augmentation) is `NaflexExample`:
no geometric augmentation (a square crop would discard the aspect ratio NaFlex keeps).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vljax.data import naflex
from vljax.data import transforms as T
from vljax.data.eval_transform import NAFLEX_VALUE_RANGE
from vljax.data.preprocess import _labels, count_skips

USER_KEYS = ("patch_size", "max_num_patches", "budgets", "budget_seed")
KEYS = USER_KEYS + ("fixed_resolution",)
VALUE_RANGE = NAFLEX_VALUE_RANGE  # what `naflex.normalize` gives: the fixed stage's must match


@dataclasses.dataclass(frozen=True)
class Plan:
    patch_size: int
    max_num_patches: int
    budgets: tuple[int, ...] | None
    budget_seed: int | None
    fixed_resolution: bool


def plan(cfg, image_size: int | None = None) -> Plan:
    """`config.input.naflex` checked (errors name the key and value) -> Plan."""
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ValueError(f"config key `input.naflex`: unknown keys {unknown} (known: {', '.join(USER_KEYS)})")
    for key in ("patch_size", "max_num_patches"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"config key `input.naflex.{key}` must be an int >= 1, got {cfg.get(key)!r}")
    budgets = cfg.get("budgets")
    if budgets is not None:
        budgets = tuple(budgets)
        if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
            raise ValueError(f"config key `input.naflex.budgets` must be ints >= 1, got {budgets!r}")
    seed = cfg.get("budget_seed")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"config key `input.naflex.budget_seed` must be an int, got {seed!r}")
    fixed = bool(cfg.get("fixed_resolution", False))
    if fixed and image_size is not None and image_size % cfg["patch_size"]:
        raise ValueError(f"config key `input.image_size`: {image_size} is not a multiple of "
                         f"input.naflex.patch_size={cfg['patch_size']} (the fixed-resolution stage's grid)")
    return Plan(cfg["patch_size"], cfg["max_num_patches"], budgets, seed, fixed)


def budget_sequence(cfg, seed: int, count: int, start: int = 0) -> list[int]:
    """The budgets of global batches start .. start + count - 1 of a stream seeded `seed` under
    `config.input.naflex` = cfg (what `BudgetBatch` pads them to)."""
    p = plan(cfg)
    budgets = p.budgets or (p.max_num_patches,)
    s = seed if p.budget_seed is None else p.budget_seed
    return [naflex.budget_at(budgets, s, t) for t in range(start, start + count)]


@dataclasses.dataclass(frozen=True)
class SquarePatches:
    """A `Preprocess` example (image float [S, S, 3]) -> its NaFlex dict (full grid)."""
    patch_size: int

    def __call__(self, ex: dict) -> dict:
        if "skip" in ex:
            return ex
        return dict(ex, image=naflex.square_patches(ex["image"], self.patch_size))


@dataclasses.dataclass(frozen=True)
class NaflexExample:
    """record (+ rng) -> {"image": uint8 [H, W, 3] at its own size, "caption", "label", "labels"}
    or {"skip": reason}; the budget's resize happens per batch (`BudgetBatch`). Colour jitter
    and greyscale as `Preprocess` draws them."""
    greyscale: float = 0.0
    colour_jitter: float = 0.0

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        caption, img, why = T.caption_and_image(record, rng)
        if why:
            return {"skip": why}
        if rng is not None:
            img = T.colour_jitter(img, rng, self.colour_jitter)
            img = T.random_greyscale(img, rng, self.greyscale)
        return {"image": np.asarray(img.convert("RGB")), "caption": caption, **_labels(record)}


class BudgetBatch(grain.IterDataset):
    """Batches of `batch_size` valid examples (skips counted, as `SkipCountingBatch`), the t-th
    padded to budget `naflex.budget_at(budgets, seed, t)`.

    t counts this stream's batches. In grain worker processes (`mp_prefetch`: worker w of W
    gets every W-th element of the parent, and batches come back round-robin), worker w's c-th
    batch is t = c * W + w: grain hands each worker its slice through `set_slice`, which this
    dataset reads before forwarding it. The batch count is in the iterator's state, so a
    restored iterator continues the budget sequence exactly.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate, patch_size: int,
                 budgets, seed: int):
        super().__init__(parent)
        self._batch_size, self._collate = batch_size, collate
        self._patch_size, self._budgets, self._seed = patch_size, tuple(budgets), int(seed)
        self._offset, self._step = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        if sequential_slice:
            raise ValueError("BudgetBatch: sequential worker slices are not supported (the batch "
                             "index of a worker's batches would not be known)")
        if not hasattr(self._parent, "set_slice"):
            raise ValueError(f"BudgetBatch: its parent {self._parent} cannot be sliced for workers")
        self._offset, self._step = sl.start or 0, sl.step or 1
        self._parent.set_slice(sl, sequential_slice)

    def __iter__(self):
        return _BudgetBatchIterator(self._parent.__iter__(), self._batch_size, self._collate,
                                    self._patch_size, self._budgets, self._seed,
                                    self._offset, self._step)

    def __str__(self):
        return f"BudgetBatch(batch_size={self._batch_size}, budgets={self._budgets})"


class _BudgetBatchIterator(grain.DatasetIterator):

    def __init__(self, parent, batch_size, collate, patch_size, budgets, seed, offset, step):
        super().__init__(parent)
        self._batch_size, self._collate, self._patch_size = batch_size, collate, patch_size
        self._budgets, self._seed, self._offset, self._step = budgets, seed, offset, step
        self._count = 0

    def __next__(self) -> dict:
        valid, bad = [], []
        while len(valid) < self._batch_size:
            ex = next(self._parent)  # StopIteration ends the dataset; the remainder is dropped
            (bad if "skip" in ex else valid).append(ex)
        n = naflex.budget_at(self._budgets, self._seed, self._count * self._step + self._offset)
        self._count += 1
        examples = [dict(ex, image=naflex.naflex_image(ex["image"], self._patch_size, n))
                    for ex in valid]
        return self._collate(examples, count_skips(bad))

    def get_state(self):
        return {"parent": self._parent.get_state(), "batches": self._count}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._count = int(state["batches"])
