r"""The LiT demo's two exact speed-ups, each side by side with what it replaces: the text tower's locked
lowest blocks run once per distinct text (`config.text_cache`, vljax/text_memo.py) instead of in every
step and evaluation, and the feature store's trunk batch run as one slice per core inside one jit
(`features.trunk_parts`) instead of whole.

    python experiments/bench_text_cache.py                          # configs/lit.py, ~8 min
    python experiments/bench_text_cache.py --workdir=/tmp/vljax_lit # reuse a demo run's feature stores

The trainer of `configs/lit.py` (MiniLM with its embeddings and blocks 0-3 locked, the
EfficientNet-Lite0 trunk locked with its features stored, batch 128) builds everything: its input
pipeline gives the batches, its state the parameters. Training: two steps are compiled, the
demo's before this change (`text_blocks=0`: every block on the captions) and with the captions'
states from a warm `TextMemo` (the state of every step after the first epoch), each on its own
copy of the state, run alternately on the same batches; a step with the memo is timed with its
host lookup. Evaluation: the demo's seven evaluators run alternately by an Embedder without and
with the (warm) memo. Store: the locked EfficientNet-Lite0 trunk on batches of 64 preprocessed demo
images, whole and sliced, alternately. The table gives medians and the largest difference of the
results (0 means bitwise equal).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import lit  # noqa: E402
from vljax import eval_builder, factory, features, objective, sharding, stages, train  # noqa: E402
from vljax.data import pipeline  # noqa: E402
from vljax.embedder import Embedder  # noqa: E402


def _steps(trainer, batches, args):
    loss = objective.make_loss(trainer.config, trainer.mesh)
    memo, k = trainer.text_memo(), trainer.text_blocks
    for b in batches:  # warm: every caption of these batches seen once
        memo(b["text"])
    runs = {}
    for name, blocks in (("every block, every step", 0), (f"blocks 0-{k - 1} once per caption", k)):
        fn = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss, trainer.trainable_mask,
                                           text_blocks=blocks),
                     in_shardings=(trainer.state_sh, sharding.batch_sharding(trainer.mesh)),
                     out_shardings=(trainer.state_sh, None), donate_argnums=(0,))
        runs[name] = dict(fn=fn, memo=blocks > 0, times=[], losses=[],
                          state=jax.tree.map(lambda x: x.copy(), trainer.state))
    with jax.set_mesh(trainer.mesh):
        for i in range(args.steps + 1):
            for r in runs.values():
                t0 = time.perf_counter()
                b = dict(batches[i % len(batches)])
                if r["memo"]:
                    b["text_states"] = memo(b["text"])
                r["state"], m = r["fn"](r["state"], sharding.shard_batch(b, trainer.mesh))
                r["losses"].append(float(m["train/loss"]))  # blocks
                r["times"].append(time.perf_counter() - t0)
    return runs


def _evals(trainer, args):
    bundle = factory.Bundle(trainer.model, trainer.state["params"], trainer.tokenizer, trainer.spec)
    store = pathlib.Path(trainer.workdir) / "features"
    evaluators = trainer.evaluators()
    runs = {}
    for name, memo in (("every block", None), ("blocks 0-3 once per text", trainer.text_memo())):
        runs[name] = dict(emb=Embedder.from_bundle(bundle, mesh=trainer.mesh, feature_store=store,
                                                   text_memo=memo, progress=False),
                          times=[], results=None)
    for i in range(args.eval_rounds + 1):  # round 0 fills the stores, the memo and the compile caches
        for r in runs.values():
            emb = r["emb"].with_params(trainer.state["params"])
            t0 = time.perf_counter()
            r["results"] = eval_builder.run_all(evaluators, emb)
            r["times"].append(time.perf_counter() - t0)
    return runs


def _store(trainer, args):
    """The trunk on the same 64-image batches, whole and in `trunk_parts` slices, alternately."""
    parts = features.trunk_parts(trainer.mesh)
    source = trainer.config.input.data[0]
    images = next(iter(pipeline.make_eval_batches(dict(source), batch_size=64, image_size=112,
                                                  value_range="efficientnet")))["image"]
    x = jnp.asarray(images)
    runs = {}
    for name, k in (("whole batch", 1), (f"{parts} slices in one jit", parts)):
        fn = jax.jit(features._trunk(trainer.model, False, k))
        runs[name] = dict(fn=fn, times=[], out=np.asarray(fn(trainer.state["params"], x)))
    for _ in range(args.store_batches):
        for r in runs.values():
            t0 = time.perf_counter()
            jax.block_until_ready(r["fn"](trainer.state["params"], x))
            r["times"].append(time.perf_counter() - t0)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--eval_rounds", type=int, default=2, help="timed evaluations of each kind")
    parser.add_argument("--store_batches", type=int, default=10, help="timed trunk batches of each kind")
    parser.add_argument("--workdir", default=None, help="reuse a workdir (its feature stores)")
    parser.add_argument("--out", default="experiments/results/bench_text_cache.json")
    args = parser.parse_args()
    config = lit.get_config()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_text_cache_")
    trainer = train.Trainer(config, workdir, write_config=args.workdir is None)
    it = trainer.make_input(stages.at(stages.parse(config), 0))
    batches = [{n: v for n, v in next(it).items() if not n.startswith("skipped/")} for _ in range(8)]
    load = [os.getloadavg()[0]]
    steps = _steps(trainer, batches, args)
    load.append(os.getloadavg()[0])
    evals = _evals(trainer, args)
    load.append(os.getloadavg()[0])
    store = _store(trainer, args)
    load.append(os.getloadavg()[0])

    print(f"\nconfigs/lit.py · batch {config.input.batch_size} · {trainer.text_blocks} locked text blocks · "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) · load "
          + " -> ".join(f"{x:.1f}" for x in load) + "\n")
    print("| part | how | median s | speed-up |")
    print("|---|---|---|---|")
    out = dict(batch=config.input.batch_size, locked_blocks=trainer.text_blocks, load=load, steps={}, evals={})
    base = None
    for name, r in steps.items():
        t = float(np.median(r["times"][1:]))
        base = base or t
        print(f"| train step (+ memo lookup) | {name} | {t:.3f} | {base / t:.2f}x |")
        out["steps"][name] = dict(median_s=t, times_s=[round(x, 4) for x in r["times"]], losses=r["losses"])
    base = None
    for name, r in evals.items():
        t = float(np.median(r["times"][1:]))
        base = base or t
        print(f"| evaluation, 7 evaluators (warm) | {name} | {t:.1f} | {base / t:.2f}x |")
        out["evals"][name] = dict(median_s=t, times_s=[round(x, 2) for x in r["times"]])
    base = None
    for name, r in store.items():
        t = float(np.median(r["times"]))
        base = base or t
        print(f"| LiT store trunk, 64 images | {name} | {t:.3f} | {base / t:.2f}x |")
        out.setdefault("store", {})[name] = dict(median_s=t, times_s=[round(x, 4) for x in r["times"]])
    sa, sb = (r["out"] for r in store.values())
    out["store_max_diff"] = float(np.abs(sa - sb).max())
    a, b = (r["losses"] for r in steps.values())
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    ra, rb = (r["results"] for r in evals.values())
    metric_diff = max(abs(ra[k] - rb[k]) for k in ra if not k.startswith("time/"))
    print(f"\nlargest loss difference, step by step: {loss_diff:.2e}; largest metric difference: {metric_diff:.2e}; "
          f"largest stored-feature difference: {out['store_max_diff']:.2e}")
    out.update(max_loss_diff=loss_diff, max_metric_diff=metric_diff)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
