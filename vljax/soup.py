r"""Model soups over real checkpoints: uniform and greedy weight averages, each one evaluated.

    # the latest checkpoint of each run (same initialisation, different hyper-parameters)
    python -m vljax.soup --workdirs=/tmp/lit_a,/tmp/lit_b,/tmp/lit_c --out=/tmp/lit_soup
    # every kept checkpoint of one run, evaluated with another config's evals
    python -m vljax.soup --workdirs=/tmp/vljax_lit --all_steps --config=configs/lit_eval.py --out=/tmp/soup

Ingredients are ranked, and the greedy soup grown, on `--select_metric` (default:
`config.select_metric`), which should be a held-out (val) metric, never the test set's. Every
ingredient and both soups are scored on all of `config.evals` (default: the first workdir's
config.json). Writes OUT/soup_results.json; with --save, OUT/uniform and OUT/greedy are workdirs
(model_spec.json, config.json and a params-only checkpoint) that `vljax-infer` and `vljax.evaluate` load.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from vljax import checkpoints, cliflags, eval_builder, factory, sharding
from vljax.embedder import Embedder
from vljax.evaluators import soups

# Flags on a module-private FlagValues: vljax.main and vljax.evaluate define --config too (cliflags).
_FLAGS = flags.FlagValues()
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs whose checkpoints are the ingredients.",
                              flag_values=_FLAGS)
_ALL_STEPS = flags.DEFINE_bool("all_steps", False, "Every kept checkpoint, not only the latest.",
                               flag_values=_FLAGS)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose evals score the soups "
                                          "(default: the first workdir's config.json).",
                                          flag_values=_FLAGS)
_SELECT = flags.DEFINE_string("select_metric", None, "Held-out metric for ranking / greedy soup.",
                              flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=_FLAGS)
_SAVE = flags.DEFINE_bool("save", False, "Also save the soups as workdirs OUT/uniform, OUT/greedy.",
                          flag_values=_FLAGS)
flags.mark_flags_as_required(["workdirs", "out"], flag_values=_FLAGS)

def read_config(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))


def load_ingredients(workdirs, all_steps: bool = False):
    """(model spec of the first workdir, model, [(name "WORKDIR@STEP", params)]).

    The latest checkpoint of each workdir, or with `all_steps` every checkpoint kept there; only
    the params are read. All workdirs must hold the same architecture (their model specs).
    """
    spec = factory.read_spec(workdirs[0])
    model = factory.build_model(spec)
    out = []
    for wd in workdirs:
        if factory.read_spec(wd)["model"] != spec["model"]:
            raise ValueError(f"{wd}: its model differs from {workdirs[0]}'s; soups average one architecture")
        with checkpoints.Checkpointer(epath.Path(wd) / "checkpoints") as ckpt:
            steps = ckpt.all_steps() if all_steps else [ckpt.latest_step()]
            if not steps or steps[0] is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        for step in sorted(steps):
            out.append((f"{wd}@{step}", factory.restore_params(wd, model, spec, step=step)))
    return spec, model, out


def score(spec, model, params, tokenizer, evaluators, mesh, batch_size: int = 64) -> dict:
    """{metric: value} of `params` on every evaluator (no timings): one Embedder of the model
    bundle, with the spec's image size, normalisation and similarity (shared by soups and WiSE-FT)."""
    emb = Embedder.from_bundle(factory.Bundle(model, params, tokenizer, spec), mesh=mesh,
                               batch_size=batch_size)
    return eval_builder.run_all(evaluators, emb, timed=False)


def cook(spec, model, ingredients, evaluators, select_metric: str, batch_size: int = 64) -> dict:
    """Scores each ingredient, the uniform soup and the greedy soup on every evaluator.

    Returns {"select_metric", "ingredients": [{"name", "metrics"}], "uniform": {"metrics", "params"},
             "greedy": {"metrics", "params", "ingredients": [names], "steps": [...]}}.
    """
    tokenizer = factory.build_tokenizer(spec)
    mesh = sharding.make_mesh([("data", -1)])
    names, params_list = [n for n, _ in ingredients], [p for _, p in ingredients]
    scored = {}  # id(params) -> metrics: each ingredient and candidate soup is evaluated once

    def evaluate(params):
        key = id(params)
        if key not in scored:
            metrics = score(spec, model, params, tokenizer, evaluators, mesh, batch_size)
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


def save_workdir(spec, config, params, workdir: str, step: int = 0):
    """Writes params as a loadable workdir: model_spec.json, config.json (its evals) and a
    params-only checkpoint, which `vljax-infer`, `vljax.evaluate` and soups load."""
    factory.write_spec(workdir, spec)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=1))
    with checkpoints.Checkpointer(epath.Path(workdir) / "checkpoints") as ckpt:
        ckpt.save(step, {"params": jax.tree.map(jnp.asarray, params)}, force=True)


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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdirs = [os.path.abspath(os.path.expanduser(w)) for w in _WORKDIRS.value]
    spec, model, ingredients = load_ingredients(workdirs, _ALL_STEPS.value)
    config = read_config(workdirs[0])
    eval_config = _CONFIG.value if _CONFIG.value is not None else config
    select = _SELECT.value or eval_config.get("select_metric")
    if not select:
        raise app.UsageError("give --select_metric (the config has no select_metric)")
    evaluators = eval_builder.build(eval_config)
    results = cook(spec, model, ingredients, evaluators, select,
                   batch_size=config.get("eval_batch_size", 64))
    print(report(results))
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    os.makedirs(out, exist_ok=True)
    if _SAVE.value:
        for kind in ("uniform", "greedy"):
            save_workdir(spec, config, results[kind]["params"], os.path.join(out, kind))
    for kind in ("uniform", "greedy"):
        del results[kind]["params"]
    with open(os.path.join(out, "soup_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(out, 'soup_results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cliflags.parser(_FLAGS)))
