"""grain input pipelines: the training iterator (sharded, shuffled, mixed, augmented) and eval batches.

Training config (`config.input`, an ml_collections ConfigDict or a dict):

    data=[dict(source="tfds", name="vljax_emoji", split="train", weight=1.0),
          dict(source="tfds", name="vljax_openclipart", split="train", weight=1.0)],
    batch_size=256,              # global; each process gets batch_size // process_count
    image_size=112,
    value_range="efficientnet",  # or (lo, hi), "clip", "imagenet" (see transforms.normalize)
    augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.1, colour_jitter=0.0),
    num_workers=2,               # grain worker processes; 0 = in this process
    read_threads=4,              # threads per worker that read + preprocess examples
    eval_workers=0,              # evaluation: grain worker processes decoding whole batches;
                                 # 0 = threads of this process (vljax/embedder.py)
    label=False,                 # add batch["label"] from each source's label_key (-1 if none)
    labels=False,                # add batch["labels"]: label sets (tfds labels_key, jsonl num_labels)
                                 # multi-hot bool [B, K] over the union of the sources' label names
    data_dir=None,               # TFDS data dir; default <assets>/tfds
    resize="crop", resample="bilinear", naflex=None,  # written by config.init_from from the
                                 # checkpoint's spec: SigLIP's squash resize, or the NaFlex patch
                                 # budget (batch "image" = {"patches", "mask", "shapes"}; see
                                 # vljax/data/checkpoint_preprocess.py)
                                 # NaFlex training (SigLIP 2): `budgets` sampled per batch and
                                 # the fixed-resolution stage, vljax/data/naflex_train.py
    text_aug=None,               # caption augmentation of Fini et al. 2023 (vljax/data/text_aug.py),
                                 # e.g. dict(synonym=0.0): stop words, EDA swap / deletion
    subcaptions=None,            # DreamLIP: subcaptions.SubCaptions kwargs (num, merged); batch
                                 # "subcaptions" int32 [B, 1 + num, L], drawn in the input workers
    locca=None,                  # LocCa's decoder tasks (vljax/data/locca.py `Locca` kwargs:
                                 # vocab_offset, bins, tasks, pad_id) on the records' "regions";
                                 # batch "dec_tokens" / "dec_target" [B, L], "dec_task" [B]
    multi_crop=None,             # set by the trainer in a self-distillation stage (vljax/teacher.py):
                                 # preprocess.MultiCrop's kwargs; batch "sd_global" [B, Vg, S, S, 3],
                                 # "sd_local" [B, Vl, s, s, 3], cut in the input workers

A source entry may also give `prefix` ("caption" | "label": Prefix Conditioning, batch "prefix_id"
int32 [B]) and `label_prompts` (templates: its class names become its captions); vljax/data/prefix.py.

Shuffling is grain's global index shuffle (random access, no buffer), reseeded every epoch, so
there is no shuffle_buffer setting. When every source is sharded (webdataset tars, parquet files:
`Source.shard_sizes`), the order is the shard order (vljax/data/shard_order.py) instead: each
process reads only its own shards, shuffled across shards and within a window of shards:

    shard_lanes=None,            # L lanes: lane l reads the shards k % L == l; B % L == 0 and
                                 # L % process_count == 0; default shard_order.default_lanes (the
                                 # largest power of two <= 64 dividing B, at most the fewest shards
                                 # of a source): the same global batches for any power-of-two
                                 # process count up to L
    shard_window=4,              # the records of this many consecutive shards are shuffled together
"""
import dataclasses
import math

import grain
from absl import flags
import jax
import ml_collections
import numpy as np

from vljax.data import checkpoint_preprocess, naflex_train, prefix as prefix_lib, shard_order
from vljax.data import sources as sources_lib
from vljax.data import text_aug as text_aug_lib
from vljax.data.checkpoint_preprocess import NaflexCollate
from vljax.data.eval_transform import EvalImage
from vljax.data.preprocess import (SKIP_REASONS, SKIPPED_KEY, Collate, MultiCrop, Preprocess,
                                   SkipCountingBatch, canonical_value_range, count_skips)
from vljax.data.locca import Locca
from vljax.data.subcaptions import SubCaptions


DEFAULT_SHARD_WINDOW = 4


def _seed(*parts: int) -> int:
    """A 32-bit seed from several ints (grain seeds must be < 2**32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _get(cfg, key, default=None):
    return cfg.get(key, default) if cfg is not None else default


def _default(value, default):
    return default if value is None else value


class TrainIterator:
    """Iterator over this process's training batches:

        {"image": f32 [B, S, S, 3] (or "image_features": f32 [B, F] with stored features; a NaFlex
         run: {"patches": f32 [B, N, P*P*3], "mask": bool [B, N], "shapes": i32 [B, 2]}),
         "text": i32 [B, L], "label": i32 [B] (config.input.label), "labels": bool [B, K] (multi-hot
         label sets, config.input.labels), "sd_global" / "sd_local" (config.input.multi_crop: the
         self-distillation views, preprocess.MultiCrop), "skipped/<reason>": int64 scalar}

    `skipped/<reason>` (missing_file, decode_error, empty_caption, read_error) is how many records
    this process has skipped so far, cumulative, across restores: pop these keys before sharding
    the batch and log them with the training metrics (`self.skipped` holds the same dict).
    `get_state()` returns a JSON-serialisable dict; `set_state()` of that state on a freshly made
    iterator with the same config, seed and process layout yields exactly the batches that
    followed it.
    """

    def __init__(self, dataset: grain.IterDataset):
        self._dataset = dataset
        self._it = iter(dataset)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        for reason, n in zip(SKIP_REASONS, batch.pop(SKIPPED_KEY)):
            self.skipped[reason] += int(n)
        batch.update({f"skipped/{r}": np.int64(n) for r, n in self.skipped.items()})
        return batch

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["grain"])
        self.skipped = dict.fromkeys(SKIP_REASONS, 0) | dict(state["skipped"])

    def close(self) -> None:
        """Stops worker processes (also done on garbage collection, but not promptly)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _preprocess_from_config(cfg):
    """`Preprocess`, or for a run from a checkpoint with SigLIP's squash resize or a NaFlex
    tower (`input.resize` / `input.naflex`, vljax/init_from.py) `CheckpointPreprocess`."""
    aug = _get(cfg, "augment") or {}
    crop = aug.get("random_resized_crop", (0.8, 1.0))
    naf = naflex_train.plan(cfg["naflex"], int(cfg["image_size"])) if _get(cfg, "naflex") else None
    if naf is not None and (naf.fixed_resolution or naf.budgets) and _get(cfg, "multi_crop"):
        raise ValueError("config key `self_distill`: the multi-crop views are not made for a "
                         "NaFlex image tower (`input.naflex`)")
    if naf is not None and naf.fixed_resolution:  # `Preprocess` below, then its full patch grid
        vr = canonical_value_range(cfg.get("value_range", "efficientnet"))
        if vr != naflex_train.VALUE_RANGE:
            raise ValueError(f"config key `input.value_range`: {vr!r} with a NaFlex image tower, "
                             f"whose NaFlex stages see {naflex_train.VALUE_RANGE}: set it to that")
        cfg = {k: v for k, v in dict(cfg).items() if k != "naflex"}
    elif naf is not None and naf.budgets:  # resized per batch to the batch's budget (BudgetBatch)
        if _get(cfg, "subcaptions"):
            raise ValueError("config key `input.subcaptions`: not made for NaFlex budgets (`input.naflex`)")
        if _get(cfg, "locca"):
            raise ValueError("config key `input.locca`: LocCa's rows are not made for NaFlex budgets (`input.naflex`)")
        return naflex_train.NaflexExample(greyscale=float(aug.get("greyscale", 0.0)),
                                          colour_jitter=float(aug.get("colour_jitter", 0.0)))
    special = checkpoint_preprocess.from_config(
        cfg, crop, float(aug.get("greyscale", 0.0)), float(aug.get("colour_jitter", 0.0)),
        canonical_value_range(cfg.get("value_range", "efficientnet")))
    text_aug = text_aug_lib.options(_get(cfg, "text_aug"))
    if special is not None:
        if text_aug is not None:
            raise ValueError("config key `input.text_aug`: not applied by a run from a checkpoint's "
                             "preprocessing (`init_from`: squash resize, NaFlex); remove it")
        if _get(cfg, "multi_crop"):
            raise ValueError("config key `self_distill`: the multi-crop views are not made for a run "
                             "from a checkpoint's preprocessing (`init_from`: squash resize, NaFlex)")
        if _get(cfg, "locca"):
            raise ValueError("config key `input.locca`: LocCa's rows are not made for a run from a "
                             "checkpoint's preprocessing (`init_from`: squash resize, NaFlex)")
        if _get(cfg, "subcaptions"):
            raise ValueError("config key `input.subcaptions`: sub-captions are not made for a run from a "
                             "checkpoint's preprocessing (`init_from`: squash resize, NaFlex)")
        return special
    return Preprocess(image_size=int(cfg["image_size"]),
                      value_range=canonical_value_range(cfg.get("value_range", "efficientnet")),
                      crop_scale=tuple(crop) if crop else None,
                      greyscale=float(aug.get("greyscale", 0.0)),
                      colour_jitter=float(aug.get("colour_jitter", 0.0)),
                      multi_crop=MultiCrop(**dict(mc)) if (mc := _get(cfg, "multi_crop")) else None,
                      text_aug=None if text_aug is None else text_aug_lib.TextAug.from_options(text_aug),
                      subcaptions=SubCaptions(**dict(sc)) if (sc := _get(cfg, "subcaptions")) else None,
                      locca=_locca(cfg))


def _locca(cfg) -> Locca | None:
    """config.input.locca (vljax/data/locca.py), or None."""
    spec = _get(cfg, "locca")
    return Locca(**{k: tuple(v) if k == "tasks" else v for k, v in dict(spec).items()}) if spec else None


class ProcessSlice(grain.MapDataset):
    """This process's share of a global example stream: with local batch b and P processes, local
    element k is global element (k // b) * P * b + p * b + k % b (rows [p*b, (p+1)*b) of every
    global batch of P * b)."""

    def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int,
                 local_batch: int):
        super().__init__(parent)
        self._p, self._n, self._b = process_index, process_count, local_batch
        self._length = len(parent) // (process_count * local_batch) * local_batch

    def __len__(self) -> int:
        return self._length

    def _global(self, index: int) -> int:
        return (index // self._b) * self._n * self._b + self._p * self._b + index % self._b

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global(i) for i in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"ProcessSlice(process {self._p} of {self._n}, local batch {self._b})"


def _local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"config.input.batch_size={global_batch} is not divisible by "
                         f"process_count={process_count}")
    return global_batch // process_count


def make_train_dataset(config, tokenizer, *, seed: int, process_index: int = 0,
                       process_count: int = 1, features=None, teachers=None,
                       caption_targets=None) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (for inspection and benchmarks)."""
    entries = list(config["data"])
    if not entries:
        raise ValueError("config.input.data is empty: give at least one source")
    if features is not None and len(features) != len(entries):
        raise ValueError(f"config.input.data has {len(entries)} sources but {len(features)} feature stores")
    data_dir = _get(config, "data_dir")
    batch = _local_batch_size(int(config["batch_size"]), process_count)
    opened = [sources_lib.get_source(entry, data_dir=data_dir) for entry in entries]
    space = sources_lib.label_space(opened) if _get(config, "labels", False) else None
    # Every source sharded (webdataset, parquet): the shard order, each process reading its own
    # shards; otherwise grain's global index shuffle over all records.
    sharded = all(src.shard_sizes is not None for src in opened)
    tag = prefix_lib.conditioned(entries)  # Prefix Conditioning: every example gets "prefix_id"
    parts, weights = [], []
    for i, (entry, src) in enumerate(zip(entries, opened)):
        names = src.label_names
        if features is not None:
            src = sources_lib.WithFeatures(src, features[i], where=f"config.input.data[{i}]")
        if _get(config, "hide_labels"):  # partial labels: the seeded hidden set (wrappers.hidden_of)
            src = sources_lib.HideLabels(src, *sources_lib.check_hide_labels(config["hide_labels"]),
                                         source_index=i)
        if teachers is not None:  # a teacher's stored embeddings (vljax/teacher_features.py)
            src = teachers[i].wrap(src, where=f"config.input.data[{i}]")
        ds = grain.MapDataset.source(src)
        if space is not None:
            ds = ds.map(sources_lib.LabelsIn(names, space))
        templates = prefix_lib.templates_of(entry, i)
        if templates is not None:  # a classification source as prompts (vljax/data/prefix.py)
            ds = ds.map(prefix_lib.LabelPrompts(opened[i].class_names_of(), templates))
        if tag:
            ds = ds.map(prefix_lib.PrefixTag(prefix_lib.entry_prefix(entry, i)))
        if not sharded:
            ds = ds.shuffle(seed=_seed(seed, i)).repeat()  # reshuffled every epoch
        parts.append(ds)
        weights.append(float(entry.get("weight", 1.0)))
    if sharded:
        ds = shard_order.shard_ordered(
            parts, [src.shard_sizes for src in opened], weights,
            lanes=_default(_get(config, "shard_lanes"),
                           shard_order.default_lanes(int(config["batch_size"]),
                                                     [src.shard_sizes for src in opened])),
            window=_default(_get(config, "shard_window"), DEFAULT_SHARD_WINDOW),
            batch_size=int(config["batch_size"]), process_count=process_count, seed=seed)
    else:
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds.random_map(_preprocess_from_config(config), seed=_seed(seed, 10**6))
    if caption_targets is not None:  # CatLIP's multi-hot caption labels (vljax/caption_labels.py)
        ds = ds.map(caption_targets)
    naf = naflex_train.plan(config["naflex"], int(config["image_size"])) if _get(config, "naflex") else None
    if naf is not None and naf.fixed_resolution:  # a NaFlex tower's fixed-resolution stage
        ds = ds.map(naflex_train.SquarePatches(naf.patch_size))
    # One global example stream, the same in every process (seeds do not depend on the process);
    # process p reads only rows [p*b, (p+1)*b) of each global batch. The global batches are thus
    # the same for any process count: 2 processes x 4 devices train exactly as 1 x 8.
    ds = ProcessSlice(ds, process_index, process_count, batch)

    threads = int(_get(config, "read_threads", 4))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(2 * batch, threads)))
    if _get(config, "naflex") and features is not None:
        raise ValueError("config key `lit_cache`: stored image features are not available for a "
                         "NaFlex image tower (variable patch sequences); set lit_cache=False")
    collate = (NaflexCollate if naf is not None else Collate)(
        tokenizer, with_label=bool(_get(config, "label", False)),
        num_labels=None if space is None else len(space),
        keep_captions=bool(_get(config, "keep_captions", False)),
        **({"locca": _locca(config)} if _get(config, "locca") else {}))
    if naf is not None and naf.budgets and not naf.fixed_resolution:
        ds = naflex_train.BudgetBatch(ds, batch, collate, naf.patch_size, naf.budgets,
                                      seed if naf.budget_seed is None else naf.budget_seed)
    else:
        ds = SkipCountingBatch(ds, batch, collate)
    workers = int(_get(config, "num_workers", 0))
    if workers > 0:
        ds = _worker_prefetch(ds, workers, buffer=int(_get(config, "worker_buffer", 2)))
    return ds


def make_train_iterator(config, tokenizer, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None, features=None, teachers=None,
                        caption_targets=None) -> TrainIterator:
    """Endless iterator of this process's training batches (see TrainIterator).

    config: the `config.input` subtree (module docstring). tokenizer: `tok(list[str]) -> int32
    [N, L]`; it must be picklable when num_workers > 0. features: one store per source of
    config.input.data, in order (`vljax.features.FeatureSource`, LiT with a locked trunk): the
    batches then carry "image_features" [B, F] in place of "image", from the same global example
    stream (same shuffling, mixing and process slices; the grey view drawn as the image
    augmentation draws it), and no image is decoded. teachers: one teacher store per source
    (`vljax.teacher_features.TeacherSource`, config.distill): the batches also carry
    "teacher_zimg" [B, D], "teacher_ztxt" [B, D] (of the drawn caption) and "teacher_t" [B].
    caption_targets: a per-example map adding "caption_labels" (`caption_labels.Targets`, CatLIP):
    the batches then carry "caption_labels" bool [B, V].
    Restoring a state needs the same config (num_workers included: worker w processes every
    num_workers-th example), seed and processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    return TrainIterator(make_train_dataset(config, tokenizer, seed=seed,
                                            process_index=process_index,
                                            process_count=process_count, features=features,
                                            teachers=teachers, caption_targets=caption_targets))


def make_eval_batches(data, *, batch_size: int, image_size: int | None = None,
                      value_range="efficientnet", tokenizer=None, data_dir=None,
                      read_threads: int = 4, workers: int = 0, process_index: int | None = None,
                      process_count: int | None = None, greyscale: bool = False,
                      eval_image: EvalImage | None = None):
    """Yields this process's rows of the eval batches over one source, in order, each record once.

    data: a source config entry (dict(source="tfds", name=..., split=..., label_key=...)) or a
    source object. Global batch j covers records [j*B, (j+1)*B) (B = batch_size); process p
    reads rows [j*B + p*b, j*B + (p+1)*b) of it (b = B // process_count), contiguous like
    `ProcessSlice` in training, so the batch gathered over processes is in record order.
    Batches: {"image": f32 [n, S, S, 3], "label": i32 [n], "index": i32 [n] (record indices),
    "mask": bool [n], "text": i32 [n, L] (with a tokenizer: the first caption)}, n = b except in
    the last batch, where n is what is left of the source (possibly 0). The consumer pads
    (vljax/embedder.py). A record that cannot be read keeps its row with a zero image and
    mask False (counted in `EvalBatches.skipped`). Every process yields `num_batches` batches,
    as collective evaluation steps need. `greyscale=True` turns every image grey (3 equal
    channels), exactly as the training augmentation does (the grey view of stored LiT features).
    eval_image: the model's eval transform (`EvalImage.from_spec(spec)`: SigLIP's squash resize,
    NaFlex), in place of `image_size` / `value_range` (centre crop); with NaFlex, "image" is the
    dict {"patches": f32 [n, N, P*P*3], "mask": bool [n, N], "shapes": i32 [n, 2]} (N the patch
    budget: one static shape, any mix of aspect ratios; unread rows hold a blank 1 x 1 grid).

    Whole batches are read, decoded and preprocessed ahead of the consumer, `read_threads` at a
    time in threads, or in `workers` grain worker processes (config.input.eval_workers; the
    tokenizer must then be picklable), while the consumer runs the towers on earlier batches.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = sources_lib.get_source(data, data_dir=data_dir) if isinstance(
        data, (dict, ml_collections.ConfigDict)) else data
    if eval_image is None:
        eval_image = EvalImage(image_size, value_range)
    return EvalBatches(source, batch_size=batch_size, eval_image=eval_image, tokenizer=tokenizer,
                       read_threads=read_threads, workers=workers, process_index=process_index,
                       process_count=process_count, greyscale=greyscale)


def _worker_prefetch(ds: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
    """`ds` computed in `workers` grain worker processes (element order kept).

    grain reads its absl flags when it starts the workers: the program must have parsed them
    (`absl.app.run` does, as in `python -m vljax.main` / `vljax.evaluate`; elsewhere, e.g. in a
    notebook, call `absl.flags.FLAGS.mark_as_parsed()` once). Library code never does it.
    """
    if not flags.FLAGS.is_parsed():
        raise ValueError("config.input.num_workers / input.eval_workers > 0 start grain worker "
                         "processes, which need parsed absl flags: run under absl.app.run (as "
                         "python -m vljax.main does) or call absl.flags.FLAGS.mark_as_parsed() "
                         "first; or set them to 0 (threads)")
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
    """j -> process p's rows of global batch j (see make_eval_batches), with "_skipped": how many
    of them could not be read, per reason (int64 [len(SKIP_REASONS)]). Picklable: it runs in
    grain's worker processes or threads."""
    source: object
    pre: Preprocess
    tokenizer: object
    global_batch: int
    batch: int
    lo: int  # p * b

    def __call__(self, j: int) -> dict:
        first = j * self.global_batch + self.lo
        n = max(0, min(self.batch, len(self.source) - first))
        image = self.pre.eval_transform.zeros(n)
        label = np.full((n,), -1, np.int32)
        mask = np.zeros((n,), bool)
        captions, skipped = [""] * n, []
        for k in range(n):
            ex = self.pre.eval(self.source[first + k])
            if "skip" in ex:
                skipped.append(ex)
                continue
            if isinstance(image, dict):
                for key in image:
                    image[key][k] = ex["image"][key]
            else:
                image[k] = ex["image"]
            label[k], mask[k], captions[k] = ex["label"], True, ex["caption"]
        out = {"image": image, "label": label, "index": np.arange(first, first + n, dtype=np.int32),
               "mask": mask, SKIPPED_KEY: count_skips(skipped)}
        if self.tokenizer is not None:
            out["text"] = (np.asarray(self.tokenizer(captions), np.int32) if n else
                           np.zeros((0, self.tokenizer.max_len), np.int32))
        return out


class EvalBatches:
    """Iterable of eval batches (see make_eval_batches); `skipped` counts unreadable records of
    the last pass, per reason; `num_batches` is the same on every process."""

    def __init__(self, source, *, batch_size, eval_image, tokenizer, read_threads,
                 process_index, process_count, workers=0, greyscale=False):
        self.source = source
        self.batch = _local_batch_size(batch_size, process_count)
        self.global_batch = batch_size
        self.num_examples = len(self.source)
        self.num_batches = math.ceil(self.num_examples / batch_size)
        # Without a tokenizer nothing reads the captions: records without one still count.
        pre = Preprocess(image_size=eval_image.image_size, value_range=eval_image.value_range,
                         require_caption=tokenizer is not None, force_greyscale=greyscale,
                         eval_transform=eval_image)
        self._make = _EvalBatch(source, pre, tokenizer, batch_size, self.batch, process_index * self.batch)
        self._threads, self._workers = int(read_threads), int(workers)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        ds = grain.MapDataset.range(self.num_batches).map(self._make)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                  prefetch_buffer_size=max(1, self._threads)))
        if self._workers > 0:
            ds = _worker_prefetch(ds, self._workers, buffer=1)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        for batch in ds:
            for reason, n in zip(SKIP_REASONS, batch.pop(SKIPPED_KEY)):
                self.skipped[reason] += int(n)
            yield batch


def first_examples(data, n: int, *, image_size: int, value_range="efficientnet", data_dir=None):
    """(images f32 [m, S, S, 3], first captions [m]) of the first m <= n readable records with a
    caption, in memory (for benchmarks that cycle a few real batches; evaluation streams)."""
    source = sources_lib.get_source(data, data_dir=data_dir) if isinstance(
        data, (dict, ml_collections.ConfigDict)) else data
    pre = Preprocess(image_size=image_size, value_range=canonical_value_range(value_range))
    images, captions = [], []
    for i in range(len(source)):
        ex = pre.eval(source[i])
        if "skip" not in ex:
            images.append(ex["image"])
            captions.append(ex["caption"])
            if len(images) == n:
                break
    return np.stack(images), captions
