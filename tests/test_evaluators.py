"""Evaluators on constructed embeddings whose metrics are known by hand.

A `TableEmbedder` stands in for a model: a data set is a list of records, each record its row
in an image embedding table; a text is looked up by its exact string. Every expected number below is
worked out in the comment next to it.
"""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import COLOURS, SHAPES, _draw

from vljax import config_check
from vljax.data import tfds_writer
from vljax.data import transforms as T
from vljax.embedder import Embedded
from vljax.evaluators import EVALUATORS, Embedder, base, prompts
from vljax.evaluators import data as data_lib
from vljax.evaluators import fewshot, gzsl, labelfree, multilabel, multilabel_train, retrieval, soups
from vljax.evaluators import zeroshot


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TableEmbedder:
    """Embeds record r as normalize(image_table[r]) and text t as normalize(text_table[t]);
    the records at positions in `unreadable` cannot be read (they are left out)."""

    def __init__(self, image_table, text_table, logit_scale=10.0, logit_bias=None, unreadable=()):
        self.image_table = np.asarray(image_table, np.float64)
        self.text_table = {k: np.asarray(v, np.float64) for k, v in text_table.items()}
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.unreadable = set(unreadable)
        self.text_calls, self.image_calls = [], []

    def embed_images(self, data):
        self.image_calls.append([data[i] for i in range(len(data))])
        index = np.asarray([i for i in range(len(data)) if i not in self.unreadable], np.int64)
        return Embedded(z=normalize(self.image_table[[data[i] for i in index]]), index=index)

    def embed_texts(self, texts):
        self.text_calls.append(list(texts))
        return normalize(np.stack([self.text_table[t] for t in texts]))


def index_images(n):
    """A data set of n records, record i being row i of the image table."""
    return list(range(n))


# ----------------------------------------------------------------------------- prompts

def test_template_sets():
    clip80 = prompts.get_templates("clip80")
    assert len(clip80) == 80 and len(set(clip80)) == 80
    assert clip80[0] == "a bad photo of a {}." and clip80[-1] == "a tattoo of the {}."
    best = prompts.get_templates("best")
    assert len(best) == 7 and set(best) <= set(clip80)
    assert prompts.get_templates("name") == ("{}",)
    assert "an emoji of {}." in prompts.get_templates("icon")
    with pytest.raises(ValueError):
        prompts.get_templates(["no slot here"])
    with pytest.raises(KeyError):
        prompts.get_templates("nope")


def test_canonicalize():
    assert prompts.canonicalize("  A Photo_of,  the {}! ", keep="{}") == "a photo of the {}"
    assert prompts.canonicalize("Great_White-Shark, (fish)", keep=",") == \
        "great whiteshark, fish"
    assert prompts.canonicalize_name("  T-shirt/Top\t ") == "t-shirt/top"
    assert prompts.canonicalize_name("ankle_boot") == "ankle boot"


def test_class_names_and_descriptions_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    (tmp_path / "names.json").write_text(json.dumps({"pets": ["cat", "dog"]}))
    assert prompts.load_class_names(tmp_path / "names.txt") == ["cat", "dog"]
    assert prompts.load_class_names(str(tmp_path / "names.json")) == ["cat", "dog"]
    (tmp_path / "cupl.json").write_text(json.dumps({"Cat": ["a furry pet."], "dog": "barks."}))
    texts = prompts.class_texts(["cat", "dog", "bird"], ["a {}.", "the {}."],
                                tmp_path / "cupl.json")
    # "Cat" is found through its canonical form; a bare string is one sentence.
    assert texts == [["a cat.", "the cat.", "a furry pet."], ["a dog.", "the dog.", "barks."],
                     ["a bird.", "the bird."]]
    assert prompts.class_texts(["cat"], None, {"cat": ["meows."]}) == [["meows."]]
    with pytest.raises(ValueError):
        prompts.class_texts(["bird"], None, {"cat": ["meows."]})


# ------------------------------------------------------------------------------ base

def test_protocol_and_unreadable_records_are_left_out():
    emb = TableEmbedder(np.eye(3)[[0, 1, 2, 0, 1]], {}, unreadable={1})
    assert isinstance(emb, Embedder)
    z, index = base.image_embeddings(emb, index_images(5))
    np.testing.assert_allclose(z, np.eye(3)[[0, 2, 0, 1]])
    np.testing.assert_array_equal(index, [0, 2, 3, 4])


def test_zeroshot_labels_follow_the_readable_records():
    # Image 1 (label 0, predicted 1) cannot be read: top-1 is over the 6 others, 5 correct.
    emb, images, labels = zeroshot_case()
    emb.unreadable = {1}
    ev = zeroshot.ZeroShotEvaluator(images, labels, ["cat", "dog", "bird"], name="toy",
                                    templates="name")
    assert ev.run(emb)["zeroshot/toy/top1"] == pytest.approx(5 / 6)


def test_ranks_break_ties_by_lower_index():
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(base.ranks_of(scores, np.array([0, 1, 0])), [0, 1, 2])
    np.testing.assert_array_equal(base.top_k(scores, 2), [[0, 1], [0, 1], [2, 1]])


# -------------------------------------------------------------------------- zero-shot

def zeroshot_case():
    """3 classes, 7 images. Scores are the image embedding's cosines with e0, e1, e2."""
    images = [
        [1, .5, .2],   # label 0: rank 0
        [.5, 1, .2],   # label 0: predicted 1, true class at rank 1
        [0, 1, 0],     # label 1: rank 0
        [.2, .1, 1],   # label 1: predicted 2, true class at rank 2
        [0, 0, 1], [0, 0, 1], [0, .1, 1],  # label 2: rank 0
    ]
    labels = [0, 0, 1, 1, 2, 2, 2]
    texts = {"cat": np.eye(3)[0], "dog": np.eye(3)[1], "bird": np.eye(3)[2]}
    return TableEmbedder(images, texts), index_images(7), np.array(labels)


def test_zeroshot_accuracies_by_hand():
    emb, images, labels = zeroshot_case()
    ev = zeroshot.ZeroShotEvaluator(images, labels, ["Cat", "dog", "bird"], name="toy",
                                    templates="name", ks=(1, 2, 5))
    result = ev.evaluate(emb)
    assert result.metrics == pytest.approx({
        "zeroshot/toy/top1": 5 / 7,   # images 0, 2, 4, 5, 6
        "zeroshot/toy/top2": 6 / 7,   # plus image 1
        "zeroshot/toy/top5": 1.0,     # k clipped to the 3 classes
        # recall per class: 1/2, 1/2, 3/3
        "zeroshot/toy/mean_per_class": (0.5 + 0.5 + 1.0) / 3,
        "zeroshot/toy/worst_class": 0.5,
    })
    np.testing.assert_array_equal(result.confusion, [[1, 1, 0], [0, 1, 1], [0, 0, 3]])
    np.testing.assert_array_equal(result.predictions, [0, 1, 1, 2, 2, 2, 2])
    assert ev.run(emb) == result.metrics


def test_prompt_ensembling_is_the_renormalised_mean_and_embedded_once():
    # Unnormalised template embeddings: each is normalised before averaging.
    table = {"a cat.": [3.0, 0, 0], "the cat.": [0, 1.0, 1.0],
             "a dog.": [0, 0, 2.0], "the dog.": [1.0, 1.0, 0]}
    emb = TableEmbedder(np.eye(3), table)
    per_class = zeroshot.class_text_embeddings(emb, [["a cat.", "the cat."],
                                                     ["a dog.", "the dog."]])
    got = zeroshot.ensemble(per_class)
    r = 1 / np.sqrt(2)
    want = normalize([[(1 + 0) / 2, (0 + r) / 2, (0 + r) / 2],
                      [(0 + r) / 2, (0 + r) / 2, (1 + 0) / 2]])
    np.testing.assert_allclose(got, want, atol=1e-6)

    emb.text_calls.clear()
    ev = zeroshot.ZeroShotEvaluator(index_images(3), [0, 1, 0], ["cat", "dog"], name="t",
                                    templates=["a {}.", "the {}."])
    ev.run(emb)
    # All 2 classes x 2 templates in a single call, once per evaluation.
    assert emb.text_calls == [["a cat.", "the cat.", "a dog.", "the dog."]]


def test_zpe_weights_by_hand():
    # Template "a": cat -> e0, dog -> e1. Template "b": cat -> (.6, .8), dog -> (.8, .6).
    table = {"a cat.": [1, 0], "a dog.": [0, 1], "b cat.": [.6, .8], "b dog.": [.8, .6]}
    emb = TableEmbedder([[1, 0], [0, 1]], table, logit_scale=2.0)
    # Logits (scale 2): template a: img0 (2, 0), img1 (0, 2); mean over images (1, 1);
    #   centred maxima 1 and 1 -> score 1.
    # template b: img0 (1.2, 1.6), img1 (1.6, 1.2); mean (1.4, 1.4); centred maxima .2, .2
    #   -> score .2.  Weights softmax(1, .2) = (1, e^-.8) / (1 + e^-.8).
    want = np.array([1.0, np.exp(-0.8)]) / (1 + np.exp(-0.8))
    ev = zeroshot.ZeroShotEvaluator(index_images(2), [0, 1], ["cat", "dog"], name="t",
                                    templates=["a {}.", "b {}."], zpe=True)
    result = ev.evaluate(emb)
    np.testing.assert_allclose(result.template_weights, want, rtol=1e-6)

    ztpl = normalize(np.array([[table["a cat."], table["a dog."]],
                               [table["b cat."], table["b dog."]]]))
    zimg = np.eye(2)
    w, scores = zeroshot.zpe_weights(zimg, ztpl, logit_scale=2.0)
    np.testing.assert_allclose(scores, [1.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    # ZPE averages logits: the classifier is the weighted sum of the templates' embeddings.
    np.testing.assert_allclose(zeroshot.logit_average(list(ztpl.transpose(1, 0, 2)), w),
                               w[0] * ztpl[0] + w[1] * ztpl[1], atol=1e-6)


def test_zpe_removes_a_constant_logit_offset():
    # The bias ZPE corrects: a template whose every logit is raised (frequent words) must
    # not score higher for it. Brute force with a per-(template, class) offset added.
    rng = np.random.default_rng(0)
    zimg, ztpl = normalize(rng.normal(size=(20, 4))), normalize(rng.normal(size=(3, 5, 4)))
    w, s = zeroshot.zpe_weights(zimg, ztpl, 1.0, batch_size=7)
    logits = np.einsum("nd,pcd->npc", zimg, ztpl) + 5.0 * rng.random(size=(3, 5))[None]
    brute = (logits - logits.mean(0)).max(axis=2).mean(axis=0)
    np.testing.assert_allclose(s, brute, atol=1e-6)
    np.testing.assert_allclose(w, np.exp(s) / np.exp(s).sum(), atol=1e-6)
    # The pre-training proxy sample and the test images both estimate the expected logits.
    zref = normalize(rng.normal(size=(9, 4)))
    _, s_ref = zeroshot.zpe_weights(zimg, ztpl, 1.0, zref=zref)
    lref = 0.5 * (np.einsum("nd,pcd->npc", zref, ztpl).mean(0) + np.einsum("nd,pcd->npc", zimg, ztpl).mean(0))
    brute_ref = (np.einsum("nd,pcd->npc", zimg, ztpl) - lref).max(axis=2).mean(axis=0)
    np.testing.assert_allclose(s_ref, brute_ref, atol=1e-6)


def test_confusion_matrix_png_is_written(tmp_path):
    emb, images, labels = zeroshot_case()
    ev = zeroshot.ZeroShotEvaluator(images, labels, ["cat", "dog", "bird"], name="toy",
                                    templates="name", plot_dir=str(tmp_path / "plots"))
    ev.run(emb)
    png = (tmp_path / "plots" / "confusion_toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# ------------------------------------------------------------------------------- GZSL

def gzsl_case():
    images = [
        [1, 0, 0, 0],      # label 0: correct
        [.1, 0, .9, 0],    # label 0: predicted 2 (an unseen class), with or without gamma
        [0, 1, 0, 0],      # label 1: correct
        [.6, 0, .5, 0],    # label 2: cosines .768 (class 0) vs .640 (class 2): predicted 0;
                           #   with gamma .2, .568 < .640: correct
        [0, 0, 0, 1], [0, 0, 0, 1],  # label 3: correct
    ]
    labels = np.array([0, 0, 1, 2, 3, 3])
    texts = {n: np.eye(4)[i] for i, n in enumerate(["a", "b", "c", "d"])}
    return TableEmbedder(images, texts), index_images(6), labels


def test_gzsl_by_hand():
    emb, images, labels = gzsl_case()
    ev = gzsl.GZSLEvaluator(images, labels, ["a", "b", "c", "d"], seen_classes=["a", "b"],
                            name="toy", templates="name")
    # Per class: S = mean(1/2, 1) = .75, U = mean(0, 1) = .5, H = 2 .75 .5 / 1.25 = .6.
    # ZSL (unseen images among unseen classes only): image 3 -> class 2, all correct.
    assert ev.run(emb) == pytest.approx({"gzsl/toy/seen": 0.75, "gzsl/toy/unseen": 0.5,
                                         "gzsl/toy/harmonic": 0.6, "gzsl/toy/zsl": 1.0,
                                         "gzsl/toy/ausuc": 0.875,
                                         "gzsl/toy/best_harmonic": 1.5 / 1.75})
    per_image = gzsl.GZSLEvaluator(images, labels, ["a", "b", "c", "d"], seen_classes=[0, 1],
                                   name="toy", templates="name", per_class=False).run(emb)
    assert per_image["gzsl/toy/seen"] == pytest.approx(2 / 3)
    assert per_image["gzsl/toy/unseen"] == pytest.approx(2 / 3)
    assert per_image["gzsl/toy/harmonic"] == pytest.approx(2 / 3)
    # Calibrated stacking fixes image 3: U = 1, H = 2 .75 / 1.75.
    calibrated = gzsl.GZSLEvaluator(images, labels, ["a", "b", "c", "d"], seen_classes=[0, 1],
                                    name="toy", templates="name", gamma=0.2).run(emb)
    assert {k: v for k, v in calibrated.items() if k.split("/")[-1] in
            ("seen", "unseen", "harmonic", "zsl")} == pytest.approx(
        {"gzsl/toy/seen": 0.75, "gzsl/toy/unseen": 1.0, "gzsl/toy/harmonic": 1.5 / 1.75,
         "gzsl/toy/zsl": 1.0})


def test_gzsl_calibration_sweep_and_ausuc_by_hand():
    emb, images, labels = gzsl_case()
    scores = normalize(np.asarray(emb.image_table))
    seen = np.array([True, True, False, False])
    # d = best seen - best unseen per image: 1, -.884, 1, .768 - .640 = .128, -1, -1.
    # Seen-side predictions are right for images 0-2, unseen-side ones for images 3-5.
    gammas, s, u = gzsl.calibration_sweep(scores, labels, seen)
    np.testing.assert_allclose(gammas, [-2, (-1 - .884) / 2, (.128 - .884) / 2,
                                        (1 + .128) / 2, 2], atol=2e-3)
    # gamma -2: all seen (S 1, U 0); above -1: images 4, 5 go unseen (U .5); above -.884:
    # image 1 too (S .75); above .128: image 3 (U 1); above 1: all unseen (S 0).
    np.testing.assert_allclose(s, [1, 1, .75, .75, 0])
    np.testing.assert_allclose(u, [0, .5, .5, 1, 1])
    # Area: .5 * 1 (U 0 -> .5) + .5 * .75 (U .5 -> 1) = .875.
    assert gzsl.ausuc(s, u) == pytest.approx(0.875)
    got = gzsl.GZSLEvaluator(images, labels, ["a", "b", "c", "d"], seen_classes=[0, 1],
                             name="toy", templates="name").run(emb)
    assert got["gzsl/toy/ausuc"] == pytest.approx(0.875)
    assert got["gzsl/toy/best_harmonic"] == pytest.approx(1.5 / 1.75)
    # A perfect classifier: the curve passes through (1, 1), AUSUC = 1.
    perfect = np.eye(4)[labels] + 0.0
    assert gzsl.ausuc(*gzsl.calibration_sweep(perfect, labels, seen)[1:]) == pytest.approx(1.0)


def test_worst_class_and_worst_group_by_hand():
    # Ranks of the true class: labels 0, 0, 1, 1, 2; correct = [1, 0, 1, 1, 0].
    ranks, labels = np.array([0, 1, 0, 0, 2]), np.array([0, 0, 1, 1, 2])
    out = zeroshot.accuracies(ranks, labels, (1,), groups=np.array([5, 5, 5, 7, 7]))
    # Per class 1/2, 1, 0 -> worst 0. Group 5: images 0-2, 2/3; group 7: images 3-4, 1/2.
    assert out["worst_class"] == 0.0
    assert out["worst_group"] == pytest.approx(0.5)
    assert out["mean_per_class"] == pytest.approx(0.5)


# -------------------------------------------------------------------------- retrieval

def test_retrieval_recalls_from_a_constructed_similarity():
    sim = np.array([[0.9, 0.1, 0.8, 0.2, 0.3],     # own {t0, t1}: t0 first        -> rank 0
                    [0.7, 0.6, 0.5, 0.1, 0.2],     # own {t2, t3}: t2 behind t0, t1 -> rank 2
                    [0.1, 0.2, 0.3, 0.4, 0.35]])   # own {t4}: behind t3            -> rank 1
    text_to_image = np.array([0, 0, 1, 1, 2])
    got = retrieval.recall_at_k(sim, np.eye(5), text_to_image, ks=(1, 2, 5), batch_size=2)
    # t2i ranks of the caption's image, per column: t0 0, t1 2, t2 1, t3 2, t4 0.
    assert got == pytest.approx({"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r5": 1.0,
                                 "t2i_r1": 2 / 5, "t2i_r2": 3 / 5, "t2i_r5": 1.0})


def test_retrieval_evaluator_by_hand():
    c, d = [0, .6, .8], [0, .8, .6]
    emb = TableEmbedder(np.eye(3), {"a": [0, 1, 0], "b": [1, 0, 0], "c": c, "d": d})
    ev = retrieval.RetrievalEvaluator(index_images(3), [["a", "b"], "c", ["d"]], name="toy",
                                      ks=(1, 2, 3))
    # sim rows (images e0, e1, e2) x columns (a, b, c, d):
    #   e0: 0 1 0 0 -> own best b at rank 0;  e1: 1 0 .6 .8 -> own c at rank 2;
    #   e2: 0 0 .8 .6 -> own d at rank 1.
    # t2i: a -> img0 behind img1, tied with img2 at 0 but lower index: rank 1;
    #   b rank 0; c (.0 .6 .8) img1 rank 1; d (0 .8 .6) img2 rank 1.
    assert ev.run(emb) == pytest.approx({
        "retrieval/toy/i2t_r1": 1 / 3, "retrieval/toy/i2t_r2": 2 / 3, "retrieval/toy/i2t_r3": 1,
        "retrieval/toy/t2i_r1": 1 / 4, "retrieval/toy/t2i_r2": 1.0, "retrieval/toy/t2i_r3": 1})
    # Image 0 unreadable: its captions a, b leave with it. e1 scores (c, d) = (.6, .8), e2
    # (.8, .6): each ranks its own caption second, and each caption its own image second.
    emb.unreadable = {0}
    assert ev.run(emb) == pytest.approx({
        "retrieval/toy/i2t_r1": 0.0, "retrieval/toy/i2t_r2": 1.0, "retrieval/toy/i2t_r3": 1,
        "retrieval/toy/t2i_r1": 0.0, "retrieval/toy/t2i_r2": 1.0, "retrieval/toy/t2i_r3": 1})


# ------------------------------------------------------------------------- multilabel

def brute_force_ap(scores, positive):
    """Mean over positives i of |{positives j: s_j >= s_i}| / |{j: s_j >= s_i}| (no ties)."""
    precisions = [np.sum(positive & (scores >= s)) / np.sum(scores >= s)
                  for s in scores[positive]]
    return np.mean(precisions)


def test_map_by_hand_and_against_brute_force():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.4, 0.5], [0.7, 0.3, 0.5], [0.6, 0.2, 0.5]])
    targets = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], bool)
    # Label 0 ranks pos, neg, pos, neg: AP = (1/1 + 2/3) / 2 = 5/6.
    # Label 1 ranks its positive third: AP = 1/3. Label 2 has no positive: left out.
    assert multilabel.mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 3) / 2)
    # Tied scores rank by image index: a positive second among equals has AP 1/2.
    assert multilabel.average_precision(np.array([.5, .5]), np.array([0, 1], bool)) == 0.5
    assert multilabel.average_precision(np.array([.5, .5]), np.array([1, 0], bool)) == 1.0

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 7))
    targets = rng.random((60, 7)) < 0.3
    want = np.mean([brute_force_ap(scores[:, j], targets[:, j]) for j in range(7)])
    assert multilabel.mean_average_precision(scores, targets) == pytest.approx(want)


def test_f1_at_k_by_hand():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8]])
    targets = multilabel.to_multi_hot([[0, 2], [2]], 3)
    # k=1: predictions {0}, {2}: TP 2 of 2 predicted, 3 true: P 1, R 2/3, F1 .8.
    assert multilabel.topk_metrics(scores, targets, 1) == pytest.approx(
        {"precision@1": 1.0, "recall@1": 2 / 3, "f1@1": 0.8})
    # k=2: predictions {0, 1}, {2, 1}: TP 2 of 4: P 1/2, R 2/3, F1 2 (1/3) / (7/6) = 4/7.
    assert multilabel.topk_metrics(scores, targets, 2) == pytest.approx(
        {"precision@2": 0.5, "recall@2": 2 / 3, "f1@2": 4 / 7})


def test_multilabel_evaluator():
    emb = TableEmbedder([[.9, .1, .0], [.1, .9, .2], [.5, .0, .6]],
                        {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1]})
    ev = multilabel.MultilabelEvaluator(index_images(3), [[0], [1, 2], [2]],
                                        ["red", "green", "blue"], name="toy",
                                        templates="name", ks=(1,))
    got = ev.run(emb)
    # Normalised images: (.99, .11, 0), (.11, .97, .22), (.64, 0, .77). red ranks img0 first,
    # green img1, blue img2 then img1 (both positives first): every AP is 1. Top-1 labels
    # red, green, blue are all correct: P 3/3, R 3/4.
    # Per label (top-1 sets): red and green P 1 R 1, blue P 1 R 1/2 (img1's blue missed).
    assert got == pytest.approx({"multilabel/toy/mAP": 1.0, "multilabel/toy/precision@1": 1.0,
                                 "multilabel/toy/recall@1": 0.75,
                                 "multilabel/toy/f1@1": 2 * 0.75 / 1.75,
                                 "multilabel/toy/CP@1": 1.0, "multilabel/toy/CR@1": 2.5 / 3,
                                 "multilabel/toy/CF1@1": 2 * (2.5 / 3) / (1 + 2.5 / 3),
                                 "multilabel/toy/OP@1": 1.0, "multilabel/toy/OR@1": 0.75,
                                 "multilabel/toy/OF1@1": 2 * 0.75 / 1.75,
                                 "multilabel/toy/real_top1": 1.0})  # every top-1 label valid


def test_cp_cr_cf1_op_or_of1_by_hand():
    pred = np.array([[1, 0, 0], [1, 0, 0]], bool)
    targets = np.array([[1, 0, 1], [0, 1, 0]], bool)
    # red: TP 1 of 2 predicted, 1 positive -> P 1/2, R 1; green, blue never predicted -> P 0,
    # R 0. CP 1/6, CR 1/3, CF1 2 (1/18) / (1/2) = 2/9; OP 1/2, OR 1/3, OF1 2 (1/6) / (5/6) = .4.
    assert multilabel.set_metrics(pred, targets) == pytest.approx(
        {"CP": 1 / 6, "CR": 1 / 3, "CF1": 2 / 9, "OP": 0.5, "OR": 1 / 3, "OF1": 0.4})
    # A label without any positive is left out of the class averages.
    pred3 = np.concatenate([pred, [[0], [1]]], axis=1)
    targets3 = np.concatenate([targets, [[0], [0]]], axis=1)
    got = multilabel.set_metrics(pred3, targets3)
    assert got["CP"] == pytest.approx(1 / 6) and got["OP"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(multilabel.topk_set(np.array([[.1, .9, .5]]), 2),
                                  [[False, True, True]])


# ---------------------------------------------------------------------------- few-shot

@pytest.mark.parametrize("n, d", [(12, 5), (5, 12)])  # primal and dual forms
def test_ridge_fit_equals_the_closed_form(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    got = fewshot.ridge_fit(x, y, [0.1, 10.0])
    for w, l2 in zip(got, [0.1, 10.0]):
        np.testing.assert_allclose(w, np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y),
                                   atol=1e-10)


@pytest.mark.parametrize("standardize", [False, True])
def test_probe_has_an_unregularised_bias_and_pm1_targets(standardize):
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(9, 4)) + 3.0, np.arange(9) % 3
    probe = fewshot.RidgeProbe(x, labels, 3, [2.0], standardize=standardize)
    # Reference: centred (standardised) features plus a constant column, penalty 2 on the
    # weights only.
    xs = (x - x.mean(0)) / ((x.std(0) + 1e-5) if standardize else 1.0)
    a = np.concatenate([xs, np.ones((9, 1))], axis=1)
    y = 2.0 * np.eye(3)[labels] - 1.0
    wb = np.linalg.solve(a.T @ a + np.diag([2.0] * 4 + [0.0]), a.T @ y)
    np.testing.assert_allclose(probe.weights[0], wb[:4], atol=1e-10)
    np.testing.assert_allclose(probe.bias, wb[4], atol=1e-10)


def test_fewshot_separable_clusters_reach_100_percent():
    rng = np.random.default_rng(0)
    centers = np.eye(16)[:4] * 5.0
    train_labels, test_labels = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 10)
    labels = np.concatenate([train_labels, test_labels])
    table = centers[labels] + 0.3 * rng.normal(size=(len(labels), 16))
    emb = TableEmbedder(table, {})
    images = index_images(len(labels))
    ev = fewshot.FewShotEvaluator(images[:120], train_labels, images[120:], test_labels,
                                  name="toy", shots=(1, 5, 10), seeds=2, holdout_per_class=5)
    for train_sets, held in ev.splits:  # held-out images never train any probe
        assert not np.intersect1d(np.concatenate(train_sets), held).size
        assert [len(t) for t in train_sets] == [4, 20, 40] and len(held) == 20
    got = ev.run(emb)
    assert got == {f"fewshot/toy/{k}shot{s}": (1.0 if not s else 0.0)
                   for k in (1, 5, 10) for s in ("", "_std")}
    fixed = fewshot.FewShotEvaluator(images[:120], train_labels, images[120:], test_labels,
                                     name="toy", shots=(5,), seeds=1, l2_regs=(1.0,))
    assert fixed.run(emb)["fewshot/toy/5shot"] == 1.0
    # Why centring is the default: a per-dimension std from 4 images inflates the 12 noise
    # dimensions to the size of the 4 informative ones.
    standardized = fewshot.FewShotEvaluator(images[:120], train_labels, images[120:],
                                            test_labels, name="toy", shots=(1,), seeds=2,
                                            holdout_per_class=5, standardize=True)
    assert standardized.run(emb)["fewshot/toy/1shot"] < 0.75


def test_fewshot_chance_on_noise():
    # Features independent of labels: the probe cannot beat chance by much.
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(4), 60)
    emb = TableEmbedder(rng.normal(size=(240, 16)), {})
    images = index_images(240)
    ev = fewshot.FewShotEvaluator(images[:160], labels[:160], images[160:], labels[160:],
                                  name="noise", shots=(5,), seeds=3)
    assert ev.run(emb)["fewshot/noise/5shot"] < 0.45


class PixelEmbedder:
    """Embeds an image as its 8 x 8 RGB thumbnail, whatever holds it (bytes, a path, pixels):
    equal images give equal embeddings from any source kind."""
    logit_scale, logit_bias = 10.0, None

    def embed_images(self, data):
        z = [np.asarray(T.decode_image(data[i]["image"]).resize((8, 8)), np.float64).ravel()
             for i in range(len(data))]
        return Embedded(z=normalize(np.stack(z)), index=np.arange(len(data)))


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory):
    """The same train and test records of coloured shapes (label: the shape; label set: shape and
    colour) as TFDS splits and as two JSONL manifests."""
    root = tmp_path_factory.mktemp("two_splits")
    rng = np.random.default_rng(0)
    records = {split: [(f"{split}{k}", tfds_writer.encode_png(_draw(SHAPES[k % 3], colour, rng)), k % 3,
                        [k % 3, 3 + list(COLOURS).index(colour)])
                       for k, colour in enumerate(list(COLOURS) * n)] for split, n in (("train", 6), ("test", 3))}
    spec = tfds_writer.DatasetSpec(
        name="vljax_two_splits",
        features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                  "captions": tfds.features.Sequence(tfds.features.Text()),
                  "label": tfds.features.ClassLabel(names=list(SHAPES)),
                  "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=[*SHAPES, *COLOURS]))},
        splits={split: (lambda recs=recs: ((key, {"id": key, "image": png, "captions": [key], "label": y,
                                                  "tags": tags}) for key, png, y, tags in recs))
                for split, recs in records.items()})
    tfds_writer.write_tfds(spec, root / "tfds")
    for split, recs in records.items():  # in TFDS's storage order, so that record i is the same
        by_key = {key: (png, y, tags) for key, png, y, tags in recs}
        stored = tfds.data_source("vljax_two_splits", split=split, data_dir=str(root / "tfds"))
        (root / split).mkdir()
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(len(stored)):
                key = data_lib.text(stored[i]["id"])
                png, y, tags = by_key[key]
                (root / split / f"{key}.png").write_bytes(png)
                f.write(json.dumps(dict(image=f"{split}/{key}.png", caption=key, label=y, labels=tags)) + "\n")
    return {"tfds": dict(name="vljax_two_splits", data_dir=str(root / "tfds")),
            "jsonl": dict(source="jsonl", path=str(root / "test.jsonl"), train_path=str(root / "train.jsonl"),
                          class_names=list(SHAPES), num_labels=7)}


def test_fewshot_family_on_a_jsonl_source_equals_tfds(two_splits):
    """The few-shot family takes a train and a test split from a source entry of any kind: on the
    same records, JSONL manifests give what TFDS splits give."""
    got = {}
    for kind, data in two_splits.items():
        ev = fewshot.FewShotEvaluator.from_config("t", dict(data=dict(data, per_class=5), shots=(1, 2), seeds=2,
                                                            holdout_per_class=2, l2_regs=(1.0, 100.0)))
        target = {("target_path" if k == "train_path" else k): v for k, v in data.items()}  # its unlabelled split
        lf = labelfree.LabelFreeEvaluator.from_config("t", dict(data=dict(target, max_target=5), templates="name"))
        mt = multilabel_train.MultilabelTrainEvaluator.from_config("t", dict(data=dict(data, max_train=10)))
        got[kind] = (ev.run(PixelEmbedder()), ev.train_labels.tolist(), ev.test_labels.tolist(), lf.class_names,
                     lf.test_labels.tolist(), len(lf.target_data), mt.train_targets.tolist(),
                     mt.test_targets.tolist())
    assert got["tfds"][0]["fewshot/t/2shot"] > 0.5  # above chance (1/3): the thumbnails show the shapes
    assert sorted(got["tfds"][1]) == sorted([0, 1, 2] * 5) and len(got["tfds"][2]) == 12 and got["tfds"][5] == 5
    assert got["jsonl"] == got["tfds"]


def test_fewshot_source_entries_are_checked(two_splits):
    jsonl = two_splits["jsonl"]
    evals = ml_collections.ConfigDict({"t": dict(type="fewshot", data=jsonl)})
    config_check.validate_evals(evals)
    evals.t.data.train_pth = "x"
    with pytest.raises(ValueError, match=r"`evals.t.data.train_pth`: unknown .*did you mean `train_path`\?"):
        config_check.validate_evals(evals)
    legacy = ml_collections.ConfigDict({"t": dict(type="labelfree", data=dict(two_splits["tfds"], target_path="x"))})
    with pytest.raises(ValueError, match=r"`evals.t.data.target_path`: unknown"):
        config_check.validate_evals(legacy)
    same = {k: v for k, v in jsonl.items() if k != "train_path"}
    with pytest.raises(ValueError, match=r"`evals.t.data.train_path` is missing: without it the train split "
                                         r"of source 'jsonl' is its test split"):
        fewshot.FewShotEvaluator.from_config("t", dict(data=same))
    # A source entry of kind tfds: `split` / `<s>_split` as the TFDS entry's.
    entry = dict(source="tfds", **two_splits["tfds"], train_split="train")
    assert data_lib.split_entry("t", entry, "test", "test")["split"] == "test"
    assert len(fewshot.FewShotEvaluator.from_config("t", dict(data=entry, shots=(1,))).test_labels) == 12


# ------------------------------------------------------------------------------ soups

def test_uniform_soup_is_the_mean():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": {"c": np.float32(3.0)}}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": {"c": np.float32(0.0)}}
    soup = soups.uniform_soup([a, b])
    np.testing.assert_allclose(soup["w"], [2.0, 4.0])
    np.testing.assert_allclose(soup["b"]["c"], 1.5)
    assert soup["w"].dtype == np.float32


def test_greedy_soup_skips_a_bad_ingredient():
    bad, good1, good2 = ({"w": np.float32(10.0)}, {"w": np.float32(1.0)},
                         {"w": np.float32(1.2)})

    def score(p):
        return -abs(float(p["w"]) - 1.1)

    soup, log = soups.greedy_soup([bad, good1, good2], score)
    # Individual scores -8.9, -.1, -.1: order good1, good2 (tie keeps list order), bad.
    # good1 + good2 -> 1.1, score 0 >= -.1: kept. + bad -> 4.07, score -2.97: skipped.
    assert log["order"] == [1, 2, 0]
    assert log["ingredients"] == [1, 2]
    assert [(i, ok) for i, _, ok in log["steps"]] == [(2, True), (0, False)]
    assert log["steps"][1][1] == pytest.approx(-(12.2 / 3 - 1.1), rel=1e-5)
    np.testing.assert_allclose(soup["w"], 1.1, rtol=1e-6)
    assert log["score"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- registry

def test_registry_builds_from_kwargs():
    emb, images, labels = zeroshot_case()
    config = {"zeroshot": dict(data=images, labels=labels, class_names=["cat", "dog", "bird"],
                               name="toy", templates="name"),
              "retrieval": dict(data=images[:3], captions=[["cat"], ["dog"], ["bird"]],
                                name="toy", ks=(1,))}
    metrics = {}
    for kind, kwargs in config.items():
        metrics.update(EVALUATORS[kind](**kwargs).run(emb))
    assert {"zeroshot", "retrieval", "multilabel", "gzsl", "fewshot", "representation"} <= set(EVALUATORS)
    assert metrics["zeroshot/toy/top1"] == pytest.approx(5 / 7)
    # Images 0-2 against cat/dog/bird: images 0 and 1 retrieve their own caption first,
    # image 2 (0, 1, 0) retrieves "dog".
    assert metrics["retrieval/toy/i2t_r1"] == pytest.approx(2 / 3)


def test_run_all_merges_metrics_in_order_with_timings():
    """One runner for the trainer, vljax.evaluate, soups and WiSE-FT: each evaluator's metrics,
    merged in config order, and `time/eval_<name>_s` per evaluator unless `timed=False`."""
    seen = []

    class Toy(base.Evaluator):
        def __init__(self, name, value):
            self.name, self.value = name, value

        def run(self, embedder):
            seen.append((self.name, embedder))
            return {f"toy/{self.name}/m": self.value}

    emb = TableEmbedder(np.eye(2), {})
    evs = {"b": Toy("b", 1.0), "a": Toy("a", 0.5)}
    got = base.run_all(evs, emb)
    assert list(got) == ["toy/b/m", "time/eval_b_s", "toy/a/m", "time/eval_a_s"]
    assert got["toy/b/m"] == 1.0 and got["toy/a/m"] == 0.5
    assert all(got[f"time/eval_{n}_s"] >= 0 for n in evs)
    assert seen == [("b", emb), ("a", emb)]  # one embedder shared by every evaluator
    assert base.run_all(evs, emb, timed=False) == {"toy/b/m": 1.0, "toy/a/m": 0.5}
