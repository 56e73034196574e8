"""DreamLIP's subcaption-specific grouping loss (vljax.losses.dreamlip `subcaption_grouping`, issue 25
item 2): a float64 numpy reference written from the official code (open_clip/loss.py `ClipLoss.forward`,
the `use_finegrained_loss` block, and `pairwise_contrastive_loss`) for the value and, by central finite
differences, the gradient, with both normalisations and a threshold; `dreamlip` unchanged with the
grouping off; 8 devices equal to one; refusals naming the keys; the patch tokens the model gives; and
`configs/clip.py:dreamlip=2` learning through `python -m vljax.main` with `train/sgl` logged."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, data_mesh, finite_differences, normalised_rows, run_main
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vljax import config_check, metrics, objective
from vljax.data import sources, tfds_writer
from vljax.losses import dreamlip
from vljax.models.two_towers import TwoTowers

sys.path.insert(0, os.path.join(REPO, "configs"))
import clip  # noqa: E402

B, K, NP, D = 16, 3, 6, 8  # images, texts per image, patches, joint width


@pytest.fixture(scope="module")
def data():
    """Each text near one of its image's patches, so the groupings differ from the mean patch."""
    rng = np.random.default_rng(0)
    patches = normalised_rows(rng, B, NP, D)
    pick = rng.integers(0, NP, size=(B, K))
    sub = patches[np.arange(B)[:, None], pick] + 0.7 * rng.normal(size=(B, K, D))
    sub = (sub / np.linalg.norm(sub, axis=-1, keepdims=True)).astype(np.float32)
    zimg = normalised_rows(rng, B, D)
    return dict(zimg=zimg, sub=sub, patches=patches, t=np.float32(4.0))


def _normalize(x):  # torch F.normalize(p=2, dim=-1)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _cross_entropy(logits):  # F.cross_entropy(logits, eye): the diagonal is the target
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return np.mean(lse - np.diag(logits))


def ref_grouping(patches, sub, t, delta=0.0, norm="minmax"):
    """The official block, line for line in float64 numpy, on one device (world_size 1), with each
    image's own texts (see the module docstring's deviations) and logit_scale_local = t."""
    bs, number_text, c = sub.shape
    local = _normalize(patches)                                    # local_image_features [b, M, c]
    texts = _normalize(sub)                                        # all_text_features [b, t, c]
    similarity = np.einsum("btd,bpd->btp", texts, local)
    min_val, max_val = similarity.min(-1, keepdims=True), similarity.max(-1, keepdims=True)
    if norm == "minmax":
        normalized = (similarity - min_val) / (max_val - min_val + 1e-10)
    else:
        e = np.exp(similarity - max_val)
        normalized = e / e.sum(-1, keepdims=True)
    threshold = 1.0 / local.shape[1] if delta < 0 else delta
    normalized = np.where(normalized < threshold, 0.0, normalized)
    weights = normalized / normalized.sum(-1, keepdims=True)
    grouped = _normalize(np.einsum("btp,bpd->btd", weights, local))
    # pairwise_contrastive_loss(all_text_features, grouped, logit_scale): a = texts, b = groupings
    text_features, image_features = texts.reshape(-1, c), grouped.reshape(-1, c)
    return 0.5 * (_cross_entropy(t * text_features @ image_features.T)
                  + _cross_entropy(t * image_features @ text_features.T))


GROUPINGS = [dict(delta=0.0, norm="minmax"), dict(delta=0.3, norm="minmax"), dict(delta=-1.0, norm="softmax")]


@pytest.mark.parametrize("opts", GROUPINGS, ids=lambda o: f"{o['norm']}-{o['delta']}")
def test_grouping_matches_numpy_reference(data, opts):
    p, s, t = data["patches"][:4], data["sub"][:4], data["t"]
    f64 = [a.astype(np.float64) for a in (p, s)]
    ref = lambda pp, ss, tt: ref_grouping(pp, ss, float(tt), **opts)  # noqa: E731
    fn = lambda pp, ss, tt: dreamlip.subcaption_grouping(pp, ss, tt, **opts)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(p, s, t)
    np.testing.assert_allclose(value, ref(*f64, t), rtol=1e-5)
    for g, r in zip(grads, finite_differences(ref, (p, s, t))):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5)
    if opts["delta"] > 0:  # the threshold drops patches here (not an inert setting)
        sim = np.einsum("btd,bpd->btp", f64[1], f64[0])
        lo, hi = sim.min(-1, keepdims=True), sim.max(-1, keepdims=True)
        dropped = ((sim - lo) / (hi - lo) < opts["delta"]) & (sim > lo)
        assert dropped.any()


def test_dreamlip_adds_the_weighted_grouping_and_is_unchanged_without_it(data):
    zimg, sub, patches, t = data["zimg"], data["sub"], data["patches"], data["t"]
    f = lambda *a, **k: jax.jit(functools.partial(dreamlip.dreamlip_loss, **k))(*a)  # noqa: E731
    off = f(zimg, sub, t)
    # sgl_weight=0: the same value, bit for bit, with or without patches given
    assert np.asarray(f(zimg, sub, t, patches, sgl_weight=0.0)) == np.asarray(off)
    on = f(zimg, sub, t, patches, sgl_weight=0.5, sgl_delta=0.2)
    grouping = dreamlip.subcaption_grouping(patches, sub, t, delta=0.2)
    np.testing.assert_allclose(on, off + 0.5 * grouping, rtol=1e-6)
    # The registered loss: no extra input, no part and no stored tokens unless the weight is > 0.
    assert objective.spec({"name": "dreamlip"}).inputs == ("zimg", "sub/ztxt", "t")
    assert not objective.needs_tokens({"name": "dreamlip", "sgl_weight": 0.0})
    assert objective.spec({"name": "dreamlip", "sgl_weight": 1.0}).inputs[-1] == "img/patches_proj"
    assert objective.needs_tokens({"name": "dreamlip", "sgl_weight": 1.0})


def _sharded_value_and_grad(fn, args, specs, mesh, axis):
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    f = jax.shard_map(lambda *a: fn(*a, axis_name=axis), mesh=mesh, in_specs=tuple(specs), out_specs=P())
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)


def _eight_devices_equal_one_device(data, impl, mesh, axis):
    args = (data["zimg"], data["sub"], data["t"], data["patches"])
    opts = dict(sgl_weight=1.0, sgl_delta=0.2, sgl_norm="minmax")
    ref_value, ref_grads = jax.jit(jax.value_and_grad(
        lambda *a: dreamlip.dreamlip_loss(*a, **opts), argnums=(0, 1, 2, 3)))(*args)
    rows = P(axis)
    fn = lambda *a, axis_name: dreamlip.dreamlip_loss(*a, axis_name=axis_name, impl=impl, **opts)  # noqa: E731
    value, grads = _sharded_value_and_grad(fn, args, (rows, rows, P(), rows), mesh, axis)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_eight_devices_equal_one_device(data):
    """The batch over ("data", "fsdp") of a 2 x 4 mesh, as the trainer splits it with FSDP."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    _eight_devices_equal_one_device(data, "all_gather", mesh, ("data", "fsdp"))


@pytest.mark.slow  # a second compile of the sharded loss (about 3 s)
def test_eight_devices_equal_one_device_ring(data):
    _eight_devices_equal_one_device(data, "ring", data_mesh(8), "data")


def _naflex(config):
    config.model.image_model = "naflex_vit"
    config.model.image = dict(width=32, depth=1, num_heads=2, patch_size=8, num_classes=128)


def test_bad_options_are_refused_naming_the_key(data):
    args = (data["zimg"], data["sub"], data["t"], data["patches"])
    for opts, key in ((dict(sgl_weight=-1.0), "sgl_weight"), (dict(sgl_weight=1.0, sgl_delta=1.0), "sgl_delta"),
                      (dict(sgl_weight=1.0, sgl_norm="l2"), "sgl_norm")):
        with pytest.raises(ValueError, match=f"config key `loss.{key}`"):
            dreamlip.dreamlip_loss(*args, **opts)
        with pytest.raises(ValueError, match=f"config key `loss.{key}`"):
            objective.spec(dict(name="dreamlip", **opts))
    with pytest.raises(ValueError, match="config key `loss.sgl_weight`: .*patch tokens"):
        dreamlip.dreamlip_loss(*args[:3], sgl_weight=1.0)
    # The config check: bad values, a tower without a head or with padded (NaFlex) patches, a typo.
    for edit, key in ((lambda c: c.loss.update(sgl_norm="l2"), "loss.sgl_norm"),
                      (lambda c: c.loss.update(sgl_delta=2.0), "loss.sgl_delta"),
                      (lambda c: c.model.image.update(num_classes=0), "model.image.num_classes"),
                      (_naflex, "model.image_model"),
                      (lambda c: c.loss.update(sgl_wieght=1.0), "loss.sgl_wieght")):
        config = clip.get_config("dreamlip=2")
        edit(config)
        with pytest.raises(ValueError, match=f"config key `{key}`"):
            config_check.validate(config)
    config_check.validate(clip.get_config("dreamlip=2,sgl=0"))  # the grouping off: no patches needed
    with pytest.raises(ValueError, match="`queue=`, `dreamlip=` each choose the loss"):
        clip.get_config("dreamlip=2,queue=64")


def test_clip_config_and_the_model_patches():
    """configs/clip.py:dreamlip=N sets the loss and the sub-captions; the model's img/patches_proj
    is img/tokens_proj without the class token (ViT, pool_type "cls"), all of them without one."""
    c = clip.get_config("dreamlip=3,sgl=0.5,sgl_delta=0.1,sgl_norm=softmax")
    assert dict(c.loss) == dict(name="dreamlip", sgl_weight=0.5, sgl_delta=0.1, sgl_norm="softmax")
    assert dict(c.input.subcaptions) == dict(num=3)
    vit = dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, num_classes=8)
    x = jnp.zeros((1, 16, 16, 3))
    model = TwoTowers(image=vit)  # the ViT's default pool_type, "cls"
    _, _, out = jax.jit(lambda x: model.init_with_output(jax.random.key(0), x, None)[0])(x)
    assert model.image_prefix_tokens() == 1 and out["img/patches_proj"].shape == (1, 4, 8)
    np.testing.assert_array_equal(out["img/patches_proj"], out["img/tokens_proj"][:, 1:])
    assert TwoTowers(image=dict(vit, pool_type="gap")).image_prefix_tokens() == 0
    assert TwoTowers(image_model="efficientnet_lite").image_prefix_tokens() == 0


_MAIN_CONFIG = """import sys
sys.path.insert(0, {configs!r})
import clip

def get_config(arg=None):
    c = clip.get_config("dreamlip=2,size=32,batch=16,steps=40")
    c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.schedule = [(".*", dict(decay_type="cosine", warmup_steps=4))]
    c.evals, c.select_metric, c.eval_every, c.ckpt_every, c.log_every, c.progress = {{}}, None, 0, 40, 1, False
    c.plot = False
    return c
"""


@pytest.mark.slow
def test_clip_dreamlip_with_grouping_through_main(tmp_path):
    """`python -m vljax.main` on configs/clip.py:dreamlip=2 (tiny towers, 32 px, 40 steps, demo
    data): the loss and its logged grouping term `train/sgl` fall."""
    if not all(tfds_writer.is_built(n, sources.default_data_dir()) for n in ("vljax_emoji", "vljax_openclipart")):
        pytest.skip("demo sets not built: python3 -m vljax.data.build_demo")
    cfg = tmp_path / "dreamlip.py"
    cfg.write_text(_MAIN_CONFIG.format(configs=os.path.join(REPO, "configs")))
    wd = tmp_path / "wd"
    run_main(cfg, wd, devices=2)
    rows = [r for r in metrics.read_metrics(os.path.join(wd, "metrics.jsonl")) if "train/loss" in r]
    loss, sgl = np.array([r["train/loss"] for r in rows]), np.array([r["train/sgl"] for r in rows])
    assert len(loss) == 40 and np.all(np.isfinite(loss)) and np.all(np.isfinite(sgl))
    assert np.mean(loss[-8:]) < np.mean(loss[:8]) - 0.3, loss
    assert np.mean(sgl[-8:]) < np.mean(sgl[:8]) - 0.2, sgl


@pytest.mark.slow  # a Trainer: init, the feature store, the step's compile (about 18 s)
def test_grouping_on_stored_lit_tokens(tmp_path):
    """With a locked trunk whose features are stored, the grouping loss makes the store keep the
    trunk's tokens and the step project them (vljax/step.py): `train/sgl` is logged, finite."""
    from absl import flags  # noqa: PLC0415
    flags.FLAGS.mark_as_parsed()
    from helpers import make_shapes_manifest, tiny_config  # noqa: PLC0415

    from vljax import train  # noqa: PLC0415
    config = tiny_config(make_shapes_manifest(str(tmp_path / "shapes"), n_per=1), "lit", steps=5, batch=8)
    config.loss = dict(name="dreamlip", sgl_weight=1.0, sgl_delta=0.1)
    config.input.subcaptions = dict(num=2)
    train.Trainer(config, str(tmp_path / "run")).fit()
    rows = [r for r in metrics.read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 5 and all(np.isfinite(r["train/sgl"]) and r["train/sgl"] > 0 for r in rows)
