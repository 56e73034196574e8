"""Benchmark of the cross-device losses: compiled temp memory per device and step time.

Sigmoid (all-gather and ring) and softmax losses, loss + gradients w.r.t. (zimg, ztxt, t, b),
in jax.shard_map over meshes of 1, 2, 4, 8 simulated CPU devices at a fixed per-device batch.

    python experiments/bench_loss.py                       # per-device batch 512, width 512
    python experiments/bench_loss.py --batch 256 --width 768 --runs 10 --devices 1,8

Prints a table and writes JSON (--out, default experiments/results/bench_loss.json). On CPU the
"devices" share the host's cores, so step times grow with the device count; the memory column
is what carries over to accelerators.
"""
import argparse
import json
import os
import pathlib
import sys
import time

# 8 simulated CPU devices; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vljax import losses  # noqa: E402

LOSSES = {
    "sigmoid_all_gather": lambda zi, zt, t, b, axis_name: losses.sigmoid_loss(
        zi, zt, t, b, axis_name=axis_name, impl="all_gather"),
    "sigmoid_ring": lambda zi, zt, t, b, axis_name: losses.sigmoid_loss(
        zi, zt, t, b, axis_name=axis_name, impl="ring"),
    "softmax": lambda zi, zt, t, b, axis_name: losses.softmax_contrastive(
        zi, zt, t, axis_name=axis_name),
}


def bench_one(loss_fn, n, batch, width, runs, seed=0):
    """-> (temp bytes per device, median seconds, all step times) of loss + grads on n devices."""
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:n])
    rng = np.random.default_rng(seed)

    def embeddings():
        x = rng.normal(size=(n * batch, width)).astype(np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        return jax.device_put(x, NamedSharding(mesh, P("data")))

    replicated = NamedSharding(mesh, P())
    args = (embeddings(), embeddings(), jax.device_put(jnp.float32(10.0), replicated),
            jax.device_put(jnp.float32(-10.0), replicated))
    f = jax.shard_map(lambda *a: loss_fn(*a, axis_name="data"), mesh=mesh,
                      in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    compiled = step.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return temp, float(np.median(times)), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512, help="per-device batch")
    parser.add_argument("--width", type=int, default=512, help="embedding width")
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated mesh sizes (<= 8)")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration")
    parser.add_argument("--out", default="experiments/results/bench_loss.json")
    args = parser.parse_args(argv)

    device_counts = [int(d) for d in args.devices.split(",")]
    if max(device_counts) > len(jax.devices()):
        parser.error(f"--devices asks for {max(device_counts)}, only {len(jax.devices())} exist")
    names = args.losses.split(",")
    unknown = set(names) - set(LOSSES)
    if unknown:
        parser.error(f"unknown losses {sorted(unknown)}; choose from {sorted(LOSSES)}")

    rows = []
    print(f"per-device batch {args.batch}, width {args.width}, fp32, loss + grads, "
          f"median of {args.runs} runs; {jax.devices()[0].platform} x {len(jax.devices())}")
    print(f"{'loss':<20}{'devices':>8}{'global B':>10}{'temp MB/dev':>13}{'median ms':>11}")
    for name in names:
        for n in device_counts:
            temp, median, times = bench_one(LOSSES[name], n, args.batch, args.width, args.runs)
            rows.append(dict(loss=name, devices=n, per_device_batch=args.batch,
                             global_batch=n * args.batch, width=args.width,
                             temp_bytes_per_device=temp, median_s=median, times_s=times))
            print(f"{name:<20}{n:>8}{n * args.batch:>10}{temp / 1e6:>13.2f}{median * 1e3:>11.1f}",
                  flush=True)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=vars(args), jax=jax.__version__,
                                   platform=jax.devices()[0].platform, results=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
