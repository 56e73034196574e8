"""Few-shot adaptation of a frozen two-tower model, several methods on the same splits.

  zeroshot    the prompt-ensemble classifier (no shots).
  ridge       the image-only ridge probe (`fewshot.RidgeProbe`).
  crossmodal  the ridge probe with class text embeddings as extra samples (`crossmodal.py`).
  tip         Tip-Adapter: the training-free cache, alpha and beta searched (`tip_adapter.py`);
              each key the mean of `augment_views` augmented views of its image (official: 10).
  tip_f       Tip-Adapter-F: the cache keys fine-tuned on the augmented views, alpha and beta
              searched again.
  coop        CoOp: learned context vectors in the text tower's input (`vljax/adapt/coop.py`).
  cocoop      CoCoOp: CoOp's context plus an image-conditioned meta-net token.

Every method sees the same images: per seed, the first k shuffled train images of each class
for each k of `shots` (nested), and `holdout_per_class` further train images per class on
which ridge's l2 and Tip-Adapter's alpha / beta are chosen. Test images are never used for a
choice. Metrics: "fewshot_adapt/<name>/<method>/<k>shot" (mean test accuracy over seeds) and
".../<k>shot_std", and "fewshot_adapt/<name>/zeroshot".

Only Tip-Adapter(-F) sees augmented views (`data.AugmentedView`, embedded once per view and
few-shot image, cached by the embedder); the other methods take each image once, unaugmented,
as their references (big_vision's probe; CoOp on frozen image embeddings).

coop / cocoop need the text tower itself: the embedder must offer `prompt_learner()`
(vljax/embedder.py does); the image tower stays frozen and its embeddings are streamed once.
"""
from collections.abc import Sequence

import numpy as np

from vljax.adapt import coop as coop_lib
from vljax.evaluators import base, crossmodal, fewshot, prompts, registry, tip_adapter, zeroshot
from vljax.evaluators import data as data_lib

METHODS = ("zeroshot", "ridge", "crossmodal", "tip", "tip_f", "coop", "cocoop")


@registry.register("fewshot_adapt")
class FewShotAdaptEvaluator(fewshot.FewShotEvaluator):
    """See the module docstring."""
    DATA_KEYS = fewshot.FEWSHOT_DATA_KEYS

    def __init__(self, train_data, train_labels: Sequence[int], test_data,
                 test_labels: Sequence[int], class_names: Sequence[str], *, name: str,
                 methods: Sequence[str] = ("zeroshot", "ridge", "crossmodal", "tip", "tip_f"),
                 shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: int = 3,
                 templates: str | Sequence[str] = "clip80",
                 l2_regs: Sequence[float] = fewshot.DEFAULT_L2_REGS, holdout_per_class: int = 10,
                 alphas: Sequence[float] = tip_adapter.DEFAULT_ALPHAS,
                 betas: Sequence[float] = tip_adapter.DEFAULT_BETAS, tip_f_epochs: int = 20,
                 augment_views: int = 10, augment_crop_scale: Sequence[float] = (0.5, 1.0),
                 text_repeats: int = 1, coop: dict | None = None):
        """
        Args (beyond `FewShotEvaluator`'s):
          class_names: C names, prompts filled with them (canonicalised).
          methods: a subset of METHODS.
          templates: the zero-shot classifier's prompt templates (`prompts.TEMPLATES` key).
          alphas / betas: Tip-Adapter's search grids.
          tip_f_epochs: Tip-Adapter-F's fine-tuning epochs (the paper's 20).
          augment_views: augmented views per few-shot image for Tip-Adapter(-F)'s cache and
            training (the official augment_epoch, 10); 0: each image once, unaugmented.
          augment_crop_scale: the views' random resized crop area range (official (0.5, 1);
            (1, 1): horizontal flips only).
          text_repeats: the weight of each text sample in the cross-modal probe.
          coop: keyword arguments of `vljax.adapt.coop.CoOpConfig` (context length, steps, lr).
        """
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"{name}: unknown methods {unknown} (known: {list(METHODS)})")
        if augment_views < 0:
            raise ValueError(f"{name}: augment_views must be >= 0, got {augment_views}")
        if not (len(augment_crop_scale) == 2 and 0 < augment_crop_scale[0] <= augment_crop_scale[1] <= 1):
            raise ValueError(f"{name}: augment_crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, "
                             f"got {augment_crop_scale}")
        if holdout_per_class <= 0:
            raise ValueError(f"{name}: holdout_per_class must be positive (alpha, beta and l2 "
                             "are chosen on held-out train images)")
        super().__init__(train_data, train_labels, test_data, test_labels, name=name,
                         shots=shots, seeds=seeds, l2_regs=l2_regs,
                         holdout_per_class=holdout_per_class, num_classes=len(class_names))
        self.holdout = holdout_per_class
        self.splits = [self._split(seed) for seed in range(seeds)]
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.texts = prompts.class_texts(self.class_names, templates, None)
        self.methods, self.alphas, self.betas = tuple(methods), tuple(alphas), tuple(betas)
        self.tip_f_epochs, self.text_repeats = tip_f_epochs, text_repeats
        self.augment_views = int(augment_views)
        self.augment_crop_scale = tuple(float(x) for x in augment_crop_scale)
        self.coop = dict(coop or {})

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="fewshot_adapt", data=dict(name=...,
        label=..., per_class=40, ...), methods=[...], shots=[...], ...); the data entry as
        `FewShotEvaluator.from_config`'s (per_class must cover max(shots) + holdout_per_class)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        train, labels, test, test_labels, names = fewshot.fewshot_data(name, data)
        return cls(train, labels, test, test_labels, names, name=name, **kwargs)

    def _ridge(self, x, y, x_held, y_held, make):
        probe = make(x, y)
        held = [np.mean(probe.predict(x_held, r) == y_held) for r in range(len(self.l2_regs))]
        return probe, int(np.argmax(held))

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        used = np.unique(np.concatenate([np.concatenate(t + [h]) for t, h in self.splits]))
        feats, row, test, test_index = fewshot.embed_train_test(
            embedder, self.train_data, len(self.train_labels), used, self.test_data)
        y_test = self.test_labels[test_index]
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        scale = float(embedder.logit_scale)
        prefix = f"fewshot_adapt/{self.name}"
        out = {}
        if "zeroshot" in self.methods:
            out[f"{prefix}/zeroshot"] = float(np.mean(np.argmax(test @ ztxt.T, 1) == y_test))
        learner = None
        if {"coop", "cocoop"} & set(self.methods):
            learner = coop_lib.PromptLearner.from_embedder(embedder, self.class_names,
                                                           **self.coop)

        views, view_row = self.augmented_views(embedder, row)
        accs = {(m, k): [] for m in self.methods if m != "zeroshot" for k in self.shots}
        for seed, (train_sets, held) in enumerate(self.splits):
            held = held[row[held] >= 0]
            x_held, y_held = feats[row[held]], self.train_labels[held]
            for k, idx in zip(self.shots, train_sets):
                idx = idx[row[idx] >= 0]  # a record that cannot be read trains nothing
                x, y = feats[row[idx]], self.train_labels[idx]
                xv = views[:, view_row[idx]] if views is not None else x[None]
                for m in self.methods:
                    if m == "zeroshot":
                        continue
                    pred = self._predict(m, x, y, x_held, y_held, test, ztxt, scale, seed,
                                         learner, xv)
                    accs[(m, k)].append(float(np.mean(pred == y_test)))
        for (m, k), a in accs.items():
            out[f"{prefix}/{m}/{k}shot"] = float(np.mean(a))
            out[f"{prefix}/{m}/{k}shot_std"] = float(np.std(a))
        return out

    def augmented_views(self, embedder, row):
        """(views [V, U, D], view_row [num_train]: the column of `views` holding train record i)
        for the U readable few-shot images of every seed (the held-out images are not
        augmented), or (None, None) when no method takes views."""
        if not (self.augment_views and {"tip", "tip_f"} & set(self.methods)):
            return None, None
        shots = np.unique(np.concatenate([t[-1] for t, _ in self.splits]))  # nested: the largest
        shots = shots[row[shots] >= 0]
        subset = data_lib.Subset(self.train_data, shots)
        # Cropped straight to the model's input size (one resampling, as torchvision's
        # RandomResizedCrop(224)); an embedder that does not say its size gets square crops.
        size = getattr(embedder, "image_size", None)
        views = []
        for v in range(self.augment_views):
            z, index = base.image_embeddings(embedder, data_lib.AugmentedView(
                subset, view=v, crop_scale=self.augment_crop_scale, size=size))
            if len(index) != len(shots):  # readable unaugmented, so readable in every view
                raise ValueError(f"{self.name}: {len(shots) - len(index)} few-shot images could "
                                 f"not be read in augmented view {v}")
            views.append(z[np.argsort(index)])
        view_row = np.full(len(self.train_labels), -1)
        view_row[shots] = np.arange(len(shots))
        return np.stack(views), view_row

    def _predict(self, method, x, y, x_held, y_held, test, ztxt, scale, seed, learner, xv):
        """Test predictions [M] of `method` trained on (x [N, D], y [N]); xv [V, N, D]: the
        augmented views of x (x[None] without augmentation)."""
        if method == "ridge":
            probe, r = self._ridge(x, y, x_held, y_held, lambda a, b: fewshot.RidgeProbe(
                a, b, self.num_classes, self.l2_regs))
            return probe.predict(test, r)
        if method == "crossmodal":
            probe, r = self._ridge(x, y, x_held, y_held, lambda a, b: crossmodal.crossmodal_probe(
                a, b, ztxt, self.l2_regs, self.text_repeats))
            return probe.predict(test, r)
        if method in ("tip", "tip_f"):
            keys, values = tip_adapter.cache_keys(xv), tip_adapter.one_hot(y, self.num_classes)
            if method == "tip_f":
                keys = tip_adapter.finetune_keys(xv, y, keys, values, ztxt, scale,
                                                 epochs=self.tip_f_epochs, seed=seed)
            alpha, beta, _ = tip_adapter.search(x_held, y_held, keys, values, ztxt, scale,
                                                self.alphas, self.betas)
            return np.argmax(np.asarray(tip_adapter.tip_logits(
                test, keys, values, ztxt, scale, alpha, beta)), axis=1)
        if method == "coop":
            return learner.fit_coop(x, y, seed=seed).predict(test)
        if method == "cocoop":
            return learner.fit_cocoop(x, y, seed=seed).predict(test)
        raise ValueError(f"unknown method {method!r}")

