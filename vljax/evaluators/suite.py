"""A zero-shot suite (vljax/suites) as a periodic evaluation inside training.

    config.evals.suite = dict(type="suite", data=dict(suite="imagenet", data_dir="/data",
                                                      max_examples=2000))

Metrics: "suite/<suite>/<dataset>/<metric>" (CLIP_benchmark's metric names, vljax/suites/scores.py)
for each prepared dataset, and "suite/<suite>/average": the mean of their main metrics. Datasets
that are not prepared are logged once, with the command that prepares them, and left out.
"""
from __future__ import annotations

from vljax import logs
from vljax.evaluators import base, registry
from vljax.suites import entries, scores, suites


@registry.register("suite")
class SuiteEvaluator(base.Evaluator):
    """Runs every prepared dataset of a suite with the trainer's embedder."""
    DATA_KEYS = ("suite", "data_dir", "max_examples", "datasets")  # the keys of `evals.<name>.data`

    def __init__(self, evaluators: dict, suite_name: str, *, name: str):
        """evaluators: {dataset name: (Dataset, its vljax evaluator)}, in suite order."""
        if not evaluators:
            raise ValueError(f"config key `evals.{name}.data`: no dataset of suite {suite_name!r} is prepared")
        self.evaluators, self.suite_name, self.name = evaluators, suite_name, name

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From `evals.<name>` = dict(type="suite", data=dict(suite=..., data_dir=..., max_examples=...,
        datasets=[...])); `datasets` keeps only those names of the suite."""
        del plot_dir
        data = dict(spec.get("data") or {})
        unknown = sorted(set(data) - set(cls.DATA_KEYS))
        if unknown or "suite" not in data:
            raise ValueError(f"config key `evals.{name}.data`: needs `suite`, allows {list(cls.DATA_KEYS)}"
                             + (f", got unknown {unknown}" if unknown else ""))
        chosen = suites.suite(data["suite"])
        if data.get("datasets") is not None:
            names = [d.name for d in chosen]
            bad = sorted(set(data["datasets"]) - set(names))
            if bad:
                raise ValueError(f"config key `evals.{name}.data.datasets`: {bad} not in suite "
                                 f"{data['suite']!r} ({names})")
            chosen = [d for d in chosen if d.name in set(data["datasets"])]
        evaluators = {}
        for dataset in chosen:
            try:
                evaluators[dataset.name] = (dataset, entries.evaluator(dataset, data.get("data_dir"),
                                                                       data.get("max_examples")))
            except entries.NotPrepared as e:
                logs.info("evals.%s: skipped %s", name, e)
        return cls(evaluators, data["suite"], name=name)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        out, main = {}, []
        for dname, (dataset, evaluator) in self.evaluators.items():
            metrics = scores.compute(dname, evaluator, embedder)
            out.update({f"suite/{self.suite_name}/{dname}/{k}": v for k, v in metrics.items()})
            if metrics.get(dataset.main_metric) is not None:
                main.append(metrics[dataset.main_metric])
        if main:
            out[f"suite/{self.suite_name}/average"] = float(sum(main) / len(main))
        return out
