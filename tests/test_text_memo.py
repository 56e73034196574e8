"""config.text_cache: the text tower's locked lowest blocks run once per distinct text
(vljax/text_memo.py), with the same results as running them in every step and evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import losses_of, make_shapes_manifest, tiny_config
from vljax import train
from vljax.models.two_towers import TwoTowers
from vljax.text_memo import TextMemo, lower_params

TEXT = dict(variant=None, width=32, depth=3, mlp_dim=64, num_heads=2, vocab_size=100, max_len=8,
            num_classes=16, causal=True, pool_type="eot", eot_id=99)


@pytest.fixture(scope="module")
def tiny():
    model = TwoTowers(image_model="vit", image=dict(variant=None, width=16, depth=1, mlp_dim=32,
                                                    num_heads=2, patch_size=8, num_classes=16),
                      text_model="text_transformer", text=TEXT)
    ids = np.random.default_rng(0).integers(1, 99, (20, 8)).astype(np.int32)
    params = model.init(jax.random.key(0), None, jnp.asarray(ids[:2]))["params"]
    return model, params, ids


def test_memo_equals_the_lower_blocks_and_computes_each_text_once(tiny):
    model, params, ids = tiny
    want = np.asarray(model.apply({"params": params}, jnp.asarray(ids), 2, method=TwoTowers.text_lower))
    memo = TextMemo(model, params, 2, chunk=8)
    assert memo.chunk % len(jax.local_devices()) == 0
    np.testing.assert_allclose(memo(ids[:12]), want[:12], rtol=1e-5, atol=1e-5)
    assert memo.computed == 12 and len(memo) == 12
    got = memo(np.concatenate([ids[5:], ids[:3], ids[19:]]))  # 5..19 and 0..2 seen; 19 twice
    np.testing.assert_allclose(got, np.concatenate([want[5:], want[:3], want[19:]]), rtol=1e-5, atol=1e-5)
    assert memo.computed == 20 and len(memo) == 20  # only rows 12..19 were new, each once
    # Only the locked part of the tower is copied: the embeddings and blocks 0, 1.
    keys = lower_params(params, 2)
    assert any("encoderblock_1/" in k for k in keys) and not any("encoderblock_2/" in k for k in keys)
    assert not any(k.startswith(("img/", "txt/head", "txt/Encoder_0/encoder_norm")) for k in keys)


def test_memo_memory_is_bounded_and_results_stay_right(tiny):
    model, params, ids = tiny
    want = np.asarray(model.apply({"params": params}, jnp.asarray(ids), 1, method=TwoTowers.text_lower))
    one_row = want[0].nbytes
    memo = TextMemo(model, params, 1, chunk=8, max_bytes=5 * one_row)
    np.testing.assert_allclose(memo(ids), want, rtol=1e-5, atol=1e-5)
    assert len(memo) == 5 and memo.bytes == 5 * one_row
    np.testing.assert_allclose(memo(ids[::-1]), want[::-1], rtol=1e-5, atol=1e-5)
    assert memo.computed == 20 + 15  # the 15 rows that did not fit are computed again
    with pytest.raises(ValueError, match="at least one locked text block"):
        TextMemo(model, params, 0)


def _lit_config(manifest, steps):
    config = tiny_config(manifest, "lit", steps=steps, batch=16)
    config.model.text.update(depth=3)
    tune = dict(decay_type="cosine", warmup_steps=3)
    config.schedule = [("img/head/.*", tune), ("img/.*", None),
                       ("txt/(Embed_0|pos_embedding).*", None),
                       ("txt/Encoder_0/encoderblock_[01]/.*", None), (".*", tune)]
    config.evals = dict(shapes=dict(type="retrieval", data=dict(source="jsonl", path=manifest)))
    config.eval_every = steps
    return config


@pytest.mark.slow  # two short LiT runs with an evaluation (about a minute); the memo itself is checked fast above
def test_text_cache_trains_and_evaluates_as_the_whole_tower(tmp_path):
    """LiT with the text tower's embeddings and blocks 0-1 locked: with text_cache the captions'
    states come from the memo and every step runs block 2 and the head only; the losses step by
    step and the evaluation equal those of the run that runs every block (8 devices)."""
    manifest = make_shapes_manifest(str(tmp_path / "shapes"), n_per=2)
    runs = {}
    for cached in (True, False):
        config = _lit_config(manifest, steps=5)
        config.text_cache = cached
        trainer = train.Trainer(config, str(tmp_path / f"run_{cached}"))
        assert trainer.text_blocks == 2
        trainer.fit()
        runs[cached] = (losses_of(tmp_path / f"run_{cached}"), trainer.evaluate(5))
        if cached:
            memo = trainer.text_memo()
            # 24 records x 2 captions, drawn 80 times: every distinct caption computed once.
            assert 0 < memo.computed == len(memo) <= 48
    assert len(runs[True][0]) == 5
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-7)
    assert runs[True][1].keys() == runs[False][1].keys()
    for k in (k for k in runs[True][1] if not k.startswith("time/")):
        np.testing.assert_allclose(runs[True][1][k], runs[False][1][k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_text_cache_without_locked_blocks_is_refused(tmp_path):
    manifest = make_shapes_manifest(str(tmp_path / "shapes"), n_per=1)
    config = tiny_config(manifest, "lit", steps=4)
    config.text_cache = True
    with pytest.raises(ValueError, match="config key `text_cache`"):
        train.Trainer(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()
