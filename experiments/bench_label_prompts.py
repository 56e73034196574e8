r"""Multi-label training step: the label prompts through the whole text tower in every step vs
their locked lower blocks run once (`vljax.train.locked_text_blocks`, `TwoTowers.text_lower`).

    python experiments/bench_label_prompts.py                     # configs/lit_multilabel.py, ~5 min
    python experiments/bench_label_prompts.py --config_arg=captions=1   # tags' loss + captions' softmax

The trainer of `configs/lit_multilabel.py` (MiniLM with its embeddings and blocks 0-3 locked, the
EfficientNet-Lite0 trunk locked with its features stored, batch 128, one prompt per tag of the
emoji + openclipart label space) builds everything: its input pipeline gives the batches, its
state the parameters. Two steps are compiled, `make_train_step(..., label_blocks=k)` and
`label_blocks=0` (the step before this change), each on its own copy of the state, and run
alternately on the same batches; the table gives the median step, the XLA cost analysis's FLOPs
of each compiled step, and the largest loss difference between the two runs step by step.
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
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import lit_multilabel  # noqa: E402
from vljax import objective, sharding, stages, train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config_arg", default=None, help="configs/lit_multilabel.py's argument")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--workdir", default=None, help="reuse a workdir (its feature store)")
    parser.add_argument("--out", default="experiments/results/bench_label_prompts.json")
    args = parser.parse_args()
    config = lit_multilabel.get_config(args.config_arg)
    config.evals = {}
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_label_prompts_")
    trainer = train.Trainer(config, workdir)
    k = trainer.label_blocks
    if not k:
        raise SystemExit(f"{config.loss}: no locked text blocks under the label prompts")
    stage = stages.at(stages.parse(config), 0)
    it = trainer.make_input(stage)
    batches = [sharding.shard_batch({n: v for n, v in next(it).items() if not n.startswith("skipped/")},
                                    trainer.mesh) for _ in range(4)]
    loss = objective.make_loss(config, trainer.mesh)
    states = trainer.label_states()
    runs = {}
    for name, blocks in (("every block, every step", 0), (f"blocks 0-{k - 1} once", k)):
        fn = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss, trainer.trainable_mask,
                                           trainer.label_text, blocks),
                     in_shardings=(trainer.state_sh, sharding.batch_sharding(trainer.mesh))
                     + ((states.sharding,) if blocks else ()),
                     out_shardings=(trainer.state_sh, None), donate_argnums=(0,))
        extra = (states,) if blocks else ()
        with jax.set_mesh(trainer.mesh):
            compiled = fn.lower(trainer.state, batches[0], *extra).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        state = jax.tree.map(lambda x: x.copy(), trainer.state)
        runs[name] = dict(fn=fn, extra=extra, state=state, times=[], losses=[],
                          flops=float(cost.get("flops", float("nan"))))
    load = [os.getloadavg()[0]]
    with jax.set_mesh(trainer.mesh):
        for i in range(args.steps + 1):
            for r in runs.values():
                t0 = time.perf_counter()
                r["state"], m = r["fn"](r["state"], batches[i % len(batches)], *r["extra"])
                r["losses"].append(float(m["train/loss"]))  # blocks
                r["times"].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    base = next(iter(runs.values()))
    diff = max(abs(a - b) for r in runs.values() for a, b in zip(r["losses"], base["losses"]))
    print(f"\n{config.loss.to_dict()} · {len(trainer.label_text)} label prompts of "
          f"{trainer.label_text.shape[1]} tokens · batch {config.input.batch_size} · "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) · load {load[0]:.1f} -> {load[1]:.1f}\n")
    print("| label prompts | median step s | steps/s | vs every block | XLA GFLOP per step |")
    print("|---|---|---|---|---|")
    out = dict(config_arg=args.config_arg, label_prompts=list(trainer.label_text.shape),
               locked_blocks=k, batch=config.input.batch_size, load=load, max_loss_diff=diff, runs={})
    t_base = float(np.median(base["times"][1:]))
    for name, r in runs.items():
        t = float(np.median(r["times"][1:]))
        print(f"| {name} | {t:.3f} | {1 / t:.2f} | {t_base / t:.2f}x | {r['flops'] / 1e9:.1f} |")
        out["runs"][name] = dict(median_s=t, step_times_s=[round(x, 4) for x in r["times"]],
                                 flops=r["flops"], losses=r["losses"])
    print(f"\nlargest loss difference between the two runs, step by step: {diff:.2e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
