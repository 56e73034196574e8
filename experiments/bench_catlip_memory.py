"""Per-device memory of CatLIP's head step at a large vocabulary, 1 device vs 8 devices, from XLA's
`memory_analysis()` of the compiled program (nothing is run: shapes only).

    python experiments/bench_catlip_memory.py                         # V = 100k, D = 512, batch 1024
    python experiments/bench_catlip_memory.py --vocab 24320,100000 --batch 4096 --width 768

The program is the head's part of the trainer's step (vljax/step.py with config.catlip): logits =
zimg @ kernel + bias ([D, V], [V]: vljax/catlip.py), the loss `catlip` (BCE) under
`objective.make_loss`'s shard_map over the batch axes, gradients w.r.t. the head and zimg, and an
AdamW update of the head (its two moments), the head and its optimizer state donated as the trainer
donates the state. Layouts: one device; 8 devices with the head replicated (mesh data=8, rule
`("catlip/.*", "replicate")`); 8 devices with the head's V axis split over fsdp (`("catlip/.*",
"fsdp")`) on meshes data=2 x fsdp=4 and fsdp=8. The batch is split over data x fsdp in every
layout. Prints per-device MiB: arguments (head, moments, zimg, targets), temp, outputs, and total.
"""
import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

from vljax import catlip, objective, sharding  # noqa: E402

LAYOUTS = (("1 device", [("data", 1)], "replicate"),
           ("data=8", [("data", 8)], "replicate"),
           ("data=2 x fsdp=4", [("data", 2), ("fsdp", 4)], "fsdp"),
           ("fsdp=8", [("fsdp", 8)], "fsdp"))


def memory(mesh_config, rule: str, batch: int, vocab: int, width: int) -> dict:
    """Per-device bytes of the compiled head step (module docstring) on `mesh_config`."""
    n = 1 if mesh_config == [("data", 1)] else 8
    mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:n])
    loss = objective.make_loss(ml_collections.ConfigDict(dict(loss=dict(name="catlip", kind="bce"))), mesh)
    tx = optax.adamw(1e-3)
    params = {"catlip": jax.eval_shape(lambda r: catlip.init_head(width, vocab, r), jax.random.key(0))}
    opt = jax.eval_shape(tx.init, params)
    rules = [("catlip/.*", rule)]
    psh = sharding.param_shardings(params, mesh, rules)
    osh = sharding.opt_state_shardings(opt, params, psh, mesh, rules)
    bsh = sharding.batch_sharding(mesh)

    def step(params, opt, zimg, y):
        def f(p, z):
            return loss({catlip.INPUT: catlip.logits(p["catlip"], z), catlip.LOSS_INPUT: y})
        value, (g, _) = jax.value_and_grad(f, argnums=(0, 1))(params, zimg)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, value

    args = (params, opt, jax.ShapeDtypeStruct((batch, width), jnp.float32),
            jax.ShapeDtypeStruct((batch, vocab), jnp.bool_))
    fn = jax.jit(step, in_shardings=(psh, osh, bsh, bsh), out_shardings=(psh, osh, None), donate_argnums=(0, 1))
    ma = fn.lower(*args).compile().memory_analysis()
    out = dict(arguments=ma.argument_size_in_bytes, temp=ma.temp_size_in_bytes, outputs=ma.output_size_in_bytes,
               aliased=ma.alias_size_in_bytes)
    out["total"] = out["arguments"] + out["temp"] + out["outputs"] - out["aliased"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", default="100000")
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--width", type=int, default=512, help="image embedding width D")
    args = parser.parse_args()
    print(f"global batch {args.batch}, width {args.width}; per-device MiB (total = arguments + temp + "
          f"outputs - donated outputs aliased to arguments)")
    cols = ("arguments", "temp", "outputs", "aliased", "total")
    print(f"{'vocab':>8} {'layout':>16} {'head':>10} " + " ".join(f"{c:>10}" for c in cols))
    for v in (int(x) for x in args.vocab.split(",")):
        for name, mesh_config, rule in LAYOUTS:
            m = memory(mesh_config, rule, args.batch, v, args.width)
            print(f"{v:>8} {name:>16} {rule:>10} " + " ".join(f"{m[c] / 2**20:>10.1f}" for c in cols))


if __name__ == "__main__":
    main()
