r"""Issue 25's objectives that train the image tower, on the demo-scale CLIP from scratch: seeds 0, 1.

    python experiments/clip_objectives.py                        # every default row x 2 seeds
    python experiments/clip_objectives.py --rows=clip,queue --seeds=0 --steps=150

Rows (`configs/clip.py:<args>,seed=S,steps=N`; configs/clip.py says what each argument sets):
  clip       (none)               the softmax loss alone: the baseline, both towers from scratch
  queue      queue=1024           + a momentum queue of negatives (MoCo v2 / ALBEF form: the batch's
                                  momentum embeddings and the last 1,024 of them; vljax/momentum.py)
  slip       slip=on              + SLIP's SimCLR loss on two augmented views (vljax/slip.py)
  timix      mix=timix            TiMix's patch mixing with soft targets (vljax/mixing.py)
  m3col      mix=m3col            M3CoL's per-example mixup with soft targets
  text_aug   text_aug=on          the text augmentations of Fini et al. 2023 (not a default row)
  dreamlip   dreamlip=6           DreamLIP: 6 sub-captions as positives + its grouping loss over the
                                  patches (vljax/losses/dreamlip.py; not a default row: 7 texts an image)
  union      prefix=union         the emoji categories as label prompts, a third source beside the
                                  captions, one loss, no prefix: Prefix Conditioning's baseline
  prefix     prefix=on            the same three sources with Prefix Conditioning (Saito et al. 2023):
                                  a learned caption / label prefix token, captions' at evaluation
                                  (neither is a default row; they compare with each other: the
                                  label source teaches the emoji categories that `clip` never sees)
The LiT demo's loss ablation (loss_ablation.py) cannot hold these: they act on a trained image tower
(momentum towers, an image-view loss, mixed pixels), which the LiT recipe locks and stores.

Columns, each the mean ± spread (max - min) over seeds, at the last step: emoji category zero-shot
top-1 and mean per class (test split), emoji val retrieval image->text R@1 / R@10 and text->image
R@1 (the selection split), training pairs/s (the mean over logged intervals after the first: the
step time is 64 pairs / that), the step's peak memory per device (XLA's memory analysis) and its
TFLOPs (XLA's cost analysis). Writes experiments/results/clip_objectives.json after every finished
row (a row x seed recorded there at the same steps is read back, not rerun) and prints the table.
"""
import argparse
import os

import ablation_table

REPO = ablation_table.REPO
OUT = os.path.join(REPO, "experiments", "results", "clip_objectives.json")
ROWS = {
    "clip": "",
    "queue": "queue=1024",
    "slip": "slip=on",
    "timix": "mix=timix",
    "m3col": "mix=m3col",
    "text_aug": "text_aug=on",
    "dreamlip": "dreamlip=6",
    "union": "prefix=union",
    "prefix": "prefix=on",
}
DEFAULT_ROWS = "clip,queue,slip,timix,m3col"
COLUMNS = [  # (header, metric key, scale)
    ("emoji zero-shot top-1", "zeroshot/emoji/top1", 100),
    ("mean per class", "zeroshot/emoji/mean_per_class", 100),
    ("val i2t R@1", "retrieval/val_retrieval/i2t_r1", 100),
    ("val i2t R@10", "retrieval/val_retrieval/i2t_r10", 100),
    ("val t2i R@1", "retrieval/val_retrieval/t2i_r1", 100),
    ("pairs/s", "train/pairs_per_s", 1),
    ("peak GB/device", "perf/memory_gb", 1),
    ("TFLOPs/step", "perf/step_tflops", 1),
]


def _digits(key, scale):
    return 0 if "pairs" in key else (3 if key.startswith("perf/") else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=DEFAULT_ROWS)
    ablation_table.add_arguments(p, seeds="0,1", steps=300, root="/tmp/vljax_clip_objectives", out=OUT)
    args = p.parse_args()
    rows = ablation_table.chosen(args.rows, ROWS)
    seeds, recorded = ablation_table.seeds_and_recorded(args)
    meta = {"steps": args.steps, "seeds": seeds, "rows": ROWS, "recipe": "configs/clip.py:<row>,seed=S"}
    results = {}
    for row in rows:
        results[row] = [recorded.get((row, s)) or ablation_table.run_main(
            f"{row} seed {s}", "configs/clip.py:" + ",".join(filter(None, (ROWS[row], f"seed={s}", f"steps={args.steps}"))),
            os.path.join(args.root, f"{row}_{s}"), args.steps, "retrieval/val_retrieval/i2t_r1") for s in seeds]
        table = ablation_table.save(args.out, meta, results, COLUMNS)
    print(ablation_table.markdown(table, COLUMNS, seeds, "row", _digits))


if __name__ == "__main__":
    main()
