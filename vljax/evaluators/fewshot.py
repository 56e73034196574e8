"""Few-shot linear probe on frozen image embeddings, solved in closed form (ridge regression),
after big_vision's fewshot_lsr evaluator.

For each seed, `shots` images per class are drawn from the train split. Features are centred
on those images' mean; with `standardize=True` they are also divided by their per-dimension
std, as big_vision does. Centring alone is the default: it keeps the embedding's geometry
(ridge is then rotation invariant), whereas a std estimated from one image per class blows
noise dimensions up to the size of informative ones (on separable clusters, 1-shot accuracy
drops from 100% to 54% in our test). Targets are one-hot rescaled to {-1, +1}
(big_vision's choice; the argmax is the same as with 0/1 targets, since the bias absorbs the
offset and the scale cancels).

The bias is fitted exactly and left unregularised: features and targets are centred, the
weights solve the ridge problem on the centred data, the bias is the target mean. Weights:

    W = (X^T X + l2 I)^-1 X^T Y   (primal, N >= D)   =   X^T (X X^T + l2 I)^-1 Y   (dual, N < D)

both read off one eigendecomposition, so a whole grid of l2 costs one decomposition.

The l2 strength is fixed when `l2_regs` holds one value; otherwise it is chosen per seed and
shot count by accuracy on a held-out part of the train split (`holdout_per_class` further
images per class, disjoint from every shot's training images; ties go to the stronger l2).
The test accuracy is reported as the mean and the (population) std over seeds.
"""
from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base, registry
from vljax.evaluators import data as data_lib

DEFAULT_L2_REGS = tuple(2.0 ** k for k in range(-4, 16, 2))


def ridge_fit(x: np.ndarray, y: np.ndarray, l2_regs: Sequence[float]) -> np.ndarray:
    """Ridge weights for every l2 in `l2_regs`, in the cheaper of primal and dual form.

    Args:
      x: [N, D] features, y: [N, C] targets (no bias term: centre both beforehand).
    Returns:
      [R, D, C] with W_r = argmin |x W - y|^2 + l2_r |W|^2.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if min(l2_regs) <= 0:
        raise ValueError("l2 strengths must be positive")
    if len(x) >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)      # D x D
        lhs, rhs = q, q.T @ (x.T @ y)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)      # N x N
        lhs, rhs = x.T @ q, q.T @ y
    return np.stack([(lhs / (eigs + l2)) @ rhs for l2 in l2_regs])


class RidgeProbe:
    """A linear classifier fitted by `ridge_fit` on centred features, {-1, 1} targets."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int,
                 l2_regs: Sequence[float], standardize: bool = False):
        """x: [N, D] train features, labels: [N]. Keeps one classifier per l2 in `l2_regs`."""
        x = np.asarray(x, np.float64)
        self.mean = x.mean(axis=0)
        # + 1e-5 as big_vision: a constant feature stays 0 instead of dividing by 0.
        self.std = x.std(axis=0) + 1e-5 if standardize else np.ones(x.shape[1])
        y = 2.0 * np.eye(num_classes)[labels] - 1.0
        self.bias = y.mean(axis=0)
        self.weights = ridge_fit((x - self.mean) / self.std, y - self.bias, l2_regs)

    def predict(self, x: np.ndarray, reg: int = 0, batch_size: int = 4096) -> np.ndarray:
        """x: [M, D] -> [M] predicted classes with the classifier of l2_regs[reg]."""
        preds = []
        for s in base.batch_slices(len(x), batch_size):  # bounds the [batch, C] scores
            z = (np.asarray(x[s], np.float64) - self.mean) / self.std
            preds.append(np.argmax(z @ self.weights[reg] + self.bias, axis=1))
        return np.concatenate(preds)


def embed_train_test(embedder: base.Embedder, train_data, num_train: int, used: np.ndarray,
                     test_data):
    """Embeds only the train records in `used` (a large train split is never embedded whole)
    and the test set.

    Returns (feats [M, D], row [num_train]: the row of feats holding train record i, -1 when
    it was not used or could not be read, test [T, D], test_index [T] readable test records).
    """
    feats, readable = base.image_embeddings(embedder, data_lib.Subset(train_data, used))
    row = np.full(num_train, -1)
    row[used[readable]] = np.arange(len(readable))
    test, test_index = base.image_embeddings(embedder, test_data)
    return feats, row, test, test_index


FEWSHOT_DATA_KEYS = ("name", "label", "label_key", "train_split", "test_split", "per_class",
                     "data_dir", "max_examples", "source")


def fewshot_data(name: str, data: dict):
    """(train subset, train labels, test source, test labels, class names) of the few-shot data
    entry `evals.<name>.data` (see `FewShotEvaluator.from_config`): a train and a test split
    (`data.open_splits`), TFDS or a source entry of any kind."""
    data_lib.check_keys(name, data, FEWSHOT_DATA_KEYS)
    per_class = int(data.get("per_class", 40))
    splits = data_lib.open_splits(name, data, {"train": "train", "test": "test"})
    label_key = data.get("label") or data.get("label_key")
    train, train_labels, names = data_lib.labelled(name, splits["train"], label_key)
    chosen, labels, counts = [], [], {}
    for i, y in enumerate(train_labels):
        if counts.get(y, 0) < per_class:
            counts[y] = counts.get(y, 0) + 1
            chosen.append(i)
            labels.append(y)
    test, test_labels, _ = data_lib.labelled(name, splits["test"], label_key, data.get("max_examples"))
    return data_lib.Subset(train, chosen), labels, test, test_labels, names


@registry.register("fewshot")
class FewShotEvaluator(base.Evaluator):
    """Metrics "fewshot/<name>/<k>shot" (mean test accuracy over seeds) and
    ".../<k>shot_std" for each k of `shots`."""
    DATA_KEYS = FEWSHOT_DATA_KEYS

    def __init__(self, train_data, train_labels: Sequence[int], test_data,
                 test_labels: Sequence[int], *, name: str,
                 shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 3,
                 l2_regs: Sequence[float] = DEFAULT_L2_REGS, holdout_per_class: int = 10,
                 standardize: bool = False, num_classes: int | None = None):
        """
        Args:
          train_data / test_data: the images, sources (vljax/evaluators/data.py); of the train
            records only those some seed uses are ever embedded.
          train_labels / test_labels: [N] ints, one per record.
          l2_regs: one value (fixed) or a grid chosen from on the held-out train images.
          standardize: divide centred features by their std (big_vision's preprocessing).
          num_classes: defaults to 1 + the largest label.
        """
        self.train_data, self.test_data = train_data, test_data
        self.train_labels = np.asarray(train_labels, np.int64)
        self.test_labels = np.asarray(test_labels, np.int64)
        if len(train_data) != len(self.train_labels) or len(test_data) != len(self.test_labels):
            raise ValueError(f"{name}: records and labels differ in number (train "
                             f"{len(train_data)} vs {len(self.train_labels)}, test "
                             f"{len(test_data)} vs {len(self.test_labels)})")
        self.num_classes = num_classes or int(max(self.train_labels.max(),
                                                  self.test_labels.max())) + 1
        self.shots, self.seeds = tuple(sorted(shots)), seeds
        # Descending, so that argmax over held-out accuracy breaks ties to the stronger l2.
        self.l2_regs = tuple(sorted(l2_regs, reverse=True))
        self.holdout = holdout_per_class if len(self.l2_regs) > 1 else 0
        self.standardize, self.name = standardize, name
        self.splits = [self._split(seed) for seed in range(seeds)]

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="fewshot", data=dict(name=...,
        label=..., train_split="train", test_split="test", per_class=40, max_examples=...),
        shots=..., ...), or with a source entry of any kind for the two splits, e.g.
        data=dict(source="jsonl", path="test.jsonl", train_path="train.jsonl", class_names=[...])
        (vljax/evaluators/data.py).

        Only the first `per_class` train records of each class (storage order: a fixed
        pseudo-random sample) make the train set, enough for 25 shots plus a held-out set,
        instead of the whole train split; reading their labels decodes no image.
        max_examples caps the test split.
        """
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        train, labels, test, test_labels, _ = fewshot_data(name, data)
        return cls(train, labels, test, test_labels, name=name, **kwargs)

    def _split(self, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Per seed: train indices of the first `shots` images of each class for every shot
        count (nested: 5-shot contains 1-shot), and the held-out indices after max(shots)."""
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(np.flatnonzero(self.train_labels == c))
                 for c in range(self.num_classes)]
        top = self.shots[-1]
        train = [np.concatenate([p[:k] for p in perms]) for k in self.shots]
        held = np.concatenate([p[top:top + self.holdout] for p in perms])
        if self.holdout and not len(held):
            raise ValueError("no train images left for choosing l2: give one fixed l2_regs")
        return train, held

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        # Embed only the train records some seed uses: a large train split is never embedded.
        used = np.unique(np.concatenate([np.concatenate(t + [h]) for t, h in self.splits]))
        feats, row, test, test_index = embed_train_test(
            embedder, self.train_data, len(self.train_labels), used, self.test_data)
        test_labels = self.test_labels[test_index]

        def readable_only(idx):  # a record that cannot be read trains no probe
            return idx[row[idx] >= 0]

        def features(idx):
            return feats[row[idx]]

        accs = {k: [] for k in self.shots}
        for train_sets, held in self.splits:
            held = readable_only(held)
            for k, idx in zip(self.shots, train_sets):
                idx = readable_only(idx)
                probe = RidgeProbe(features(idx), self.train_labels[idx], self.num_classes,
                                   self.l2_regs, self.standardize)
                best = 0
                if len(self.l2_regs) > 1:
                    x_held, y_held = features(held), self.train_labels[held]
                    held_acc = [np.mean(probe.predict(x_held, r) == y_held)
                                for r in range(len(self.l2_regs))]
                    best = int(np.argmax(held_acc))
                accs[k].append(float(np.mean(probe.predict(test, best) == test_labels)))
        out = {}
        for k, a in accs.items():
            out[f"fewshot/{self.name}/{k}shot"] = float(np.mean(a))
            out[f"fewshot/{self.name}/{k}shot_std"] = float(np.std(a))
        return out
