"""Training stages (vljax/stages.py): FLIP's masked pre-training with an unmasked tune, CLIPA's short
sequences; and bfloat16 compute for every tower kind."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import losses_of, make_shapes_manifest, tiny_config

from vljax import checkpoints, factory, stages, train
from vljax.convert.posemb import resample_posemb
from vljax.models.vit import ViT


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2)


def _staged(manifest, steps=8):
    config = tiny_config(manifest, "clip", steps=steps, batch=8)
    config.stages = [dict(until=steps // 2, image_size=16, max_len=8, patch_dropout=0.5), dict(until=steps)]
    return config


def test_vit_resamples_its_position_embedding_for_a_smaller_grid():
    vit = ViT(variant=None, width=16, depth=1, num_heads=2, patch_size=4, pool_type="gap",
              posemb_grid=(4, 4))
    params = vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert params["pos_embedding"].shape == (1, 16, 16)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    got = vit.apply({"params": params}, x)[0]
    # Reference: a ViT of the small grid holding the numpy-resampled embedding.
    small = dict(params, pos_embedding=resample_posemb(np.asarray(params["pos_embedding"]), (2, 2)))
    want = ViT(variant=None, width=16, depth=1, num_heads=2, patch_size=4, pool_type="gap").apply(
        {"params": small}, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stage_config_errors_name_the_key(manifest):
    config = _staged(manifest)
    config.stages[-1] = dict(until=7)
    with pytest.raises(ValueError, match=r"stages\[1\].until"):
        stages.parse(config)
    config = _staged(manifest)
    config.stages[0] = dict(until=4, imag_size=16)
    with pytest.raises(ValueError, match=r"stages\[0\].*imag_size"):
        stages.parse(config)
    config = _staged(manifest)
    config.stages[0] = dict(until=4, max_len=64)
    with pytest.raises(ValueError, match="exceeds tokenizer.max_len"):
        stages.parse(config)


@pytest.mark.slow  # three trainer runs with a recompile per stage (~50 s): the default run's 15-minute budget
def test_staged_run_learns_compiles_once_per_stage_and_resumes_exactly(manifest, tmp_path, monkeypatch, caplog):
    config = _staged(manifest)
    spec = factory.spec_from_config(config)
    assert spec["model"]["image"]["posemb_grid"] == [4, 4]  # the full resolution's grid (32 px / 8)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "Finished XLA compilation of jit(step_fn)" in r.getMessage()]
    assert len(compiles) == 2  # one step per stage
    losses = losses_of(tmp_path / "straight")
    assert len(losses) == 8 and all(np.isfinite(losses))
    # The state never changes shape: the position embedding stays on the 4 x 4 grid.
    assert straight["params"]["img"]["pos_embedding"].shape == (1, 16, 32)

    # Preempted inside stage 0 and again at the stage boundary: the resumed run is the same run.
    original = checkpoints.PreemptionGuard.reached
    for stop_at in (3, 4):
        monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step, s=stop_at: step == s)
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    np.testing.assert_allclose(losses_of(tmp_path / "resumed"), losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


BERT_TINY = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=16, type_vocab_size=2, pool_type="mean", num_classes=32)


@pytest.mark.slow
@pytest.mark.parametrize("towers", ["vit+text_transformer", "vit+bert", "efficientnet_lite+bert"])
def test_bfloat16_compute_learns_and_tracks_float32(manifest, tmp_path, towers):
    """bf16 compute, fp32 params / optimizer state / loss: learns, and stays near the fp32 run.

    Every tower kind runs in bf16. EfficientNet-Lite is what vljax ships it as: the pretrained
    ImageNet tower (its batch norm folded into the convolutions), locked, run every step
    (`lit_cache=False`, so the trunk computes in bf16). From random initialisation that tower has no
    normalisation and does not train at this size in fp32 either (measured: the tiny run stays at
    chance, ln 16, with either text tower), so it is not compared from scratch.
    Tolerances: the first loss (same params: bf16 rounding alone) within 1%, the first 5 within 5%,
    and the mean of the last 10 within 10% (after 30 steps, trajectories differ step by step as any two
    runs with other rounding do; measured: 0.4%, 2.5%, 2%)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(manifest, "lit" if towers.startswith("efficientnet") else "clip", steps=30, batch=16)
        if towers.endswith("+bert"):
            config.model.text_model = "bert"
            config.model.text = dict(BERT_TINY)
            config.tokenizer = dict(kind="bert", max_len=16)
        if towers.startswith("efficientnet"):
            config.lit_cache = False
            config.input.image_size = 64
            del config.input["value_range"]
            config.input.value_range = "efficientnet"
            config.model.image_model = "efficientnet_lite"
            config.model.image = dict(variant="lite0", num_classes=32)
            config.model_init = dict(img="efficientnet_lite0")
        config.dtype = dtype
        workdir = tmp_path / f"{towers}_{dtype}"
        state = train.train_and_evaluate(config, str(workdir))
        leaves = jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])
        assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
        runs[dtype] = np.asarray(losses_of(workdir))
    for dtype, losses in runs.items():
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (dtype, losses)
    np.testing.assert_allclose(runs["bfloat16"][0], runs["float32"][0], rtol=0.01)  # same params: numerics
    np.testing.assert_allclose(runs["bfloat16"][:5], runs["float32"][:5], rtol=0.05)
    np.testing.assert_allclose(np.mean(runs["bfloat16"][-10:]), np.mean(runs["float32"][-10:]), rtol=0.1)
