"""Images/s per core of training input pipelines: vljax's grain pipeline against open_clip's own
webdataset pipeline on the same shards at 224 px, side by side in one run (issue 23, item 2).

    python3 -m vljax.data.web_export --format=webdataset --out=/tmp/vljax_web/webdataset
    python3 -m vljax.data.web_export --format=parquet --out=/tmp/vljax_web/parquet
    pip install --target /tmp/vljax_bench_deps --no-deps torchvision==<torch's pair>  # open_clip_train
    PYTHONPATH=/tmp/vljax_bench_deps python3 experiments/bench_input.py --web_dir=/tmp/vljax_web

Pipelines (`--pipelines`), each at `--workers` worker processes (0: in this process):
  demo:             the demo's training input as configs/clip.py reads it (TFDS array_record,
                    112 px, BERT tokens of 32), the figure this bench gave before;
  vljax_tfds:       vljax.data.pipeline.make_train_dataset on the TFDS array_record datasets;
  vljax_webdataset: the same on web_export's tars (source kind "webdataset");
  vljax_parquet:    the same on web_export's parquet shards (source kind "parquet");
  open_clip:        open_clip_train.data.get_wds_dataset on the same tars, with the args of
                    open_clip's training CLI (open_clip_train.params.parse_args, not distributed),
                    open_clip.image_transform(224, is_train=True) and get_tokenizer("ViT-B-32").
The last four do the same work per image: read, decode (PIL), random resized crop to 224 (scale
0.9-1.0, bicubic: open_clip's default), CLIP normalisation, CLIP BPE tokens of 77, batch; both
mix vljax_emoji and vljax_openclipart (vljax 1:1 by weight, open_clip by concatenating the shard
lists). Per row: the first `--warmup` batches (worker start-up, shuffle buffers) are timed apart;
then `--batches` batches give images/s (wall) and images per CPU-second (the CPU time of this
process and all its child processes over the same batches): "per core", which stays meaningful
on a shared machine where wall-clock rates depend on the neighbours.
Prints a table and writes experiments/results/bench_input.json.

open_clip_train imports torchvision; the CPU torch here has no torchvision on PyPI, and a
torchvision in the shared environment would switch transformers' image processors (tests pin the
PIL ones): install it apart, as above (the CUDA build of its `_C` cannot load with CPU torch:
empty its `_meta_registrations.py` and `_autograd_registrations.py` there; transforms need no ops).
"""
import json
import os
from pathlib import Path
import platform
import sys
import time

import functools

from absl import app
from absl import flags
import psutil
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from vljax.data import pipeline  # noqa: E402
from vljax.data import sources  # noqa: E402
from vljax.tokenizers import get_tokenizer  # noqa: E402

PIPELINES = ("demo", "vljax_tfds", "vljax_webdataset", "vljax_parquet", "open_clip")
DATASETS = ("vljax_emoji", "vljax_openclipart")
CLIP_TOKENS = 77
OPEN_CLIP_CROP = (0.9, 1.0)  # open_clip.transform.image_transform's default RandomResizedCrop scale

_PIPELINES = flags.DEFINE_list("pipelines", list(PIPELINES), f"Which to measure, of {PIPELINES}.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker process counts to measure (0: in process).")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per row (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Batches timed apart first (start-up).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Image size (all but the demo row, which keeps 112).")
_WEB_DIR = flags.DEFINE_string("web_dir", "/tmp/vljax_web", "web_export's output root: "
                               "<web_dir>/<format>/<dataset>/train/.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "bench_input.json"),
                           "JSON results file.")


def _shards(fmt: str, name: str) -> list[str]:
    ext = "tar" if fmt == "webdataset" else "parquet"
    folder = Path(_WEB_DIR.value) / fmt / name / "train"
    paths = sorted(str(p) for p in folder.glob(f"[0-9]*.{ext}"))
    if not paths:
        raise app.UsageError(f"--web_dir: no {ext} shards in {folder}; write them with "
                             f"`python3 -m vljax.data.web_export --format={fmt} --out={folder.parents[1]}`")
    return paths


def _brace(paths: list[str]) -> str:
    """web_export's shard list as a brace pattern: DIR/{00000..0000N}.tar."""
    folder, ext = os.path.dirname(paths[0]), paths[0].rsplit(".", 1)[1]
    return f"{folder}/{{{Path(paths[0]).stem}..{Path(paths[-1]).stem}}}.{ext}"


def vljax_input(kind: str, num_workers: int) -> dict:
    """config.input of a vljax row (the demo's own for kind "demo")."""
    if kind == "demo":
        return dict(data=[dict(source="tfds", name=n, split="train", weight=1.0) for n in DATASETS],
                    batch_size=_BATCH.value, image_size=112, value_range="efficientnet",
                    augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.1), num_workers=num_workers)
    if kind == "vljax_tfds":
        data = [dict(source="tfds", name=n, split="train", weight=1.0) for n in DATASETS]
    elif kind == "vljax_webdataset":  # the entry of the "webdataset" kind (issue 23)
        data = [dict(source="webdataset", urls=_brace(_shards("webdataset", n)), image_key="jpg;png;webp",
                     caption_key="txt;json:caption", weight=1.0) for n in DATASETS]
    else:
        data = [dict(source="parquet", urls=_brace(_shards("parquet", n)), image_key="jpg;png;image",
                     caption_key="txt;caption", weight=1.0) for n in DATASETS]
    return dict(data=data, batch_size=_BATCH.value, image_size=_IMAGE.value, value_range="clip",
                augment=dict(random_resized_crop=OPEN_CLIP_CROP, greyscale=0.0), num_workers=num_workers)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its live descendants."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _time(it, images_of) -> dict:
    """Times warm-up and steady state of batch iterator `it` (started at t0, stored in it)."""
    t0 = time.perf_counter()
    for _ in range(_WARMUP.value):
        next(it)
    t1, c1 = time.perf_counter(), _cpu_seconds()
    images = sum(images_of(next(it)) for _ in range(_BATCHES.value))
    t2, c2 = time.perf_counter(), _cpu_seconds()
    return dict(images_per_s=images / (t2 - t1), images_per_cpu_s=images / max(c2 - c1, 1e-9),
                cpu_s=c2 - c1, wall_s=t2 - t1, warmup_s=t1 - t0, timed_images=images)


def measure_vljax(kind: str, num_workers: int) -> dict:
    tokenizer = (get_tokenizer("bert", max_len=32) if kind == "demo"
                 else get_tokenizer("clip", max_len=CLIP_TOKENS))
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(vljax_input(kind, num_workers), tokenizer, seed=0,
                                      process_index=0, process_count=1)
    made = time.perf_counter() - t0
    row = _time(it, lambda batch: batch["text"].shape[0])
    it.close()
    return dict(row, warmup_s=row["warmup_s"] + made, skipped=dict(it.skipped))


def measure_open_clip(num_workers: int) -> dict:
    # Imported here, not at the top: open_clip_train needs torch and torchvision (module
    # docstring), which only the open_clip rows use.
    import open_clip  # pylint: disable=import-outside-toplevel
    from open_clip_train import data as oc_data  # pylint: disable=import-outside-toplevel
    from open_clip_train import params as oc_params  # pylint: disable=import-outside-toplevel

    # webdataset >= 0.2.96 ends each shard with an `eof_value` of {}, which open_clip_train's
    # group_by_keys_nothrow reads as a file ("KeyError: 'fname'"; webdataset issue #384, open_clip
    # issue #935): the fix given there, eof_value=None, in the name open_clip_train.data calls.
    oc_data.tar_file_expander = functools.partial(wds.tariterators.tar_file_expander, eof_value=None)
    paths = [_shards("webdataset", n) for n in DATASETS]
    num_samples = sum(json.loads(Path(p[:-4] + "_stats.json").read_text())["successes"]
                      for group in paths for p in group)
    args = oc_params.parse_args([
        "--train-data", "::".join(_brace(group) for group in paths), "--dataset-type", "webdataset",
        "--train-num-samples", str(num_samples), "--batch-size", str(_BATCH.value),
        "--workers", str(num_workers), "--seed", "0", "--model", "ViT-B-32"])
    # open_clip_train.distributed.init_distributed_device, not distributed:
    args.world_size, args.rank, args.local_rank, args.distributed = 1, 0, 0, False
    preprocess = open_clip.image_transform(_IMAGE.value, is_train=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    t0 = time.perf_counter()
    info = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    it = iter(info.dataloader)
    made = time.perf_counter() - t0
    row = _time(it, lambda batch: batch[0].shape[0])
    if hasattr(it, "_shutdown_workers"):  # torch DataLoader's iterator: stop its worker processes
        it._shutdown_workers()  # pylint: disable=protected-access
    return dict(row, warmup_s=row["warmup_s"] + made)


def main(argv):
    del argv
    unknown = set(_PIPELINES.value) - set(PIPELINES)
    if unknown:
        raise app.UsageError(f"--pipelines: unknown {sorted(unknown)}; known: {PIPELINES}")
    for name in _PIPELINES.value:
        kind = name.removeprefix("vljax_")
        if name in ("vljax_webdataset", "vljax_parquet") and kind not in sources.SOURCES:
            raise app.UsageError(f"--pipelines={name}: vljax has no {kind!r} source kind yet "
                                 f"(known: {sorted(sources.SOURCES)}); leave it out of --pipelines")
    rows = []
    for name in _PIPELINES.value:
        for w in map(int, _WORKERS.value):
            print(f"[bench_input] {name}, {w} workers ...", flush=True)
            row = measure_open_clip(w) if name == "open_clip" else measure_vljax(name, w)
            rows.append(dict(pipeline=name, num_workers=w, **row))
    cpus = os.cpu_count()
    print(f"\ninput pipelines, batch {_BATCH.value}, {_IMAGE.value} px (demo: 112 px, BERT/32), "
          f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':<18}{'workers':>8}{'images/s':>10}{'img/CPU-s':>11}{'CPU-s':>7}{'warm-up s':>10}")
    for r in rows:
        print(f"{r['pipeline']:<18}{r['num_workers']:>8}{r['images_per_s']:>10.0f}"
              f"{r['images_per_cpu_s']:>11.0f}{r['cpu_s']:>7.1f}{r['warmup_s']:>10.1f}")
    result = dict(batch_size=_BATCH.value, image_size=_IMAGE.value, clip_tokens=CLIP_TOKENS,
                  cpus=cpus, machine=platform.machine(), load_average=os.getloadavg(),
                  timed_batches=_BATCHES.value, warmup_batches=_WARMUP.value, rows=rows)
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(result, indent=1))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
