r"""Zero-shot evaluation throughput: Fashion-MNIST test images/s with the demo model.

    python experiments/bench_eval.py                       # 1000 test images, 80 CLIP templates
    python experiments/bench_eval.py --images=500 --templates=photo   # a quick look

The evaluator and embedder are the library's own (`vljax.evaluators.ZeroShotEvaluator` over
`vljax.embedder.Embedder`, which streams the images from the data pipeline), on the demo model of
`configs/lit.py` (EfficientNet-Lite0 + MiniLM, 112 px) with random weights (speed does not depend
on them; `--pretrained` loads the config's towers). Class text embeddings are computed once per
evaluation (10 classes x T templates in batches), then every image is scored against the [C, D]
class matrix. Rows:
  - "first run": the first evaluation (a fresh Embedder), compilation included;
  - "steady": later evaluations, each with a fresh Embedder (its towers, jitted once per model
    and mesh, are not compiled again): reading, decoding and preprocessing the images, overlapped
    with the image tower, and the class text embeddings.
Images/s counts the test images over the whole evaluation (text embeddings included); the text
and image parts are also timed on their own, and the image part's two halves apart: the input
(`pipeline.make_eval_batches` alone) and the image tower (on the same batches held in memory).

    python experiments/bench_eval.py --workers=2          # decoding in 2 grain worker processes
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import lit as lit_config  # noqa: E402
from vljax import factory, sharding, train  # noqa: E402
from vljax.data import pipeline  # noqa: E402
from vljax.embedder import Embedder  # noqa: E402
from vljax.evaluators import zeroshot  # noqa: E402

_IMAGES = flags.DEFINE_integer("images", 1000, "Fashion-MNIST test images (the first in storage order).")
_TEMPLATES = flags.DEFINE_string("templates", "clip80", "Prompt templates (vljax.evaluators.prompts).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Steady-state evaluations timed (median).")
_BATCH = flags.DEFINE_integer("batch", 64, "Embedder batch size (the trainer's eval_batch_size).")
_PRETRAINED = flags.DEFINE_bool("pretrained", False, "Load the config's pretrained towers.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Grain worker processes decoding batches (input.eval_workers).")
_THREADS = flags.DEFINE_integer("read_threads", 4, "Threads decoding batches ahead (with --workers=0).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_eval.json", "JSON output path.")


def main(argv):
    del argv
    load_start = os.getloadavg()
    config = lit_config.get_config()
    if not _PRETRAINED.value:
        config.model_init = {}
    model = train.build_model(config)
    params = jax.device_get(train.init_params(model, config, jax.random.key(0)))
    tokenizer = train.build_tokenizer(config)

    t0 = time.perf_counter()
    ev = zeroshot.ZeroShotEvaluator.from_config("fashion_mnist", dict(
        data=dict(name="vljax_fashion_mnist", split="test", max_examples=_IMAGES.value),
        templates=_TEMPLATES.value))
    load_s = time.perf_counter() - t0
    n = len(ev.data)
    n_texts = sum(len(t) for t in ev.texts)
    mesh = sharding.make_mesh([("data", -1)])
    bundle = factory.Bundle(model, params, tokenizer, factory.spec_from_config(config))

    def embedder():
        return Embedder.from_bundle(bundle, mesh=mesh, batch_size=_BATCH.value,
                                    read_threads=_THREADS.value, workers=_WORKERS.value)

    def timed_run():
        t0 = time.perf_counter()
        metrics = ev.run(embedder())
        return time.perf_counter() - t0, metrics

    rows = {}
    first_s, metrics = timed_run()
    rows["first run (compiles)"] = [first_s]
    rows["steady"] = [timed_run()[0] for _ in range(_REPEATS.value)]
    # The parts of a steady evaluation on their own.
    emb = embedder()
    t0 = time.perf_counter()
    zeroshot.class_text_embeddings(emb, ev.texts)
    text_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb.embed_images(ev.data)
    image_s = time.perf_counter() - t0
    # The image part's halves apart: the input alone, then the tower alone on those images in memory.
    t0 = time.perf_counter()
    batches = list(pipeline.make_eval_batches(ev.data, batch_size=emb.batch_size, image_size=emb.image_size,
                                              value_range=emb.value_range, read_threads=_THREADS.value,
                                              workers=_WORKERS.value))
    input_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb.embed_image_array(np.concatenate([b["image"] for b in batches]))
    tower_s = time.perf_counter() - t0

    res = {k: dict(seconds=float(np.median(v)), images_per_s=n / float(np.median(v)), all_s=v)
           for k, v in rows.items()}
    out = dict(config="configs/lit.py", images=n, image_size=config.input.image_size, classes=len(ev.texts),
               texts=n_texts, templates=_TEMPLATES.value, batch=_BATCH.value, pretrained=_PRETRAINED.value,
               workers=_WORKERS.value, read_threads=_THREADS.value,
               runs=res, text_embeddings_s=text_s, text_per_s=n_texts / text_s, image_embeddings_s=image_s,
               image_stream_images_per_s=n / image_s, image_input_only_s=input_s, image_tower_only_s=tower_s,
               metadata_load_s=load_s,
               top1=metrics["zeroshot/fashion_mnist/top1"],
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               loadavg_start=load_start, loadavg_end=os.getloadavg(), cpus=os.cpu_count())

    print(f"Zero-shot Fashion-MNIST ({n} test images, {config.input.image_size} px, {len(ev.texts)} classes x "
          f"{n_texts // len(ev.texts)} templates), demo model (configs/lit.py), embedder batch {_BATCH.value}, "
          f"input: {f'{_WORKERS.value} worker processes' if _WORKERS.value else f'{_THREADS.value} threads'}")
    print("| evaluation | seconds | images/s |")
    print("|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r['seconds']:.2f} | {r['images_per_s']:.0f} |")
    print(f"parts of a steady evaluation: class text embeddings {text_s:.2f} s once ({n_texts} prompts, "
          f"{out['text_per_s']:.0f}/s), image embeddings (read, decode, preprocess, tower) {image_s:.2f} s "
          f"({out['image_stream_images_per_s']:.0f} images/s; apart: input {input_s:.2f} s, tower {tower_s:.2f} s); "
          f"reading labels {load_s:.1f} s (not counted); "
          f"load average {load_start} -> {out['loadavg_end']}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
