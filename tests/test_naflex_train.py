"""NaFlex training (SigLIP 2, Sec. 2.4.2): a patch budget drawn per global batch that every
process and a resumed run agree on, the fixed-resolution stage fed to the same NaFlex tower
(which then equals the fixed-resolution ViT), and a `python -m vljax.main` run of
configs/siglip2.py across the fixed -> NaFlex switch."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from vljax import config_check, factory, metrics, stages
from vljax.data import naflex, naflex_train, pipeline
from vljax.models.naflex import NaFlexViT, params_from_vit
from vljax.models.vit import ViT
from vljax.tokenizers import get_tokenizer

PATCH = 8
BUDGETS = (4, 9, 16)
# (H, W): wide, tall, square, a strip: the aspect ratios NaFlex keeps.
SIZES = [(24, 60), (70, 20), (40, 40), (12, 90), (50, 35), (33, 47)]


def _load_config_module(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A JSONL image-text set of 24 images of mixed aspect ratios (4 of each size)."""
    root = tmp_path_factory.mktemp("naflex_data")
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        for j, (h, w) in enumerate(SIZES):
            name = f"im{k}_{j}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
            lines.append(dict(image=name, captions=[f"image {j} number {k}"]))
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("clip", max_len=8)


def _input(manifest, batch=4, **naf):
    return ml_collections.ConfigDict(dict(
        data=[dict(source="jsonl", path=manifest)], batch_size=batch, image_size=32,
        value_range=(-1.0, 1.0), augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.5),
        num_workers=0, read_threads=1,
        naflex=dict(patch_size=PATCH, max_num_patches=16, budgets=BUDGETS, **naf)))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_budget_sequence_follows_the_seed_only():
    cfg = dict(patch_size=PATCH, max_num_patches=16, budgets=BUDGETS)
    a = naflex_train.budget_sequence(cfg, seed=3, count=60)
    assert a == naflex_train.budget_sequence(cfg, seed=3, count=60)
    assert a[20:] == naflex_train.budget_sequence(cfg, seed=3, count=40, start=20)
    assert a != naflex_train.budget_sequence(cfg, seed=4, count=60)
    assert set(a) == set(BUDGETS)  # 60 uniform draws from 3 hit every budget
    assert a == naflex_train.budget_sequence(dict(cfg, budget_seed=3), seed=99, count=60)
    assert naflex_train.budget_sequence(dict(cfg, budgets=None), seed=3, count=5) == [16] * 5


def test_batches_are_padded_to_the_drawn_budget_on_1_and_2_processes_and_after_a_resume(
        manifest, tokenizer):
    cfg = _input(manifest)
    want = naflex_train.budget_sequence(cfg.naflex, seed=7, count=8)
    one = _take(pipeline.make_train_iterator(cfg, tokenizer, seed=7, process_index=0,
                                             process_count=1), 8)
    assert [b["image"]["patches"].shape[1] for b in one] == want
    for b in one:
        image = b["image"]
        assert image["patches"].shape == (4, image["mask"].shape[1], PATCH * PATCH * 3)
        assert (image["shapes"].prod(1) <= image["mask"].shape[1]).all()
        assert image["mask"].sum(1).tolist() == image["shapes"].prod(1).tolist()
    # Two processes, 2 rows each: the same budget per batch, their rows the global batch's.
    halves = [_take(pipeline.make_train_iterator(_input(manifest), tokenizer, seed=7,
                                                 process_index=p, process_count=2), 8)
              for p in (0, 1)]
    for t, b in enumerate(one):
        for key in ("patches", "mask", "shapes"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][t]["image"][key], halves[1][t]["image"][key]]),
                b["image"][key])
    # A resumed iterator continues the sequence (budgets and arrays) exactly.
    it = pipeline.make_train_iterator(cfg, tokenizer, seed=7, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = pipeline.make_train_iterator(cfg, tokenizer, seed=7, process_index=0, process_count=1)
    resumed.set_state(state)
    for b, r in zip(one[3:], _take(resumed, 5)):
        for key in ("patches", "mask", "shapes"):
            np.testing.assert_array_equal(r["image"][key], b["image"][key])
        np.testing.assert_array_equal(r["text"], b["text"])


def test_worker_slices_keep_the_global_budget_sequence(manifest, tokenizer):
    """What grain's mp_prefetch does with W workers (a copy per worker, sliced w::W through
    `set_slice`, batches taken round-robin), in this process: batch t still gets budget t.
    (Measured with num_workers=2 in real worker processes too: see the report.)"""
    cfg = _input(manifest)
    want = naflex_train.budget_sequence(cfg.naflex, seed=7, count=6)
    ds = pipeline.make_train_dataset(cfg, tokenizer, seed=7)
    workers = []
    for w in range(2):
        part = copy.deepcopy(ds)
        part.set_slice(slice(w, None, 2))
        workers.append(iter(part))
    got = [next(workers[t % 2])["image"]["mask"].shape[1] for t in range(6)]
    assert got == want


def test_fixed_resolution_stage_is_the_plain_pipeline_as_full_patch_grids(manifest, tokenizer):
    cfg = _input(manifest)
    cfg.naflex.fixed_resolution = True
    plain = _input(manifest)
    del plain["naflex"]
    got = next(pipeline.make_train_iterator(cfg, tokenizer, seed=1, process_index=0,
                                            process_count=1))
    ref = next(pipeline.make_train_iterator(plain, tokenizer, seed=1, process_index=0,
                                            process_count=1))
    assert got["image"]["shapes"].tolist() == [[4, 4]] * 4 and got["image"]["mask"].all()
    np.testing.assert_array_equal(got["image"]["patches"],
                                  np.stack([naflex.patchify(x, PATCH) for x in ref["image"]]))
    cfg.value_range = (0.0, 1.0)
    with pytest.raises(ValueError, match="input.value_range"):
        pipeline.make_train_iterator(cfg, tokenizer, seed=1, process_index=0, process_count=1)


def test_naflex_tower_on_the_square_grid_equals_the_fixed_resolution_vit():
    kw = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=PATCH,
              pool_type="map", num_classes=16, act="gelu_tanh")
    vit = ViT(**kw, posemb="learn")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    # Random values of every leaf (layer norms too) from numpy: compiling flax's random init
    # costs more than the two forward passes together.
    params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32),
                          jax.eval_shape(vit.init, jax.random.key(0), images)["params"])
    want, _ = jax.jit(vit.apply)({"params": params}, images)
    tower = NaFlexViT(**kw, posemb_grid=4, max_num_patches=16)
    batch = naflex.stack([naflex.square_patches(x, PATCH) for x in images])
    got, _ = jax.jit(tower.apply)({"params": params_from_vit(params)}, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The same tree as NaFlexViT's own: shapes and names.
    own = jax.eval_shape(tower.init, jax.random.key(0), batch)["params"]
    assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, params_from_vit(params))
    with pytest.raises(ValueError, match="cls"):
        params_from_vit({**params, "cls": jnp.zeros((1, 1, 32))})


def test_stage_key_and_siglip2_config(manifest):
    siglip2 = _load_config_module("siglip2.py")
    c = siglip2.get_config("decoder=off,sd=off,naflex=on,steps=40")
    config_check.validate(c)  # the checks a run applies before any work
    parsed = stages.parse(c)
    assert [(s.until, s.naflex) for s in parsed] == [(36, False), (40, True)]
    assert c.model.image_model == "naflex_vit" and c.model.image.posemb_grid == 8
    assert c.input.naflex.budgets == (32, 64, 144, 196, 256)
    big = siglip2.get_config("decoder=off,sd=off,naflex=on,img=B/16,txt=B,size=256")
    assert big.input.naflex.budgets == siglip2.PAPER_BUDGETS == (128, 256, 576, 784, 1024)
    assert big.input.naflex.max_num_patches == 256 and big.model.image.posemb_grid == 16
    with pytest.raises(ValueError, match="naflex=on needs sd=off"):
        siglip2.get_config("naflex=on")
    with pytest.raises(ValueError, match=r"stages\[0\]\.naflex.*NaFlex image tower"):
        plain = siglip2.get_config("decoder=off,sd=off,steps=20")
        plain.stages = [dict(until=20, naflex=True)]
        stages.parse(plain)
    with pytest.raises(ValueError, match="patch_dropout with a NaFlex image tower"):
        c.stages = [dict(until=40, patch_dropout=0.5)]
        stages.parse(c)
    with pytest.raises(ValueError, match=r"input.naflex.budgets"):
        naflex_train.plan(dict(patch_size=8, max_num_patches=16, budgets=(0, 4)))
    with pytest.raises(ValueError, match=r"unknown keys \['budget'\]"):
        naflex_train.plan(dict(patch_size=8, max_num_patches=16, budget=4))


@pytest.mark.slow  # a `python -m vljax.main` subprocess: imports and three step compiles (fixed, then one per drawn budget)
def test_main_trains_configs_siglip2_across_the_naflex_switch(manifest, tmp_path):
    """configs/siglip2.py (decoder=off, sd=off, naflex=on) at tiny sizes: 3 fixed-resolution
    steps, then 3 NaFlex steps at budgets drawn from (9, 16): every loss finite, the image
    tower's parameters trained after the switch."""
    cfg = tmp_path / "naflex.py"
    cfg.write_text(
        "import importlib.util\n"
        f"_s = importlib.util.spec_from_file_location('s2', {os.path.join(REPO, 'configs', 'siglip2.py')!r})\n"
        "siglip2 = importlib.util.module_from_spec(_s)\n_s.loader.exec_module(siglip2)\n\n"
        "def get_config(arg=None):\n"
        "    c = siglip2.get_config('decoder=off,sd=off,naflex=on,steps=6,batch=8,size=32')\n"
        f"    c.input.data = [dict(source='jsonl', path={manifest!r})]\n"
        "    c.input.naflex.budgets = (9, 16)\n"
        "    c.stages = [dict(until=3, naflex=False), dict(until=6, naflex=True)]\n"
        "    c.model.image.update(width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=32)\n"
        "    c.model.text.update(width=32, depth=2, mlp_dim=64, num_heads=2, max_len=16, num_classes=32)\n"
        "    c.tokenizer.max_len = 16\n"
        "    c.evals, c.select_metric, c.log_every, c.progress, c.plot = {}, None, 1, False, False\n"
        "    c.eval_every, c.ckpt_every, c.keep_ckpts = 0, 3, 3\n"
        "    c.schedule = [('.*', dict(decay_type='cosine', warmup_steps=2))]\n"
        "    return c\n")
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={wd}"],
                          cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(str(wd / "metrics.jsonl")) if "train/loss" in r]
    assert len(rows) == 6 and all(np.isfinite(r["train/loss"]) for r in rows)
    spec = factory.read_spec(wd)
    assert spec["naflex"] == {"patch_size": PATCH, "max_num_patches": 16}  # no training keys
    model = factory.build_model(spec)
    before, after = (factory.restore_params(wd, model, spec, step=s) for s in (3, 6))
    img = [(np.asarray(a), np.asarray(b)) for a, b in
           zip(jax.tree.leaves(before["img"]), jax.tree.leaves(after["img"]))]
    assert all(np.isfinite(b).all() for _, b in img)
    assert sum(not np.array_equal(a, b) for a, b in img) >= len(img) // 2
