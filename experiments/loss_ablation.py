r"""Loss ablation on the LiT demo recipe (issue 9): every loss, 300 steps, same data, seeds 0 and 1.

    python experiments/loss_ablation.py                      # all losses x 2 seeds, ~5 min a run on 2 cores
    python experiments/loss_ablation.py --losses=softmax,dcl --seeds=0,1,2 --root=/tmp/abl

Each run is `python -m vljax.main --config=configs/lit_ablation.py:loss=L,seed=S` (the demo recipe with
that loss; see the config for what each loss sets) in `<root>/<loss>_<seed>`. The runs share one
LiT feature store (`<root>/features`, linked into every workdir): the locked trunk and the data are
the same, so its fingerprint is too. A finished run (its step-300 evaluation in metrics.jsonl) is not
run again. Reported per loss, mean and spread (max - min over seeds) of:
Fashion-MNIST zero-shot top-1, held-out emoji and openclipart retrieval R@1 / R@5 (image->text),
emoji val R@1 (the selection metric), GZSL H on the configs/lit_eval.py seen/unseen split,
modality gap on held-out emoji, training pairs/s (mean over the logged steps after the first) and the
step's peak memory per device (XLA's memory analysis; runs older than issue 24 did not log it: "-").
Writes experiments/results/loss_ablation.json (or --out) after every finished loss and prints the
markdown table; a loss x seed already recorded there at the same steps is read back, not rerun.
The second wave's objectives (issue 25) have their own table, with a softmax baseline run beside them:

    python experiments/loss_ablation.py --out=experiments/results/loss_ablation_objectives.json \
        --losses=softmax,hard_negatives,false_negatives,label_smoothing,ascl,dreamlip,sigmoid,hard_negatives_sigmoid,distill,dcd,structure

The distillation rows (distill, dcd) take a teacher: --teacher=DIR (any checkpoint vljax.factory.load
reads), by default the demo (`configs/lit.py`, 500 steps, seed 0) trained first in `<root>/teacher`.
"""
import argparse
import os
import sys

import ablation_table

REPO = ablation_table.REPO
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "experiments", "results", "loss_ablation.json")

COLUMNS = [  # (header, metric key, scale)
    ("FMNIST top-1", "zeroshot/fashion_mnist/top1", 100),
    ("emoji R@1", "retrieval/emoji_retrieval/i2t_r1", 100),
    ("emoji R@5", "retrieval/emoji_retrieval/i2t_r5", 100),
    ("openclipart R@1", "retrieval/openclipart_retrieval/i2t_r1", 100),
    ("openclipart R@5", "retrieval/openclipart_retrieval/i2t_r5", 100),
    ("val R@1 (select)", "retrieval/val_retrieval/i2t_r1", 100),
    ("GZSL H", "gzsl/fashion_mnist_gzsl/harmonic", 100),
    ("modality gap", "representation/emoji_representation/modality_gap", 1),
    ("pairs/s", "train/pairs_per_s", 1),
    ("peak GB/device", "perf/memory_gb", 1),
]


def _digits(key, scale):
    return 3 if scale == 1 and ("gap" in key or "memory" in key) else (0 if "pairs" in key else 1)


def teacher(root: str, given: str) -> str:
    """The distillation rows' teacher: `given`, or the demo (configs/lit.py, 500 steps) trained in
    `<root>/teacher` (read back when it finished before)."""
    if given:
        return given
    workdir = ablation_table.workdir_with_shared_store(root, "teacher")
    ablation_table.run_main("teacher (configs/lit.py)", "configs/lit.py", workdir, 500, "zeroshot/fashion_mnist/top1")
    return workdir


def run(loss: str, seed: int, root: str, steps: int, teacher_dir: str = "") -> dict:
    """One row's run in `<root>/<loss>_<seed>`, its LiT feature store linked to the shared one."""
    workdir = ablation_table.workdir_with_shared_store(root, f"{loss}_{seed}")
    arg = f"loss={loss},seed={seed},steps={steps}" + (f",teacher={teacher_dir}" if teacher_dir else "")
    out = ablation_table.run_main(f"{loss} seed {seed}", f"configs/lit_ablation.py:{arg}",
                                  workdir, steps, "zeroshot/fashion_mnist/top1")
    print(f"[ablation] {loss} seed {seed}: FMNIST {100 * out['zeroshot/fashion_mnist/top1']:.1f}%, val R@1 "
          f"{100 * out['retrieval/val_retrieval/i2t_r1']:.1f}%", flush=True)
    return out


def main():
    from configs.lit_ablation import LOSSES, TEACHER_ROWS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--teacher", default="", help="the distill / dcd rows' teacher checkpoint (default: the "
                   "demo, configs/lit.py, trained in <root>/teacher)")
    ablation_table.add_arguments(p, seeds="0,1", steps=300, root="/tmp/vljax_loss_ablation", out=OUT)
    args = p.parse_args()
    losses = ablation_table.chosen(args.losses, LOSSES, "--losses")
    seeds, recorded = ablation_table.seeds_and_recorded(args)
    meta = {"steps": args.steps, "seeds": seeds, "recipe": "configs/lit_ablation.py (configs/lit.py + loss)"}
    results = {}
    for loss in losses:
        if any((loss, s) not in recorded for s in seeds) and loss in TEACHER_ROWS:
            args.teacher = teacher(args.root, args.teacher)
        given = args.teacher if loss in TEACHER_ROWS else ""
        results[loss] = [recorded.get((loss, s)) or run(loss, s, args.root, args.steps, given) for s in seeds]
        table = ablation_table.save(args.out, meta, results, COLUMNS)
    print(ablation_table.markdown(table, COLUMNS, seeds, "loss", _digits))


if __name__ == "__main__":
    main()
