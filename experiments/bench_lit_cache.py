r"""LiT training step: the locked image tower recomputed every step vs its features cached.

    python experiments/bench_lit_cache.py                  # the demo's configuration (configs/lit.py)
    python experiments/bench_lit_cache.py --steps=5 --batch=32   # a quick look
    python experiments/bench_lit_cache.py --image_tower=vit_b16 --batch=32 --steps=3 \
        --out=experiments/results/bench_lit_cache_b16.json      # a locked ViT-B/16 at 224 px

Both steps are the trainer's own (`vljax.train.make_train_step` on `build_model`, `make_loss` and
`optim.make_optimizer` of `configs/lit.py`, jit with donation as `Trainer.fit` does): EfficientNet-Lite0
locked with a trainable head + MiniLM text tower, batch and image size from the config. "recomputed"
feeds real images (emoji + openclipart at the config's size) through the locked trunk each step;
"cached" feeds the trunk's stored features of the same images as a batch input (`image_features`, what
the pipeline reads from the `lit_cache` store, vljax/features.py), the step applying only the head.
The two alternate step by step, with the trunk's forward pass alone timed in between, so all three
see the same machine load. Weights are random (speed does
not depend on them); `--pretrained` loads the config's `model_init` towers instead.
`--image_tower=vit_b16` swaps the image tower for a locked ViT-B/16 (GAP pooling, linear head into
the same 384-d space) at 224 px, as LiT's own towers are; the text side stays the demo's.
Also reported: the one-off cost of writing the features (trunk forward per image), i.e. how many
steps the store needs to pay for itself.
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
from vljax import objective, optim, pretrained, sharding, train  # noqa: E402
from vljax.data import pipeline  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps of each kind (after one compile step).")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the config's batch size (0 = the config's).")
_PRETRAINED = flags.DEFINE_bool("pretrained", False, "Load the config's pretrained towers.")
_TOWER = flags.DEFINE_enum("image_tower", "efficientnet", ["efficientnet", "vit_b16"],
                           "The locked image tower: the demo's EfficientNet-Lite0, or ViT-B/16 at 224 px.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_lit_cache.json", "JSON output path.")

N_BATCHES = 4  # distinct real batches, cycled


def real_batches(config, tokenizer, n):
    b, s = config.input.batch_size, config.input.image_size
    images, captions = [], []
    for name in ("vljax_emoji", "vljax_openclipart"):
        x, caps = pipeline.first_examples(dict(name=name, split="train"), (n * b) // 2 + b,
                                          image_size=s, value_range=config.input.value_range)
        images.append(x)
        captions += caps
    images = np.concatenate(images)[: n * b]
    texts = tokenizer(captions[: n * b])
    return images, texts


def stats(times):
    t = np.asarray(times[1:])
    return dict(first_step_s=times[0], median_s=float(np.median(t)), p90_s=float(np.percentile(t, 90)),
                worst_s=float(t.max()), step_times_s=[round(x, 4) for x in times])


def main(argv):
    del argv
    config = lit_config.get_config()
    if _BATCH.value:
        config.input.batch_size = _BATCH.value
    if _TOWER.value == "vit_b16":
        config.model.image_model = "vit"
        config.model.image = dict(variant="B/16", pool_type="gap", num_classes=config.model.text.num_classes)
        config.input.image_size = 224
        config.input.value_range = "clip"
        config.model_init = {k: v for k, v in config.model_init.items() if k != "img"}
    if not _PRETRAINED.value:
        config.model_init = {}
    b = config.input.batch_size
    load_start = os.getloadavg()

    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    model = train.build_model(config)
    tokenizer = train.build_tokenizer(config)
    params = jax.jit(lambda r: model.init(r, *train._dummy_inputs(config))["params"])(jax.random.key(0))
    for tower, spec in (config.get("model_init") or {}).items():
        if spec:
            params = pretrained.write_tower(params, pretrained.load_tower(spec), tower)
    tx, _, mask = optim.make_optimizer(config, params)
    loss = objective.make_loss(config, mesh)
    images, texts = real_batches(config, tokenizer, N_BATCHES)

    # The stored features: the trunk's features of every image, as features.write_features computes them.
    feats_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_trunk))
    feats_fn(params, images[:b]).block_until_ready()
    t0 = time.perf_counter()
    table = np.concatenate([np.asarray(feats_fn(params, images[i:i + b])) for i in range(0, len(images), b)])
    cache_s_per_image = (time.perf_counter() - t0) / len(images)

    def make():
        own = jax.tree.map(lambda x: x.copy(), params)  # each run donates its own buffers
        state = {"params": own, "opt_state": tx.init(own), "step": np.zeros((), np.int32),
                 "rng": jax.random.key(1)}
        sh = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh, [(".*", "replicate")])
        step = train.make_train_step(model, tx, loss, mask)
        step = jax.jit(step, in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None),
                       donate_argnums=(0,))
        return step, jax.device_put(state, sh)

    runs = {"recomputed": make(), "cached": make()}
    times = {k: [] for k in list(runs) + ["trunk forward only"]}
    losses = {k: [] for k in runs}
    with jax.set_mesh(mesh):
        for i in range(_STEPS.value + 1):
            j = i % N_BATCHES
            sl = slice(j * b, (j + 1) * b)
            for name, (step, state) in runs.items():
                batch = {"text": texts[sl]}
                if name == "cached":
                    batch["image_features"] = table[sl]
                else:
                    batch["image"] = images[sl]
                t0 = time.perf_counter()
                state, m = step(state, sharding.shard_batch(batch, mesh))
                losses[name].append(float(m["train/loss"]))  # blocks
                times[name].append(time.perf_counter() - t0)
                runs[name] = (step, state)
            t0 = time.perf_counter()  # the locked trunk's forward alone, under the same load
            feats_fn(params, images[sl]).block_until_ready()
            times["trunk forward only"].append(time.perf_counter() - t0)

    res = {k: stats(v) for k, v in times.items()}
    for k in res:
        res[k]["pairs_per_s"] = b / res[k]["median_s"]
        if k in losses:
            res[k]["loss_first_last"] = (losses[k][0], losses[k][-1])
    speedup = res["recomputed"]["median_s"] / res["cached"]["median_s"]
    # Amdahl: the cache removes the trunk's forward pass (cache_s_per_image * b) and nothing else.
    trunk_fwd_s = res["trunk forward only"]["median_s"]
    saved = res["recomputed"]["median_s"] - res["cached"]["median_s"]
    out = dict(config="configs/lit.py", image_tower=_TOWER.value, batch=b, image_size=config.input.image_size, steps=_STEPS.value,
               pretrained=_PRETRAINED.value, runs=res, speedup=speedup,
               cache_build_s_per_image=cache_s_per_image, cache_features=int(table.shape[1]),
               trunk_forward_s_per_batch=trunk_fwd_s,
               trunk_share_of_recomputed_step=trunk_fwd_s / res["recomputed"]["median_s"],
               amdahl_speedup=(res["cached"]["median_s"] + trunk_fwd_s) / res["cached"]["median_s"],
               breakeven_steps_per_epoch=cache_s_per_image * b / saved if saved > 0 else None,
               max_abs_loss_diff=float(np.max(np.abs(np.subtract(losses["recomputed"], losses["cached"])))),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               loadavg_start=load_start, loadavg_end=os.getloadavg(), cpus=os.cpu_count())

    tower = {"efficientnet": "EfficientNet-Lite0", "vit_b16": "ViT-B/16"}[_TOWER.value]
    print(f"LiT step, configs/lit.py ({tower} locked + MiniLM), batch {b}, {config.input.image_size} px, "
          f"{_STEPS.value} steps each, interleaved")
    print("| locked tower | median s | p90 s | worst s | first s | pairs/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for k, r in res.items():
        sp = res["recomputed"]["median_s"] / r["median_s"]
        if k not in runs:
            print(f"| ({k}) | {r['median_s']:.3f} | {r['p90_s']:.3f} | {r['worst_s']:.3f} | - | - | - |")
            continue
        print(f"| {k} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {r['worst_s']:.3f} | {r['first_step_s']:.2f} | "
              f"{r['pairs_per_s']:.0f} | {sp:.1f}x |")
    print(f"locked trunk forward {trunk_fwd_s:.2f} s per batch = {out['trunk_share_of_recomputed_step']:.0%} of the "
          f"recomputed step: the most caching can give is {out['amdahl_speedup']:.2f}x (Amdahl)")
    print(f"cache build: {cache_s_per_image * 1e3:.1f} ms/image once; losses of the two steps differ by at most "
          f"{out['max_abs_loss_diff']:.2e}; load average {load_start} -> {out['loadavg_end']}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
