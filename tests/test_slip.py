"""SLIP (vljax/slip.py, losses/simclr.py, models/ssl_heads.SimCLRHead) and the caption augmentation
of Fini et al. 2023 (vljax/data/text_aug.py)."""
import dataclasses
import io
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from helpers import REPO, make_shapes_manifest, tiny_config
from test_configs import _load
from vljax import config_check, factory, metrics, objective, slip
from vljax.data import pipeline, text_aug
from vljax.data.preprocess import Preprocess
from vljax.tokenizers import get_tokenizer
from vljax.losses.simclr import simclr_loss
from vljax.models.ssl_heads import SimCLRHead, init_simclr_head


def _nt_xent_reference(z1, z2, tau):
    """SimCLR's NT-Xent from its equations (Chen et al. 2020, Eq. 1; SLIP's SIMCLRLoss), float64:
    for each of the 2B views, -log of its positive's share among the other 2B - 1 views."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    s = z @ z.T / tau
    np.fill_diagonal(s, -np.inf)  # a view is not its own negative
    top = s.max(axis=1, keepdims=True)
    lse = np.log(np.sum(np.exp(s - top), axis=1)) + top[:, 0]
    pos = s[np.arange(n2), (np.arange(n2) + n2 // 2) % n2]
    return float(np.mean(lse - pos))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=1)


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 6)).astype(np.float32)
    return z1, (z1 + 0.7 * rng.normal(size=z1.shape)).astype(np.float32)


def test_nt_xent_value_and_gradient_equal_the_reference(views):
    z1, z2 = views
    value, grads = jax.jit(jax.value_and_grad(simclr_loss, argnums=(0, 1)))(z1, z2)  # SLIP's tau 0.1
    np.testing.assert_allclose(value, _nt_xent_reference(z1, z2, 0.1), rtol=1e-5)
    # The gradient against central differences of the float64 reference.
    eps, a, b = 1e-5, z1.astype(np.float64), z2.astype(np.float64)
    for which, arr in ((0, a), (1, b)):
        num = np.zeros_like(arr)
        for i, j in itertools.product(range(arr.shape[0]), range(arr.shape[1])):
            hi, lo = arr.copy(), arr.copy()
            hi[i, j] += eps
            lo[i, j] -= eps
            args_hi = (hi, b) if which == 0 else (a, hi)
            args_lo = (lo, b) if which == 0 else (a, lo)
            num[i, j] = (_nt_xent_reference(*args_hi, 0.1) - _nt_xent_reference(*args_lo, 0.1)) / (2 * eps)
        np.testing.assert_allclose(grads[which], num, atol=2e-5, rtol=1e-4)


def test_nt_xent_on_a_data_x_fsdp_mesh_equals_one_device(views):
    """The batch split over ("data", "fsdp") of a 2 x 4 mesh, as the trainer does with FSDP: every
    view's negatives are the global batch's (all-gather), value and gradients as on one device."""
    z1, z2 = views
    axes = ("data", "fsdp")
    mesh = jax.make_mesh((2, 4), axes, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    f = jax.shard_map(lambda a, b: simclr_loss(a, b, axis_name=axes), mesh=mesh,
                      in_specs=(P(axes), P(axes)), out_specs=P())
    put = [jax.device_put(x, NamedSharding(mesh, P(axes))) for x in (z1, z2)]
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*put)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(simclr_loss, argnums=(0, 1)))(z1, z2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-7, rtol=1e-5)


def test_nt_xent_refuses_bad_inputs(views):
    z1, z2 = views
    with pytest.raises(ValueError, match="same shape|one shape"):
        simclr_loss(z1, z2[:4])
    with pytest.raises(ValueError, match="temperature"):
        simclr_loss(z1, z2, temperature=0.0)


def test_simclr_head_normalises_each_view_over_the_global_batch():
    """SLIP's MLP (Linear, BN, ReLU, Linear, BN, ReLU, Linear): at init (BN scale 1, bias 0) the first
    BatchNorm's output has mean 0 and variance 1 per feature over each view's batch, whatever the
    other view holds (SLIP applies the MLP to each view separately)."""
    head = SimCLRHead(hidden=16, out=8)
    params = jax.jit(lambda r: init_simclr_head(head, 12, r))(jax.random.key(0))
    assert params["layer3"]["kernel"].shape == (16, 8)
    x = np.random.default_rng(1).normal(size=(2, 32, 12)).astype(np.float32)
    x[1] = 10 * x[1] + 3  # another scale in the second view
    pre = x @ np.asarray(params["layer1"]["kernel"]) + np.asarray(params["layer1"]["bias"])
    ref = (pre - pre.mean(1, keepdims=True)) / np.sqrt(pre.var(1, keepdims=True) + 1e-5)
    apply = jax.jit(lambda v: head.apply({"params": params}, v))
    out = apply(jnp.asarray(x))
    assert out.shape == (2, 32, 8)
    # One view alone gives the same outputs for it: statistics are per view.
    alone = apply(jnp.asarray(x[:1]))
    np.testing.assert_allclose(alone[0], out[0], rtol=1e-5, atol=1e-5)
    h = np.maximum(ref, 0) @ np.asarray(params["layer2"]["kernel"]) + np.asarray(params["layer2"]["bias"])
    h = np.maximum((h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5), 0)
    want = h @ np.asarray(params["layer3"]["kernel"]) + np.asarray(params["layer3"]["bias"])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # Under jit with the batch split over 8 devices (data 2 x fsdp 4) the statistics are the
    # global batch's (SyncBatchNorm): the outputs equal the one-device ones.
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    np.testing.assert_allclose(apply(jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp"))))), out,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ text augmentation (Fini et al.)


def test_stopword_removal_and_eda_operations():
    assert text_aug.remove_stopwords("A cat is sitting on the mat, isn't it?") == "cat sitting mat , ?"
    words = "a red circle on a blue square".split()
    rng = np.random.default_rng(0)
    for _ in range(20):
        swapped = text_aug.random_swap(words, rng)
        moved = [i for i, (a, b) in enumerate(zip(words, swapped)) if a != b]
        assert sorted(swapped) == sorted(words) and len(moved) in (0, 2)  # "a" may swap with "a"
    assert text_aug.random_deletion(words, rng, p=0.0) == words
    assert len(text_aug.random_deletion(words, rng, p=1.0)) == 1  # never empty
    assert text_aug.random_deletion(["circle"], rng, p=1.0) == ["circle"]
    table = {"circle": ("ring", "disc"), "a": ("one",)}  # "a" is a stop word: never replaced
    for _ in range(10):
        out = text_aug.synonym_replacement(words, rng, table)
        assert out[:2] == words[:2] and out[3:] == words[3:] and out[2] in ("ring", "disc")


def test_text_aug_is_seeded_by_the_record_and_equals_the_reference():
    """Fixed inputs, fixed per-record generators: the same captions every time, equal to the draws
    made step by step (stop words with p 0.5, then one of the weighted operations)."""
    aug = text_aug.TextAug.from_options(text_aug.options(dict(synonym=0.0)))
    caption = "a photo of a small red circle next to the blue square"
    got = [aug(caption, np.random.default_rng(seed)) for seed in range(40)]
    assert got == [aug(caption, np.random.default_rng(seed)) for seed in range(40)]
    for seed, out in enumerate(got):  # the reference: the same draws, written out
        rng = np.random.default_rng(seed)
        text = text_aug.remove_stopwords(caption) if rng.uniform() < 0.5 else caption
        op = rng.choice(4, p=np.array([0.0, 0.0, 0.2, 0.1]) / 0.3)
        words = text.split()
        if op == 2:
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
        else:
            words = [w for w, k in zip(words, rng.uniform(size=len(words)) > 0.1) if k]
        assert out == " ".join(words), seed
    assert len(set(got)) > 10  # it does augment


def test_text_aug_keeps_images_and_applies_in_training_only(tmp_path):
    """The caption's draws come after the image's: the same image with the augmentation on or off;
    evaluation (no generator) keeps the caption."""
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    img.paste((20, 20, 220), (5, 5, 25, 25))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    record = {"image": buf.getvalue(), "captions": ["a red square with a blue square inside"]}
    plain = Preprocess(image_size=24, crop_scale=(0.5, 1.0), colour_jitter=0.3, greyscale=0.5)
    aug = dataclasses.replace(plain, text_aug=text_aug.TextAug.from_options(text_aug.options(dict(synonym=0.0))))
    changed = 0
    for seed in range(8):
        a, b = plain(record, np.random.default_rng(seed)), aug(record, np.random.default_rng(seed))
        np.testing.assert_array_equal(a["image"], b["image"])
        changed += a["caption"] != b["caption"]
    assert changed >= 4
    assert aug.eval(record)["caption"] == record["captions"][0]


def test_text_aug_bad_config_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"input\.text_aug\.synonyms"):
        text_aug.options(dict())  # synonym replacement by default needs a table
    with pytest.raises(ValueError, match=r"input\.text_aug`: unknown keys \['swap_p'\]"):
        text_aug.options(dict(swap_p=0.1))
    bad = tmp_path / "syn.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="syn.json"):
        text_aug.read_synonyms(str(bad))


def _pipeline_config(manifest):
    return dict(data=[dict(source="jsonl", path=manifest)], batch_size=4, image_size=16,
                value_range=(-1.0, 1.0), augment=dict(random_resized_crop=(0.8, 1.0)), num_workers=0,
                keep_captions=True, text_aug=dict(synonym=0.0, stopwords=0.5),
                multi_crop=slip.multi_crop(slip.DEFAULTS, 16))


def test_views_and_captions_resume_and_split_over_processes_exactly(manifest):
    """SLIP's two views and the augmented captions come from the example's seeded generator: a
    restored iterator continues with the same batches, and 2 processes' rows are 1 process's."""
    tok = get_tokenizer("clip", max_len=16)
    cfg = _pipeline_config(manifest)
    it = pipeline.make_train_iterator(cfg, tok, seed=3, process_index=0, process_count=1)
    first = next(it)
    assert first["sd_global"].shape == (4, 2, 16, 16, 3)
    state = it.get_state()
    second = next(it)
    again = pipeline.make_train_iterator(cfg, tok, seed=3, process_index=0, process_count=1)
    again.set_state(state)
    resumed = next(again)
    for key in ("image", "sd_global", "text"):
        np.testing.assert_array_equal(resumed[key], second[key])
    assert list(resumed["caption"]) == list(second["caption"])
    halves = [next(pipeline.make_train_iterator(cfg, tok, seed=3, process_index=p, process_count=2))
              for p in (0, 1)]  # batch_size is global: 2 rows each
    assert [c for h in halves for c in h["caption"]] == list(first["caption"])
    np.testing.assert_array_equal(np.concatenate([h["sd_global"] for h in halves]), first["sd_global"])
    plain = pipeline.make_train_iterator({k: v for k, v in cfg.items() if k != "text_aug"}, tok, seed=3,
                                         process_index=0, process_count=1)
    assert [c for _ in range(3) for c in next(plain)["caption"]] != \
        list(first["caption"]) + list(second["caption"]) + list(next(it)["caption"])


# ------------------------------------------------------------------ SLIP in the trainer


def test_config_check_refuses_what_cannot_work(manifest):
    config = tiny_config(manifest)
    config.ssl = dict(head_width=8, out=4)
    config_check.validate(config)
    config.ssl = dict(width=8)
    with pytest.raises(ValueError, match=r"config key `ssl`: unknown keys \['width'\]"):
        config_check.validate(config)
    config.ssl = dict(temperature=0.0)
    with pytest.raises(ValueError, match="`ssl`.*temperature"):
        config_check.validate(config)
    config.ssl = dict()
    config.self_distill = dict()
    with pytest.raises(ValueError, match="`ssl` and `self_distill`"):
        config_check.validate(config)
    # A locked image tower (LiT): refused naming `ssl` and `schedule`, before any work.
    lit = tiny_config(manifest, "lit")
    lit.lit_cache = False
    lit.ssl = dict()
    params = {"img": {"embedding": {"kernel": 0}, "head": {"kernel": 0}}, "txt": {"x": 0},
              "simclr": {"layer1": {"kernel": 0}}}
    mask = {"img": {"embedding": {"kernel": False}, "head": {"kernel": True}}, "txt": {"x": True},
            "simclr": {"layer1": {"kernel": True}}}
    with pytest.raises(ValueError, match="`ssl` and `schedule`.*img/embedding/kernel"):
        objective.check(lit, mask)
    del params
    lit.lit_cache = True
    with pytest.raises(ValueError, match="lit_cache"):
        config_check.validate(lit)


def test_clip_config_args():
    """configs/clip.py: `slip=on` sets config.ssl, `text_aug=on` input.text_aug; both validate."""
    clip_config = _load(os.path.join(REPO, "configs", "clip.py"))
    config = clip_config.get_config("slip=on,text_aug=on,ssl_width=64")
    assert config.ssl.head_width == 64 and config.ssl.temperature == 0.1
    assert dict(config.input.text_aug) == dict(synonym=0.0)
    config_check.validate(config)
    assert "ssl" not in clip_config.get_config("slip=off")
    with pytest.raises(ValueError, match="slip='yes'"):
        clip_config.get_config("slip=yes")


def test_the_head_is_left_out_of_the_exported_encoder():
    params = {"img": 1, "txt": 2, "t": 3, "simclr": {"layer1": 4}}
    assert factory.encoder_only({}, params)[1] == {"img": 1, "txt": 2, "t": 3}


_MAIN_CONFIG = """import sys
sys.path.insert(0, {tests!r})
import helpers
from test_configs import _load

clip = _load({clip!r})


def get_config(arg=None):
    c = clip.get_config("slip=on,text_aug=on,size=32,batch=8,steps=16,ssl_width=32,ssl_out=16")
    tiny = helpers.tiny_config({manifest!r}, "clip")  # the tiny towers and data of the tests
    c.input.data, c.input.augment = tiny.input.data, dict(random_resized_crop=(0.8, 1.0))
    c.model, c.tokenizer, c.schedule, c.lr = tiny.model, tiny.tokenizer, tiny.schedule, tiny.lr
    c.evals, c.select_metric, c.eval_every, c.ckpt_every, c.log_every, c.progress = {{}}, None, 0, 8, 1, False
    return c
"""


@pytest.mark.slow  # a subprocess: imports, one compile (3 tower passes + head) and 16 steps
def test_clip_slip_config_through_main_learns_its_ssl_part(manifest, tmp_path):
    """`python -m vljax.main --config=configs/clip.py:slip=on,text_aug=on` (tiny towers, 2 devices):
    the logged NT-Xent `train/ssl` falls (chance log 15 = 2.71 at batch 8), and the checkpoint holds
    the head."""
    cfg = tmp_path / "slip.py"
    cfg.write_text(_MAIN_CONFIG.format(tests=os.path.join(REPO, "tests"), clip=os.path.join(REPO, "configs", "clip.py"),
                                       manifest=manifest))
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(str(tmp_path / "wd" / "metrics.jsonl")) if "train/ssl" in r]
    ssl = [r["train/ssl"] for r in rows]
    assert len(ssl) == 16 and all(np.isfinite(ssl))
    assert all(r["train/loss"] > r["train/ssl"] for r in rows)  # the CLIP term beside it
    first, last = np.mean(ssl[:4]), np.mean(ssl[-4:])
    assert last < 0.9 * first, (first, last)
    assert os.path.isdir(tmp_path / "wd" / "checkpoints" / "16" / "params")
