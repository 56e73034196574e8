"""The base-to-new generalisation protocol of CoCoOp (Zhou et al., CVPR 2022, Sec. 4.1).

The classes are split in two halves: prompts are learned on `shots` images per BASE class,
then base test images are classified among the base classes and new test images among the
new classes (never seen in training); H = 2 base new / (base + new), the harmonic mean.

  templates  the hand-written prompt ensemble (no training): the zero-shot reference.
  coop       CoOp's context learned on the base classes, applied to the new class names.
  cocoop     CoCoOp's context and meta-net, likewise.

Metrics "base_to_new/<name>/<method>/{base,new,harmonic}" (means over seeds).
"""
from collections.abc import Sequence

import numpy as np

from vljax.adapt import coop as coop_lib
from vljax.evaluators import base, fewshot, prompts, registry, zeroshot
from vljax.evaluators import data as data_lib

METHODS = ("templates", "coop", "cocoop")


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


@registry.register("base_to_new")
class BaseToNewEvaluator(base.Evaluator):
    """See the module docstring."""
    DATA_KEYS = fewshot.FEWSHOT_DATA_KEYS

    def __init__(self, train_data, train_labels: Sequence[int], test_data,
                 test_labels: Sequence[int], class_names: Sequence[str], *, name: str,
                 base_classes: Sequence[int] | None = None, shots: int = 16, seeds: int = 3,
                 methods: Sequence[str] = METHODS, templates: str | Sequence[str] = "clip80",
                 coop: dict | None = None):
        """
        Args:
          train_data / test_data: sources; train_labels / test_labels: [N] ints.
          class_names: all C names. base_classes: the base half (default: the first C // 2).
          coop: keyword arguments of `vljax.adapt.coop.PromptLearner`.
        """
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"{name}: unknown methods {unknown} (known: {list(METHODS)})")
        num = len(class_names)
        self.base = np.asarray(sorted(base_classes) if base_classes is not None
                               else range(num // 2), np.int64)
        self.new = np.setdiff1d(np.arange(num), self.base)
        if not len(self.base) or not len(self.new):
            raise ValueError(f"{name}: base and new classes must both be non-empty")
        self.train_data, self.test_data = train_data, test_data
        self.train_labels = np.asarray(train_labels, np.int64)
        self.test_labels = np.asarray(test_labels, np.int64)
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.texts = prompts.class_texts(self.class_names, templates, None)
        self.name, self.shots, self.seeds = name, shots, seeds
        self.methods, self.coop = tuple(methods), dict(coop or {})
        self.splits = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            self.splits.append(np.concatenate([
                rng.permutation(np.flatnonzero(self.train_labels == c))[:shots]
                for c in self.base]))

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="base_to_new", data=dict(name=...,
        label=..., per_class=16, max_examples=...), base_classes=[...], shots=16, ...)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        train, labels, test, test_labels, names = fewshot.fewshot_data(name, data)
        return cls(train, labels, test, test_labels, names, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        used = np.unique(np.concatenate(self.splits))
        feats, row, test, test_index = fewshot.embed_train_test(
            embedder, self.train_data, len(self.train_labels), used, self.test_data)
        y_test = self.test_labels[test_index]
        groups = {"base": self.base, "new": self.new}
        masks = {g: np.isin(y_test, cls) for g, cls in groups.items()}
        # Labels as indices into each group's class list.
        local = {g: np.searchsorted(cls, y_test[masks[g]]) for g, cls in groups.items()}

        def accs(logits_fn):
            return {g: float(np.mean(np.argmax(logits_fn(test[masks[g]], cls), 1) == local[g]))
                    for g, cls in groups.items()}

        results = {}
        if "templates" in self.methods:
            ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
            results["templates"] = [accs(lambda z, cls: z @ ztxt[cls].T)]
        learned = [m for m in self.methods if m != "templates"]
        if learned:
            learner = coop_lib.PromptLearner.from_embedder(embedder, self.class_names,
                                                           **self.coop)
            for m in learned:
                results[m] = []
                for seed, idx in enumerate(self.splits):
                    idx = idx[row[idx] >= 0]
                    x, y = feats[row[idx]], np.searchsorted(self.base, self.train_labels[idx])
                    fit = learner.fit_coop if m == "coop" else learner.fit_cocoop
                    prompts_ = fit(x, y, classes=self.base, seed=seed)
                    results[m].append(accs(lambda z, cls, p=prompts_: p.logits(z, classes=cls)))
        out = {}
        for m, per_seed in results.items():
            b = float(np.mean([r["base"] for r in per_seed]))
            n = float(np.mean([r["new"] for r in per_seed]))
            prefix = f"base_to_new/{self.name}/{m}"
            out.update({f"{prefix}/base": b, f"{prefix}/new": n,
                        f"{prefix}/harmonic": harmonic(b, n)})
        return out
