r"""Prompting table (issue 9): zero-shot top-1 of every prompt method on one model.

    python experiments/prompting.py --model=/tmp/vljax_loss_ablation/softmax_0   # the demo recipe's model

Runs `python -m vljax.evaluate --model=MODEL --config=configs/prompting.py` (see that config for the
methods and datasets), writes experiments/results/prompting.json and prints the markdown table:
rows = methods, columns = datasets, top-1 % ("-" where a method has no input for the dataset, e.g. no
description file). Every method embeds the same images (one forward pass per dataset).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "experiments", "results", "prompting.json")
ROWS = [("name", "class name only"), ("photo", "one template (\"a photo of a {}.\")"),
        ("clip80", "80 CLIP templates"), ("best", "best-7 CLIP templates"), ("icon", "demo's 5 icon templates"),
        ("cupl", "CuPL descriptions"), ("cupl_clip80", "CuPL + 80 templates"), ("zpe", "ZPE weights (80)"),
        ("zpe_select", "ZPE + MAD selection (80)")]


def main():
    from configs.prompting import DATASETS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "metrics.json")
        subprocess.check_call([sys.executable, "-m", "vljax.evaluate", f"--model={args.model}",
                               "--config=configs/prompting.py", f"--out={raw}"], cwd=REPO)
        with open(raw) as f:
            metrics = json.load(f)
    metrics = metrics.get("metrics", metrics)
    table = {m: {ds: metrics.get(f"zeroshot/{ds}/{m}/top1") for ds in DATASETS} for m, _ in ROWS}
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "top1": table, "metrics": metrics}, f, indent=1)
    lines = ["| prompts | " + " | ".join(DATASETS) + " |", "|---|" + "---:|" * len(DATASETS)]
    for m, label in ROWS:
        cells = ["-" if table[m][ds] is None else f"{100 * table[m][ds]:.1f}" for ds in DATASETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
