"""Every loss through the one trainer: the inputs it declares reach it (FILIP's projected tokens
and text masks, CWCL's frozen features), it learns on the tiny set, compiles once, gives the same
losses on 1 and 8 devices, and a recipe that cannot feed it is refused before any work."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (REPO, fit_counting_step_compiles, losses_of, make_shapes_manifest, tiny_config,
                     tiny_config_file)

from vljax import config_check, features, sharding, stages, train
from vljax.models.text import TextTransformer
from vljax.models.two_towers import TwoTowers


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


def _config(manifest, loss, recipe, steps):
    config = tiny_config(manifest, recipe, steps=steps)
    if loss == "softmax+multilabel":  # captions' contrastive loss plus the tags' multi-label loss
        config.loss = dict(name="softmax", multilabel_weight=1.0, multilabel_kind="bce",
                           multilabel_template="a {} shape")
        config.input.labels = True
        config.input.data[0]["num_labels"] = 3
        config.model.bias_init = -10.0
        return config
    config.loss = dict(name=loss)
    if loss == "multi_positive":
        # The shapes manifest's label sets ({shape}): 16 of 48 records share each one.
        config.loss.positives = "label_sets"
        config.input.labels = True
        config.input.data[0]["num_labels"] = 3
    if loss == "multilabel":
        # The shapes manifest's label sets ({shape} of 3) against 3 label prompts; SigLIP's t and b.
        config.loss.kind = "wan"
        config.input.labels = True
        config.input.data[0]["num_labels"] = 3
        config.model.bias_init = -10.0
    return config


def test_causal_text_mask_ends_at_eot():
    """CLIP text has no pad id: the real tokens are those up to and including end-of-text."""
    tower = TextTransformer(width=16, depth=1, num_heads=2, vocab_size=64, max_len=6, eot_id=63,
                            num_classes=8)
    tokens = jnp.array([[62, 5, 63, 0, 0, 0], [62, 7, 8, 9, 10, 63], [62, 1, 2, 0, 0, 0]])
    (_, out), _ = tower.init_with_output(jax.random.key(0), tokens)
    np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 0, 0, 0], [1] * 6, [1] * 6])


def test_projected_tokens_share_the_head():
    """img/tokens_proj is the head applied per token, normalised: the class token's equals zimg."""
    model = TwoTowers(image=dict(width=16, depth=1, num_heads=2, patch_size=8, num_classes=8, pool_type="cls"),
                      text=dict(width=16, depth=1, num_heads=2, vocab_size=64, max_len=6, eot_id=63,
                                num_classes=8))
    images, texts = jnp.ones((2, 16, 16, 3)), jnp.array([[62, 5, 63, 0, 0, 0]] * 2)
    (zimg, ztxt, out), _ = model.init_with_output(jax.random.key(0), images, texts)
    assert out["img/tokens_proj"].shape == (2, 5, 8) and out["txt/tokens_proj"].shape == (2, 6, 8)
    np.testing.assert_allclose(out["img/tokens_proj"][:, 0], zimg, atol=1e-6)
    np.testing.assert_allclose(out["txt/tokens_proj"][:, 2], ztxt, atol=1e-6)  # the EOT token
    np.testing.assert_allclose(jnp.linalg.norm(out["txt/tokens_proj"], axis=-1), 1.0, atol=1e-5)


def test_cwcl_on_a_trained_tower_is_refused(manifest, tmp_path):
    """CWCL takes the frozen modality's structure: image weights need a locked image trunk."""
    config = tiny_config(manifest, "clip", steps=10)
    config.loss = dict(name="cwcl")
    with pytest.raises(ValueError, match="`loss.ref_modality`.*img/"):
        train.Trainer(config, str(tmp_path / "run"))
    config.loss = dict(name="cwcl", ref_modality="text")
    with pytest.raises(ValueError, match="txt/"):
        train.Trainer(config, str(tmp_path / "run"))


def test_multi_positive_without_labels_is_refused(manifest, tmp_path):
    """Each `loss.positives` that the data cannot give is refused before any work, naming the key."""
    config = tiny_config(manifest, "clip", steps=10)
    config.loss = dict(name="multi_positive")  # positives="labels": shared class labels
    refusals = [("`input.label`: loss 'multi_positive'", {}),
                (r"`input.data\[0\].path`.*has none", dict(label=True)),  # no record has a 'label'
                (r"`input.data\[0\].label_key`", dict(label=True, data=[dict(source="tfds", name="vljax_emoji",
                                                                                split="train")]))]
    for match, inp in refusals:
        config.input.update(inp)
        with pytest.raises(ValueError, match=match):
            train.Trainer(config, str(tmp_path / "run"))
    config = tiny_config(manifest, "clip", steps=10)
    config.loss = dict(name="multi_positive", positives="label_sets")
    refusals = [("`input.labels`: loss 'multi_positive' \\(`loss.positives`='label_sets'\\)", {}),
                (r"`input.data\[0\].num_labels`", dict(labels=True)),
                (r"`input.data\[0\].labels_key`", dict(data=[dict(source="tfds", name="vljax_emoji", split="train")]))]
    for match, inp in refusals:
        config.input.update(inp)
        with pytest.raises(ValueError, match=match):
            train.Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    config.loss.positives = "tags"
    with pytest.raises(ValueError, match="`loss.positives`: 'tags' is not one of"):
        config_check.validate(config)


def test_multilabel_needs_label_sets_and_a_bias(manifest, tmp_path):
    """The multi-label loss takes the batch's label sets and the model's logit bias: a recipe
    without either is refused before any work, naming the key; with both, the trainer embeds one
    prompt per label of the label space (`loss.template`)."""
    config = _config(manifest, "multilabel", "clip", steps=10)
    config.model.bias_init = None
    with pytest.raises(ValueError, match="`model.bias_init`: loss 'multilabel'"):
        train.Trainer(config, str(tmp_path / "run"))
    config = _config(manifest, "multilabel", "clip", steps=10)
    config.input.labels = False
    with pytest.raises(ValueError, match="`input.labels`: loss 'multilabel'"):
        train.Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    config = _config(manifest, "multilabel", "clip", steps=10)
    config.loss.template = "a drawing of shape {}"
    trainer = train.Trainer(config, str(tmp_path / "run"))
    expected = np.asarray(trainer.tokenizer([f"a drawing of shape {k}" for k in "012"]))
    np.testing.assert_array_equal(trainer.label_text, expected)
    assert trainer.spec["logits"] == "sigmoid"  # inference gives each label its own probability
    config.loss.template = "no slot"
    with pytest.raises(ValueError, match="`loss.template`"):
        train.Trainer(config, str(tmp_path / "run2"))
    # Added to a contrastive loss: the same needs, its own template key.
    config = _config(manifest, "softmax+multilabel", "clip", steps=10)
    trainer = train.Trainer(config, str(tmp_path / "run3"))
    np.testing.assert_array_equal(trainer.label_text, trainer.tokenizer([f"a {k} shape" for k in "012"]))
    config.model.bias_init = None
    with pytest.raises(ValueError, match="`model.bias_init`: loss 'softmax \\+ multilabel_weight'"):
        train.Trainer(config, str(tmp_path / "run4"))


@pytest.mark.slow
def test_multi_positive_config_through_main(tmp_path):
    """`python -m vljax.main` trains multi_positive on the tiny JSONL set's label sets."""
    cfg = tiny_config_file(tmp_path / "tiny.py", tmp_path / "shapes", steps=8, lines=[
        "c.loss = dict(name='multi_positive', positives='label_sets', min_overlap=1.0)",
        "c.input.labels = True", "c.input.data[0]['num_labels'] = 3"])
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 8 and all(np.isfinite(losses))


def _expected_log_positives(records, per_label, batch):
    others, same, draws = records - 1, per_label - 1, batch - 1
    return sum(math.comb(same, x) * math.comb(others - same, draws - x) / math.comb(others, draws)
               * math.log(1 + x) for x in range(min(same, draws) + 1))


# (loss, recipe) pairs the trainer runs; CWCL only with a locked tower; LiT with the feature store
# (FILIP's: the trunk's tokens stored too).
RUNS = [("softmax", "clip"), ("dcl", "clip"), ("filip", "clip"), ("filip", "lit"), ("dcl", "lit"),
        ("cwcl", "lit"), ("dclw", "clip"), ("multi_positive", "clip"), ("multi_positive", "lit"),
        ("multilabel", "clip"), ("multilabel", "lit"), ("softmax+multilabel", "lit")]


@pytest.mark.slow
@pytest.mark.parametrize("loss,recipe", RUNS)
def test_loss_learns_and_compiles_once(loss, recipe, manifest, tmp_path, caplog):
    config = _config(manifest, loss, recipe, steps=30)
    config_check.validate(config)
    trainer = train.Trainer(config, str(tmp_path))
    assert fit_counting_step_compiles(trainer, caplog) == 1
    losses = losses_of(tmp_path)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    if loss == "multi_positive":
        # Its floor is the targets' entropy, E log |P(i)| (|P(i)| - 1 hypergeometric: 15 other
        # records of the same shape among 47, 15 drawn): the excess above it must shrink.
        floor = _expected_log_positives(records=48, per_label=16, batch=config.input.batch_size)
        assert last - floor < 0.85 * (first - floor), (first, last, floor)
    elif loss == "cwcl":
        # A random trunk's features are all alike (cosine near 1): the targets are near uniform
        # and the loss's floor is near log B. It must still move towards that floor.
        assert last < first and last > np.log(config.input.batch_size) - 0.5, (first, last)
    else:
        assert last < 0.8 * first, (loss, recipe, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("loss,recipe", [("filip", "clip"), ("filip", "lit"), ("cwcl", "lit"),
                                         ("multi_positive", "clip"), ("multi_positive", "lit"),
                                         ("multilabel", "lit"), ("softmax+multilabel", "clip")])
def test_loss_equal_on_1_and_8_devices(loss, recipe, manifest, tmp_path):
    results = []
    for n in (1, 8):
        config = _config(manifest, loss, recipe, steps=4)
        config.mesh = [("data", n)]
        train.train_and_evaluate(config, str(tmp_path / str(n)), devices=jax.devices()[:n])
        results.append(losses_of(tmp_path / str(n)))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4)


@pytest.mark.slow
def test_filip_on_stored_tokens_equals_the_recomputed_trunk(manifest, tmp_path):
    """LiT + FILIP with lit_cache: the store keeps the trunk's tokens (float16), every device holds
    its rows of the batch's image_tokens, and the steps equal those that run the locked trunk on
    the images, to float16's precision (2^-11 relative on the tokens)."""
    results = {}
    for cache in (True, False):
        config = _config(manifest, "filip", "lit", steps=5)
        config.lit_cache = cache
        trainer = train.Trainer(config, str(tmp_path / str(cache)))
        if cache:
            batch = next(trainer.make_input(stages.at(stages.parse(config), 0)))
            store = features.FeatureSource(next((tmp_path / "True" / "features").iterdir()))
            assert store.token_shape == (17, 32) and store[0]["tokens"].dtype == np.float16
            tokens = batch["image_tokens"]
            assert tokens.shape == (16, 17, 32) and tokens.dtype == np.float16
            sharded = sharding.shard_batch({"image_tokens": tokens}, trainer.mesh)["image_tokens"]
            rows = 16 // len(jax.devices())
            for shard in sharded.addressable_shards:  # each device: its own rows, nothing more
                lo = shard.index[0].start
                assert shard.data.shape == (rows, 17, 32)
                np.testing.assert_array_equal(np.asarray(shard.data), tokens[lo:lo + rows])
        trainer.fit()
        results[cache] = losses_of(tmp_path / str(cache))
    assert len(results[True]) == 5
    np.testing.assert_allclose(results[True], results[False], rtol=2e-3)


def _schedule_locking(*patterns):
    tune = dict(decay_type="cosine", warmup_steps=3)
    return [(p, None) for p in patterns] + [(".*", tune)]


def test_locked_text_blocks_counts_the_locked_bottom_of_the_text_tower(manifest, tmp_path):
    """The label prompts skip the text blocks that are locked with everything below them: none
    when an embedding trains, a dropout is on or the blocks are scanned; stops at the first
    block that trains."""
    def count(lines, **text):
        config = _config(manifest, "multilabel", "clip", steps=4)
        config.model.text.update(depth=3, **text)
        config.schedule = _schedule_locking(*lines)
        spec = train.factory.spec_from_config(config)
        import vljax.optim
        mask = vljax.optim.make_optimizer(config, train.factory.abstract_params(
            train.factory.build_model(spec), spec))[2]
        return train.locked_text_blocks(spec, mask)

    stem = "txt/(Embed_0|pos_embedding).*"
    assert count([stem, "txt/Encoder_0/encoderblock_[01]/.*"]) == 2
    assert count([stem, "txt/Encoder_0/encoderblock_[02]/.*"]) == 1  # block 1 trains
    assert count([stem, "txt/Encoder_0/.*", "txt/head/.*"]) == 3    # the whole tower but its norm
    assert count(["txt/Encoder_0/encoderblock_[01]/.*"]) == 0        # its embeddings train
    assert count([stem, "txt/Encoder_0/encoderblock_[01]/.*"], dropout=0.1) == 0
    assert count([stem, "txt/Encoder_0/.*"], scan=True) == 0
    assert count([]) == 0


@pytest.mark.slow  # about a minute each; the split itself is checked fast (tests/test_text.py)
@pytest.mark.parametrize("loss,tower", [
    ("multilabel", "text_transformer"),
    ("softmax+multilabel", "bert")])  # the demo's text tower (configs/lit_multilabel.py)
def test_label_prompts_run_locked_text_blocks_once(loss, tower, manifest, tmp_path):
    """With the text tower's embeddings and lowest block locked, the label prompts' states after
    that block are computed once and every step runs only the blocks above: the same losses, step
    by step, as the step that runs the whole tower on them (8 devices)."""
    results = {}
    for cached in (True, False):
        config = _config(manifest, loss, "lit", steps=6)
        if tower == "bert":
            config.tokenizer = dict(kind="bert", max_len=16)
            config.model.text_model = "bert"
            config.model.text = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                                     intermediate_size=64, num_classes=32)
            stem = "txt/(word_embeddings|position_embeddings|token_type_embeddings|embeddings_ln)/.*"
            block0 = "txt/encoderblock_0/.*"
        else:
            stem, block0 = "txt/(Embed_0|pos_embedding).*", "txt/Encoder_0/encoderblock_0/.*"
        config.schedule = [("img/head/.*", dict(decay_type="cosine", warmup_steps=3)),
                           ("img/.*", None)] + _schedule_locking(stem, block0)
        trainer = train.Trainer(config, str(tmp_path / str(cached)))
        assert trainer.label_blocks == 1
        if not cached:
            trainer.label_blocks = 0  # the step that runs every block on the prompts
        trainer.fit()
        results[cached] = losses_of(tmp_path / str(cached))
    assert len(results[True]) == 6
    np.testing.assert_allclose(results[True], results[False], rtol=1e-6, atol=1e-7)
