r"""WiSE-FT over real checkpoints: the weight-space ensemble of a zero-shot model and its fine-tuned
version (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022), scored on a grid of
mixing coefficients.

    python -m vljax.wise_ft --zeroshot=/tmp/adapt_lit --finetuned=/tmp/adapt_lit_ft \
        --config=configs/adapt.py --id_metric=zeroshot/fashion_mnist/top1 \
        --ood_metric=retrieval/emoji_test/i2t_r1 --out=/tmp/wise_ft

theta_alpha = (1 - alpha) theta_0 + alpha theta_1 (Eq. 1; `soups.wise_ft`), for each alpha of
--alphas, every one scored on all of `config.evals`. Writes OUT/wise_ft.json and
OUT/wise_ft.png: the in-distribution metric against the out-of-distribution one, one point per
alpha (the paper's Figure 1), and both against alpha.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from vljax import cliflags, eval_builder, factory, sharding, soup
from vljax.evaluators import soups
from vljax.metrics import save_figure

# Flags on a module-private FlagValues: vljax.main and vljax.evaluate define --config too (cliflags).
_FLAGS = flags.FlagValues()
_ZS = flags.DEFINE_string("zeroshot", None, "Workdir of the zero-shot model (theta_0).",
                          flag_values=_FLAGS)
_FT = flags.DEFINE_string("finetuned", None, "Workdir of its fine-tuned version (theta_1).",
                          flag_values=_FLAGS)
_ALPHAS = flags.DEFINE_list("alphas", [str(a / 10) for a in range(11)], "Mixing coefficients.",
                            flag_values=_FLAGS)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose evals score each mix "
                                          "(default: the zero-shot workdir's config.json).",
                                          flag_values=_FLAGS)
_ID = flags.DEFINE_string("id_metric", None, "The in-distribution metric (x axis).", flag_values=_FLAGS)
_OOD = flags.DEFINE_string("ood_metric", None, "The held-out metric (y axis).", flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=_FLAGS)
flags.mark_flags_as_required(["zeroshot", "finetuned", "id_metric", "ood_metric", "out"],
                             flag_values=_FLAGS)


def sweep(spec, model, params0, params1, alphas: Sequence[float], evaluators,
          batch_size: int = 64) -> list[dict]:
    """[{"alpha", "metrics"}] for each alpha: theta_alpha scored on every evaluator
    (`soup.score`: one Embedder of the model bundle, `eval_builder.run_all`)."""
    tokenizer = factory.build_tokenizer(spec)
    mesh = sharding.make_mesh([("data", -1)])
    out = []
    for alpha in alphas:
        params = soups.wise_ft(params0, params1, float(alpha))
        metrics = soup.score(spec, model, params, tokenizer, evaluators, mesh, batch_size)
        out.append({"alpha": float(alpha), "metrics": metrics})
    return out


def plot(results: list[dict], id_metric: str, ood_metric: str, path: str) -> str:
    """The ID-OOD curve (one point per alpha) and both metrics against alpha, as one PNG."""
    for key in (id_metric, ood_metric):
        if key not in results[0]["metrics"]:
            raise ValueError(f"metric {key!r} is not among {sorted(results[0]['metrics'])}")
    alphas = [r["alpha"] for r in results]
    ind = [r["metrics"][id_metric] for r in results]
    ood = [r["metrics"][ood_metric] for r in results]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(ind, ood, "o-")
    for a, x, y in zip(alphas, ind, ood):
        ax1.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel(f"in-distribution: {id_metric}")
    ax1.set_ylabel(f"held-out: {ood_metric}")
    ax1.set_title("WiSE-FT (labels: alpha)")
    ax2.plot(alphas, ind, "o-", label=id_metric)
    ax2.plot(alphas, ood, "s-", label=ood_metric)
    ax2.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdirs = [os.path.abspath(os.path.expanduser(w)) for w in (_ZS.value, _FT.value)]
    spec, model, ingredients = soup.load_ingredients(workdirs)
    config = _CONFIG.value if _CONFIG.value is not None else soup.read_config(workdirs[0])
    evaluators = eval_builder.build(config)
    results = sweep(spec, model, ingredients[0][1], ingredients[1][1],
                    [float(a) for a in _ALPHAS.value], evaluators,
                    batch_size=config.get("eval_batch_size", 64))
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "wise_ft.json"), "w") as f:
        json.dump({"zeroshot": workdirs[0], "finetuned": workdirs[1], "results": results}, f,
                  indent=1)
    plot(results, _ID.value, _OOD.value, os.path.join(out, "wise_ft.png"))
    for r in results:
        print(f"alpha {r['alpha']:.2f}  {_ID.value} {r['metrics'][_ID.value]:.4f}  "
              f"{_OOD.value} {r['metrics'][_OOD.value]:.4f}")
    print(f"wrote {out}/wise_ft.json, wise_ft.png")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cliflags.parser(_FLAGS)))
