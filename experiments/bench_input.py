"""Pairs per second delivered by the grain input pipeline for the demo input config.

    python3 experiments/bench_input.py [--workers=0,1,2] [--batches=8] [--batch_size=128]

Measures only the pipeline (read array_record, decode PNG, random resized crop, greyscale,
normalise, BERT-tokenise, batch): the trainer compares these numbers with its step throughput.
The first batches (worker start-up, imports) are timed separately from the steady state.
Prints a table and writes experiments/results/bench_input.json. Needs the demo datasets
(`python3 -m vljax.data.build_demo`).
"""
import json
import os
from pathlib import Path
import platform
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from vljax.data import pipeline  # noqa: E402
from vljax.tokenizers import get_tokenizer  # noqa: E402

_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "num_workers settings to measure.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per setting (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches first (start-up).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 112, "Image size.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "bench_input.json"),
                           "JSON results file.")


def demo_input(num_workers: int) -> dict:
    """The demo's training input (emoji + openclipart, as in configs/clip.py, with augmentation)."""
    return dict(
        data=[dict(source="tfds", name="vljax_emoji", split="train", weight=1.0),
              dict(source="tfds", name="vljax_openclipart", split="train", weight=1.0)],
        batch_size=_BATCH.value, image_size=_IMAGE.value, value_range="efficientnet",
        augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.1), num_workers=num_workers)


def measure(num_workers: int, tokenizer) -> dict:
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(demo_input(num_workers), tokenizer, seed=0,
                                      process_index=0, process_count=1)
    for _ in range(_WARMUP.value):
        next(it)
    t1 = time.perf_counter()
    for _ in range(_BATCHES.value):
        batch = next(it)
    t2 = time.perf_counter()
    it.close()
    pairs = _BATCHES.value * batch["image"].shape[0]
    return dict(num_workers=num_workers, pairs_per_s=pairs / (t2 - t1),
                warmup_s=t1 - t0, timed_pairs=pairs, skipped=it.skipped)


def main(argv):
    del argv
    tokenizer = get_tokenizer("bert", max_len=32)
    rows = [measure(int(w), tokenizer) for w in _WORKERS.value]
    print(f"\ngrain input pipeline, batch {_BATCH.value}, {_IMAGE.value} px, bert tokenizer, "
          f"{os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'pairs/s':>9} {'warm-up s':>10}")
    for r in rows:
        print(f"{r['num_workers']:>8} {r['pairs_per_s']:>9.0f} {r['warmup_s']:>10.1f}")
    result = dict(batch_size=_BATCH.value, image_size=_IMAGE.value, tokenizer="bert/32",
                  cpus=os.cpu_count(), machine=platform.machine(), timed_batches=_BATCHES.value,
                  rows=rows)
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(result, indent=1))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
