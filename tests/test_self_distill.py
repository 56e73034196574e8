"""SigLIP 2's self-distillation stage (vljax/teacher.py): SILC's consistency loss and TIPS' masked
prediction equal numpy references written from the papers' equations (value; gradient of the
student's logits and of its head), on one device and on an 8-device data x fsdp mesh; the EMA
teacher follows the student, is sharded by the student's rules and checkpointed exactly; the input
workers' multi-crop views; and the recipe trained by the one trainer, switched on by a stage,
resumed inside the stage as if never interrupted."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, losses_of, make_shapes_manifest, tiny_config
from jax.sharding import PartitionSpec as P
from PIL import Image

from vljax import checkpoints, config_check, metrics, sharding, stages, teacher, train
from vljax.data.preprocess import MultiCrop, Preprocess
from vljax.losses.self_distill import consistency_loss, masked_patch_loss, updated_center
from vljax.models.ssl_heads import DINOHead
from vljax.models.vit import ViT

TS, TT = 0.1, 0.04  # student, teacher temperatures


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_consistency(s, t, c, ts=TS, tt=TT):
    """DINO / SILC: mean over examples and pairs (teacher global view i, student view v != i) of
    -sum_k P_t(i)_k log P_s(v)_k; P_t = softmax((t - c) / tt), P_s = softmax(s / ts)."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    terms = []
    for b in range(len(s)):
        for i in range(t.shape[1]):
            pt = _softmax((t[b, i] - c) / tt)
            for v in range(s.shape[1]):
                if v != i:
                    terms.append(-np.sum(pt * np.log(_softmax(s[b, v] / ts))))
    return np.mean(terms)


def np_consistency_grad(s, t, c, ts=TS, tt=TT):
    """d/ds of `np_consistency`: each pair adds (softmax(s_v / ts) - P_t(i)) / ts."""
    g = np.zeros(s.shape)
    pairs = t.shape[1] * s.shape[1] - t.shape[1]
    for b in range(len(s)):
        for i in range(t.shape[1]):
            pt = _softmax((t[b, i].astype(np.float64) - c) / tt)
            for v in range(s.shape[1]):
                if v != i:
                    g[b, v] += (_softmax(s[b, v].astype(np.float64) / ts) - pt) / ts
    return g / (pairs * len(s))


def np_masked(s, t, mask, c, ts=TS, tt=TT):
    """iBOT / TIPS: per image the mean over its masked patches of -sum P_t log P_s (0 with none
    masked), then the mean over images."""
    per = []
    for b in range(len(s)):
        h = [-np.sum(_softmax((t[b, p].astype(np.float64) - c) / tt) * np.log(_softmax(s[b, p].astype(np.float64) / ts)))
             for p in range(s.shape[1]) if mask[b, p]]
        per.append(np.mean(h) if h else 0.0)
    return np.mean(per)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    b, vg, vl, k, n = 8, 2, 3, 7, 5
    s = rng.normal(size=(b, vg + vl, k)).astype(np.float32)
    t = rng.normal(size=(b, vg, k)).astype(np.float32)
    c = rng.normal(size=(k,)).astype(np.float32) * 0.1
    sp = rng.normal(size=(b, n, k)).astype(np.float32)
    tp = rng.normal(size=(b, n, k)).astype(np.float32)
    mask = rng.uniform(size=(b, n)) < 0.5
    mask[0] = False  # an image without masked patches counts 0
    return s, t, c, sp, tp, mask


def test_consistency_loss_equals_numpy_reference(logits):
    s, t, c, *_ = logits
    value, grad = jax.value_and_grad(lambda x: consistency_loss(x, t, c, student_temp=TS, teacher_temp=TT))(s)
    np.testing.assert_allclose(value, np_consistency(s, t, c), rtol=1e-5)
    np.testing.assert_allclose(grad, np_consistency_grad(s, t, c), rtol=1e-4, atol=1e-7)
    # The teacher gets no gradient (DINO: its softmax is a target).
    assert not np.any(jax.grad(lambda y: consistency_loss(s, y, c))(t))
    with pytest.raises(ValueError, match="global ones"):
        consistency_loss(s[:, :1], t, c)


def test_masked_patch_loss_and_centre_equal_numpy_reference(logits):
    _, t, c, sp, tp, mask = logits
    value, grad = jax.value_and_grad(lambda x: masked_patch_loss(x, tp, mask, c))(sp)
    np.testing.assert_allclose(value, np_masked(sp, tp, mask, c), rtol=1e-5)
    # d/ds at patch p of image b: (softmax(s / ts) - P_t) / ts / (masked patches of b) / B; 0 unmasked.
    want = np.zeros(sp.shape)
    for b in range(len(sp)):
        for p in np.flatnonzero(mask[b]):
            want[b, p] = (_softmax(sp[b, p] / TS) - _softmax((tp[b, p] - c) / TT)) / TS / mask[b].sum() / len(sp)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(updated_center(c, t, 0.9), 0.9 * c + 0.1 * t.reshape(-1, t.shape[-1]).mean(0),
                               rtol=1e-6)


def test_losses_on_a_data_x_fsdp_mesh_equal_one_device(logits):
    """Inside shard_map over 4 x 2 devices: value, gradient and centre equal the one-device ones."""
    s, t, c, sp, tp, mask = logits
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)], jax.devices()[:8])
    axes = ("data", "fsdp")

    def both(s, t, sp, tp, mask, c, axis_name=None):
        return (consistency_loss(s, t, c, axis_name) + masked_patch_loss(sp, tp, mask, c, axis_name),
                updated_center(c, t, 0.9, axis_name))

    def sharded(*a):
        return jax.shard_map(lambda *x: both(*x, axis_name=axes), mesh=mesh,
                             in_specs=(P(axes),) * 5 + (P(),), out_specs=P())(*a)

    rest = (t, sp, tp, mask, c)
    out = []
    for fn in (both, sharded):
        value_and_centre = lambda x, f=fn: f(x, *rest)  # noqa: E731
        (value, centre), grad = jax.jit(lambda x, f=value_and_centre: (
            f(x), jax.grad(lambda y: f(y)[0])(x)))(s)
        out.append((value, centre, grad))
    (v1, c1, g1), (v8, c8, g8) = out
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    np.testing.assert_allclose(c8, c1, rtol=1e-6)
    np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-9)


def _np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def np_dino_head(p, x):
    """DINO's head: MLP (GELU), L2 normalisation, weight-normalised prototypes (no bias)."""
    x = x.astype(np.float64)
    layers = sorted(k for k in p if k.startswith("mlp_"))
    for i, name in enumerate(layers):
        x = x @ p[name]["kernel"].astype(np.float64) + p[name]["bias"]
        if i < len(layers) - 1:
            x = _np_gelu(x)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    v = p["prototypes"].astype(np.float64)
    return x @ (v / np.linalg.norm(v, axis=0, keepdims=True))


def test_head_gradient_equals_finite_differences_of_numpy_reference(logits):
    """The consistency loss through the student's DINO head: jax's forward equals the numpy head's,
    and its gradient along a random direction of the head's params equals the numpy reference's
    central difference (float64)."""
    _, t, c, *_ = logits
    head = DINOHead(out_dim=7, hidden_dim=6, bottleneck_dim=4, num_layers=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5, 3)).astype(np.float32)
    params = jax.tree.map(lambda a: a * 20, head.init(jax.random.key(0), x)["params"])  # away from 0
    np.testing.assert_allclose(head.apply({"params": params}, x), np_dino_head(jax.device_get(params), x),
                               rtol=1e-4, atol=1e-5)
    loss = lambda p: consistency_loss(head.apply({"params": p}, x), t, c)  # noqa: E731
    grad = jax.grad(loss)(params)
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), jax.device_get(params))
    np_loss = lambda p: np_consistency(np_dino_head(p, x), t, c)  # noqa: E731
    eps = 1e-5
    plus = jax.tree.map(lambda a, d: np.asarray(a, np.float64) + eps * d, jax.device_get(params), direction)
    minus = jax.tree.map(lambda a, d: np.asarray(a, np.float64) - eps * d, jax.device_get(params), direction)
    fd = (np_loss(plus) - np_loss(minus)) / (2 * eps)
    got = sum(np.vdot(np.asarray(g, np.float64), d)
              for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(got, fd, rtol=2e-3)


def test_vit_token_mask_replaces_the_masked_patches():
    """A masked patch's pixels do not reach the output (its embedding is the mask token); an
    all-False mask is the plain tower."""
    vit = ViT(variant=None, width=16, depth=1, num_heads=2, patch_size=4, pool_type="gap")
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = jax.jit(vit.init)(jax.random.key(0), x)["params"]
    token = jnp.ones((16,))
    masked = jax.jit(lambda x, m: vit.apply({"params": params}, x, token_mask=(m, token))[0])
    plain = jax.jit(lambda x: vit.apply({"params": params}, x)[0])
    mask = jnp.array([[True, False, False, False], [False, False, False, True]])
    changed = x.at[0, :4, :4].add(5.0).at[1, 4:, 4:].add(5.0)  # only masked patches change
    np.testing.assert_allclose(masked(changed, mask), masked(x, mask), rtol=1e-6, atol=1e-6)
    assert not np.allclose(plain(changed), plain(x))
    np.testing.assert_allclose(masked(x, mask & False), plain(x), rtol=1e-6, atol=1e-7)


def test_random_mask_masks_exactly_the_ratio():
    m = np.asarray(teacher.random_mask(jax.random.key(0), 6, 16, 0.5))
    assert m.shape == (6, 16) and (m.sum(1) == 8).all() and len({tuple(r) for r in m}) > 1


def _tiny_sd_config(manifest, steps=6, start=4, batch=8):
    config = tiny_config(manifest, "siglip", steps=steps, batch=batch)
    config.self_distill = dict(local_views=2, out_dim=16, patch_out_dim=8, hidden_dim=16, bottleneck_dim=8,
                               num_layers=2, local_size=16)
    config.stages = stages.switch_on_at(None, steps, start, self_distill=True)
    return config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2)


def test_config_keys_and_stage_switch(manifest):
    config = _tiny_sd_config(manifest)
    assert [dict(s) for s in config.stages] == [dict(until=4), dict(until=6, self_distill=True)]
    assert stages.switch_on_at([dict(until=3, patch_dropout=0.5), dict(until=10)], 10, 2, self_distill=True) == [
        dict(until=2, patch_dropout=0.5), dict(until=3, patch_dropout=0.5, self_distill=True),
        dict(until=10, self_distill=True)]
    config_check.validate(config)
    config.self_distill.momentun = 0.9
    with pytest.raises(ValueError, match="self_distill.*momentun"):
        config_check.validate(config)
    config = _tiny_sd_config(manifest)
    del config["self_distill"]
    with pytest.raises(ValueError, match="self_distill"):
        stages.parse(config)


def test_multi_crop_views_are_seeded_by_the_example_and_leave_the_main_view_alone(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    img.save(tmp_path / "a.png")
    record = {"image": str(tmp_path / "a.png"), "captions": ["a"]}
    crop = MultiCrop(global_size=32, local_size=16, global_views=2, local_views=3)
    pre = Preprocess(image_size=32, value_range=(-1.0, 1.0), crop_scale=(0.8, 1.0), greyscale=0.5,
                     multi_crop=crop)
    a, b = (pre(record, np.random.default_rng(7)) for _ in range(2))
    plain = Preprocess(image_size=32, value_range=(-1.0, 1.0), crop_scale=(0.8, 1.0), greyscale=0.5)(
        record, np.random.default_rng(7))
    assert a["sd_global"].shape == (2, 32, 32, 3) and a["sd_local"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(a["sd_local"], b["sd_local"])  # same seed, same crops
    np.testing.assert_array_equal(a["image"], plain["image"])     # the main view is unchanged
    assert not np.array_equal(a["sd_global"][0], a["sd_global"][1])
    assert "sd_global" not in pre(record, None)  # eval mode: no views


@pytest.mark.slow  # a trainer's sharded init on 8 devices: 24-36 s on 2 busy cores
def test_teacher_state_shards_like_the_student_and_restores_exactly(manifest, tmp_path):
    config = _tiny_sd_config(manifest)
    config.mesh = [("data", 4), ("fsdp", 2)]
    config.sharding_rules = [(".*", "fsdp")]
    trainer = train.Trainer(config, str(tmp_path / "wd"), devices=jax.devices()[:8])
    state = trainer.state
    tp = traverse_util.flatten_dict(state["teacher"]["params"], sep="/")
    sp = traverse_util.flatten_dict(state["params"], sep="/")
    name = "img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
    assert tp[name].sharding.spec == sp[name].sharding.spec and "fsdp" in str(tp[name].sharding.spec)
    assert "ssl/mask_token" in tp and all(k.startswith(("img/", "ssl/")) for k in tp)
    np.testing.assert_array_equal(tp[name], sp[name])
    # EMA: m * teacher + (1 - m) * student.
    moved = jax.tree.map(lambda a: a + 1.0, teacher.student_part(state["params"]))
    got = teacher.ema(state["teacher"]["params"], moved, 0.9)
    np.testing.assert_allclose(traverse_util.flatten_dict(got, sep="/")[name], tp[name] + 0.1, rtol=1e-6, atol=1e-7)
    # Saved and restored as the item "teacher", into its shardings.
    changed = {**state, "teacher": {**state["teacher"], "center": state["teacher"]["center"] + 3.0,
                                    "started": jnp.ones((), bool)}}
    ckpt = checkpoints.Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(1, changed, {"stage": 0, "iterator": {}}, force=True)
    restored, _ = ckpt.restore(None, trainer.abstract_state)
    for a, b, want in zip(jax.tree.leaves(changed["teacher"]), jax.tree.leaves(restored["teacher"]),
                          jax.tree.leaves(trainer.abstract_state["teacher"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == want.sharding
    ckpt.close()


@pytest.mark.slow  # four trainer runs, two compiled steps each: ~150 s on 2 busy cores
def test_self_distill_stage_trains_resumes_exactly_and_equals_on_1_and_8_devices(manifest, tmp_path, monkeypatch):
    """Stage 1 (steps 5, 6) adds the self-distillation term, on a 4 x 2 data x fsdp mesh with every
    parameter (teacher included) fsdp-sharded: the loss stays finite; the teacher starts as the
    student and follows it; a run preempted inside the stage (after step 5) and resumed equals the
    uninterrupted one (teacher, centres and crops from the checkpoint); and the losses (sigmoid,
    then + self-distillation) equal those of the same recipe on one device."""
    config = _tiny_sd_config(manifest)
    config.mesh, config.sharding_rules = [("data", 4), ("fsdp", 2)], [(".*", "fsdp")]
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    losses = losses_of(tmp_path / "straight")
    assert len(losses) == 6 and all(np.isfinite(losses))
    t = straight["teacher"]
    assert bool(t["started"]) and np.any(np.asarray(t["center"]) != 0)
    ema_gap = [np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
               zip(jax.tree.leaves(t["params"]), jax.tree.leaves(teacher.student_part(straight["params"])))]
    assert 0 < max(ema_gap)  # not the student any more, but close: 2 EMA steps at 0.996
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 5)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    np.testing.assert_allclose(losses_of(tmp_path / "resumed"), losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    one = _tiny_sd_config(manifest)
    one.mesh, one.sharding_rules = [("data", 1)], [(".*", "fsdp")]
    train.Trainer(one, str(tmp_path / "one"), devices=jax.devices()[:1]).fit()
    np.testing.assert_allclose(losses, losses_of(tmp_path / "one"), rtol=1e-4)


@pytest.mark.slow  # a `python -m vljax.main` subprocess: imports, two compiles and 20 steps
def test_main_trains_configs_siglip2_with_self_distillation(tmp_path):
    """`python -m vljax.main` on configs/siglip2.py (sd=on, decoder off to keep it small) at tiny
    sizes on the shapes set: self-distillation switches on at 80% of the steps, every loss is
    finite and the image-text loss falls before it."""
    manifest = make_shapes_manifest(str(tmp_path / "shapes"), n_per=1)
    cfg = tmp_path / "sd.py"
    cfg.write_text(
        "import importlib.util, os\n"
        f"_s = importlib.util.spec_from_file_location('s2', {os.path.join(REPO, 'configs', 'siglip2.py')!r})\n"
        "siglip2 = importlib.util.module_from_spec(_s)\n_s.loader.exec_module(siglip2)\n\n"
        "def get_config(arg=None):\n"
        "    c = siglip2.get_config('decoder=off,sd=on,steps=20,batch=8,size=32,local=2')\n"
        f"    c.input.data = [dict(source='jsonl', path={manifest!r})]\n"
        "    c.model.image.update(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, num_classes=32)\n"
        "    c.model.text.update(width=32, depth=2, mlp_dim=64, num_heads=2, max_len=16, num_classes=32)\n"
        "    c.tokenizer.max_len = 16\n"
        "    c.self_distill.update(out_dim=64, patch_out_dim=32, hidden_dim=32, bottleneck_dim=16)\n"
        "    c.evals, c.select_metric, c.log_every, c.progress, c.plot = {}, None, 1, False, False\n"
        "    c.eval_every = c.ckpt_every = 0\n"
        "    c.schedule = [('.*', dict(decay_type='cosine', warmup_steps=3))]\n"
        "    c.lr = 3e-3\n"
        "    return c\n")
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(str(tmp_path / "wd" / "metrics.jsonl")) if "train/loss" in r]
    assert len(rows) == 20 and all(np.isfinite(r["train/loss"]) for r in rows)
    sd = [r for r in rows if "train/sd_consistency" in r]
    assert [r["step"] for r in sd] == [17, 18, 19, 20]
    before = [r["train/loss"] for r in rows[:16]]
    assert np.mean(before[-3:]) < np.mean(before[:3]), before
    # Both terms are cross-entropies: finite and positive. (Whether they fall is not asserted: 4
    # steps at the tail of the cosine schedule, with the centre moving from 0, do not show it.)
    assert all(r["train/sd_consistency"] > 0 and r["train/sd_masked"] > 0 for r in sd), sd


@pytest.mark.slow  # three eager passes of a tiny ViT with both heads: ~20 s of CPU
def test_a_term_of_weight_zero_is_skipped_and_the_other_is_unchanged(manifest):
    """The ablation's single-term rows (configs/siglip2.py sd=consistency / sd=masked): with
    `masked_weight=0` the value is SILC's consistency on UNMASKED student views (a reference built
    here from the tower, heads and loss); with `consistency_weight=0` it is the masked term of the
    full step (same rng, same mask), without local crops; an untrained term's centre is kept."""
    config = _tiny_sd_config(manifest)
    model, size = config.model, config.input.image_size
    full = teacher.options(config)
    build = lambda **o: teacher.SelfDistill.build(model, {**full, **o}, size)  # noqa: E731
    sd = build()
    params = {"img": sd.tower.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]}
    params = teacher.with_heads(params, model, full, jax.random.key(1))
    t = {**teacher.init(params), "center": jnp.full((full["out_dim"],), 0.1),
         "patch_center": jnp.full((full["patch_out_dim"],), 0.2)}
    t["params"] = jax.tree.map(lambda a: a * 0.9, t["params"])  # a teacher that is not the student
    rng = np.random.default_rng(0)
    batch = {"sd_global": jnp.asarray(rng.normal(size=(4, 2, size, size, 3)), jnp.float32),
             "sd_local": jnp.asarray(rng.normal(size=(4, 2, 16, 16, 3)), jnp.float32)}
    key = jax.random.key(2)
    both, aux = sd.loss(params, t, batch, key)
    np.testing.assert_allclose(both, full["consistency_weight"] * aux["consistency"]
                               + full["masked_weight"] * aux["masked"], rtol=1e-6)

    cons, aux_c = build(masked_weight=0.0).loss(params, t, batch, key)
    assert float(aux_c["masked"]) == 0.0 and aux_c["t_patch"] is None
    kw = dict(train=True, patch_dropout=0.0, rngs={"dropout": jax.random.split(key)[1]})
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    pooled = lambda x: sd.heads.apply({"params": params["ssl"]}, sd.tower.apply(  # noqa: E731
        {"params": params["img"]}, flat(x), **kw)[1]["pre_logits"], method="pooled").reshape(4, x.shape[1], -1)
    _, tout = sd.tower.apply({"params": t["params"]["img"]}, flat(batch["sd_global"]), train=False)
    t_cls = sd.heads.apply({"params": t["params"]["ssl"]}, tout["pre_logits"], method="pooled")
    want = consistency_loss(jnp.concatenate([pooled(batch["sd_global"]), pooled(batch["sd_local"])], axis=1),
                            t_cls.reshape(4, 2, -1), t["center"], student_temp=TS, teacher_temp=TT)
    np.testing.assert_allclose(cons, want, rtol=1e-5)
    assert abs(float(want) - float(aux["consistency"])) > 1e-4  # masking changed it: SILC sees unmasked views

    masked, aux_m = build(consistency_weight=0.0).loss(params, t, {"sd_global": batch["sd_global"]}, key)
    assert float(aux_m["consistency"]) == 0.0 and aux_m["t_cls"] is None
    np.testing.assert_allclose(masked, full["masked_weight"] * aux["masked"], rtol=1e-6)
    after = build(consistency_weight=0.0).update(t, params, aux_m)
    np.testing.assert_array_equal(after["center"], t["center"])
    assert not np.array_equal(after["patch_center"], t["patch_center"])
