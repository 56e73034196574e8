"""Benchmark of the cross-device losses: compiled temp memory per device and step time.

Sigmoid and softmax losses, each all-gather and ring, loss + gradients w.r.t. (zimg, ztxt, t, b),
in jax.shard_map over meshes of 1, 2, 4, 8 simulated CPU devices at a fixed per-device batch.

    python experiments/bench_loss.py                       # per-device batch 512, width 512
    python experiments/bench_loss.py --batch 256 --width 768 --runs 10 --devices 1,8
    # Toward pod scale: compiled memory only (--runs 0), as many simulated devices as asked.
    python experiments/bench_loss.py --devices 2,16,32,64 --runs 0 \
        --losses sigmoid_ring,softmax_ring --out experiments/results/bench_loss_pod.json

Prints a table and writes JSON (--out, default experiments/results/bench_loss.json). On CPU the
"devices" share the host's cores, so step times grow with the device count; the memory column
(XLA's compiled temp allocation per device) is what carries over to accelerators.
"""
import argparse
import json
import os
import pathlib
import sys
import time


def _simulated_devices(argv):
    """The largest --devices entry (at least 8): the CPU device count, set before jax loads."""
    for i, a in enumerate(argv):
        if a.startswith("--devices"):
            value = a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            return max([8] + [int(d) for d in value.split(",") if d.strip().isdigit()])
    return 8


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           f"{_simulated_devices(sys.argv[1:])}").strip()

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
    "softmax_all_gather": lambda zi, zt, t, b, axis_name: losses.softmax_contrastive(
        zi, zt, t, axis_name=axis_name, impl="all_gather"),
    "softmax_ring": lambda zi, zt, t, b, axis_name: losses.softmax_contrastive(
        zi, zt, t, axis_name=axis_name, impl="ring"),
}


def bench_one(loss_fn, n, batch, width, runs, seed=0):
    """-> (temp bytes per device, median seconds or None, step times) of loss + grads on n devices.

    runs=0 compiles only (the memory analysis), without executing the step.
    """
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
    if runs == 0:
        return temp, None, []
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
    parser.add_argument("--devices", default="1,2,4,8",
                        help="comma-separated mesh sizes (simulated CPU devices up to the largest)")
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per configuration; 0: compiled memory only")
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
    print(f"{'loss':<20}{'devices':>8}{'global B':>10}{'temp MB/dev':>13}{'vs 2 dev':>10}"
          f"{'median ms':>11}")
    for name in names:
        at_2 = None
        for n in device_counts:
            temp, median, times = bench_one(LOSSES[name], n, args.batch, args.width, args.runs)
            at_2 = temp if n == 2 else at_2
            ratio = "-" if at_2 is None else f"{temp / at_2:.2f}x"
            rows.append(dict(loss=name, devices=n, per_device_batch=args.batch,
                             global_batch=n * args.batch, width=args.width,
                             temp_bytes_per_device=temp, median_s=median, times_s=times))
            ms = "-" if median is None else f"{median * 1e3:.1f}"
            print(f"{name:<20}{n:>8}{n * args.batch:>10}{temp / 1e6:>13.2f}{ratio:>10}{ms:>11}",
                  flush=True)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=vars(args), jax=jax.__version__,
                                   platform=jax.devices()[0].platform, results=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
