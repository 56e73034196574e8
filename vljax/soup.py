r"""Model soups over real checkpoints: uniform and greedy weight averages, each one evaluated.

    # the latest checkpoint of each run (same initialisation, different hyper-parameters)
    python -m vljax.soup --workdirs=/tmp/lit_a,/tmp/lit_b,/tmp/lit_c --out=/tmp/lit_soup
    # every kept checkpoint of one run, evaluated with another config's evals
    python -m vljax.soup --workdirs=/tmp/vljax_lit --all_steps --config=configs/lit_eval.py --out=/tmp/soup

Ingredients are ranked, and the greedy soup grown, on `--select_metric` (default:
`config.select_metric`), which should be a held-out (val) metric, never the test set's. Every
ingredient and both soups are scored on all of `config.evals` (default: the first workdir's
config.json). Writes OUT/soup_results.json; with --save, OUT/uniform and OUT/greedy are workdirs
(config.json + checkpoint) that `vljax-infer`, `vljax.evaluate` and `--mode=eval` load.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections

from vljax.evaluators import soups


def read_config(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_ingredients(workdirs, all_steps: bool = False):
    """(config of the first workdir, model, [(name "WORKDIR@STEP", params)]).

    The latest checkpoint of each workdir, or with `all_steps` every checkpoint kept there.
    All workdirs must hold the same architecture (`config.model`).
    """
    from vljax import checkpoints, train
    config = read_config(workdirs[0])
    model = train.build_model(config)
    out = []
    for wd in workdirs:
        cfg = read_config(wd)
        if cfg.model.to_dict() != config.model.to_dict():
            raise ValueError(f"{wd}: config.model differs from {workdirs[0]}'s; soups average one architecture")
        ckpt = checkpoints.Checkpointer(os.path.join(wd, "checkpoints"))
        steps = ckpt.all_steps() if all_steps else [ckpt.latest_step()]
        ckpt.close()
        if not steps or steps[0] is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(wd, 'checkpoints')}")
        for step in sorted(steps):
            out.append((f"{wd}@{step}", train.restore_params(cfg, model, wd, step)))
    return config, model, out


def cook(config, model, ingredients, evaluators, select_metric: str, batch_size: int = 64) -> dict:
    """Scores each ingredient, the uniform soup and the greedy soup on every evaluator.

    Returns {"select_metric", "ingredients": [{"name", "metrics"}], "uniform": {"metrics", "params"},
             "greedy": {"metrics", "params", "ingredients": [names], "steps": [...]}}.
    """
    from vljax import sharding, train
    from vljax.embedder import Embedder
    tokenizer = train.build_tokenizer(config)
    mesh = sharding.make_mesh([("data", -1)])
    names, params_list = [n for n, _ in ingredients], [p for _, p in ingredients]
    scored = {}  # id(params) -> metrics: each ingredient and candidate soup is evaluated once

    def evaluate(params):
        key = id(params)
        if key not in scored:
            emb = Embedder(model, params, tokenizer, mesh=mesh, image_size=config.input.image_size,
                           value_range=config.input.get("value_range", "efficientnet"),
                           batch_size=batch_size)
            metrics = {}
            for ev in evaluators.values():
                metrics.update(ev.run(emb))
            if select_metric not in metrics:
                raise ValueError(f"select_metric {select_metric!r} is not among the metrics: {sorted(metrics)}")
            scored[key] = (params, metrics)  # params kept alive so that id() stays unique
        return scored[key][1]

    uniform = soups.uniform_soup(params_list)
    greedy, log = soups.greedy_soup(params_list, lambda p: evaluate(p)[select_metric])
    return {
        "select_metric": select_metric,
        "ingredients": [{"name": n, "metrics": evaluate(p)} for n, p in zip(names, params_list)],
        "uniform": {"metrics": evaluate(uniform), "params": uniform},
        "greedy": {"metrics": evaluate(greedy), "params": greedy,
                   "ingredients": [names[i] for i in log["ingredients"]],
                   "steps": [(names[i], s, bool(a)) for i, s, a in log["steps"]]},
    }


def save_workdir(config, model, params, workdir: str, step: int = 0):
    """Writes params as a loadable workdir: config.json and a checkpoint (fresh optimizer state)."""
    import jax.numpy as jnp

    from vljax import checkpoints, optim
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    tx, _, _ = optim.make_optimizer(config, params)
    params = jax.tree.map(jnp.asarray, params)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.asarray(step, jnp.int32),
             "rng": jax.random.key(0)}
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.save(step, state, {}, force=True)


def report(results) -> str:
    """A table: one row per ingredient and soup, the select metric first."""
    sel = results["select_metric"]
    rows = [(r["name"], r["metrics"]) for r in results["ingredients"]]
    rows += [("uniform soup", results["uniform"]["metrics"]), ("greedy soup", results["greedy"]["metrics"])]
    keys = [sel] + sorted(k for k in rows[0][1] if k != sel and not k.startswith("time/"))
    width = max(len(n) for n, _ in rows)
    lines = [" " * width + "  " + "  ".join(keys)]
    lines += [f"{n:<{width}}  " + "  ".join(f"{m[k]:>{len(k)}.4f}" for k in keys) for n, m in rows]
    lines.append(f"greedy soup ingredients: {', '.join(results['greedy']['ingredients'])}")
    return "\n".join(lines)


def main(argv):
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from vljax import eval_builder
    workdirs = [os.path.abspath(os.path.expanduser(w)) for w in _WORKDIRS.value]
    config, model, ingredients = load_ingredients(workdirs, _ALL_STEPS.value)
    eval_config = _CONFIG.value if _CONFIG.value is not None else config
    select = _SELECT.value or eval_config.get("select_metric")
    if not select:
        raise app.UsageError("give --select_metric (the config has no select_metric)")
    evaluators = eval_builder.build(eval_config)
    results = cook(config, model, ingredients, evaluators, select,
                   batch_size=config.get("eval_batch_size", 64))
    print(report(results))
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    os.makedirs(out, exist_ok=True)
    if _SAVE.value:
        for kind in ("uniform", "greedy"):
            save_workdir(config, model, results[kind]["params"], os.path.join(out, kind))
    for kind in ("uniform", "greedy"):
        del results[kind]["params"]
    with open(os.path.join(out, "soup_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(out, 'soup_results.json')}")
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    _WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs whose checkpoints are the ingredients.")
    _ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Every kept checkpoint, not only the latest.")
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose evals score the soups "
                                              "(default: the first workdir's config.json).")
    _SELECT = flags.DEFINE_string("select_metric", None, "Held-out metric for ranking / greedy soup.")
    _OUT = flags.DEFINE_string("out", None, "Output directory.")
    _SAVE = flags.DEFINE_bool("save", False, "Also save the soups as workdirs OUT/uniform, OUT/greedy.")
    flags.mark_flags_as_required(["workdirs", "out"])
    sys.exit(app.run(main))
