r"""Peak memory of streaming, sharded evaluation: it must not grow with the number of images.

    python experiments/bench_eval_memory.py                  # 10k and 50k generated images, Fashion-MNIST
    python experiments/bench_eval_memory.py --sizes=2000 --no-fashion_mnist   # a quick look

1. A generated classification set (ImageNet-val-sized: 1000 classes, 224 x 224 JPEGs of coloured
   shapes on noise) of 10,000 and 50,000 records, written once as TFDS array_record under
   ~/.cache/vljax/bench. The zero-shot evaluator (`ZeroShotEvaluator.from_config`, one template,
   1000 class prompts) runs over each in a fresh subprocess with the library's Embedder at
   224 px. The model is deliberately small (ViT width 64, depth 2, patch 32; text transformer
   width 64, depth 2) so that 50k images finish in minutes on 2 CPU cores: the claim measured
   here is about the data path (what is held in memory), not the towers.
2. The Fashion-MNIST test set (10,000 images) zero-shot at 224 px with the demo model of
   configs/lit.py (EfficientNet-Lite0 + MiniLM, random weights: memory does not depend on them),
   the evaluation `python -m vljax.evaluate --config=configs/lit.py --evals=fashion_mnist` runs.

Peak RSS is each child's own `ru_maxrss` (everything: Python, JAX, XLA, grain threads).
Writes experiments/results/bench_eval_memory.json and prints a table.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_SIZES = flags.DEFINE_list("sizes", ["10000", "50000"], "Generated set sizes (records).")
_FMNIST = flags.DEFINE_bool("fashion_mnist", True, "Also measure Fashion-MNIST at 224 px with the demo model.")
_BATCH = flags.DEFINE_integer("batch", 64, "Embedder batch size.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one measurement ('gen:N' or 'fmnist') and print JSON.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_eval_memory.json", "JSON output path.")

CLASSES, SIZE = 1000, 224
BENCH_DIR = pathlib.Path(os.environ.get("VLJAX_ASSETS", pathlib.Path.home() / ".cache" / "vljax")) / "bench"


def _name(n: int) -> str:
    return f"vljax_bench_cls{n}"


def _image(k: int) -> bytes:
    """Record k: class k % 1000 sets the colour and shape of a figure on a noise background."""
    from PIL import Image, ImageDraw
    c = k % CLASSES
    rng = np.random.default_rng(k)
    bg = rng.integers(0, 256, size=(SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    img = Image.fromarray(bg).resize((SIZE, SIZE), Image.NEAREST)
    d = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in np.random.default_rng(c).integers(0, 256, 3))
    x0, y0 = rng.integers(10, 80, size=2)
    box = [int(x0), int(y0), int(x0) + 100, int(y0) + 100]
    (d.ellipse, d.rectangle, d.pieslice)[c % 3](box, *((30, 300) if c % 3 == 2 else ()), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def ensure_dataset(n: int) -> str:
    """Writes the generated set of n records (cached; reruns skip generation)."""
    import tensorflow_datasets as tfds
    from vljax.data import tfds_writer
    if tfds_writer.is_built(_name(n), BENCH_DIR):
        return str(BENCH_DIR)
    t0 = time.perf_counter()
    names = [f"class {c}" for c in range(CLASSES)]

    def examples():
        for k in range(n):
            yield str(k), {"image": _image(k), "captions": [names[k % CLASSES]], "label": k % CLASSES}
    spec = tfds_writer.DatasetSpec(
        name=_name(n), features={"image": tfds_writer.png_bytes_feature(),
                                 "captions": tfds.features.Sequence(tfds.features.Text()),
                                 "label": tfds.features.ClassLabel(names=names)},
        splits={"test": examples}, description=f"{n} generated 224 px images, 1000 classes (benchmark)")
    tfds_writer.write_tfds(spec, BENCH_DIR)
    print(f"generated {_name(n)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(BENCH_DIR)


def _small_model():
    import jax
    from vljax.models.two_towers import TwoTowers
    from vljax.tokenizers import get_tokenizer
    model = TwoTowers(
        image_model="vit", image=dict(variant=None, width=64, depth=2, mlp_dim=128, num_heads=2,
                                      patch_size=32, num_classes=64, pool_type="gap"),
        text_model="text_transformer", text=dict(variant=None, width=64, depth=2, mlp_dim=128, num_heads=2,
                                                 vocab_size=49408, max_len=16, num_classes=64, causal=True,
                                                 pool_type="eot", eot_id=49407))
    params = jax.jit(lambda r: model.init(r, np.zeros((1, SIZE, SIZE, 3), np.float32),
                                          np.zeros((1, 16), np.int32))["params"])(jax.random.key(0))
    return model, jax.device_get(params), get_tokenizer("clip", max_len=16)


def child(what: str) -> dict:
    from vljax import factory, sharding
    from vljax.embedder import Embedder
    from vljax.evaluators import ZeroShotEvaluator
    mesh = sharding.make_mesh([("data", -1)])
    if what.startswith("gen:"):
        n = int(what[4:])
        data_dir = ensure_dataset(n)
        model, params, tok = _small_model()
        ev = ZeroShotEvaluator.from_config("bench", dict(
            data=dict(name=_name(n), split="test", data_dir=data_dir), templates="name"))
        value_range, desc = "clip", "ViT w64 d2 /32 + text w64 d2 (random)"
    else:
        from configs import lit as lit_config
        from vljax import train
        config = lit_config.get_config()
        config.model_init = {}
        config.input.image_size = SIZE
        model, tok = train.build_model(config), train.build_tokenizer(config)
        params = train.init_params(model, config, __import__("jax").random.key(0))
        ev = ZeroShotEvaluator.from_config("fashion_mnist", dict(config.evals.fashion_mnist))
        value_range, desc = config.input.value_range, "configs/lit.py: EfficientNet-Lite0 + MiniLM (random)"
        n = len(ev.data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    bundle = factory.Bundle(model, params, tok, {"image_size": SIZE, "value_range": value_range})
    emb = Embedder.from_bundle(bundle, mesh=mesh, batch_size=_BATCH.value)
    metrics = ev.run(emb)
    seconds = time.perf_counter() - t0
    return dict(images=n, image_size=SIZE, model=desc, seconds=seconds, images_per_s=n / seconds,
                top1=metrics[f"zeroshot/{ev.name}/top1"], batch=emb.batch_size,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                rss_before_eval_mb=rss_before)


def _run_child(what: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, f"--child={what}", f"--batch={_BATCH.value}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(child(_CHILD.value)))
        return
    load_start = os.getloadavg()
    for n in _SIZES.value:  # generation outside the measured children
        ensure_dataset(int(n))
    rows = {f"generated {int(n):,}": _run_child(f"gen:{n}") for n in _SIZES.value}
    if _FMNIST.value:
        rows["Fashion-MNIST test"] = _run_child("fmnist")
    gen = [r["peak_rss_mb"] for k, r in rows.items() if k.startswith("generated")]
    out = dict(rows=rows, peak_rss_spread=(max(gen) / min(gen) - 1) if gen else None,
               loadavg_start=load_start, loadavg_end=os.getloadavg(), cpus=os.cpu_count())
    print(f"Zero-shot evaluation at {SIZE} px, streaming (vljax.embedder.Embedder), batch {_BATCH.value}, "
          f"fresh process each")
    print("| data | images | model | peak RSS (MB) | images/s | top-1 |")
    print("|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['images']:,} | {r['model']} | {r['peak_rss_mb']:.0f} | {r['images_per_s']:.0f} | "
              f"{r['top1']:.3f} |")
    if gen:
        print(f"peak RSS spread over the generated sizes: {out['peak_rss_spread']:.1%}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
