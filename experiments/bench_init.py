r"""Host memory of building a training state on an 8-device FSDP mesh: sharded init vs host init.

    python experiments/bench_init.py                     # ViT-B/16 + text-B CLIP, 224 px (~2 min)
    python experiments/bench_init.py --config_arg=img=S/16,txt=S,size=224

Each variant runs in a fresh process with 8 simulated CPU devices (on CPU, device memory IS host
memory, so the figure counts the state itself once): the process's peak RSS is reset
(/proc/self/clear_refs) after imports and model construction, the state is built, and the peak RSS
growth is divided by the state's size (params + optimizer state).

* `vljax` — what `train.Trainer` does without a checkpoint (`train.init_state`): jitted inits with
  output shardings, params first, then the optimizer state: every parameter and moment is created
  in its shards (the minimum is 1.0x: the state must exist). Mesh, shardings and tokenizer are
  built before the peak is reset; the compilations of the inits are inside the measurement.
* `host` — the path vljax had before: `jax.jit(model.init)` on one device, numpy copies of params
  and optimizer state on the host, then `make_array_from_callback` onto the mesh.

Writes experiments/results/bench_init.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(variant: str, config_arg: str) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from configs import clip
    from vljax import factory, optim, sharding, train

    config = clip.get_config(config_arg)
    config.mesh = [("data", 1), ("fsdp", 8)]
    config.sharding_rules = [(".*", "fsdp")]
    spec = factory.spec_from_config(config)
    model = factory.build_model(spec)
    jax.devices()
    abstract = factory.abstract_params(model, spec)
    tx, _, _ = optim.make_optimizer(config, abstract)
    state_abs = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, abstract)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_abs))
    n_params = sum(x.size for x in jax.tree.leaves(abstract))
    mesh = sharding.make_mesh(config.mesh)
    init_rng, train_rng = jax.random.split(jax.random.key(0))
    full_abs = dict(state_abs, step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(lambda r: r, train_rng))
    shardings = sharding.state_shardings(full_abs, mesh, config.sharding_rules)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if variant == "vljax":  # what train.Trainer does when there is no checkpoint to resume
        init_params, init_opt = train.make_init_fns(model, tx, config)
        state = train.init_state(init_params, init_opt, shardings, config.model_init, init_rng, train_rng)
        jax.block_until_ready(state)
    else:
        params = jax.jit(lambda r: model.init(r, *train._dummy_inputs(config))["params"])(init_rng)
        params = jax.tree.map(np.asarray, params)
        host = {"params": params, "opt_state": tx.init(params), "step": np.zeros((), np.int32)}
        del shardings["rng"]
        state = jax.tree.map(lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]), host, shardings)
        del params, host
        jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    per_device = max(sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
                         if s.device == d) for d in jax.devices())
    return {"variant": variant, "params": n_params, "state_mb": state_bytes / 2**20,
            "rss_before_mb": before, "peak_growth_mb": peak - before,
            "ratio": (peak - before) / (state_bytes / 2**20), "largest_device_mb": per_device / 2**20,
            "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_arg", default="img=B/16,txt=B,size=224")
    parser.add_argument("--variants", default="vljax,host")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/bench_init.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.config_arg)))
        return
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    rows = []
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--config_arg", args.config_arg],
                              env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][7:]))
    print(f"CLIP `configs/clip.py:{args.config_arg}` on [('data', 1), ('fsdp', 8)], rules [('.*', 'fsdp')]: "
          f"{rows[0]['params'] / 1e6:.1f}M params, state {rows[0]['state_mb']:.0f} MB (params + AdamW moments)")
    print("| init | peak host RSS growth MB | / state size | largest device MB | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_growth_mb']:.0f} | {r['ratio']:.2f}x | {r['largest_device_mb']:.0f} "
              f"| {r['seconds']:.1f} |")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"config_arg": args.config_arg, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
