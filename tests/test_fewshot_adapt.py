"""Few-shot adaptation: Tip-Adapter(-F) against the paper's equations written out, the cross-modal
probe, and the evaluator's protocol (choices on held-out train images only) on constructed data."""
import numpy as np
import pytest
from test_evaluators import TableEmbedder, index_images, normalize

from vljax.evaluators import EVALUATORS, crossmodal, fewshot, fewshot_adapt, tip_adapter


def _reference_tip(f, keys, labels, w, scale, alpha, beta, num_classes):
    """Eq. 3-4 of Zhang et al. one test image and one cache entry at a time."""
    out = []
    for fi in f:
        logits = scale * np.array([fi @ w[c] for c in range(num_classes)])
        for k, y in zip(keys, labels):
            logits[y] += alpha * np.exp(-beta * (1.0 - fi @ k))
        out.append(logits)
    return np.array(out)


def test_tip_logits_equal_the_equations():
    rng = np.random.default_rng(0)
    f, keys, w = (normalize(rng.normal(size=s)) for s in ((5, 8), (6, 8), (3, 8)))
    labels = np.array([0, 0, 1, 1, 2, 2])
    got = tip_adapter.tip_logits(f, keys, tip_adapter.one_hot(labels, 3), w, 7.0, 2.5, 3.0)
    ref = _reference_tip(f, keys, labels, w, 7.0, 2.5, 3.0, 3)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_search_grid_is_the_official_one():
    # utils.search_hp of gaopengcuhk/Tip-Adapter, search_scale 7 and 3, search_step 200 and 20.
    betas, alphas = tip_adapter.search_grid(7, 200), tip_adapter.search_grid(3, 20)
    assert len(betas) == 200 and betas[0] == 0.1 and betas[1] == 0.1345 and betas[-1] == 6.9655
    assert alphas[:3] == (0.1, 0.245, 0.39) and alphas[-1] == 2.855
    assert max(tip_adapter.DEFAULT_BETAS) == tip_adapter.search_grid(50, 200)[-1]


def test_search_is_the_best_pair_of_the_equations_on_held_out_images():
    rng = np.random.default_rng(5)
    f, keys, w = (normalize(rng.normal(size=s)) for s in ((40, 8), (9, 8), (3, 8)))
    labels, y = np.repeat(np.arange(3), 3), rng.integers(0, 3, 40)
    alphas, betas = (0.0, 0.5, 2.0, 8.0), (1.0, 4.0, 16.0)
    accs = {(a, b): np.mean(np.argmax(_reference_tip(f, keys, labels, w, 3.0, a, b, 3), 1) == y)
            for a in alphas for b in betas}
    best = max(accs.values())
    # Ties: the smallest alpha, then the smallest beta.
    want = min((a, b) for (a, b), acc in accs.items() if acc == best)
    got = tip_adapter.search(f, y, keys, tip_adapter.one_hot(labels, 3), w, 3.0,
                             alphas[::-1], betas[::-1])
    assert got[:2] == want and got[2] == pytest.approx(best)


def test_tip_f_step_is_adamw_on_the_gradient_of_the_equations():
    # One epoch of at most 256 images = one full-batch AdamW step (torch semantics: decoupled
    # weight decay lr * wd * k, eps outside the square root; first step: m^ = g, v^ = g^2).
    rng = np.random.default_rng(6)
    f, keys, w = (normalize(rng.normal(size=s)) for s in ((12, 8), (6, 8), (3, 8)))
    y, labels = rng.integers(0, 3, 12), np.repeat(np.arange(3), 2)
    values, scale, alpha, beta, lr, wd = tip_adapter.one_hot(labels, 3), 5.0, 1.5, 2.0, 1e-2, 0.01
    logits = _reference_tip(f, keys, labels, w, scale, alpha, beta, 3)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    affinity = np.exp(-beta * (1.0 - f @ keys.T))                     # [M, NK]
    dlogits = (p - np.eye(3)[y]) / len(y)                               # d mean CE / d logits
    grad = alpha * beta * ((dlogits @ values.T) * affinity).T @ f       # [NK, D]
    want = keys - lr * wd * keys - lr * grad / (np.abs(grad) + 1e-4)
    got = tip_adapter.finetune_keys(f, y, keys, values, w, scale, alpha=alpha, beta=beta,
                                    epochs=1, lr=lr, weight_decay=wd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cache_keys_average_the_views_and_tip_f_trains_on_view_e_mod_v():
    rng = np.random.default_rng(8)
    v0, v1 = normalize(rng.normal(size=(12, 8))), normalize(rng.normal(size=(12, 8)))
    mean = (v0 + v1) / 2
    np.testing.assert_allclose(tip_adapter.cache_keys(np.stack([v0, v1])),
                               mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-6)
    w, y = normalize(rng.normal(size=(3, 8))), rng.integers(0, 3, 12)
    keys, values = normalize(rng.normal(size=(6, 8))), tip_adapter.one_hot(np.arange(6) % 3, 3)

    def tune(views, epochs):
        return tip_adapter.finetune_keys(np.asarray(views), y, keys, values, w, 5.0,
                                         epochs=epochs, lr=1e-2)
    # Epoch 0 trains on view 0 (so one view is the unaugmented call), epoch 1 on view 1, and the
    # views cycle: V = 3 and V = 2 agree over 2 epochs.
    np.testing.assert_allclose(tune([v0, v1], 1), tune(v0, 1), rtol=1e-6)
    np.testing.assert_allclose(tune([v0, v0], 2), tune(v0, 2), rtol=1e-6)
    np.testing.assert_allclose(tune([v0, v1, v0], 2), tune([v0, v1], 2), rtol=1e-6)
    assert np.abs(tune([v0, v1], 2) - tune([v0, v0], 2)).max() > 1e-4


def _square_image(size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


class _Records(list):
    """Records in memory, a source (it names its records for the embedder's cache)."""

    def cache_key(self):
        return "test-records"


def test_augmented_view_is_a_fixed_crop_and_flip_of_each_record():
    from vljax.embedder import data_key
    from vljax.evaluators.data import AugmentedView, Subset
    img = _square_image()
    records = _Records([{"image": img, "captions": [""], "label": 0}, {"image": b"not an image"},
                        {"image": np.zeros((30, 50, 3), np.uint8), "captions": [""], "label": 1}])
    view = AugmentedView(records, view=0, seed=3)
    np.testing.assert_array_equal(view[0]["image"], AugmentedView(records, 0, 3)[0]["image"])
    assert view[0]["label"] == 0 and view[1] is records[1]  # undecodable: passed on unchanged
    side = view[2]["image"].shape[0]                           # a square, no larger than the crop
    assert view[2]["image"].shape == (side, side, 3) and 0.5 * 30 <= side <= 50
    # A crop of the whole square image is the image itself or its mirror, and both occur.
    whole = [AugmentedView(records, v, crop_scale=(1.0, 1.0))[0]["image"] for v in range(40)]
    same = [np.array_equal(x, img) for x in whole]
    mirror = [np.array_equal(x, img[:, ::-1]) for x in whole]
    assert all(a or b for a, b in zip(same, mirror)) and 10 < sum(same) < 30
    # With the model's size: cropped straight to it, and the eval transform leaves it as it is
    # (resampled once, as torchvision's RandomResizedCrop(224)).
    from PIL import Image

    from vljax.data import transforms as T
    sized = AugmentedView(records, view=0, seed=3, size=24)
    for i in (0, 2):
        x = sized[i]["image"]
        assert x.shape == (24, 24, 3)
        np.testing.assert_array_equal(np.asarray(T.resize_small_center_crop(Image.fromarray(x), 24)), x)
    assert repr(sized) != repr(view) and data_key(sized) != data_key(view)
    crops = [AugmentedView(records, v, flip=False)[0]["image"] for v in range(5)]
    assert len({x.tobytes() for x in crops}) == 5 and img.tobytes() not in {x.tobytes() for x in crops}
    # Distinct views and subsets have distinct cache keys and reprs (the feature store's key).
    assert data_key(AugmentedView(records, 0)) != data_key(AugmentedView(records, 1))
    assert repr(AugmentedView(records, 0)) != repr(AugmentedView(records, 1))
    assert repr(Subset(records, [0, 1])) != repr(Subset(records, [0, 2]))


class _ViewRecordingEmbedder(TableEmbedder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.views = []

    def embed_images(self, data):
        if hasattr(data, "augmentation"):
            self.views.append((data.view, [data[i] for i in range(len(data))]))
        return super().embed_images(data)


def test_adapt_evaluator_augments_only_the_few_shot_images_for_tip():
    ev, emb = _evaluator_case(True, augment_views=3)
    emb = _ViewRecordingEmbedder(emb.image_table, emb.text_table)
    plain = _evaluator_case(True, augment_views=0)[0].run(emb)
    assert emb.views == []
    got = ev.run(emb)
    shots = {ev.train_data[i] for train_sets, _ in ev.splits for i in train_sets[-1]}
    assert [v for v, _ in emb.views] == [0, 1, 2]
    assert all(set(records) == shots and len(records) == len(shots) for _, records in emb.views)
    assert not shots & set(ev.test_data)  # (a seed's held-out images may be another's shots)
    # The table embedder gives every view the image's own embedding: the mean of equal views is
    # the unaugmented key, so every metric is the unaugmented evaluator's.
    assert got == pytest.approx(plain, abs=1e-9)
    ridge_only = _evaluator_case(True, augment_views=3, methods=("zeroshot", "ridge"))[0]
    emb.views.clear()
    ridge_only.run(emb)
    assert emb.views == []


def _clusters(seed, n_per_class, num_classes=4, dim=16, noise=0.35):
    rng = np.random.default_rng(seed)
    centers = normalize(rng.normal(size=(num_classes, dim)))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    x = normalize(centers[labels] + noise * rng.normal(size=(len(labels), dim)))
    return centers, x, labels


def test_search_keeps_zero_shot_when_the_cache_is_noise_and_uses_a_good_cache():
    centers, x, y = _clusters(0, 20)
    tr, he = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1  # both hold every class
    values = tip_adapter.one_hot(y[tr], 4)
    # Text weights are the class centres (a perfect zero-shot classifier); keys with shuffled
    # labels only hurt: the search must pick alpha = 0.
    bad = tip_adapter.one_hot(np.random.default_rng(1).permutation(y[tr]), 4)
    alpha, _, acc = tip_adapter.search(x[he], y[he], x[tr], bad, centers, 10.0)
    assert alpha == 0.0
    assert acc == np.mean(np.argmax(x[he] @ centers.T, 1) == y[he])
    # Useless text weights (all classes alike) and a correct cache: the cache must carry it.
    alpha, _, acc = tip_adapter.search(x[he], y[he], x[tr], values,
                                       np.tile(centers[:1], (4, 1)), 10.0)
    assert alpha > 0 and acc > 0.9


def test_tip_f_lowers_the_training_loss_and_leaves_values_alone():
    centers, x, y = _clusters(2, 8, noise=0.8)
    values = tip_adapter.one_hot(y, 4)
    w = np.tile(centers[:1], (4, 1))

    def loss(k):
        logits = np.asarray(tip_adapter.tip_logits(x, k, values, w, 10.0, 1.0, 1.0))
        logits = logits - logits.max(1, keepdims=True)
        return -np.mean(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(1)))

    keys = tip_adapter.finetune_keys(x, y, x, values, w, 10.0, epochs=50, lr=1e-2)
    assert keys.shape == x.shape and not np.allclose(keys, x)
    assert loss(keys) < loss(x) - 0.05


def test_crossmodal_probe_uses_text_as_samples():
    # One shot per class far off its centre: text embeddings (the centres) fix the probe.
    centers, x, y = _clusters(3, 30, noise=0.35)
    one_shot = np.array([np.flatnonzero(y == c)[0] for c in range(4)])
    test = np.setdiff1d(np.arange(len(y)), one_shot)
    accs = {}
    for name, probe in (
            ("ridge", fewshot.RidgeProbe(x[one_shot], y[one_shot], 4, [0.1])),
            ("crossmodal", crossmodal.crossmodal_probe(x[one_shot], y[one_shot], centers,
                                                       [0.1], text_repeats=4))):
        accs[name] = np.mean(probe.predict(x[test]) == y[test])
    assert accs["crossmodal"] > accs["ridge"] + 0.1
    # Text samples alone (no image) already give the nearest-centre classifier's accuracy.
    only_text = crossmodal.crossmodal_probe(np.zeros((0, 16)), np.zeros(0, int), centers, [0.1])
    nearest = np.mean(np.argmax(x[test] @ centers.T, 1) == y[test])
    assert np.mean(only_text.predict(x[test]) == y[test]) == pytest.approx(nearest, abs=0.02)


def _evaluator_case(text_good: bool, augment_views: int = 10,
                    methods=("zeroshot", "ridge", "crossmodal", "tip", "tip_f")):
    centers, table, labels = _clusters(4, 40, noise=0.35)
    names = ["cat", "dog", "bird", "fish"]
    wrong = np.roll(centers, 1, axis=0)  # text of class c points at class c-1's images
    texts = {f"a photo of a {n}.": (centers if text_good else wrong)[i]
             for i, n in enumerate(names)}
    train = np.concatenate([np.flatnonzero(labels == c)[:30] for c in range(4)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    images = index_images(len(labels))
    ev = fewshot_adapt.FewShotAdaptEvaluator(
        [images[i] for i in train], labels[train], [images[i] for i in test], labels[test],
        names, name="toy", templates=["a photo of a {}."], shots=(1, 4, 16), seeds=2,
        methods=methods, holdout_per_class=10, tip_f_epochs=20, augment_views=augment_views)
    return ev, TableEmbedder(table, texts)


@pytest.mark.parametrize("text_good", [True, False])
def test_adapt_evaluator_tip_matches_the_better_of_zero_shot_and_the_cache(text_good):
    ev, emb = _evaluator_case(text_good)
    got = ev.run(emb)
    zs = got["fewshot_adapt/toy/zeroshot"]
    assert zs > 0.9 if text_good else zs < 0.1
    for k in (1, 4, 16):
        tip = got[f"fewshot_adapt/toy/tip/{k}shot"]
        # alpha = 0 is in the grid: with good text the search keeps (at least nearly) zero-shot;
        # with wrong text the cache takes over and beats it by far.
        assert tip >= (zs - 0.05 if text_good else 0.5)
    assert got["fewshot_adapt/toy/ridge/16shot"] > 0.85
    assert set(got) == {"fewshot_adapt/toy/zeroshot"} | {
        f"fewshot_adapt/toy/{m}/{k}shot{s}" for m in ("ridge", "crossmodal", "tip", "tip_f")
        for k in (1, 4, 16) for s in ("", "_std")}


def test_adapt_evaluator_never_chooses_on_test_images():
    ev, emb = _evaluator_case(True)
    train_records = set(ev.train_data)
    for train_sets, held in ev.splits:
        assert not np.intersect1d(np.concatenate(train_sets), held).size
    ev.run(emb)
    # Every image embedded is either a train record or one of the test set, embedded once.
    test_calls = [c for c in emb.image_calls if set(c) & set(ev.test_data)]
    assert len(test_calls) == 1 and not set(test_calls[0]) & train_records
    assert EVALUATORS["fewshot_adapt"] is fewshot_adapt.FewShotAdaptEvaluator
    with pytest.raises(ValueError, match="unknown methods"):
        fewshot_adapt.FewShotAdaptEvaluator([0], [0], [1], [0], ["a"], name="x",
                                            methods=("nope",))
    for bad in (dict(augment_views=-1), dict(augment_crop_scale=(0.0, 1.0)),
                dict(augment_crop_scale=(0.9, 0.5))):
        with pytest.raises(ValueError, match=f"x: {next(iter(bad))}"):
            fewshot_adapt.FewShotAdaptEvaluator([0], [0], [1], [0], ["a"], name="x", **bad)


def test_wise_ft_is_the_linear_interpolation_of_eq1(tmp_path):
    from vljax import wise_ft
    from vljax.evaluators import soups
    p0 = {"w": np.array([1.0, 2.0], np.float32), "t": np.float32(0.0)}
    p1 = {"w": np.array([3.0, -2.0], np.float32), "t": np.float32(1.0)}
    for alpha in (0.0, 0.25, 1.0):
        mix = soups.wise_ft(p0, p1, alpha)
        np.testing.assert_allclose(mix["w"], (1 - alpha) * p0["w"] + alpha * p1["w"], rtol=1e-6)
        assert mix["w"].dtype == np.float32
    np.testing.assert_array_equal(soups.wise_ft(p0, p1, 0.0)["w"], p0["w"])
    results = [{"alpha": a, "metrics": {"id": a, "ood": 1 - a * a}} for a in (0.0, 0.5, 1.0)]
    png = wise_ft.plot(results, "id", "ood", str(tmp_path / "w.png"))
    assert open(png, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nope"):
        wise_ft.plot(results, "nope", "ood", str(tmp_path / "x.png"))
