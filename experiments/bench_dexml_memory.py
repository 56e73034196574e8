"""Per-device memory of DEXML's decoupled softmax (loss + gradients w.r.t. the image and label
embeddings) with the label space replicated vs sharded over the devices, from XLA's
`memory_analysis()` of the compiled per-device program (nothing is run: shapes only).

    python experiments/bench_dexml_memory.py                    # 8 simulated devices, K up to 100k
    python experiments/bench_dexml_memory.py --labels 1000,100000 --batch 4096 --width 768

Replicated: the trainer's layout today (`loss.name="dexml"`): the batch split over the devices,
every device holding all K label embeddings [K, D] and their gradient, and a [B/n, K] logit block.
Sharded (`decoupled_softmax(..., label_axis=...)`): every device holds K/n labels, the whole batch's
image embeddings [B, D] and a [B, K/n] logit block; the log-sum-exp over labels is combined from
[B] partial sums. The logit block is the same size in both (B K / n); the label embeddings, their
gradient and the optimizer state on them (not counted here) shrink by n. The text tower's
activations on the K label prompts, which the trainer computes every step, shrink alike when the
prompts are sharded (not measured here: this script compiles the loss only).
Prints a table: labels, layout, per-device argument / temp / output bytes, and their total.
"""
import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vljax.losses.dexml import decoupled_softmax  # noqa: E402


def memory(layout: str, mesh, batch: int, labels: int, width: int) -> dict:
    """Per-device bytes of the compiled value_and_grad of the decoupled softmax."""
    if layout == "replicated":
        specs = (P("d"), P(), P("d"))
        fn = lambda zi, zl, y: decoupled_softmax(zi, zl, 10.0, y, axis_name="d")  # noqa: E731
    else:
        specs = (P(), P("d"), P(None, "d"))
        fn = lambda zi, zl, y: decoupled_softmax(zi, zl, 10.0, y, label_axis="d")  # noqa: E731
    f = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())
    shapes = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, d, p in
              zip(((batch, width), (labels, width), (batch, labels)), (jnp.float32, jnp.float32, jnp.bool_), specs)]
    ma = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*shapes).compile().memory_analysis()
    out = dict(arguments=ma.argument_size_in_bytes, temp=ma.temp_size_in_bytes, outputs=ma.output_size_in_bytes)
    out["total"] = sum(out.values())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", default="1000,10000,100000")
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--width", type=int, default=512, help="embedding width D")
    args = parser.parse_args()
    devices = jax.devices()[:8]
    mesh = Mesh(devices, ("d",))
    print(f"devices {len(devices)}, global batch {args.batch}, width {args.width}; per-device MiB")
    print(f"{'labels':>8} {'layout':>10} {'arguments':>10} {'temp':>10} {'outputs':>10} {'total':>10}")
    for k in (int(x) for x in args.labels.split(",")):
        for layout in ("replicated", "sharded"):
            m = memory(layout, mesh, args.batch, k, args.width)
            print(f"{k:>8} {layout:>10} " + " ".join(f"{m[c] / 2**20:>10.1f}" for c in
                                                    ("arguments", "temp", "outputs", "total")))


if __name__ == "__main__":
    main()
