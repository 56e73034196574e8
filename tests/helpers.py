"""Shared test fixtures-as-functions: a generated JSONL image-text set of coloured shapes and tiny
configs that train on it in seconds (tests/test_train.py, tests/test_inference.py, ...)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from vljax import metrics

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


def tiny_config_file(path, shapes_dir, lines=(), steps=4, batch=8):
    """Writes a config file (for `python -m vljax.main --config=path`) of `tiny_config` on a shapes
    manifest under `shapes_dir` (one image per colour and shape), then `lines` (statements on `c`)."""
    body = "".join(f"    {line}\n" for line in lines)
    with open(path, "w") as f:
        f.write("import sys\n"
                f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
                "import helpers\n\n"
                "def get_config(arg=None):\n"
                f"    c = helpers.tiny_config(helpers.make_shapes_manifest({str(shapes_dir)!r}, n_per=1), "
                f"'clip', steps={steps}, batch={batch})\n"
                f"{body}    return c\n")
    return path


def run_main(config_path, workdir, devices=4):
    """Runs `python -m vljax.main --config=config_path --workdir=workdir` on `devices` simulated
    CPU devices, in a subprocess; asserts that it succeeded (its stderr's end otherwise)."""
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={config_path}", f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses_of(workdir):
    return [r["train/loss"] for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r]


def fit_counting_step_compiles(trainer, caplog) -> int:
    """Runs trainer.fit() and returns how often the update step compiled (1 when the state it
    returns has the shardings and types it was given)."""
    import logging

    import jax
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            trainer.fit()
    finally:
        jax.config.update("jax_log_compiles", False)
    return sum("Finished XLA compilation of jit(step_fn)" in r.getMessage() for r in caplog.records)


def finite_differences(f, arrays, h=1e-6):
    """Central differences of f(*arrays) (float64) with respect to every element of every array."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            up = f(*arrays)
            a[idx] = old - h
            g[idx] = (up - f(*arrays)) / (2 * h)
            a[idx] = old
        grads.append(g)
    return grads


def normalised_rows(rng, *shape):
    """Gaussian rows scaled to unit L2 norm along the last axis, float32 (embeddings for loss tests)."""
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def data_mesh(n):
    """A 1-D mesh ("data",) over the first n devices, explicit axis types (loss tests' shard_map)."""
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:n])


def train_through_main(config_file, workdir, devices=2) -> list[float]:
    """Runs `python -m vljax.main --config=config_file --workdir=workdir` on `devices` CPU devices
    (asserting it exits 0 and says so) and returns its logged training losses."""
    xla_flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", f"device_count={devices}")
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={config_file}", f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{devices} device(s)" in proc.stderr, proc.stderr[-3000:]
    return losses_of(workdir)
