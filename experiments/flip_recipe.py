r"""FLIP on the demo-scale CLIP recipe: 50% patch dropout with a short unmasked tune vs no dropout.

    python experiments/flip_recipe.py                         # 2 seeds, 4 variants (~45 min on 2 cores)
    python experiments/flip_recipe.py --steps=150 --seeds=0   # a quick look

Each run is `python -m vljax.main --config=configs/clip.py:pd=P,tune=T,seed=S,...` (configs/clip.py: tiny
ViT + causal text from scratch on the demo's emoji + openclipart captions). The masked recipe is run
under three budgets, each a comparison FLIP (Li et al., CVPR 2023) makes:

* same steps: the undropped run's batch and steps (the cheapest run: fewer FLOPs per step);
* equal memory and epochs (FLIP Table 1a: at 50% masking the batch doubles for the same memory and
  the run sees the same number of samples in half the steps);
* equal wall-clock (FLIP Fig. 1 and 3: masking buys more samples in the same time): the steps times
  `--speedup`, the step-time ratio of 50% dropout at this tower size (`bench_train.py --sizes=tiny
  --frameworks=vljax,vljax_pd --patch_dropout=0.5`: 1.44x on this machine; 1.4 is used).

The unmasked tune is the last `--tune` steps of the undropped run's schedule scaled with the run (10%),
in the tail of the cosine decay: its learning rate falls from 2.4% of the peak to 0, the size of FLIP's
own tuning rate (its README: 4e-8 against 4e-6 for pre-training, 1% of the peak, 1% of the schedule).
Reported: held-out emoji retrieval image->text R@1 / R@5 (`retrieval/val_retrieval/...` at the last
step), emoji category zero-shot top-1, the training pairs/s (mean over logged intervals after the first)
and the run's wall time. Writes experiments/results/flip_recipe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vljax import metrics  # noqa: E402

KEYS = ("retrieval/val_retrieval/i2t_r1", "retrieval/val_retrieval/i2t_r5", "zeroshot/emoji/top1")


def run(arg: str, workdir: str) -> dict:
    cmd = [sys.executable, "-m", "vljax.main", f"--config=configs/clip.py:{arg}", f"--workdir={workdir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last = [r for r in rows if KEYS[0] in r][-1]
    speeds = [r["train/pairs_per_s"] for r in rows if "train/pairs_per_s" in r][1:]
    return {**{k: last[k] for k in KEYS}, "pairs_per_s": sum(speeds) / max(len(speeds), 1), "wall_s": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tune", type=int, default=30, help="unmasked steps at the end of the dropout runs")
    parser.add_argument("--pd", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64, help="the undropped run's batch (configs/clip.py's)")
    parser.add_argument("--speedup", type=float, default=1.4,
                        help="step-time ratio of the masked step, for the equal wall-clock budget")
    parser.add_argument("--budgets", default="same_steps,equal_memory,equal_time")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/flip_recipe.json"))
    args = parser.parse_args()
    def masked(steps, tune, batch):
        return f"steps={steps},batch={batch},pd={args.pd},tune={tune}"
    budgets = {
        "same_steps": ("same steps", masked(args.steps, args.tune, args.batch)),
        "equal_memory": ("equal memory and epochs: 2x batch, half the steps",
                         masked(args.steps // 2, args.tune // 2, 2 * args.batch)),
        "equal_time": (f"equal wall-clock: {args.speedup:g}x the steps",
                       masked(round(args.steps * args.speedup), round(args.tune * args.speedup), args.batch)),
    }
    variants = {"no dropout": f"steps={args.steps},batch={args.batch}"}
    for key in args.budgets.split(","):
        name, arg = budgets[key]
        variants[f"patch dropout {args.pd:g}, {name} ({arg})"] = arg
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arg in variants.items():
            for seed in args.seeds.split(","):
                results.setdefault(name, []).append(
                    run(f"{arg},seed={seed}", os.path.join(tmp, f"{len(results)}_{seed}")))
                print(name, seed, results[name][-1], flush=True)
    print(f"\nconfigs/clip.py, {args.steps} steps, seeds {args.seeds}")
    print("| variant | emoji val i2t R@1 (per seed; mean) | i2t R@5 mean | emoji zero-shot top-1 mean | pairs/s "
          "| run wall s |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in (*KEYS, "pairs_per_s", "wall_s")}
        r1 = ", ".join(f"{r[KEYS[0]]:.1%}" for r in rs)
        print(f"| {name} | {r1}; {mean[KEYS[0]]:.1%} | {mean[KEYS[1]]:.1%} | {mean[KEYS[2]]:.1%} "
              f"| {mean['pairs_per_s']:.0f} | {mean['wall_s']:.0f} |")
    pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
