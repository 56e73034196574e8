"""Shared by the ablation scripts (loss_ablation.py, siglip2_ablation.py): read a finished run's final
evaluation from its metrics.jsonl, run `python -m vljax.main` for a row, and summarise rows x seeds
as mean ± spread (max - min) in a markdown table."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_run(workdir: str, steps: int, required: str) -> dict | None:
    """The run's step-`steps` evaluation (every non-train key logged at that step), its mean
    training throughput (logged steps after the first), last loss and the step's perf/* figures
    (the largest logged: peak memory per device and TFLOPs of the costliest logged step);
    None when `required` is not among them (the run has not finished)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    final = {}
    for r in rows:
        if r.get("step") == steps and not any(k.startswith("train/") for k in r):
            final.update(r)
    if required not in final:
        return None
    speeds = [r["train/pairs_per_s"] for r in rows if "train/pairs_per_s" in r][1:]
    final["train/pairs_per_s"] = statistics.fmean(speeds) if speeds else float("nan")
    final["train/loss_last"] = [r["train/loss"] for r in rows if "train/loss" in r][-1]
    perf = [r for r in rows if "perf/memory_gb" in r]
    if perf:  # the largest over the run: a staged run's steps differ (self-distillation, NaFlex budgets)
        final["perf/memory_gb"] = max(r["perf/memory_gb"] for r in perf)
        final["perf/step_tflops"] = max(r.get("perf/step_tflops", float("nan")) for r in perf)
    return final


def recorded_runs(path: str, **settings) -> dict[tuple[str, int], dict]:
    """{(row, seed): run} from an earlier table file at `path` whose settings (e.g. steps, vocab) equal
    `settings`; {} when there is none or it was made with other settings. So a session that lost its
    run directories does not rerun what the table already records."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if any(old.get(k) != v for k, v in settings.items()):
        return {}
    seeds = old.get("seeds", [])
    return {(row, seed): run for row, runs in old.get("runs", {}).items()
            for seed, run in zip(seeds, runs)}


def add_arguments(p, *, seeds: str, steps: int, root: str, out: str, settings: str = "steps") -> None:
    """The options every ablation script takes beside its rows: --seeds, --steps, --root (the runs'
    workdirs), --out (the table's JSON) and --fresh; `settings` names what a recorded run must share
    to be read back."""
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--root", default=root)
    p.add_argument("--out", default=out)
    p.add_argument("--fresh", action="store_true",
                   help=f"ignore the runs already recorded in --out (by default a row x seed recorded "
                        f"there at the same {settings} is read back, not rerun)")


def chosen(text: str, known, flag: str = "--rows") -> list[str]:
    """The comma-separated names of `text`, each one of `known`; exits naming `flag` otherwise."""
    names = text.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
    return names


def seeds_and_recorded(args, **settings) -> tuple[list[int], dict[tuple[str, int], dict]]:
    """(the --seeds, the runs recorded in --out at --steps and `settings`; {} with --fresh)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    recorded = {} if args.fresh else recorded_runs(args.out, steps=args.steps, **settings)
    return seeds, recorded


def workdir_with_shared_store(root: str, name: str) -> str:
    """`<root>/<name>`, its LiT feature store (`features`) a link to the shared `<root>/features`:
    runs with the same locked trunk and data share one store (its fingerprint is the same), so only
    the first run writes it."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    shared = os.path.join(root, "features")
    os.makedirs(shared, exist_ok=True)
    link = os.path.join(workdir, "features")
    if not os.path.lexists(link):
        os.symlink(shared, link)
    return workdir


def run_main(name: str, config_arg: str, workdir: str, steps: int, required: str) -> dict:
    """`python -m vljax.main --config=<config_arg> --workdir=<workdir>` unless it finished before
    (then its metrics are read back); exits naming the run when it fails."""
    done = read_run(workdir, steps, required)
    if done is not None:
        print(f"[ablation] {name}: done before, read {workdir}", flush=True)
        return done
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "vljax.main", f"--config={config_arg}", f"--workdir={workdir}"]
    print(f"[ablation] {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(workdir, "run.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[ablation] {name} failed (exit {rc}); see {workdir}/run.log")
    out = read_run(workdir, steps, required)
    if out is None:
        raise SystemExit(f"[ablation] {name}: no step-{steps} `{required}` in {workdir}/metrics.jsonl")
    print(f"[ablation] {name}: {time.time() - t0:.0f} s", flush=True)
    return out


def save(path: str, meta: dict, results: dict[str, list[dict]], columns) -> dict:
    """Writes {**meta, "table", "runs"} to `path` (after every finished row, so an interrupted
    ablation keeps what it ran) and returns the table."""
    table = summarise(results, columns)
    with open(path, "w") as f:
        json.dump({**meta, "table": table, "runs": results}, f, indent=1)
    return table


def summarise(results: dict[str, list[dict]], columns) -> dict:
    """{row: {key: {"mean", "spread", "values"}}} over each row's runs; columns: (header, key, scale)."""
    table = {}
    for name, runs in results.items():
        row = {}
        for _, key, scale in columns:
            vals = [r[key] * scale for r in runs if key in r]
            if vals:
                row[key] = {"mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "values": vals}
        table[name] = row
    return table


def markdown(table: dict, columns, seeds, first: str, digits) -> str:
    """The table; digits(key, scale) -> decimals of that column."""
    lines = [f"| {first} | " + " | ".join(h for h, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        cells = []
        for _, key, scale in columns:
            if key not in row:
                cells.append("-")
                continue
            d = digits(key, scale)
            cells.append(f"{row[key]['mean']:.{d}f} ± {row[key]['spread']:.{d}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± spread (max - min) over seeds {', '.join(map(str, seeds))}.")
    return "\n".join(lines)
