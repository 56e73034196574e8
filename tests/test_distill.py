"""Distillation from a teacher CLIP's stored embeddings (CLIP-KD's FD / CRD / ICL, vljax/losses/distill.py):
numpy references of the equations (value and gradient), 1 device == 8, the teacher store
(vljax/teacher_features.py) and CLIP-KD with the STRUCTURE regulariser (tests/test_structure.py)
trained through `python -m vljax.main` with configs/lit.py-style arguments."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, finite_differences, losses_of, make_shapes_manifest, tiny_config
from jax.sharding import PartitionSpec as P

from vljax import checkpoints, factory, objective, sharding, teacher_features, train
from vljax.data import pipeline, sources
from vljax.embedder import Embedder
from vljax.losses.distill import clip_kd


# ----------------------------------------------------------------------------------------------
# numpy references, float64, written from the equations in the modules' docstrings
# ----------------------------------------------------------------------------------------------

def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ce(logits):  # mean over rows of CE with the diagonal as the positive
    return -np.mean(np.diag(_log_softmax(logits)))


def _kl(lt, ls):  # mean over rows of KL(softmax(lt) || softmax(ls))
    a, b = _log_softmax(lt), _log_softmax(ls)
    return np.mean(np.sum(np.exp(a) * (a - b), -1))


def ref_clip_kd(zi, zt, t, ti, tt, tT, fd, crd, icl):
    task = (_ce(t * zi @ zt.T) + _ce(t * zt @ zi.T)) / 2
    b, d = zi.shape
    fd_v = np.sum((zi - ti) ** 2) / (b * d) + np.sum((zt - tt) ** 2) / (b * d)
    crd_v = (_kl(tT * ti @ tt.T, t * zi @ zt.T) + _kl(tT * tt @ ti.T, t * zt @ zi.T)) / 2
    icl_v = (_ce(t * zi @ tt.T) + _ce(t * zt @ ti.T)) / 2
    return task + fd * fd_v + crd * crd_v + icl * icl_v


def _num_grad(f, x):
    return finite_differences(f, [x])[0]


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    b, d = 8, 6
    return dict(zi=_unit(rng, b, d), zt=_unit(rng, b, d), ti=_unit(rng, b, d), tt=_unit(rng, b, d))


KD_WEIGHTS = [dict(fd=1.0, crd=0.0, icl=0.0), dict(fd=0.0, crd=1.0, icl=0.0), dict(fd=0.0, crd=0.0, icl=1.0),
              dict(fd=2.0, crd=0.5, icl=0.3)]


@pytest.mark.parametrize("w", KD_WEIGHTS)
def test_clip_kd_value_and_gradient_equal_numpy(pairs, w):
    p, t, tT = pairs, 3.0, 5.0
    kw = dict(fd_weight=w["fd"], crd_weight=w["crd"], icl_weight=w["icl"])
    args = [jnp.asarray(p[k], jnp.float32) for k in ("zi", "zt")]
    teach = [jnp.asarray(p[k], jnp.float32) for k in ("ti", "tt")]
    value, grads = jax.value_and_grad(lambda a, c, s: clip_kd(a, c, s, *teach, jnp.float32(tT), **kw),
                                      argnums=(0, 1, 2))(*args, jnp.float32(t))
    ref = lambda zi, zt, s: ref_clip_kd(zi, zt, s, p["ti"], p["tt"], tT, **w)  # noqa: E731
    np.testing.assert_allclose(value, ref(p["zi"], p["zt"], t), rtol=1e-5)
    np.testing.assert_allclose(grads[0], _num_grad(lambda x: ref(x, p["zt"], t), p["zi"]), atol=2e-5)
    np.testing.assert_allclose(grads[1], _num_grad(lambda x: ref(p["zi"], x, t), p["zt"]), atol=2e-5)
    np.testing.assert_allclose(grads[2], _num_grad(lambda x: ref(p["zi"], p["zt"], x[0]), np.array([t])), rtol=1e-4)


def test_clip_kd_teacher_gets_no_gradient_and_widths_are_checked(pairs):
    z = [jnp.asarray(pairs[k], jnp.float32) for k in ("zi", "zt", "ti", "tt")]
    g = jax.grad(lambda ti, tt: clip_kd(z[0], z[1], 3.0, ti, tt, jnp.float32(5.0), icl_weight=1.0),
                 argnums=(0, 1))(z[2], z[3])
    assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))
    wide = jnp.zeros((8, 7))
    with pytest.raises(ValueError, match="width 6.*width 7"):
        clip_kd(z[0], z[1], 3.0, wide, wide, jnp.float32(5.0))
    # CRD alone compares similarity distributions: any teacher width.
    assert np.isfinite(clip_kd(z[0], z[1], 3.0, wide + 0.1, wide + 0.1, jnp.float32(5.0), fd_weight=0.0))


def _value_and_grad(fn, args, mesh=None):
    """jit(value_and_grad) of fn(*args) in its first argument: on one device, or (mesh) under
    shard_map with every argument split over the batch axis."""
    if mesh is None:
        f = lambda a, *rest: fn(a, *rest)  # noqa: E731
    else:
        f = jax.shard_map(lambda *a: fn(*a, "data"), mesh=mesh, in_specs=(P("data"),) * len(args),
                          out_specs=P())
    return jax.jit(jax.value_and_grad(f))(*args)


def test_one_device_equals_eight():
    rng = np.random.default_rng(1)
    zi, zt, ti, tt = (jnp.asarray(_unit(rng, 16, 6), jnp.float32) for _ in range(4))
    tT = jnp.full((16,), 5.0, jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))

    def kd(a, c, ti_, tt_, tT_, axis=None):
        return clip_kd(a, c, jnp.float32(3.0), ti_, tt_, tT_[0], axis, fd_weight=2.0, crd_weight=0.5,
                       icl_weight=0.3)

    args = (zi, zt, ti, tt, tT)
    one, eight = _value_and_grad(kd, args), _value_and_grad(kd, args, mesh)
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
    np.testing.assert_allclose(eight[1], one[1], atol=1e-6)


def test_clip_kd_needs_a_teacher(manifest, tmp_path):
    config = tiny_config(manifest, "lit", steps=10)
    config.loss = dict(name="clip_kd")
    with pytest.raises(ValueError, match="config key `distill`"):
        train.Trainer(config, str(tmp_path / "run"))
    assert "fd_weight" in objective.option_keys("clip_kd")


# ----------------------------------------------------------------------------------------------
# The teacher store and the batch
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(manifest, tmp_path_factory):
    """A tiny teacher CLIP as a vljax workdir (model_spec.json + a params checkpoint), random weights."""
    root = tmp_path_factory.mktemp("teacher")
    spec = factory.spec_from_config(tiny_config(manifest, "clip"))
    model = factory.build_model(spec)
    params = jax.jit(model.init)(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
    factory.write_spec(root, spec)
    with checkpoints.Checkpointer(root / "checkpoints") as ckpt:
        ckpt.save(0, {"params": params}, force=True)
    return str(root)


def test_teacher_store_holds_the_teachers_embeddings_and_the_batch_carries_them(manifest, teacher_dir, tmp_path):
    bundle = factory.load(teacher_dir)
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    source = sources.get_source(dict(source="jsonl", path=manifest))
    store = teacher_features.write_teacher_store(bundle, teacher_dir, source, tmp_path / "t", mesh=mesh,
                                                 batch_size=8, progress=False)
    emb = Embedder.from_bundle(bundle, mesh=mesh, batch_size=8, progress=False)
    images = emb.embed_images(source)
    assert len(store) == len(source) == len(images.index)
    for i in (0, 5, len(source) - 1):
        rec = store[i]
        np.testing.assert_array_equal(rec["teacher_zimg"], images.z[i])
        np.testing.assert_array_equal(rec["teacher_ztxt"], emb.embed_texts(source.captions_of(i)))
        assert rec["teacher_t"] == np.float32(emb.logit_scale)
    written = os.stat(str(store.path / teacher_features.FILE)).st_mtime_ns
    again = teacher_features.write_teacher_store(bundle, teacher_dir, source, tmp_path / "t", mesh=mesh,
                                                 batch_size=8, progress=False)
    assert again.path == store.path and os.stat(str(store.path / teacher_features.FILE)).st_mtime_ns == written

    inp = tiny_config(manifest, "clip").input
    inp.keep_captions = True
    it = pipeline.make_train_iterator(inp, factory.build_tokenizer(bundle.spec), seed=0, teachers=[store],
                                      process_index=0, process_count=1)
    batch = next(it)
    assert batch["teacher_zimg"].shape == (16, 32) and batch["teacher_t"].shape == (16,)
    # Each row's text embedding is the teacher's embedding of the caption this batch drew.
    np.testing.assert_array_equal(batch["teacher_ztxt"], emb.embed_texts(list(batch["caption"])))
    rows = {tuple(store[i]["teacher_zimg"]) for i in range(len(store))}
    assert all(tuple(r) in rows for r in batch["teacher_zimg"])


def test_distill_config_keys_are_checked(manifest, tmp_path):
    config = tiny_config(manifest, "clip")
    config.distill = dict(teacher=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="distill.teacher"):
        teacher_features.teacher_stores(config, None, tmp_path)
    config.distill = dict(teacher=str(tmp_path), batch=4)
    with pytest.raises(ValueError, match="distill.batch"):
        teacher_features.teacher_stores(config, None, tmp_path)


@pytest.mark.slow
def test_distillation_and_structure_train_through_main(manifest, teacher_dir, tmp_path):
    """configs/lit.py's `distill=` / `structure=` arguments (`with_distillation`) on the tiny LiT
    recipe: `python -m vljax.main` stores the teacher's embeddings and the stored trunk features,
    trains CLIP-KD (contrastive + CRD + FD) + STRUCTURE, and the loss falls."""
    cfg = tmp_path / "tiny_distill.py"
    cfg.write_text(
        "import sys\n"
        f"sys.path[:0] = [{os.path.join(REPO, 'tests')!r}, {os.path.join(REPO, 'configs')!r}]\n"
        "import helpers, lit\n\n"
        "def get_config(arg=None):\n"
        f"    c = helpers.tiny_config({manifest!r}, 'lit', steps=24, batch=16)\n"
        f"    return lit.with_distillation(c, {teacher_dir!r}, crd=1.0, fd=1.0, structure=0.5)\n")
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 24 and all(np.isfinite(losses))
    # Measured: 3.38 -> 2.82 (mean of the first / last 4 steps; a random teacher and a random locked
    # trunk, so the distillation terms have a floor well above 0).
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
    index = json.loads(next((tmp_path / "wd" / "teacher").glob("*/teacher.json")).read_text())
    assert index["num_records"] == 12 * 4 and index["dim"] == 32 and not index["unreadable"]
