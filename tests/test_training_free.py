"""Training-free zero-shot methods (issue 26 item 6): PerceptionCLIP, FuDD, CaSED, SuS-X (TIP-X).

Each method's function equals a numpy transcription of its equations (the official code's loops) on tiny
arrays; each evaluator runs on the real demo data (emoji, Fashion-MNIST TFDS builds) through its config
entry with one small LiT-shaped model (random towers: the properties hold for any model), and refuses
bad input naming it.
"""
import importlib.util
import itertools
import json
import os

import jax
import numpy as np
import pytest
from helpers import REPO, tiny_config

from vljax import config_check, eval_builder, sharding, train
from vljax.embedder import Embedder
from vljax.evaluators import cased, fudd, perceptionclip, susx

DESCRIPTIONS = os.path.join(REPO, "configs", "descriptions")
FM_FUDD = os.path.join(DESCRIPTIONS, "fudd_fashion_mnist.json")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- PerceptionCLIP

NUM_Z = 4


def official_two_step(logits, temperature, logits_z=None):
    """perceptionclip_two_step.classify on logits [N, C*Z] laid out class-major, as the official head."""
    n = len(logits)
    if logits_z is None:  # infer_mode 0
        fp = np.exp(logits / temperature).reshape(n, -1, NUM_Z).sum(axis=1)
        fp = fp / fp.sum(axis=1, keepdims=True)
    else:  # infer_mode 1
        fp = np.exp(logits_z / temperature)
        fp = fp / fp.sum(axis=1, keepdims=True)
    probs = np.exp(logits).reshape(n, -1, NUM_Z)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return (probs * fp[:, None, :]).sum(axis=2)


@pytest.mark.parametrize("temperature", [1.0, 0.3, 5.0])
@pytest.mark.parametrize("without_class", [False, True])
def test_perceptionclip_equals_the_official_two_step(temperature, without_class):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3 * NUM_Z)) * 3
    logits_z = rng.normal(size=(6, NUM_Z)) * 3 if without_class else None
    p_y, p_z = perceptionclip.perceptionclip_probs(logits.reshape(6, 3, NUM_Z), temperature, logits_z)
    np.testing.assert_allclose(p_y, official_two_step(logits, temperature, logits_z), rtol=1e-10)
    np.testing.assert_allclose(p_y.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p_z.sum(1), 1.0, rtol=1e-12)


def test_perceptionclip_contexts_and_sentences():
    main, attrs = perceptionclip.load_attributes(os.path.join(DESCRIPTIONS, "perceptionclip_icon.json"))
    zs = perceptionclip.contexts(attrs)
    assert len(zs) == 4 * 2 and zs[0] == ("others", "normal")
    assert perceptionclip.context_sentences(main, "cat", attrs, ("others", "normal")) == [
        "an illustration of cat.", "an illustration of cat, art.", "an illustration of cat, drawing."]
    assert len(perceptionclip.context_sentences(main, "cat", attrs, ("sketch", "bw"))) == 9
    with pytest.raises(ValueError, match=r"attributes dict: `main_template`"):
        perceptionclip.load_attributes({"main_template": "no slot", "attributes": {"a": {"v": [""]}}})
    with pytest.raises(ValueError, match=r"value 'v' of attribute 'a' has no description"):
        perceptionclip.load_attributes({"main_template": "a {}", "attributes": {"a": {"v": []}}})


# ---------------------------------------------------------------- FuDD

def reference_fudd_top1(zimg, initial, pair_emb, k):
    out = []
    for x, s in zip(zimg, initial):
        amb = list(np.argsort(-s, kind="stable")[:k])
        if k == 1:
            out.append(amb[0])
            continue
        reps = [_unit(np.mean([pair_emb[c, o] for o in amb if o != c], axis=0)) for c in amb]
        out.append(amb[int(np.argmax([x @ r for r in reps]))])
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fudd_equals_the_reference(k):
    rng = np.random.default_rng(1)
    zimg, ztxt = _unit(rng.normal(size=(20, 8))), _unit(rng.normal(size=(5, 8)))
    pair = rng.normal(size=(5, 5, 8))
    initial = zimg @ ztxt.T
    scores = fudd.fudd_scores(zimg, initial, pair, k, batch_size=7)
    np.testing.assert_array_equal(np.argmax(scores, 1), reference_fudd_top1(zimg, initial, pair, k))
    # Classes outside the ambiguous set keep their initial order, below it.
    top = np.argsort(-initial, 1, kind="stable")
    np.testing.assert_array_equal(np.argsort(-scores, 1, kind="stable")[:, k:], top[:, k:])
    if k == 1:
        np.testing.assert_array_equal(np.argsort(-scores, 1, kind="stable"), top)


def test_fudd_refuses_a_missing_pair(tmp_path):
    table = json.load(open(FM_FUDD))
    del table["coat"]["shirt"]
    path = tmp_path / "fudd.json"
    path.write_text(json.dumps(table))
    names = [n for n in table if not n.startswith("_")]
    with pytest.raises(ValueError, match=r"fudd.json: class 'coat' has no description against class 'shirt'"):
        fudd.load_differential(str(path), names)
    with pytest.raises(ValueError, match=r"no differential descriptions for class 'hat'"):
        fudd.load_differential(FM_FUDD, names + ["hat"])


# ---------------------------------------------------------------- SuS-X / TIP-X

def official_tipx(test, support, labels, weights, alpha, beta, gamma, temperature, scale=100.0):
    """vishaal27/SuS-X tipx.py: compute_image_text_distributions, get_kl_divergence_sims (the
    repeat_interleave loop), scale_, and the final logits."""
    def dist(f):
        s = f @ weights.T / temperature
        return np.exp(s) / np.exp(s).sum(1, keepdims=True)
    p, q = dist(test), dist(support)
    kl = np.array([[np.sum(pi * (np.log(pi) - np.log(qj))) for qj in q] for pi in p])
    new_knowledge = test @ support.T
    y = (kl - kl.min()) / (kl.max() - kl.min()) * (new_knowledge.max() - new_knowledge.min()) + new_knowledge.min()
    kl_logits = -y @ labels
    cache_logits = np.exp(-(beta - beta * new_knowledge)) @ labels
    return scale * test @ weights.T + kl_logits * gamma + cache_logits * alpha


def test_tipx_equals_the_official_code():
    rng = np.random.default_rng(2)
    test, support = _unit(rng.normal(size=(9, 6))), _unit(rng.normal(size=(8, 6)))
    weights = _unit(rng.normal(size=(4, 6)))
    labels = np.eye(4)[rng.integers(0, 4, 8)]
    for alpha, beta, gamma in [(1.0, 5.5, 0.5), (3.0, 1.0, 10.0), (0.0, 2.0, 0.0)]:
        got = susx.tipx_logits(test, support, labels, weights, 100.0, alpha, beta, gamma, 0.5)
        np.testing.assert_allclose(got, official_tipx(test, support, labels, weights, alpha, beta, gamma, 0.5),
                                   rtol=1e-10)
    zs = susx.tipx_logits(test, support, labels, weights, 12.0, 0.0, 5.5, 0.0)
    np.testing.assert_allclose(zs, 12.0 * test @ weights.T, rtol=1e-12)


def test_tipx_search_finds_the_best_grid_point():
    rng = np.random.default_rng(6)
    zval, support = _unit(rng.normal(size=(12, 6))), _unit(rng.normal(size=(8, 6)))
    weights, yval = _unit(rng.normal(size=(4, 6))), rng.integers(0, 4, 12)
    labels = np.eye(4)[np.arange(8) % 4]
    alpha, beta, gamma, acc = susx.search(zval, yval, support, labels, weights, 12.0)

    def accuracy(a, b, g):
        return np.mean(np.argmax(susx.tipx_logits(zval, support, labels, weights, 12.0, a, b, g), 1) == yval)
    assert accuracy(alpha, beta, gamma) == acc
    unit = 12.0 / 100
    for a, b, g in itertools.product(susx.OFFICIAL_ALPHAS[::4], susx.OFFICIAL_BETAS[::40], susx.OFFICIAL_GAMMAS[::10]):
        assert accuracy(a * unit, b, g * unit) <= acc


def test_support_retrieval():
    rng = np.random.default_rng(3)
    zdb, ztxt = _unit(rng.normal(size=(30, 5))), _unit(rng.normal(size=(3, 5)))
    rows, y = susx.retrieve_support(zdb, ztxt, 4)
    want = np.concatenate([np.argsort(-(zdb @ t), kind="stable")[:4] for t in ztxt])
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(y, [0] * 4 + [1] * 4 + [2] * 4)


# ---------------------------------------------------------------- CaSED

def test_cased_candidates_and_scores():
    caps = ["Grinning cat face with big eyes", "emoji of cat face", "cats and dogs, 2 photos", "a dog"]
    assert cased.candidates(caps) == ["cat", "face", "dog"]
    assert cased.candidates(["photo of x"]) == ["object"]
    rng = np.random.default_rng(4)
    x, c, w = _unit(rng.normal(size=6)), _unit(rng.normal(size=6)), _unit(rng.normal(size=(5, 6)))
    p = cased.cased_scores(x, c, w, 0.3)
    si, st = np.exp(w @ x / 0.07), np.exp(w @ c / 0.07)
    np.testing.assert_allclose(p, 0.3 * si / si.sum() + 0.7 * st / st.sum(), rtol=1e-10)


def test_cluster_accuracy_is_the_best_one_to_one_matching():
    rng = np.random.default_rng(5)
    preds = [f"w{i}" for i in rng.integers(0, 4, 30)]
    labels = rng.integers(0, 3, 30)
    words = sorted(set(preds))
    best = max(sum(p == words[perm[y]] for p, y in zip(preds, labels))
               for perm in itertools.permutations(range(len(words)), 3))
    assert cased.cluster_accuracy(preds, labels) == pytest.approx(best / 30)


# ---------------------------------------------------------------- on the demo data

EMOJI = dict(name="vljax_emoji", split="test", label="category", max_examples=40)
FMNIST = dict(name="vljax_fashion_mnist", split="test", max_examples=40)


@pytest.fixture(scope="module")
def embedder():
    """A LiT-shaped model with small random towers at 32 px, on one device."""
    config = tiny_config("unused.jsonl", "lit")
    model = train.build_model(config)
    params = jax.device_get(train.init_params(model, config, jax.random.key(0)))
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    return Embedder(model, params, train.build_tokenizer(config), mesh=mesh, image_size=32,
                    value_range=(-1.0, 1.0), progress=False)


@pytest.fixture(scope="module")
def zeroshot_metrics(embedder):
    evals = eval_builder.build({"evals": dict(
        emoji=dict(type="zeroshot", data=EMOJI, templates="icon"),
        fm=dict(type="zeroshot", data=FMNIST, templates="clothing"))})
    return {k: v for ev in evals.values() for k, v in ev.run(embedder).items()}


def test_fudd_with_one_ambiguous_class_is_zeroshot(embedder, zeroshot_metrics):
    evals = eval_builder.build({"evals": {
        f"fm{k}": dict(type="fudd", data=FMNIST, descriptions=FM_FUDD, k=k, templates="clothing")
        for k in (1, 3)}})
    m = {k: v for ev in evals.values() for k, v in ev.run(embedder).items()}
    assert m["fudd/fm1/top1"] == m["fudd/fm1/zeroshot_top1"] == zeroshot_metrics["zeroshot/fm/top1"]
    assert m["fudd/fm3/zeroshot_top1"] == zeroshot_metrics["zeroshot/fm/top1"]
    # FuDD reorders only the 3 ambiguous classes: top-5 accuracy is the initial classifier's.
    assert m["fudd/fm3/top5"] == zeroshot_metrics["zeroshot/fm/top5"]
    assert m["fudd/fm3/top1"] <= m["fudd/fm3/ambiguous_recall"]


def test_susx_with_zero_weights_is_zeroshot(embedder, zeroshot_metrics):
    data = dict(EMOJI, database_split="train", max_database=120)
    evals = eval_builder.build({"evals": dict(
        zero=dict(type="susx", data=data, templates="icon", per_class=4, alpha=0.0, gamma=0.0),
        tipx=dict(type="susx", data=data, templates="icon", per_class=4),
        searched=dict(type="susx", data=dict(data, val_split="val", max_val=24), templates="icon", per_class=4,
                      search=True))})
    m = {k: v for ev in evals.values() for k, v in ev.run(embedder).items()}
    assert m["susx/zero/top1"] == m["susx/zero/zeroshot_top1"] == zeroshot_metrics["zeroshot/emoji/top1"]
    assert m["susx/tipx/support_size"] == 10 * 4
    assert {"susx/searched/alpha", "susx/searched/beta", "susx/searched/gamma"} <= set(m)
    with pytest.raises(ValueError, match=r"`evals.nosearch.search` needs `evals.nosearch.data.val_split`"):
        eval_builder.build({"evals": dict(nosearch=dict(type="susx", data=data, search=True))})
    with pytest.raises(ValueError, match=r"`evals.small.data`: the SuS database holds 3 records, fewer than per_class=4"):
        eval_builder.build({"evals": dict(small=dict(type="susx", data=dict(EMOJI, max_database=3),
                                                     per_class=4))})


def test_perceptionclip_on_emoji(embedder, zeroshot_metrics, tmp_path):
    one = tmp_path / "one.json"  # a single context with nothing added: PerceptionCLIP is zero-shot
    one.write_text(json.dumps({"main_template": "an emoji of {}", "attributes": {"none": {"v": [""]}}}))
    evals = eval_builder.build({"evals": dict(
        one=dict(type="perceptionclip", data=EMOJI, attributes=str(one)),
        icon=dict(type="perceptionclip", data=EMOJI, temperature=2.0,
                  attributes=os.path.join(DESCRIPTIONS, "perceptionclip_icon.json")),
        noy=dict(type="perceptionclip", data=EMOJI, infer="without_class",
                 attributes=os.path.join(DESCRIPTIONS, "perceptionclip_icon.json")))})
    m = {k: v for ev in evals.values() for k, v in ev.run(embedder).items()}
    assert m["perceptionclip/one/top1"] == m["perceptionclip/one/zeroshot_top1"]
    single = eval_builder.build({"evals": dict(z=dict(type="zeroshot", data=EMOJI, templates=["an emoji of {}."]))})
    assert m["perceptionclip/one/top1"] == single["z"].run(embedder)["zeroshot/z/top1"]
    for k in ("icon", "noy"):
        assert 0.0 <= m[f"perceptionclip/{k}/top1"] <= m[f"perceptionclip/{k}/top5"] <= 1.0


def test_cased_on_emoji(embedder):
    ev = eval_builder.build({"evals": dict(
        voc=dict(type="cased", data=dict(EMOJI, database_split="train", max_database=150)))})["voc"]
    preds, nearest, index, _ = ev.predict(embedder)
    assert len(preds) == len(index) == 40
    # Every prediction is a word of a database caption (or CaSED's fallback "object").
    words = {w for c in ev.captions for w in cased.caption_words(c)} | {"object"}
    assert set(preds) <= words and set(nearest) <= set(ev.captions)
    m = ev.run(embedder)
    assert -1.0 <= m["cased/voc/semantic_similarity"] <= 1.0
    assert 1 / 40 <= m["cased/voc/cluster_accuracy"] <= 1.0
    # Predicting the true class name itself scores semantic similarity 1 and cluster accuracy 1.
    truth = [ev.class_names[y] for y in ev.labels[index]]
    perfect = ev._metrics(truth, ev.labels[index])
    assert perfect["semantic_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["cluster_accuracy"] == perfect["semantic_iou"] == perfect["exact"] == 1.0
    with pytest.raises(ValueError, match=r"`evals.tiny.data`: the caption database holds 2 distinct captions, fewer than k=10"):
        cased.CaSEDEvaluator(ev.data, ev.labels, ev.class_names, ["a", "b", "a"], name="tiny")


def test_lit_eval_config_entries_validate_and_build():
    spec = importlib.util.spec_from_file_location("lit_eval", os.path.join(REPO, "configs", "lit_eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    evals = module.get_config().evals.to_dict()
    mine = {k: v for k, v in evals.items() if v["type"] in ("perceptionclip", "fudd", "cased", "susx")}
    assert {v["type"] for v in mine.values()} == {"perceptionclip", "fudd", "cased", "susx"}
    config_check.validate_evals(mine)
    # CaSED's entries read every training caption to build (its from_config runs in test_cased_on_emoji).
    cheap = {k: v for k, v in mine.items() if v["type"] != "cased"}
    assert set(eval_builder.build({"evals": cheap})) == set(cheap)
    with pytest.raises(ValueError, match=r"evals.bad"):
        config_check.validate_evals({"bad": dict(mine["fashion_mnist_fudd"], k_ambiguous=3)})
