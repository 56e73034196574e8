r"""SigLIP 2's recipe, part by part, on the demo-scale configs/siglip2.py (issue 24): seeds 0 and 1.

    python experiments/siglip2_ablation.py                          # every row x 2 seeds
    python experiments/siglip2_ablation.py --rows=siglip,decoder --seeds=0 --steps=300

Rows (`configs/siglip2.py:<args>,seed=S,steps=N,tok=<the BPE>`):
  siglip          decoder=off,sd=off       the sigmoid loss alone (configs/siglip.py)
  decoder         decoder=on,sd=off        + the LocCa / CapPa caption decoder
  self_distill    decoder=off,sd=consistency  + SILC's local-to-global consistency (EMA teacher)
  masked          decoder=off,sd=masked    + TIPS' masked prediction (EMA teacher)
  full            decoder=on,sd=on         the recipe: decoder + both self-supervised terms
  naflex          decoder=on,sd=off,naflex=on  the decoder row at native aspect ratio for its
                                           last 10% (NaFlex; it needs sd=off), against `decoder`
The self-supervised terms switch on for the last 20% of the steps, NaFlex for the last 10%, as
configs/siglip2.py sets them from the paper.

Every row uses one tokenizer: a 4,096-token byte-level BPE learned from the demo's training
captions (`python -m vljax.data.train_tokenizer`, written once to <root>/bpe4096.json). It stands in
for SigLIP 2's Gemma vocabulary at demo scale, as the tiny towers stand in for B/16: with CLIP's
49,408 tokens the decoder's output projection made a decoder row ~30 minutes on 2 cores
(configs/siglip2.py). Caption NLL is per token of this tokenizer (log 4096 = 8.3 nats is chance).

Columns, each the mean ± spread (max - min) over seeds: emoji category zero-shot top-1, emoji val
image->text R@1 / R@10 (the demo's selection metric), dense-probe mIoU (foreground vs background
from the icons' alpha, a linear probe on the image tower's patch tokens), caption NLL per token and
the decoder's scoring classifier (CapPa) top-1 on emoji categories (rows with the decoder), training pairs/s and the step's peak memory per device (XLA's memory
analysis) and TFLOPs, each the largest the run logged (the self-distillation stage's step, the
largest NaFlex budget among the logged steps). Writes experiments/results/siglip2_ablation.json and prints the table.
"""
import argparse
import os
import subprocess
import sys

import ablation_table

REPO = ablation_table.REPO
OUT = os.path.join(REPO, "experiments", "results", "siglip2_ablation.json")
ROWS = {
    "siglip": "decoder=off,sd=off",
    "decoder": "decoder=on,sd=off",
    "self_distill": "decoder=off,sd=consistency",
    "masked": "decoder=off,sd=masked",
    "full": "decoder=on,sd=on",
    "naflex": "decoder=on,sd=off,naflex=on",
}
COLUMNS = [  # (header, metric key, scale)
    ("emoji zero-shot top-1", "zeroshot/emoji/top1", 100),
    ("val R@1", "retrieval/val_retrieval/i2t_r1", 100),
    ("val R@10", "retrieval/val_retrieval/i2t_r10", 100),
    ("dense mIoU", "dense_probe/dense/miou", 100),
    ("caption NLL", "caption_nll/caption_nll/nll", 1),
    ("CapPa top-1", "cappa_zeroshot/cappa/top1", 100),
    ("pairs/s", "train/pairs_per_s", 1),
    ("peak GB/device", "perf/memory_gb", 1),
    ("TFLOPs/step", "perf/step_tflops", 1),
]
VOCAB = 4096


def _digits(key, scale):
    if "pairs" in key:
        return 0
    return 3 if key.startswith("perf/") else (2 if "nll" in key else 1)


def tokenizer(root: str) -> str:
    """The rows' BPE: learned once from configs/siglip2.py's training captions."""
    path = os.path.join(root, f"bpe{VOCAB}.json")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "vljax.data.train_tokenizer", "--config=configs/siglip2.py",
                        f"--vocab_size={VOCAB}", f"--out={path}"], cwd=REPO, check=True)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    ablation_table.add_arguments(p, seeds="0,1", steps=300, root="/tmp/vljax_siglip2_ablation", out=OUT,
                                 settings="steps and vocabulary")
    args = p.parse_args()
    rows = ablation_table.chosen(args.rows, ROWS)
    os.makedirs(args.root, exist_ok=True)
    tok = tokenizer(args.root)
    seeds, recorded = ablation_table.seeds_and_recorded(args, vocab=VOCAB)
    meta = {"steps": args.steps, "seeds": seeds, "vocab": VOCAB, "rows": ROWS}
    results = {}
    for row in rows:
        results[row] = [recorded.get((row, s)) or ablation_table.run_main(
            f"{row} seed {s}", f"configs/siglip2.py:{ROWS[row]},seed={s},steps={args.steps},tok={tok}",
            os.path.join(args.root, f"{row}_{s}"), args.steps, "dense_probe/dense/miou") for s in seeds]
        table = ablation_table.save(args.out, meta, results, COLUMNS)
    print(ablation_table.markdown(table, COLUMNS, seeds, "row", _digits))


if __name__ == "__main__":
    main()
