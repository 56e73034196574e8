"""ACID (vljax/acid.py): the learnability selection equals a numpy reference written from the
equations (JEST's joint sampling in chunks, Evans et al. 2024; ACID's student minus teacher loss,
Udandarao et al. 2024); the trainer trains on the selected sub-batch of a super-batch scored by a
teacher checkpoint, the same on 1 and 8 devices; the config check names the bad key."""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import REPO, losses_of, make_shapes_manifest, tiny_config, tiny_config_file
from vljax import acid, config_check, metrics, train
from vljax.losses import sigmoid_loss, softmax_contrastive


def _np_select(student, teacher, k, chunks, gumbels=None):
    """The selection from its definition: chunk c takes the k / chunks examples not yet chosen with
    the largest gain + noise; the gain of x given the chosen set S is A[x, x] + sum_{j in S}
    (A[x, j] + A[j, x]) for pairwise scores, A[x] for per-example ones (A = student - teacher)."""
    a = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
    chosen = []
    for c in range(chunks):
        gain = np.array([(a[x, x] + sum(a[x, j] + a[j, x] for j in chosen)) if a.ndim == 2 else a[x]
                         for x in range(a.shape[0])])
        if gumbels is not None:
            gain = gain + gumbels[c]
        gain[chosen] = -np.inf
        chosen += [int(i) for i in np.argsort(-gain, kind="stable")[:k // chunks]]
    return np.array(chosen)


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    n = 24
    return {"pair": (rng.normal(size=(n, n)), rng.normal(size=(n, n))),
            "example": (rng.normal(size=n), rng.normal(size=n))}


@pytest.mark.parametrize("form", ["pair", "example"])
@pytest.mark.parametrize("sample", [False, True])
def test_selection_equals_numpy_reference(scores, form, sample):
    student, teacher = scores[form]
    n, k, chunks = student.shape[0], 12, 4
    key = jax.random.key(3) if sample else None
    gumbels = None
    if sample:
        gumbels = [np.asarray(jax.random.gumbel(jax.random.fold_in(key, c), (n,), jnp.float32)) for c in range(chunks)]
    got = np.asarray(acid.learnability_select(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                              k, rng=key, chunks=chunks))
    np.testing.assert_array_equal(got, _np_select(student, teacher, k, chunks, gumbels))
    assert len(set(got.tolist())) == k


def test_joint_selection_differs_from_independent_top_k(scores):
    """The conditioning matters: with pairwise scores, 4 chunks choose a different set than the top
    12 of the diagonal alone (one chunk)."""
    student, teacher = scores["pair"]
    joint = set(np.asarray(acid.learnability_select(student, teacher, 12, chunks=4)).tolist())
    alone = set(np.asarray(acid.learnability_select(student, teacher, 12, chunks=1)).tolist())
    diag = np.diagonal(student - teacher)
    assert alone == set(np.argsort(-diag)[:12].tolist()) and joint != alone


def test_scores_sum_to_the_training_losses():
    """The sigmoid pair matrix sums (over the batch, / N) to SigLIP's loss and the softmax
    per-example losses average to CLIP's: the scores are the losses the student trains on."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 16, 8)).astype(np.float32)
    zimg, ztxt = (z / np.linalg.norm(z, axis=-1, keepdims=True))
    t, b = jnp.float32(7.0), jnp.float32(-3.0)
    np.testing.assert_allclose(acid.sigmoid_pair_losses(zimg, ztxt, t, b).sum() / 16,
                               sigmoid_loss(zimg, ztxt, t, b), rtol=1e-5)
    np.testing.assert_allclose(acid.softmax_example_losses(zimg, ztxt, t).mean(),
                               softmax_contrastive(zimg, ztxt, t), rtol=1e-5)


def test_softmax_kd_equals_numpy_reference():
    """ACED's KD term: the mean over rows of KL(teacher || student), image-to-text and
    text-to-image, halved; zero for a student equal to its teacher; no gradient to the teacher."""
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=(2, 2, 6, 4)).astype(np.float32)

    def kl_ref(lt, ls):
        pt = np.exp(lt - lt.max(1, keepdims=True))
        pt /= pt.sum(1, keepdims=True)
        log_ps = ls - ls.max(1, keepdims=True) - np.log(np.exp(ls - ls.max(1, keepdims=True)).sum(1, keepdims=True))
        return np.mean(np.sum(pt * (np.log(pt) - log_ps), axis=1))
    ls, lt = 3.0 * zs[0] @ zs[1].T, 5.0 * zt[0] @ zt[1].T
    want = 0.5 * (kl_ref(lt, ls) + kl_ref(lt.T, ls.T))
    np.testing.assert_allclose(acid.softmax_kd(zs[0], zs[1], 3.0, zt[0], zt[1], 5.0), want, rtol=1e-5)
    np.testing.assert_allclose(acid.softmax_kd(zt[0], zt[1], 5.0, zt[0], zt[1], 5.0), 0.0, atol=1e-6)
    g = jax.grad(lambda a: acid.softmax_kd(zs[0], zs[1], 3.0, a, zt[1], 5.0))(jnp.asarray(zt[0]))
    assert not np.any(np.asarray(g))


def _with_acid(config, **acid_cfg):
    c = ml_collections.ConfigDict(config.to_dict())
    c.acid = acid_cfg
    return c


def test_config_check_names_the_key(tmp_path):
    base = tiny_config(str(tmp_path / "m.jsonl"), "siglip", batch=8)
    cases = [(dict(filter_ratio=0.5), "acid.teacher"),
             (dict(teacher=str(tmp_path / "nowhere")), "acid.teacher"),
             (dict(teacher=str(tmp_path), filter_ratio=0.0), "acid.filter_ratio"),
             (dict(teacher=str(tmp_path), filter_ratio=1.0), "acid.filter_ratio"),
             (dict(teacher=str(tmp_path), filter_ratio=0.3), "acid.filter_ratio"),  # 8 / 0.7: no whole batch
             (dict(teacher=str(tmp_path), chunks=3), "acid.chunks"),
             (dict(teacher=str(tmp_path), chunks=2, kd_weight=-1.0), "acid.kd_weight"),
             (dict(teacher=str(tmp_path), chunks=2, sample="yes"), "acid.sample"),
             (dict(teacher=str(tmp_path), ratio=0.5), "`acid`")]
    for cfg, key in cases:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            acid.options(_with_acid(base, **cfg))
    with pytest.raises(ValueError, match=r"acid\.teacher"):
        config_check.validate(_with_acid(base, teacher=str(tmp_path / "nowhere"), chunks=2))
    assert acid.options(_with_acid(base, teacher=str(tmp_path), chunks=2))["filter_ratio"] == 0.5
    assert acid.super_batch_size(8, 0.5) == 16 and acid.super_batch_size(24, 0.25) == 32


def _schedule(config):
    config.schedule = [(".*", dict(decay_type="cosine", warmup_steps=1))]
    return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny SigLIP at another random init than the students', saved as a vljax workdir (spec + checkpoint: what
    `vljax.factory.load` reads) without compiling a training step."""
    root = tmp_path_factory.mktemp("acid")
    manifest = make_shapes_manifest(str(root / "shapes"), n_per=4)
    config = _schedule(tiny_config(manifest, "siglip", steps=2, batch=8))
    config.seed = 1  # not the student's init (seed 0): a teacher that disagrees with it
    trainer = train.Trainer(config, str(root / "teacher"))
    trainer.ckpt.save(0, trainer.state, {"stage": 0, "iterator": {}}, force=True)
    trainer.ckpt.wait()
    return manifest, str(root / "teacher")


def _run(manifest, teacher, workdir, n, mesh):
    """A 2-step SigLIP run with the teacher (super-batch 16, sub-batch 8) and ACED's KD term on `n`
    devices: (losses, the last step's chosen rows, the KD terms)."""
    config = _schedule(tiny_config(manifest, "siglip", steps=2, batch=8))
    config.acid = dict(teacher=teacher, filter_ratio=0.5, chunks=2, kd_weight=0.5)
    config.mesh, config.sharding_rules = mesh, [(".*", "fsdp")]
    trainer = train.Trainer(config, str(workdir), devices=jax.devices()[:n])
    assert next(trainer.make_input())["image"].shape[0] == 16  # the super-batch
    if n > 1:  # the teacher's params are sharded like the student's
        leaf = trainer.acid_params["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
        assert "fsdp" in str(leaf.sharding.spec)
    trainer.fit()
    kd = [r["train/acid_kd"] for r in metrics.read_metrics(str(workdir / "metrics.jsonl")) if "train/acid_kd" in r]
    return losses_of(workdir), np.asarray(trainer.acid_indices), kd


@pytest.fixture(scope="module")
def one_device(teacher_dir, tmp_path_factory):
    manifest, teacher = teacher_dir
    return _run(manifest, teacher, tmp_path_factory.mktemp("acid1") / "wd", 1, [("data", 1)])


@pytest.mark.slow  # two Trainers (teacher saved, student run: one step compile): 55 s of CPU, 180 s on the busy 2 cores
def test_trains_on_the_selected_sub_batch(one_device):
    """Each step trains on 8 distinct rows of the 16 of its super-batch; the loss and the KD term
    (a random teacher: far from the student) are finite, the KD term positive."""
    losses, idx, kd = one_device
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(kd) == 2 and all(np.isfinite(kd)) and min(kd) > 0
    assert idx.shape == (8,) and len(set(idx.tolist())) == 8 and idx.min() >= 0 and idx.max() < 16


@pytest.mark.slow  # a second trainer run whose 8-device step compiles: ~100 s on 2 busy cores
def test_selection_and_loss_same_on_1_and_8_devices(teacher_dir, one_device, tmp_path):
    """The chosen rows and the losses on one device equal those on a 4 x 2 data x fsdp mesh, every
    param (the teacher's too) fsdp-sharded: the selection is global over the super-batch."""
    manifest, teacher = teacher_dir
    losses, idx, kd = _run(manifest, teacher, tmp_path / "wd", 8, [("data", 4), ("fsdp", 2)])
    np.testing.assert_array_equal(idx, one_device[1])
    np.testing.assert_allclose(losses, one_device[0], rtol=1e-4)
    np.testing.assert_allclose(kd, one_device[2], rtol=1e-4)


@pytest.mark.slow  # a `python -m vljax.main` subprocess: imports, a compile and 2 steps
def test_main_trains_with_a_teacher_checkpoint(teacher_dir, tmp_path):
    """`python -m vljax.main` on a tiny CLIP (softmax scores) with the SigLIP teacher: finite
    losses and the selection's metrics logged."""
    _, teacher = teacher_dir
    cfg = tiny_config_file(tmp_path / "acid.py", tmp_path / "shapes", steps=2, batch=8,
                           lines=[f"c.acid = dict(teacher={teacher!r}, filter_ratio=0.5, chunks=2)",
                                  "c.schedule = [('.*', dict(decay_type='cosine', warmup_steps=1))]"])
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_configs_siglip2_switch(tmp_path):
    """configs/siglip2.py: `acid=<teacher path>` sets config.acid (filter ratio 0.5), which the
    config check accepts; without it there is no config.acid."""
    spec = importlib.util.spec_from_file_location("siglip2_acid", os.path.join(REPO, "configs", "siglip2.py"))
    siglip2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(siglip2)
    c = siglip2.get_config(f"decoder=off,sd=off,acid={tmp_path},acid_ratio=0.5")
    assert dict(c.acid) == {"teacher": str(tmp_path), "filter_ratio": 0.5}
    config_check.validate(c)
    assert acid.options(c)["chunks"] == 16 and acid.super_batch_size(c.input.batch_size, 0.5) == 128
    assert siglip2.get_config("decoder=off,sd=off").get("acid") is None
