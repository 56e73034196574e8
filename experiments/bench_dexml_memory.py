"""Per-device memory of DEXML's decoupled softmax with the label space replicated vs split over the
devices, from XLA's `memory_analysis()` of compiled per-device programs (nothing is run: shapes only).

    python experiments/bench_dexml_memory.py                    # 8 simulated devices, K up to 100k
    python experiments/bench_dexml_memory.py --labels 1000,100000 --batch 4096 --width 768
    python experiments/bench_dexml_memory.py --step-labels 100000   # the trainer's step only

Two tables.

The loss alone (loss + gradients w.r.t. the image and label embeddings), 8 devices. Replicated:
the batch split over the devices, every device holding all K label embeddings [K, D] and their
gradient, and a [B/n, K] logit block. Sharded (`decoupled_softmax(..., label_axis=...)`): every
device holds K/n labels, the whole batch's image embeddings [B, D] and a [B, K/n] logit block; the
log-sum-exp over labels is combined from [B] partial sums. The logit block is the same size in both
(B K / n); the label embeddings and their gradient shrink by n.

The TRAINER's update step (`vljax.step.make_train_step` with `objective.make_loss`, `loss.name=
"dexml"`; a small ViT / text transformer of width `--tower-width`, AdamW, the label prompts [K, 16]
embedded by the text tower in every step): one device with the K prompts; 8 devices (data axis)
with the prompts replicated (the layout without `loss.label_axis`); 8 devices with
`loss.label_axis="data"` (vljax/label_shards.py: the prompts, their activations in the text tower,
their embeddings and the label-set columns split over the devices). Columns: per-device argument /
temp / output bytes and XLA's planned peak (`perf.StepCost.peak_bytes`). The text tower's
activations on the K prompts are what the split saves: replicated, every device runs the tower on
all K prompts.

Measured (jax 0.10.2, CPU, 8 simulated devices; `python experiments/bench_dexml_memory.py`), MiB
per device:

    the loss, global batch 1024, D 512     arguments     temp   outputs    total
      K 100000  replicated                     207.8    195.3     195.6    598.6
      K 100000  sharded                         38.6    244.2      26.4    309.2
    the trainer's step, global batch 256,  arguments     temp   outputs     peak
    towers' width 128, prompts of 16 tokens
      K 100000  1 device                       119.4  55128.8      83.0  55248.2
      K 100000  8 devices, replicated           87.6  54211.6      83.0  54299.2
      K 100000  8 devices, label_axis="data"    87.6   6865.3      83.0   6952.9

The step's memory is the text tower's activations on the prompts: replicated, 8 devices save
nothing (each runs the tower on all 100k prompts); split, each holds 1/7.8 of them.
"""
import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vljax import label_shards, objective, perf, sharding  # noqa: E402
from vljax.losses.dexml import decoupled_softmax  # noqa: E402
from vljax.models.two_towers import TwoTowers  # noqa: E402
from vljax.step import make_train_step  # noqa: E402

PROMPT_LEN = 16


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


def step_memory(devices: int, split: bool, batch: int, labels: int, width: int) -> perf.StepCost:
    """Per-device StepCost of the trainer's compiled DEXML update step (module docstring)."""
    mesh_cfg = [("data", devices)]
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:devices])
    config = ml_collections.ConfigDict(dict(mesh=mesh_cfg, loss=dict(name="dexml")))
    if split:
        config.loss.label_axis = "data"
    tower = dict(variant=None, width=width, depth=2, mlp_dim=4 * width, num_heads=4, num_classes=width)
    model = TwoTowers(image_model="vit", image=dict(tower, patch_size=16, pool_type="cls"),
                      text_model="text_transformer",
                      text=dict(tower, vocab_size=49408, max_len=PROMPT_LEN, causal=True, pool_type="eot",
                                eot_id=49407))
    prompts = np.ones((labels, PROMPT_LEN), np.int32)
    prompts[:, -1] = 49407
    prompts, rows = label_shards.place(config, mesh, prompts)
    images = jax.ShapeDtypeStruct((batch, 64, 64, 3), jnp.float32)
    texts = jax.ShapeDtypeStruct((batch, PROMPT_LEN), jnp.int32)
    params = jax.eval_shape(lambda r, x, y: model.init(r, x, y)["params"], jax.random.key(0), images, texts)
    tx = optax.adamw(1e-3)
    step = make_train_step(model, tx, objective.make_loss(config, mesh), jax.tree.map(lambda _: True, params),
                           label_text=prompts, label_sharding=rows)
    rep, bsh = NamedSharding(mesh, P()), sharding.batch_sharding(mesh)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key(0))}
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
    data = {"image": images, "text": texts, "labels": jax.ShapeDtypeStruct((batch, labels), jnp.bool_)}
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in data.items()}
    fn = jax.jit(step, donate_argnums=(0,))
    with jax.set_mesh(mesh):
        return perf.compiled_cost(fn, devices, state, data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", default="1000,10000,100000", help="the loss table's label counts")
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--width", type=int, default=512, help="embedding width D (loss table)")
    parser.add_argument("--step-labels", default="100000", help="the trainer step table's label counts")
    parser.add_argument("--step-batch", type=int, default=256, help="global batch (step table)")
    parser.add_argument("--tower-width", type=int, default=128, help="towers' width = D (step table)")
    parser.add_argument("--skip-loss", action="store_true", help="the trainer step table only")
    args = parser.parse_args()
    devices = jax.devices()[:8]
    mib = 2 ** 20
    if not args.skip_loss:
        mesh = Mesh(devices, ("d",))
        print(f"the loss: devices {len(devices)}, global batch {args.batch}, width {args.width}; per-device MiB")
        print(f"{'labels':>8} {'layout':>10} {'arguments':>10} {'temp':>10} {'outputs':>10} {'total':>10}")
        for k in (int(x) for x in args.labels.split(",")):
            for layout in ("replicated", "sharded"):
                m = memory(layout, mesh, args.batch, k, args.width)
                print(f"{k:>8} {layout:>10} " + " ".join(f"{m[c] / mib:>10.1f}" for c in
                                                        ("arguments", "temp", "outputs", "total")))
    print(f"\nthe trainer's step: global batch {args.step_batch}, towers' width {args.tower_width}, "
          f"prompts of {PROMPT_LEN} tokens; per-device MiB")
    print(f"{'labels':>8} {'devices':>8} {'layout':>10} {'arguments':>10} {'temp':>10} {'outputs':>10} {'peak':>10}")
    for k in (int(x) for x in args.step_labels.split(",")):
        for n, split in ((1, False), (len(devices), False), (len(devices), True)):
            c = step_memory(n, split, args.step_batch, k, args.tower_width)
            layout = "split" if split else "replicated"
            print(f"{k:>8} {n:>8} {layout:>10} {c.argument_bytes / mib:>10.1f} {c.temp_bytes / mib:>10.1f} "
                  f"{c.output_bytes / mib:>10.1f} {c.peak_bytes / mib:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
