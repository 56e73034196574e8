r"""Issue 11's tables: few-shot adapters and prompt learning, base-to-new, label-free adaptation,
GZSL calibration, on the LiT demo model (configs/adapt.py's evals).

    python -m vljax.main --config=configs/lit.py:steps=300 --workdir=/tmp/adapt_lit       # the model, once
    python experiments/adapt_fewshot.py --model=/tmp/adapt_lit                   # all evals
    python experiments/adapt_fewshot.py --model=/tmp/adapt_lit --only=fmnist_fewshot,emoji_fewshot
    python experiments/adapt_fewshot.py --table                                  # tables from the JSON

Each evaluator's metrics are merged into experiments/results/adapt.json as it finishes (with
its runtime and the config argument), so runs of different evals add up; the tables are
printed as markdown.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "experiments", "results", "adapt.json")


def _load_config(arg):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import adapt
    return adapt.get_config(arg)


def run(model: str, only, config_arg, out: str) -> dict:
    from vljax import eval_builder, factory, sharding
    from vljax.embedder import Embedder
    config = _load_config(config_arg)
    evaluators = eval_builder.build(config, only=only)
    bundle = factory.load(model)
    emb = Embedder.from_bundle(bundle, mesh=sharding.make_mesh([("data", -1)]), batch_size=64)
    results = json.load(open(out)) if os.path.exists(out) else {}
    for name, ev in evaluators.items():
        t0 = time.perf_counter()
        metrics = ev.run(emb)
        results[name] = {"metrics": metrics, "seconds": round(time.perf_counter() - t0, 1),
                         "config_arg": config_arg, "model": model,
                         "load_avg": os.getloadavg()[0]}
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def tables(results: dict) -> str:
    lines = []
    for name in ("fmnist_fewshot", "emoji_fewshot", "fmnist_cocoop", "emoji_cocoop"):
        if name not in results:
            continue
        m = results[name]["metrics"]
        prefix = f"fewshot_adapt/{name}"
        per_shot = [k for k in m if k.split("/")[-1][:-4].isdigit() and k.endswith("shot")]
        shots = sorted({int(k.split("/")[-1][:-4]) for k in per_shot})
        methods = sorted({k.split("/")[2] for k in per_shot},
                         key=["ridge", "crossmodal", "tip", "tip_f", "coop", "cocoop"].index)
        lines += [f"\n{name} (test accuracy %, mean ± std over seeds; {results[name]['seconds']:.0f} s)\n",
                  "| method | " + " | ".join(f"{k} shot" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        if f"{prefix}/zeroshot" in m:
            lines.append("| zero-shot (templates) | " + " | ".join(
                [_pct(m[f"{prefix}/zeroshot"])] * len(shots)) + " |")
        for meth in methods:
            cells = [f"{_pct(m.get(f'{prefix}/{meth}/{k}shot'))} ± "
                     f"{_pct(m.get(f'{prefix}/{meth}/{k}shot_std'))}" for k in shots]
            lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    for name in ("fmnist_base_to_new", "emoji_base_to_new"):
        if name not in results:
            continue
        m = results[name]["metrics"]
        lines += [f"\n{name} (accuracy %, 16 shots of the base classes; "
                  f"{results[name]['seconds']:.0f} s)\n", "| method | base | new | H |", "|---|---|---|---|"]
        for meth in ("templates", "coop", "cocoop"):
            p = f"base_to_new/{name}/{meth}"
            if f"{p}/base" in m:
                lines.append(f"| {meth} | {_pct(m[p + '/base'])} | {_pct(m[p + '/new'])} | "
                             f"{_pct(m[p + '/harmonic'])} |")
    for name in ("openclipart_multilabel", "emoji_multilabel"):
        if name not in results:
            continue
        m = results[name]["metrics"]
        lines += [f"\n{name} (held-out test split, %; top-3 label sets and p >= 0.5; "
                  f"{results[name]['seconds']:.0f} s)\n",
                  "| head | mAP | CP@3 | CR@3 | CF1@3 | OP@3 | OR@3 | OF1@3 | CF1@thr | OF1@thr |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for meth in ("zeroshot", "bce", "asl", "wan"):
            p = f"multilabel_train/{name}/{meth}/"
            if p + "mAP" in m:
                lines.append(f"| {meth} | " + " | ".join(_pct(m.get(p + k)) for k in (
                    "mAP", "CP@3", "CR@3", "CF1@3", "OP@3", "OR@3", "OF1@3", "CF1@thr",
                    "OF1@thr")) + " |")
    if "fmnist_labelfree" in results:
        m, p = results["fmnist_labelfree"]["metrics"], "labelfree/fmnist_labelfree"
        lines += ["\nfmnist_labelfree (Fashion-MNIST test accuracy %)\n",
                  "| zero-shot | pseudo-label CoOp | images pseudo-labelled |", "|---|---|---|",
                  f"| {_pct(m[p + '/zeroshot'])} | {_pct(m[p + '/adapted'])} ± "
                  f"{_pct(m[p + '/adapted_std'])} | {m[p + '/pseudo_labelled']:.0f} |"]
    if "fmnist_gzsl" in results:
        m, p = results["fmnist_gzsl"]["metrics"], "gzsl/fmnist_gzsl"
        lines += ["\nfmnist_gzsl (per-class accuracy %)\n",
                  "| S | U | H | ZSL | AUSUC | best H over gamma |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(_pct(m[f"{p}/{k}"]) for k in
                                   ("seen", "unseen", "harmonic", "zsl", "ausuc",
                                    "best_harmonic")) + " |"]
    if "emoji_worst_group" in results:
        m, p = results["emoji_worst_group"]["metrics"], "zeroshot/emoji_worst_group"
        lines += ["\nemoji_worst_group (99 subcategories, grouped by their 10 categories; %)\n",
                  "| top-1 | mean per class | worst class | worst group |", "|---|---|---|---|",
                  "| " + " | ".join(_pct(m[f"{p}/{k}"]) for k in
                                   ("top1", "mean_per_class", "worst_class", "worst_group")) + " |"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/adapt_lit")
    parser.add_argument("--only", default=None, help="comma-separated eval names of configs/adapt.py")
    parser.add_argument("--config_arg", default=None, help="configs/adapt.py's argument")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    args = parser.parse_args()
    if not args.table:
        run(args.model, args.only.split(",") if args.only else None, args.config_arg, args.out)
    print(tables(json.load(open(args.out))))


if __name__ == "__main__":
    main()
