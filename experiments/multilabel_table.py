r"""Multi-label learning on the demo's tag sets with labels hidden (issue 26): losses x hidden
fractions x seeds 0, 1, 2.

    python experiments/multilabel_table.py                                  # every row x 3 seeds
    python experiments/multilabel_table.py --rows=bce:0,pu_mlc:0.5 --seeds=0 --steps=100

A row is `<loss>:<hidden fraction>`; each run is
`python -m vljax.main --config=configs/lit_multilabel.py:loss=L,hide=H,hide_seed=S,seed=S,steps=N`
in `<root>/<loss>_<hide>_<seed>`: the demo's towers (locked EfficientNet-Lite0 with its stored
features, MiniLM with its top two blocks) trained on the emoji and openclipart tags (184 labels)
with that loss, a fraction H of every image's positive tags hidden from training (seeded by the
run's seed, so the three seeds also hide three different sets; the hidden tags are written to the
run's hidden_labels.json). Losses (configs/lit_multilabel.py):
  bce       binary cross-entropy on every tag; with H > 0 a hidden tag counts as negative, i.e.
            the assume-negative baseline; bce:0 is the full-label run
  pu_mlc    PU-MLC (Yuan et al. 2023): positive labels only, the rest unlabelled
  nnpu      the non-negative PU risk (Kiryo et al. 2017), label frequency 1 - H
  comic     COMIC (label correction and multi-focal modifier for long-tailed partial labels)
  dexml     DEXML's decoupled softmax (Gupta et al. 2024)
The runs share one LiT feature store (`<root>/features`, linked into every workdir: the trunk and
the data are the same, so its fingerprint is too); only the first run writes it.

Columns, per test set (emoji and openclipart tags, evaluated once at the last step with the
trained prompt): mAP, CF1@3, OF1@3, ReaL-style top-1 (the top label counts when it is any label of
the image) and split-conformal label sets at alpha = 0.1 calibrated on that dataset's val split
(coverage, target >= 0.9, and mean set size), each the mean ± spread (max - min) over seeds.
Writes experiments/results/multilabel_table.json after every finished row (a row x seed already
recorded there at the same steps is read back, not rerun) and prints the tables.
"""
import argparse
import os

import ablation_table

REPO = ablation_table.REPO
OUT = os.path.join(REPO, "experiments", "results", "multilabel_table.json")
LOSSES = {"bce": "loss=multilabel,kind=bce", "pu_mlc": "loss=pu_mlc", "nnpu": "loss=nnpu",
          "comic": "loss=comic", "dexml": "loss=dexml"}
DEFAULT_ROWS = "bce:0,bce:0.5,pu_mlc:0.5,nnpu:0.5,comic:0.5,dexml:0,bce:0.8,pu_mlc:0.8"
DATASETS = ("emoji", "openclipart")
ALPHA = 0.1


def columns(dataset: str):
    k = f"multilabel/{dataset}_tags"
    return [("mAP", f"{k}/mAP", 100), ("CF1@3", f"{k}/CF1@3", 100), ("OF1@3", f"{k}/OF1@3", 100),
            ("ReaL top-1", f"{k}/real_top1", 100),
            (f"coverage@{ALPHA:g}", f"{k}/conformal_coverage@{ALPHA:g}", 100),
            (f"set size@{ALPHA:g}", f"{k}/conformal_size@{ALPHA:g}", 1)]


COLUMNS = [c for d in DATASETS for c in columns(d)] + [("pairs/s", "train/pairs_per_s", 1)]


def _digits(key, scale):
    return 0 if "pairs" in key else 1


def parse_rows(text: str) -> list[tuple[str, float]]:
    rows = []
    for item in text.split(","):
        loss, _, hide = item.partition(":")
        if loss not in LOSSES:
            raise SystemExit(f"--rows: unknown loss {loss!r} in {item!r}; known: {', '.join(LOSSES)}")
        try:
            fraction = float(hide or 0)
        except ValueError:
            raise SystemExit(f"--rows: {item!r}: the hidden fraction after ':' must be a number") from None
        if not 0 <= fraction < 1:
            raise SystemExit(f"--rows: {item!r}: the hidden fraction must be in [0, 1)")
        rows.append((loss, fraction))
    return rows


def run(loss: str, hide: float, seed: int, root: str, steps: int) -> dict:
    """One run in `<root>/<loss>_<hide>_<seed>`, its LiT feature store linked to the shared one."""
    workdir = ablation_table.workdir_with_shared_store(root, f"{loss}_{hide:g}_{seed}")
    arg = f"{LOSSES[loss]},hide={hide:g},hide_seed={seed},seed={seed},steps={steps}"
    return ablation_table.run_main(f"{loss}:{hide:g} seed {seed}", f"configs/lit_multilabel.py:{arg}",
                                   workdir, steps, "multilabel/emoji_tags/mAP")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=DEFAULT_ROWS, help="loss:hidden_fraction,...")
    ablation_table.add_arguments(p, seeds="0,1,2", steps=500, root="/tmp/vljax_multilabel_table", out=OUT)
    args = p.parse_args()
    rows = parse_rows(args.rows)
    seeds, recorded = ablation_table.seeds_and_recorded(args)
    meta = {"steps": args.steps, "seeds": seeds, "alpha": ALPHA,
            "recipe": "configs/lit_multilabel.py:<loss>,hide=H,hide_seed=S,seed=S"}
    results = {}
    for loss, hide in rows:
        name = f"{loss}:{hide:g}"
        results[name] = [recorded.get((name, s)) or run(loss, hide, s, args.root, args.steps) for s in seeds]
        table = ablation_table.save(args.out, meta, results, COLUMNS)
    for dataset in DATASETS:
        cols = columns(dataset) + ([("pairs/s", "train/pairs_per_s", 1)] if dataset == DATASETS[0] else [])
        print(f"\n{dataset} tags (test split)\n")
        print(ablation_table.markdown(table, cols, seeds, "loss:hidden", _digits))


if __name__ == "__main__":
    main()
