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

from vljax.evaluators import base

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


class FewShotEvaluator(base.Evaluator):
    """Metrics "fewshot/<name>/<k>shot" (mean test accuracy over seeds) and
    ".../<k>shot_std" for each k of `shots`."""

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray, *, name: str,
                 shots: Sequence[int] = (1, 5, 10, 25), seeds: int = 3,
                 l2_regs: Sequence[float] = DEFAULT_L2_REGS, holdout_per_class: int = 10,
                 standardize: bool = False, num_classes: int | None = None,
                 batch_size: int = 256):
        """
        Args:
          train_images / test_images: [N, H, W, 3] float32, preprocessed.
          train_labels / test_labels: [N] ints.
          l2_regs: one value (fixed) or a grid chosen from on the held-out train images.
          standardize: divide centred features by their std (big_vision's preprocessing).
          num_classes: defaults to 1 + the largest label.
        """
        self.train_images, self.test_images = train_images, test_images
        self.train_labels = np.asarray(train_labels, np.int64)
        self.test_labels = np.asarray(test_labels, np.int64)
        self.num_classes = num_classes or int(max(self.train_labels.max(),
                                                  self.test_labels.max())) + 1
        self.shots, self.seeds = tuple(sorted(shots)), seeds
        # Descending, so that argmax over held-out accuracy breaks ties to the stronger l2.
        self.l2_regs = tuple(sorted(l2_regs, reverse=True))
        self.holdout = holdout_per_class if len(self.l2_regs) > 1 else 0
        self.standardize, self.name, self.batch_size = standardize, name, batch_size
        self.splits = [self._split(seed) for seed in range(seeds)]

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
        # Embed only the train images some seed uses: a large train split is never embedded.
        used = np.unique(np.concatenate([np.concatenate(t + [h]) for t, h in self.splits]))
        feats = base.embed_images(embedder, self.train_images, self.batch_size, indices=used)
        test = base.embed_images(embedder, self.test_images, self.batch_size)

        def features(idx):
            return feats[np.searchsorted(used, idx)]  # `used` is sorted and holds idx

        accs = {k: [] for k in self.shots}
        for train_sets, held in self.splits:
            for k, idx in zip(self.shots, train_sets):
                probe = RidgeProbe(features(idx), self.train_labels[idx], self.num_classes,
                                   self.l2_regs, self.standardize)
                best = 0
                if len(self.l2_regs) > 1:
                    x_held, y_held = features(held), self.train_labels[held]
                    held_acc = [np.mean(probe.predict(x_held, r) == y_held)
                                for r in range(len(self.l2_regs))]
                    best = int(np.argmax(held_acc))
                accs[k].append(float(np.mean(probe.predict(test, best) == self.test_labels)))
        out = {}
        for k, a in accs.items():
            out[f"fewshot/{self.name}/{k}shot"] = float(np.mean(a))
            out[f"fewshot/{self.name}/{k}shot_std"] = float(np.std(a))
        return out
