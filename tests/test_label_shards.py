"""The label space split over a mesh axis in the trainer (`loss.label_axis`, vljax/label_shards.py):
the update step with DEXML's label prompts, their embeddings and the label-set columns split over
the label axis equals the replicated step on one device (loss, gradient norm and the gradients
themselves, as an SGD step of rate 1 writes them into the params), on data x fsdp and on
data x label meshes with a label space that needs padding; the config check names the key."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import REPO, losses_of, run_main, tiny_config, tiny_config_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vljax import config_check, label_shards, objective, sharding
from vljax.step import make_train_step

K, B, VOCAB = 13, 16, 16  # 13 labels: padded to 16 on a label axis of 4


class _Towers(nn.Module):
    """Linear towers with TwoTowers' interface as the step uses it (images=None: text only)."""

    @nn.compact
    def __call__(self, image, text, train=False, text_lower=None):
        unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
        txt = nn.Dense(8, name="txt")
        ztxt = unit(txt(jax.nn.one_hot(text, VOCAB).mean(1)))
        zimg = None if image is None else unit(nn.Dense(8, name="img")(image.reshape(image.shape[0], -1)))
        return zimg, ztxt, {"t": jnp.exp(self.param("t", lambda _: jnp.log(10.0)))}


@pytest.fixture(scope="module")
def data():
    """(batch, label prompts [K, 5], the replicated one-device step's (metrics, params))."""
    rng = np.random.default_rng(0)
    labels = (rng.random((B, K)) < 0.25).astype(np.float32)
    labels[[2, 11]] = 0  # images without a label: they contribute 0
    batch = {"image": rng.uniform(-1, 1, size=(B, 4, 4, 3)).astype(np.float32),
             "text": rng.integers(0, VOCAB, size=(B, 5)).astype(np.int32), "labels": labels}
    label_text = rng.integers(0, VOCAB, size=(K, 5)).astype(np.int32)
    return batch, label_text, _one_step([("data", 1)], None, batch, label_text)[:2]


def _one_step(mesh_cfg, label_axis, batch, label_text):
    """(metrics, params) after one SGD step (rate 1) of DEXML's loss, and the placed prompts."""
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:int(np.prod([s for _, s in mesh_cfg]))])
    config = ml_collections.ConfigDict(dict(mesh=mesh_cfg, loss=dict(name="dexml")))
    if label_axis:
        config.loss.label_axis = label_axis
    text, rows = label_shards.place(config, mesh, label_text)
    model, tx = _Towers(), optax.sgd(1.0)
    params = model.init(jax.random.key(0), batch["image"], batch["text"])["params"]
    step = make_train_step(model, tx, objective.make_loss(config, mesh), jax.tree.map(lambda _: True, params),
                           label_text=text, label_sharding=rows)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(7)}
    with jax.set_mesh(mesh):
        state, m = jax.jit(step)(state, sharding.shard_batch(batch, mesh))
    return jax.device_get(m), jax.device_get(state["params"]), text


@pytest.mark.parametrize("mesh_cfg,label_axis", [([("data", 2), ("fsdp", 4)], "fsdp"),
                                                 ([("data", 2), ("label", 4)], "label")])
def test_label_split_step_equals_the_replicated_one(data, mesh_cfg, label_axis):
    batch, label_text, (one, p_one) = data
    split, p_split, text = _one_step(mesh_cfg, label_axis, batch, label_text)
    assert text.shape == (16, 5)  # padded to the axis's multiple with copies of prompt 0
    np.testing.assert_array_equal(text[K:], np.repeat(label_text[:1], 3, axis=0))
    assert one["train/loss"] > 0.5  # a real value, not a masked-out 0
    for key in ("train/loss", "train/grad_norm"):
        np.testing.assert_allclose(split[key], one[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_split), jax.tree.leaves(p_one)):  # params - grads
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_place_pads_and_splits_only_when_asked():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    text = np.arange(24, dtype=np.int32).reshape(8, 3)
    cfg = ml_collections.ConfigDict(dict(mesh=[("data", 2), ("fsdp", 4)], loss=dict(name="dexml")))
    assert label_shards.place(cfg, mesh, text) == (text, None)
    cfg.loss.label_axis = "fsdp"
    placed, rows = label_shards.place(cfg, mesh, text)
    assert placed is text and rows.spec == P("fsdp")  # 8 rows: already a multiple of 4
    assert label_shards.place(cfg, mesh, None) == (None, None)
    labels, mask = label_shards.padded_labels(jnp.ones((2, 5)), 8)
    np.testing.assert_array_equal(labels, np.concatenate([np.ones((2, 5)), np.zeros((2, 3))], 1))
    np.testing.assert_array_equal(mask, np.arange(8) < 5)


def test_config_check_names_label_axis(tmp_path):
    config = tiny_config(str(tmp_path / "unused.jsonl"), "clip", steps=5)
    config.mesh = [("data", 2), ("fsdp", 4)]
    config.input.labels = True
    config.loss = dict(name="dexml", label_axis="label")
    with pytest.raises(ValueError, match=r"`loss.label_axis`: 'label' is not an axis of config.mesh"):
        config_check.validate(config)
    config.loss.label_axis = "fsdp"
    config_check.validate(config)
    config.loss.multilabel_weight = 1.0
    with pytest.raises(ValueError, match=r"`loss.label_axis`: the multi-label regulariser"):
        config_check.validate(config)
    config.loss = dict(name="multilabel", label_axis="fsdp")  # a loss that takes its prompts replicated
    with pytest.raises(ValueError, match="label_axis"):
        config_check.validate(config)


def test_lit_multilabel_label_axis_argument():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import lit_multilabel
    c = lit_multilabel.get_config("loss=dexml,label_axis=data")
    config_check.validate(c)
    assert dict(c.loss) == dict(name="dexml", template="an icon of {}.", label_axis="data")
    assert "label_axis" not in lit_multilabel.get_config("loss=dexml").loss
    with pytest.raises(ValueError, match="`loss.label_axis`"):
        config_check.validate(lit_multilabel.get_config("loss=dexml,label_axis=fsdp"))


@pytest.mark.slow  # a `python -m vljax.main` subprocess on 2 devices: imports, two compiles, 4 steps
def test_main_trains_dexml_with_the_label_space_split(tmp_path):
    """`python -m vljax.main` with DEXML's label prompts split over the fsdp axis (3 labels padded
    to 4), the text tower's lowest block locked (the prompts' states computed once, split too):
    4 finite losses."""
    cfg = tiny_config_file(tmp_path / "dexml.py", tmp_path / "shapes", steps=4, batch=8, lines=[
        "c.loss = dict(name='dexml', template='a {} shape', label_axis='fsdp')",
        "c.mesh = [('fsdp', 2)]", "c.input.labels = True", "c.input.data[0]['num_labels'] = 3",
        "c.schedule = [('txt/(Embed_0|pos_embedding).*', None), ('txt/Encoder_0/encoderblock_0/.*', None), "
        "('.*', dict(decay_type='cosine', warmup_steps=1))]"])
    run_main(cfg, tmp_path / "wd", devices=2)
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and losses[0] > 0.1
