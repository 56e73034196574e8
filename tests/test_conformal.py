"""ReaL-style accuracy and split-conformal label sets: against loops and the reference quantile
of Angelopoulos & Bates (the k-th smallest score, k = ceil((n+1)(1-alpha))), the coverage guarantee of their
Theorem 1 over random splits, the refusal of a calibration split too small for alpha, and the
multi-label evaluator's keys."""
import math

import numpy as np
import pytest
from test_evaluators import TableEmbedder, index_images, normalize

from vljax.evaluators import conformal
from vljax.evaluators.multilabel import MultilabelEvaluator


def _data(n, labels=10, seed=0):
    """n images with 1-3 of `labels` labels; scores the labels' indicator plus noise."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, labels), bool)
    for row in targets:
        row[rng.choice(labels, rng.integers(1, 4), replace=False)] = True
    return targets + 0.8 * rng.normal(size=targets.shape), targets


def test_real_accuracy_counts_any_valid_label():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.8], [0.3, 0.2, 0.1], [1.0, 0.0, 0.0]])
    targets = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]], bool)
    # Image 0: top-1 label 0 is not valid; 1: tie of 1 and 2 -> 1, valid; 2: 0, valid; 3 no label.
    assert conformal.real_accuracy(scores, targets) == pytest.approx(2 / 3)
    loop = np.mean([targets[i, int(np.argmax(scores[i]))] for i in range(3)])
    assert conformal.real_accuracy(scores, targets) == pytest.approx(loop)
    with pytest.raises(ValueError, match="no image has a valid label"):
        conformal.real_accuracy(scores, np.zeros_like(targets))


def test_qhat_is_the_papers_quantile_and_sets_hold_every_label_above_it():
    scores, targets = _data(57)
    targets[5] = False  # unlabeled: not a calibration point
    r = np.array([-min(scores[i, j] for j in np.flatnonzero(targets[i])) for i in range(57) if targets[i].any()])
    n = len(r)
    for alpha in (0.05, 0.1, 0.3):
        k = math.ceil((n + 1) * (1 - alpha))
        # The k-th smallest: numpy's "inverted_cdf" quantile at k / n. (The paper's code's
        # method="higher" takes index ceil(k (n - 1) / n), the (k+1)-th smallest for k < n.)
        ref = np.quantile(r, k / n, method="inverted_cdf")
        qhat = conformal.calibrate(scores, targets, alpha)
        assert qhat == ref == np.sort(r)[k - 1]
        sets = conformal.label_sets(scores, qhat)
        np.testing.assert_array_equal(sets, scores >= -qhat)
    cov, size = conformal.coverage_and_size(sets, targets)
    labeled = targets.any(1)
    assert cov == pytest.approx(np.mean([set(np.flatnonzero(targets[i])) <= set(np.flatnonzero(sets[i]))
                                         for i in np.flatnonzero(labeled)]))
    assert size == pytest.approx(sets[labeled].sum(1).mean())


def test_coverage_guarantee_over_random_splits():
    """Theorem 1: 1 - alpha <= P(cover) <= 1 - alpha + 1/(n+1), here averaged over 200 splits."""
    scores, targets = _data(1100, seed=1)
    rng = np.random.default_rng(2)
    alpha, n = 0.1, 99
    covs, sizes = [], []
    for _ in range(200):
        perm = rng.permutation(len(scores))
        cal, test = perm[:n], perm[n:]
        qhat = conformal.calibrate(scores[cal], targets[cal], alpha)
        cov, size = conformal.coverage_and_size(conformal.label_sets(scores[test], qhat), targets[test])
        covs.append(cov)
        sizes.append(size)
    assert 1 - alpha - 0.008 <= np.mean(covs) <= 1 - alpha + 1 / (n + 1) + 0.008
    assert np.mean(sizes) < 10  # informative: fewer than all labels


def test_too_small_calibration_split_is_refused():
    assert conformal.min_calibration_size(0.1) == 9 and conformal.min_calibration_size(0.05) == 19
    scores, targets = _data(9)
    conformal.calibrate(scores, targets, 0.1)  # n = 9 = 1/alpha - 1: the largest score
    with pytest.raises(ValueError, match=r"cal split: 8 labeled calibration images are too few for alpha=0.1"):
        conformal.calibrate(scores[:8], targets[:8], 0.1, where="cal split")
    with pytest.raises(ValueError, match="alpha=1.5 is not in"):
        conformal.calibrate(scores, targets, 1.5)


def test_multilabel_evaluator_reports_real_and_conformal_metrics():
    rng = np.random.default_rng(3)
    dirs = normalize(rng.normal(size=(6, 16)))
    targets = np.zeros((300, 6), bool)
    for row in targets:
        row[rng.choice(6, rng.integers(1, 3), replace=False)] = True
    table = normalize(targets @ dirs + 0.4 * rng.normal(size=(300, 16)))
    names = [f"l{j}" for j in range(6)]
    texts = {n: dirs[j] for j, n in enumerate(names)}
    labels = [np.flatnonzero(r) for r in targets]
    images = index_images(300)
    ev = MultilabelEvaluator(images[:200], labels[:200], names, name="toy", templates="name",
                             calibration=(images[200:], labels[200:]), alphas=(0.1, 0.2))
    got = ev.run(TableEmbedder(table, texts))
    scores = normalize(table) @ normalize(dirs).T
    assert got["multilabel/toy/real_top1"] == pytest.approx(conformal.real_accuracy(scores[:200], targets[:200]))
    for alpha in (0.1, 0.2):
        qhat = conformal.calibrate(scores[200:], targets[200:], alpha)
        cov, size = conformal.coverage_and_size(conformal.label_sets(scores[:200], qhat), targets[:200])
        assert got[f"multilabel/toy/conformal_coverage@{alpha:g}"] == pytest.approx(cov)
        assert got[f"multilabel/toy/conformal_size@{alpha:g}"] == pytest.approx(size)
    assert got["multilabel/toy/conformal_size@0.2"] <= got["multilabel/toy/conformal_size@0.1"]
    with pytest.raises(ValueError, match=r"`evals.toy.calibration`: 5 labeled calibration images"):
        MultilabelEvaluator(images[:200], labels[:200], names, name="toy", templates="name",
                            calibration=(images[200:205], labels[200:205]), alphas=(0.1,))


def test_calibration_entry_is_opened_and_checked(tmp_path):
    """`evals.<name>.calibration` is a data entry of any source kind: its label space must be the
    evaluated one, and it must hold enough labeled images for each alpha, both before any work."""
    from helpers import make_shapes_manifest
    path = make_shapes_manifest(str(tmp_path))
    data = dict(source="jsonl", path=path, num_labels=3)
    ev = MultilabelEvaluator.from_config("toy", dict(type="multilabel", data=data, templates="name",
                                                     calibration=dict(data, max_examples=20), alphas=(0.1,)))
    assert len(ev.calibration[0]) == 20 and ev.calibration[1].shape == (20, 3)
    with pytest.raises(ValueError, match=r"`evals.toy.calibration`: its label names are not those"):
        MultilabelEvaluator.from_config("toy", dict(data=data, calibration=dict(data, num_labels=4)))
    with pytest.raises(ValueError, match=r"`evals.toy.calibration`: 8 labeled calibration images are too few"):
        MultilabelEvaluator.from_config("toy", dict(data=data, calibration=dict(data, max_examples=8), alphas=(0.1,)))
