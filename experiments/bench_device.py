r"""Accelerator benchmark on whatever backend JAX finds (CPU, GPU, TPU); writes one JSON.

    python experiments/bench_device.py                    # ViT-B/16 + text-B CLIP, bf16 (< 5 min)
    python experiments/bench_device.py --reduced          # CPU-sized check that everything runs

Measures, on the first device:
  * the CLIP train step (the trainer's own, `bench_train.vljax_step`: ViT-B/16 at 224 px + the
    12-layer width-512 text tower, softmax loss, AdamW, bf16 compute) at the largest power-of-two
    batch that fits: the batch doubles from --start_batch while the compiled step's memory
    (XLA's memory analysis: arguments + outputs + temporaries - aliased) stays within --mem_fraction
    of the device's memory, and the first batch that does not compile or fit ends the search;
  * pairs/s and MFU at that batch, without and with patch dropout (--patch_dropout, FLIP), the two
    steps alternating so both see the same device state. MFU = analytic model FLOPs of the step
    (the kept tokens under dropout) / step time / the device's peak (the vendor's dense bf16 figure
    where the device kind is in PEAK_FLOPS, else an XLA bf16 matmul timed here; both are kept);
  * the ring sigmoid and ring softmax losses (`bench_loss.bench_one`) on all local devices:
    loss + grads step time and compiled temp memory per device;
  * zero-shot classification images/s: image tower forward + logits against --classes class
    embeddings + argmax, at the train batch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_loss  # noqa: E402  (sets XLA_FLAGS for simulated CPU devices before jax loads)
import bench_train  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense bf16 FLOP/s per chip from the vendors' data sheets (without sparsity).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}

REDUCED = "tiny"  # bench_train.SIZES entry for --reduced
FULL = "b16"


def _memory(compiled) -> tuple[float, float | None]:
    """(bytes the compiled step needs: arguments + outputs + temporaries - aliased, the device's
    limit or None where it reports none, as CPUs do)."""
    mem = compiled.memory_analysis()
    used = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return float(used), (stats or {}).get("bytes_limit")


def _synthetic_batch(size: dict, rng):
    s, b, L = size["img"]["image_size"], size["batch"], size["txt"]["max_len"]
    images = rng.uniform(-1, 1, size=(b, s, s, 3)).astype(np.float32)
    texts = rng.integers(1, 49406, size=(b, L)).astype(np.int32)
    texts[:, -1] = 49407  # CLIP's end-of-text id, where the causal tower pools
    return {"image": images, "text": texts}


class _Step:
    """One compiled train step of `size` at `patch_dropout`, with its state and a batch."""

    def __init__(self, size: dict, patch_dropout: float, dtype: str):
        from vljax import sharding
        self.size, self.patch_dropout = size, patch_dropout
        config = bench_train.vljax_config(size, dtype, patch_dropout=patch_dropout)
        self.fn, self.state, self.mesh, _ = bench_train.vljax_step(config, jax.devices()[:1])
        with jax.set_mesh(self.mesh):
            self.batch = sharding.shard_batch(_synthetic_batch(size, np.random.default_rng(0)),
                                              self.mesh)
            t0 = time.perf_counter()
            self.compiled = self.fn.lower(self.state, self.batch).compile()
            self.compile_s = time.perf_counter() - t0

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        float(metrics["train/loss"])  # blocks
        return time.perf_counter() - t0


def largest_batch(size_name: str, dtype: str, log):
    """The step at the largest power-of-two batch that fits -> (step, search log).

    Compiling is the slow part on an accelerator, so the search compiles the start batch b0 and
    2 b0, extrapolates the memory linearly in the batch (weights and optimizer state fixed,
    activations proportional), compiles the largest power of two predicted to fit, and halves
    while that does not fit.
    """
    tried = []

    def attempt(batch):
        size = dict(bench_train.SIZES[size_name], batch=batch)
        try:
            step = _Step(size, 0.0, dtype)
        except Exception as e:  # XLA reports an allocation it cannot make as an error
            log(f"  batch {batch}: {type(e).__name__}: {str(e)[:120]}")
            tried.append(dict(batch=batch, fits=False, bytes=None))
            return None, None, None
        used, limit = _memory(step.compiled)
        ok = limit is None or used <= ARGS.mem_fraction * limit
        tried.append(dict(batch=batch, fits=ok, bytes=used, compile_s=step.compile_s))
        log(f"  batch {batch}: {'fits' if ok else 'does not fit'} ({used / 2**30:.2f} GiB"
            + (f" of {limit / 2**30:.1f}" if limit else "") + f"), compiled in {step.compile_s:.0f}s")
        return (step if ok else None), used, limit

    b0 = ARGS.start_batch
    best, used0, _ = attempt(b0)
    if best is None:
        raise SystemExit(f"--start_batch={b0} does not fit the device")
    if 2 * b0 > ARGS.max_batch:
        return best, tried
    del best  # free its state before the next compile
    best, used1, limit = attempt(2 * b0)
    if best is None:
        return attempt(b0)[0], tried
    per_example = (used1 - used0) / b0
    target = 2 * b0
    while (target * 2 <= ARGS.max_batch and (limit is None or used1 + per_example
                                              * (target * 2 - 2 * b0) <= ARGS.mem_fraction * limit)):
        target *= 2
    while target > 2 * b0:
        log(f"  predicted to fit: batch {target}")
        best = None  # free the smaller step's state before the larger compile
        best, _, _ = attempt(target)
        if best is not None:
            return best, tried
        target //= 2
    return best or attempt(2 * b0)[0], tried


def _peak(dtype: str):
    kind = jax.devices()[0].device_kind
    measured = bench_train._MatmulPeak(dtype)
    measured()
    return PEAK_FLOPS.get(kind), measured.summary()["best_flops_per_s"]


def train_rows(size_name, step, dtype, log):
    """Alternating steps without / with patch dropout at the same batch -> rows."""
    steps = {0.0: step, ARGS.patch_dropout: _Step(step.size, ARGS.patch_dropout, dtype)}
    times = {p: [] for p in steps}
    for i in range(ARGS.steps + 1):
        for p, s in steps.items():
            times[p].append(s())
    spec_peak, matmul_peak = _peak(dtype)
    rows = []
    for p, s in steps.items():
        t = float(np.median(times[p][1:]))
        flops = bench_train.model_flops(s.size, p)
        rows.append(dict(model=size_name, batch=s.size["batch"], patch_dropout=p, median_s=t,
                         step_times_s=times[p], pairs_per_s=s.size["batch"] / t,
                         model_step_flops=flops, compile_s=s.compile_s,
                         mfu=flops / t / spec_peak if spec_peak else None,
                         flops_fraction_of_matmul_peak=flops / t / matmul_peak,
                         peak_flops_spec=spec_peak, peak_flops_matmul=matmul_peak))
        log(f"  patch dropout {p:.0%}: {rows[-1]['pairs_per_s']:.1f} pairs/s, "
            f"{rows[-1]['flops_fraction_of_matmul_peak']:.0%} of the matmul peak"
            + (f", MFU {rows[-1]['mfu']:.1%}" if spec_peak else ""))
    rows[1]["speedup_vs_no_dropout"] = rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"]
    return rows


def zero_shot_rows(step, log):
    """Images/s of zero-shot classification with the step's model and current params."""
    from vljax import train
    config = bench_train.vljax_config(step.size, ARGS.dtype)
    model = train.build_model(config)
    rng = np.random.default_rng(1)
    classes = rng.normal(size=(ARGS.classes, config.model.image["num_classes"])).astype(np.float32)
    classes = jnp.asarray(classes / np.linalg.norm(classes, axis=-1, keepdims=True))

    @jax.jit
    def classify(params, images, classes):
        zimg = model.apply({"params": params}, images, None)[0]
        return jnp.argmax(zimg @ classes.T.astype(zimg.dtype), axis=-1)

    params = step.state["params"]
    images = jax.device_put(step.batch["image"])
    classify(params, images, classes).block_until_ready()
    times = []
    for _ in range(ARGS.steps):
        t0 = time.perf_counter()
        classify(params, images, classes).block_until_ready()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    row = dict(batch=len(images), classes=ARGS.classes, median_s=t, images_per_s=len(images) / t)
    log(f"  zero-shot: {row['images_per_s']:.1f} images/s ({ARGS.classes} classes)")
    return row


def loss_rows(log):
    n = len(jax.devices())
    rows = []
    for name in ("sigmoid_ring", "softmax_ring"):
        temp, median, _ = bench_loss.bench_one(bench_loss.LOSSES[name], n, ARGS.loss_batch,
                                               ARGS.loss_width, ARGS.steps)
        rows.append(dict(loss=name, devices=n, per_device_batch=ARGS.loss_batch,
                         width=ARGS.loss_width, temp_bytes_per_device=temp, median_s=median))
        log(f"  {name} on {n} device(s): {median * 1e3:.2f} ms, {temp / 1e6:.1f} MB temp")
    return rows


def main(argv=None):
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true",
                        help=f"the `{REDUCED}` sizes and small batches (a CPU check that it runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--start_batch", type=int, default=None, help="default 64 (8 reduced)")
    parser.add_argument("--max_batch", type=int, default=None, help="default 4096 (16 reduced)")
    parser.add_argument("--mem_fraction", type=float, default=0.9,
                        help="share of the device memory a step may use")
    parser.add_argument("--patch_dropout", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, 3 reduced)")
    parser.add_argument("--loss_batch", type=int, default=None,
                        help="per-device batch of the loss rows (default 4096, 256 reduced)")
    parser.add_argument("--loss_width", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000, help="zero-shot classes")
    parser.add_argument("--out", default=None,
                        help="default experiments/results/bench_device_<platform>[_reduced].json")
    ARGS = parser.parse_args(argv)
    reduced = ARGS.reduced
    ARGS.start_batch = ARGS.start_batch or (8 if reduced else 64)
    ARGS.max_batch = ARGS.max_batch or (16 if reduced else 4096)
    ARGS.steps = ARGS.steps or (3 if reduced else 10)
    ARGS.loss_batch = ARGS.loss_batch or (256 if reduced else 4096)
    device = jax.devices()[0]
    out = ARGS.out or (f"experiments/results/bench_device_{device.platform}"
                       f"{'_reduced' if reduced else ''}.json")
    size_name = REDUCED if reduced else FULL
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    log(f"{device.platform} x {len(jax.devices())} ({device.device_kind}); model {size_name}, {ARGS.dtype}")
    log("batch search")
    step, tried = largest_batch(size_name, ARGS.dtype, log)
    log(f"train step at batch {step.size['batch']}")
    train = train_rows(size_name, step, ARGS.dtype, log)
    zero_shot = zero_shot_rows(step, log)
    log("ring losses")
    ring = loss_rows(log)
    result = dict(platform=device.platform, device_kind=device.device_kind,
                  devices=len(jax.devices()), jax=jax.__version__, reduced=reduced,
                  config=vars(ARGS), batch_search=tried, train=train, zero_shot=zero_shot,
                  ring_losses=ring, wall_s=time.perf_counter() - start)
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")


ARGS = None

if __name__ == "__main__":
    main()
