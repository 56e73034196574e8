"""The one trainer: every recipe learns, meshes agree, a resumed run equals an uninterrupted one,
bad records are counted, bad configs are refused."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageDraw

from vljax import checkpoints, config_check, metrics, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape, colour, rng, size=32):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0 = rng.integers(2, 8, size=2)
    x1, y1 = size - rng.integers(2, 8, size=2)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=COLOURS[colour])
    else:
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=COLOURS[colour])
    return img


def make_shapes_manifest(root, n_per=4, bad=False, seed=0):
    """A JSONL image-text set of coloured shapes ("a red circle"), labels = shape index."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    lines = []
    for colour in COLOURS:
        for si, shape in enumerate(SHAPES):
            for k in range(n_per):
                name = f"{colour}_{shape}_{k}.png"
                _draw(shape, colour, rng).save(os.path.join(root, name))
                lines.append(dict(image=name, captions=[f"a {colour} {shape}", f"{shape}, {colour}"], labels=[si]))
    if bad:
        with open(os.path.join(root, "corrupt.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
        lines += [dict(image="corrupt.png", caption="a broken image"),
                  dict(image=lines[0]["image"], caption="   "),
                  dict(image="missing.png", caption="a missing image")]
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def tiny_config(manifest, recipe="clip", steps=30, batch=16):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 0
    c.keep_ckpts = 2
    c.mesh = [("data", -1)]
    c.sharding_rules = [(".*", "replicate")]
    c.input = dict(data=[dict(source="jsonl", path=manifest)], batch_size=batch, image_size=32,
                   value_range=(-1.0, 1.0), augment=dict(random_resized_crop=(0.8, 1.0)), num_workers=0)
    c.tokenizer = dict(kind="clip", max_len=16)
    vit = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, num_classes=32)
    txt = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, vocab_size=49408, max_len=16,
               num_classes=32)
    if recipe == "siglip":
        vit.update(pool_type="map")
        txt.update(causal=False, pool_type="last")
    else:
        vit.update(pool_type="cls")
        txt.update(causal=True, pool_type="eot", eot_id=49407)
    c.model = dict(image_model="vit", image=vit, text_model="text_transformer", text=txt,
                   temperature_init=10.0, bias_init=-10.0 if recipe == "siglip" else None)
    c.model_init = None
    c.loss = dict(name="sigmoid", impl="ring") if recipe == "siglip" else dict(name="softmax")
    c.optax = dict(name="adamw")
    c.lr = 3e-3
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.schedule = [(".*", dict(decay_type="cosine", warmup_steps=3))]
    if recipe == "lit":
        c.schedule = [("img/head/.*", dict(decay_type="cosine", warmup_steps=3)), ("img/.*", None),
                      (".*", dict(decay_type="cosine", warmup_steps=3))]
        c.input.augment = dict(random_resized_crop=None)
        c.lit_cache = True
    c.evals = {}
    c.progress = False
    c.plot = False
    return c


def losses_of(workdir):
    return [r["train/loss"] for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


@pytest.mark.parametrize("recipe", ["clip", "siglip", "lit"])
def test_recipe_learns(recipe, manifest, tmp_path):
    config = tiny_config(manifest, recipe, steps=40)
    config_check.validate(config)
    train.train_and_evaluate(config, str(tmp_path))
    losses = losses_of(tmp_path)
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (recipe, first, last)
    if recipe == "lit":
        assert any(f.startswith("lit_cache_") for f in os.listdir(tmp_path))


def test_lit_cache_equals_recomputing(manifest, tmp_path):
    """A locked tower's cached features give the same training as recomputing them."""
    config = tiny_config(manifest, "lit", steps=6)
    train.train_and_evaluate(config, str(tmp_path / "cached"))
    config.lit_cache = False
    train.train_and_evaluate(config, str(tmp_path / "recomputed"))
    np.testing.assert_allclose(losses_of(tmp_path / "cached"), losses_of(tmp_path / "recomputed"),
                               rtol=2e-5, atol=2e-6)


def test_same_losses_across_mesh_shapes(manifest, tmp_path):
    runs = {
        "1 device": (dict(mesh=[("data", 1)]), jax.devices()[:1]),
        "data 8": (dict(mesh=[("data", 8)]), None),
        "data 4 x fsdp 2": (dict(mesh=[("data", 4), ("fsdp", 2)], sharding_rules=[(".*", "fsdp")]), None),
    }
    results = {}
    for name, (over, devices) in runs.items():
        config = tiny_config(manifest, "siglip", steps=5)
        config.update(over)
        workdir = str(tmp_path / name.replace(" ", "_"))
        train.train_and_evaluate(config, workdir, devices=devices)
        results[name] = losses_of(workdir)
    for name, losses in results.items():
        np.testing.assert_allclose(losses, results["1 device"], rtol=1e-4, err_msg=name)


def test_resume_equals_uninterrupted(manifest, tmp_path, monkeypatch):
    config = tiny_config(manifest, "clip", steps=8)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

    # Preempted at step 3 (as SIGTERM would): a checkpoint is saved and the run exits...
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 3)
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config, workdir)
    assert len(losses_of(workdir)) == 3
    # ... and the next run resumes from it.
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, workdir)

    np.testing.assert_allclose(losses_of(workdir), losses_of(tmp_path / "straight"), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bad_records_are_counted(tmp_path):
    manifest = make_shapes_manifest(str(tmp_path / "data"), n_per=2, bad=True)
    config = tiny_config(manifest, "clip", steps=6, batch=8)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    last = metrics.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[-1]
    assert last["data/skipped/decode_error"] >= 1
    assert last["data/skipped/empty_caption"] >= 1
    assert last["data/skipped/missing_file"] >= 1


def test_config_errors_name_the_key(manifest):
    config = tiny_config(manifest)
    config.totl_steps = 3
    with pytest.raises(ValueError, match="totl_steps"):
        config_check.validate(config)
    raw = tiny_config(manifest).to_dict()
    raw["input"]["batch_size"] = "64"  # a config file's mistake (ml_collections refuses it on the command line)
    with pytest.raises(ValueError, match="input.batch_size"):
        config_check.validate(ml_collections.ConfigDict(raw))


def test_main_refuses_unknown_override_before_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vljax.main", "--config=configs/clip.py", f"--workdir={tmp_path}",
         "--config.totl_steps=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "totl_steps" in proc.stderr
    assert not os.listdir(tmp_path)  # nothing was written
