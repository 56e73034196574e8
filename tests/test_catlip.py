"""CatLIP (vljax/catlip.py, vljax/caption_labels.py, vljax/losses/catlip.py): the caption vocabulary,
the per-example targets, the head's loss against numpy (value and gradient), 1 device == 8 devices
with the head sharded over the vocabulary, the config check, and (slow) a run through vljax.main."""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import REPO, make_shapes_manifest, run_main, tiny_config
from test_configs import _load
from vljax import caption_labels, catlip, config_check, factory, metrics, objective, sharding
from vljax.data import pipeline
from vljax.losses.catlip import catlip_loss
from vljax.tokenizers import get_tokenizer

CAPTIONS = ["A red cat on a mat.", "Two cats and a dog", "the dog's ball", "Red balls!"]


class _Captions:
    """A stand-in source: captions only (what the vocabulary reads)."""

    def __init__(self, captions, key="k"):
        self.captions, self.key = captions, key

    def __len__(self):
        return len(self.captions)

    def captions_of(self, i):
        return [self.captions[i], ""]

    def cache_key(self):
        return self.key


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=1)


def test_vocabulary_of_a_tiny_caption_list_is_exact():
    assert caption_labels.terms_of("A red cat on a mat.") == ["red", "cat", "mat"]
    assert caption_labels.terms_of("the dog's ball") == ["dog", "ball"]
    assert caption_labels.terms_of("A red cat on a mat.", bigrams=True) == ["red", "cat", "mat", "red cat", "cat mat"]
    assert caption_labels.build_vocabulary(CAPTIONS, min_count=2) == (["ball", "cat", "dog", "red"], [2, 2, 2, 2])
    assert caption_labels.build_vocabulary(CAPTIONS, min_count=1, max_terms=5) == (
        ["ball", "cat", "dog", "red", "mat"], [2, 2, 2, 2, 1])
    assert caption_labels.build_vocabulary(CAPTIONS, min_count=2, max_terms=2) == (["ball", "cat"], [2, 2])
    assert caption_labels.build_vocabulary(["boxes", "a box", "berries", "glass"], min_count=1)[0] == [
        "box", "berry", "glass"]


def test_vocabulary_file_is_written_once_read_back_and_refused_when_stale(tmp_path):
    settings = dict(min_count=2, max_terms=0, bigrams=False)
    src = [_Captions(CAPTIONS)]
    record = caption_labels.vocabulary_for(src, tmp_path, settings)
    assert record["terms"] == ["ball", "cat", "dog", "red"] and record["counts"] == [2, 2, 2, 2]
    assert not (tmp_path / caption_labels.VOCAB_FILE).exists()  # extracting writes nothing
    caption_labels.write_vocabulary(tmp_path, record)
    assert json.loads((tmp_path / caption_labels.VOCAB_FILE).read_text()) == record
    # A resumed run reads the file (not the captions: these would give another vocabulary).
    same_key = [_Captions(["zebra zebra", "zebra"] + CAPTIONS[2:])]
    assert caption_labels.vocabulary_for(same_key, tmp_path, settings) == record
    with pytest.raises(ValueError, match=r"caption_vocab.json: written for .*settings"):
        caption_labels.vocabulary_for(src, tmp_path, {**settings, "min_count": 1})
    with pytest.raises(ValueError, match=r"caption_vocab.json: written for sources"):
        caption_labels.vocabulary_for([_Captions(CAPTIONS, key="other")], tmp_path, settings)
    with pytest.raises(ValueError, match=r"`catlip.min_count`"):
        caption_labels.vocabulary_for(src, tmp_path / "new", {**settings, "min_count": 9})


def test_targets_are_made_per_example_in_the_pipeline(manifest):
    targets = caption_labels.Targets(("ball", "cat", "dog", "red"))
    assert targets({"caption": "Red cats"})["caption_labels"].tolist() == [False, True, False, True]
    assert targets({"skip": "decode_error"}) == {"skip": "decode_error"}
    assert pickle.loads(pickle.dumps(targets))({"caption": "a dog"})["caption_labels"].tolist() == [
        False, False, True, False]
    vocab = tuple(caption_labels.build_vocabulary(
        caption_labels.training_captions([_ManifestCaptions(manifest)]), min_count=1)[0])
    config = tiny_config(manifest).input
    config.keep_captions = True
    it = pipeline.make_train_iterator(config, get_tokenizer("clip", max_len=16), seed=0, process_index=0,
                                      process_count=1, caption_targets=caption_labels.Targets(vocab))
    batch = next(it)
    it.close()
    assert batch["caption_labels"].shape == (16, len(vocab)) and batch["caption_labels"].dtype == bool
    want = np.stack([caption_labels.Targets(vocab)({"caption": c})["caption_labels"] for c in batch["caption"]])
    np.testing.assert_array_equal(batch["caption_labels"], want)
    assert batch["caption_labels"].sum(axis=1).min() == 2  # "a red circle": colour and shape


class _ManifestCaptions(_Captions):
    def __init__(self, manifest):
        rows = [json.loads(line) for line in open(manifest)]
        super().__init__([c for r in rows for c in r["captions"]])


def _reference(z, kernel, bias, y, kind="bce"):
    """CatLIP's loss from its definition (losses/catlip.py), float64, and its gradients for bce."""
    z, kernel, bias, y = (np.asarray(a, np.float64) for a in (z, kernel, bias, y))
    logits = z @ kernel + bias
    p = 1 / (1 + np.exp(-logits))
    if kind == "bce":
        per = np.logaddexp(0, logits) - y * logits
    else:  # ASL, Ridnik et al. 2021 Eq. 6-8, gamma_neg 4, gamma_pos 1, margin 0.05
        pm = np.maximum(p - 0.05, 0)
        per = -(y * (1 - p) * np.log(p) + (1 - y) * pm ** 4 * np.log(1 - pm))
    labeled = y.sum(1) > 0
    value = per.mean(1)[labeled].sum() / labeled.sum()
    dlogits = (p - y) / y.shape[1] * labeled[:, None] / labeled.sum()
    return value, {"kernel": z.T @ dlogits, "bias": dlogits.sum(0), "z": dlogits @ kernel.T}


@pytest.fixture(scope="module")
def head_data():
    rng = np.random.default_rng(0)
    b, d, v = 16, 8, 64
    z = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.uniform(size=(b, v)) < 0.1
    y[3] = False  # a caption with no vocabulary term: left out of the mean
    kernel = rng.normal(size=(d, v)).astype(np.float32)
    bias = rng.normal(size=(v,)).astype(np.float32) * 0.1
    return z, kernel, bias, y


def test_loss_value_and_gradient_equal_the_reference(head_data):
    z, kernel, bias, y = head_data

    def f(head, z):
        return catlip_loss(catlip.logits(head, z), y)
    value, (g_head, g_z) = jax.value_and_grad(f, argnums=(0, 1))({"kernel": kernel, "bias": bias}, z)
    want, grads = _reference(z, kernel, bias, y)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(g_head["kernel"], grads["kernel"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_head["bias"], grads["bias"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_z, grads["z"], rtol=1e-5, atol=1e-8)
    asl = catlip_loss(catlip.logits({"kernel": kernel, "bias": bias}, z), y, kind="asl")
    np.testing.assert_allclose(asl, _reference(z, kernel, bias, y, "asl")[0], rtol=1e-5)
    with pytest.raises(ValueError, match="`loss.kind`"):
        catlip_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), kind="softmax")


def test_head_sharded_over_the_vocabulary_on_8_devices_equals_one_device(head_data):
    """The step's form: logits from the head (kernel's V columns split over `fsdp`), the loss under
    objective.make_loss's shard_map over data x fsdp; value and gradients == one device."""
    z, kernel, bias, y = head_data
    config = ml_collections.ConfigDict(dict(loss=dict(name="catlip", kind="bce")))
    rules = [("catlip/.*", "fsdp")]

    def run(mesh):
        loss = objective.make_loss(config, mesh)
        params = {"catlip": {"kernel": kernel, "bias": bias}}
        psh = sharding.param_shardings(params, mesh, rules)
        params = jax.device_put(params, psh)
        bsh = sharding.batch_sharding(mesh)
        zz, yy = jax.device_put(z, bsh), jax.device_put(y, bsh)

        def f(p, zz):
            return loss({"catlip/logits": catlip.logits(p["catlip"], zz), "batch/caption_labels": yy})
        out = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, zz)
        return psh, jax.device_get(out)

    psh8, (v8, (g8, gz8)) = run(sharding.make_mesh([("data", 2), ("fsdp", 4)]))
    _, (v1, (g1, gz1)) = run(sharding.make_mesh([("data", 1)], devices=jax.devices()[:1]))
    assert psh8["catlip"]["kernel"].spec == P(None, "fsdp") and psh8["catlip"]["bias"].spec == P("fsdp")
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    np.testing.assert_allclose(v1, _reference(z, kernel, bias, y)[0], rtol=1e-6)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(g8["catlip"][k], g1["catlip"][k], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gz8, gz1, rtol=1e-5, atol=1e-9)


def test_config_check_refuses_what_cannot_work(manifest):
    config = tiny_config(manifest)
    config.catlip = dict(min_count=1)
    with pytest.raises(ValueError, match="`catlip` and `loss.name`.*'softmax'"):
        config_check.validate(config)
    config.loss = dict(name="catlip")
    config_check.validate(config)
    config.catlip = dict(min_count=0)
    with pytest.raises(ValueError, match="config key `catlip`: min_count"):
        config_check.validate(config)
    config.catlip = dict(threshold=3)
    with pytest.raises(ValueError, match=r"config key `catlip`: unknown keys \['threshold'\]"):
        config_check.validate(config)
    config.catlip = dict()
    config.mixing = dict(kind="mixup")
    with pytest.raises(ValueError, match="`catlip` and `mixing`"):
        config_check.validate(config)
    del config["mixing"]
    del config["catlip"]
    with pytest.raises(ValueError, match="config key `catlip`: loss 'catlip' takes"):
        config_check.validate(config)
    mask = {"img": {"k": True}, "catlip": {"kernel": False, "bias": True}}
    with pytest.raises(ValueError, match="`catlip` and `schedule`.*catlip/kernel"):
        catlip.check(mask)


def test_the_config_file_and_the_export():
    c = _load(os.path.join(REPO, "configs", "catlip.py")).get_config("min_count=3,bigrams=on,kind=asl")
    assert dict(c.catlip) == dict(min_count=3, max_terms=0, bigrams=True) and c.loss.kind == "asl"
    config_check.validate(c)
    assert catlip.image_only(c)  # the step runs no text tower for CatLIP's own loss
    c.loss.align_weight = 0.1
    assert not catlip.image_only(c)
    params = {"img": 1, "txt": 2, "t": 3, "catlip": {"kernel": 4}}
    assert factory.encoder_only({}, params)[1] == {"img": 1, "txt": 2, "t": 3}


# configs/catlip.py on the tests' tiny towers and shapes data, its head sharded over fsdp=2.
_MAIN_CONFIG = """import sys
sys.path.insert(0, {tests!r})
import helpers
from test_configs import _load


def get_config(arg=None):
    c, tiny = _load({path!r}).get_config("size=32,batch=16,steps=24,min_count=1"), helpers.tiny_config({manifest!r})
    c.model, c.tokenizer, c.input.data = tiny.model, tiny.tokenizer, tiny.input.data
    c.update(dict(lr=1e-2, mesh=[("data", 1), ("fsdp", 2)], eval_every=0, ckpt_every=12, log_every=1, progress=False,
                  schedule=[("txt/.*", None), ("t", None), (".*", dict(decay_type="cosine", warmup_steps=2))]))
    return c
"""


def _chance_bce(targets) -> float:
    """The mean per-label BCE of the best image-blind predictor: each term predicted with its
    frequency q over `targets` [N, V] (binary entropy H(q), averaged over the V terms)."""
    q = np.clip(targets.mean(axis=0), 1e-9, 1 - 1e-9)
    return float(np.mean(-(q * np.log(q) + (1 - q) * np.log(1 - q))))


@pytest.mark.slow  # a subprocess: imports, the init's and the step's compiles, 24 tiny steps
def test_catlip_config_through_main_learns_from_the_images(manifest, tmp_path):
    """`python -m vljax.main --config=configs/catlip.py` (tiny towers, head sharded over fsdp=2): the
    vocabulary file holds the captions' terms, the loss ends below what label frequencies alone give
    (the image-blind optimum: the head learned from the images), and the checkpoint holds the head."""
    cfg = tmp_path / "catlip_tiny.py"
    cfg.write_text(_MAIN_CONFIG.format(tests=os.path.join(REPO, "tests"), manifest=manifest,
                                       path=os.path.join(REPO, "configs", "catlip.py")))
    wd = tmp_path / "wd"
    run_main(cfg, wd, devices=2)
    captions = _ManifestCaptions(manifest).captions
    vocab = caption_labels.build_vocabulary(captions, min_count=1)[0]
    assert json.loads((wd / caption_labels.VOCAB_FILE).read_text())["terms"] == vocab
    assert sorted(vocab) == sorted(["red", "green", "blue", "yellow", "circle", "square", "triangle"])
    targets = caption_labels.Targets(tuple(vocab))
    chance = _chance_bce(np.stack([targets({"caption": c})["caption_labels"] for c in captions]))
    losses = [r["train/loss"] for r in metrics.read_metrics(str(wd / "metrics.jsonl")) if "train/loss" in r]
    assert len(losses) == 24 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert first > chance > 0.5 and last < 0.95 * chance, (first, chance, last)
    tree = (wd / "checkpoints" / "24" / "params" / "_METADATA").read_text()
    assert '{"key": "catlip", "key_type": 2}, {"key": "kernel"' in tree  # the head is checkpointed
