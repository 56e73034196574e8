"""Multi-label evaluation beyond rankings: ReaL-style accuracy and conformal label sets (numpy).

ReaL accuracy (Beyer et al. 2020, "Are we done with ImageNet?", Sec. 3): the top-1 prediction
counts as correct when it is ANY of the image's valid labels; images without a valid label are
left out (as ReaL leaves out the images its raters gave no label).

Conformal label sets: split conformal prediction (Angelopoulos & Bates, "A Gentle Introduction to
Conformal Prediction and Distribution-Free Uncertainty Quantification", arXiv 2107.07511, Sec. 1,
the recipe and Theorem 1), with a multi-label score chosen here: the nonconformity of a labeled
image is minus the score of its LOWEST-scored true label,

    r_i = -min_{l in Y_i} s_il,

the LAC score (Sec. 1's 1 - softmax of the true class, Sadinle et al. 2019) taken at the worst of the
image's labels, so a set covers an image when it holds every one of its labels. With the n
calibration images' scores, qhat is their ceil((n + 1)(1 - alpha))-th smallest (Sec. 1: the
ceil((n+1)(1-alpha))/n empirical quantile), and the set of a test image is
C(x) = {l : -s_l <= qhat}, all labels scoring at least -qhat. Exchangeable calibration and test
images give P(Y_test subset of C(X_test)) >= 1 - alpha (Theorem 1). It needs
ceil((n + 1)(1 - alpha)) <= n, i.e. n >= 1/alpha - 1; a smaller calibration split is refused.
Scores s are any per-label scores where higher means more likely (here cosine similarities to the
label prompts; sigmoid(t s + b) gives the same sets).
"""
from __future__ import annotations

import math

import numpy as np


def real_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of the images with a valid label whose top-1 label (ties: lower index) is one of
    them. scores [N, L], targets [N, L] bool."""
    targets = np.asarray(targets, bool)
    labeled = targets.any(1)
    if not labeled.any():
        raise ValueError("ReaL accuracy: no image has a valid label")
    top1 = np.argmax(scores, axis=1)  # first maximum: the lower index on ties
    return float(targets[np.arange(len(top1)), top1][labeled].mean())


def nonconformity(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """r_i = -min over image i's labels of its scores, for the images with a label: [n]."""
    targets = np.asarray(targets, bool)
    labeled = targets.any(1)
    return -np.where(targets, scores, np.inf).min(axis=1)[labeled]


def min_calibration_size(alpha: float) -> int:
    """The smallest n with ceil((n + 1)(1 - alpha)) <= n (about 1/alpha - 1)."""
    n = 1
    while math.ceil((n + 1) * (1 - alpha) - 1e-9) > n:
        n += 1
    return n


def check_calibration_size(n: int, alpha: float, where: str = "calibration") -> None:
    """Raises, naming `where`, when alpha is not in (0, 1) or n labeled calibration images are
    fewer than `min_calibration_size(alpha)` (qhat would be infinite: every set all labels)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{where}: alpha={alpha} is not in (0, 1)")
    need = min_calibration_size(alpha)
    if n < need:
        raise ValueError(f"{where}: {n} labeled calibration images are too few for alpha={alpha} "
                         f"(split conformal needs n >= 1/alpha - 1 = {need}: ceil((n+1)(1-alpha)) <= n)")


def calibrate(scores: np.ndarray, targets: np.ndarray, alpha: float, where: str = "calibration") -> float:
    """qhat of split conformal prediction at level alpha from the calibration images' scores
    [n, L] and label sets [n, L] bool (images without a label are not counted in n). Raises,
    naming `where`, when alpha is not in (0, 1) or n < the `min_calibration_size(alpha)`."""
    r = np.sort(nonconformity(scores, targets))
    n = len(r)
    check_calibration_size(n, alpha, where)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return float(r[k - 1])


def label_sets(scores: np.ndarray, qhat: float) -> np.ndarray:
    """[N, L] bool: the conformal sets {l : -s_l <= qhat}."""
    return -np.asarray(scores) <= qhat


def coverage_and_size(sets: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(fraction of the labeled images whose label set is inside their predicted set, mean set
    size over those images)."""
    targets = np.asarray(targets, bool)
    labeled = targets.any(1)
    covered = ~(targets & ~sets).any(1)
    return float(covered[labeled].mean()), float(sets[labeled].sum(1).mean())
