"""Fine-tuning and LiT from a checkpoint a user brings (`config.init_from`, vljax/init_from.py): a
SigLIP 2 NaFlex directory and a SigLIP directory (tests/siglip_dirs.py: tiny random-weight
transformers models with their own SentencePiece tokenizers) train through `train.Trainer`, start
from the checkpoint's exact params (step-0 embeddings equal the torch model's), resume exactly,
and their workdirs reload with `factory.load`; bad input is refused before anything is written."""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import REPO, losses_of, make_shapes_manifest, tiny_config  # noqa: E402
from siglip_dirs import PATCH, siglip2_dir, siglip_dir  # noqa: E402

from vljax import checkpoints, factory, init_from, metrics, train  # noqa: E402
from vljax.data.naflex import naflex_batch  # noqa: E402

TEXTS = ["a red circle", "A BLUE square!", "", "a photo of the cat 🐈"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_dirs")
    return {"siglip": siglip_dir(root), "siglip2": siglip2_dir(root, max_num_patches=25)}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """The shapes set with every other image stretched (wide or tall): mixed aspect ratios."""
    root = tmp_path_factory.mktemp("ft_data")
    path = make_shapes_manifest(str(root), n_per=2)
    for i, name in enumerate(sorted(f for f in os.listdir(root) if f.endswith(".png"))):
        if i % 2:
            img = Image.open(root / name)
            img.resize((48, 20) if i % 4 == 1 else (16, 40)).save(root / name)
    return path


def ft_config(manifest, path, steps=16, lock="none"):
    """tiny_config with the model, tokenizer and image size left to the checkpoint."""
    raw = tiny_config(manifest, "siglip", steps=steps, batch=16).to_dict()
    for key in ("model", "tokenizer", "model_init"):
        raw.pop(key)
    raw["input"].pop("image_size")
    raw["input"].pop("value_range")
    raw["input"]["augment"] = dict(random_resized_crop=None)
    raw["init_from"] = str(path)
    raw["lr"] = 3e-3
    raw["loss"] = dict(name="sigmoid")  # the ring form compiles slower; tests/test_losses covers it
    if lock == "image":
        raw["schedule"] = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=3))]
    return ml_collections.ConfigDict(raw)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 60), (32, 32), (40, 12))]


def _embed(model, params, images, ids):
    zimg, ztxt, _ = jax.jit(model.apply)({"params": params}, images, jnp.asarray(ids))
    return np.asarray(zimg), np.asarray(ztxt)


def _torch_siglip2(model, path, images, ids, budget=25):
    proc = transformers.Siglip2ImageProcessorPil.from_pretrained(path, max_num_patches=budget)
    x = proc(images=images, return_tensors="np", input_data_format="channels_last")
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    pixel_values=torch.from_numpy(x["pixel_values"]),
                    pixel_attention_mask=torch.from_numpy(x["pixel_attention_mask"]).long(),
                    spatial_shapes=torch.from_numpy(x["spatial_shapes"]).long())
    return out.image_embeds.numpy(), out.text_embeds.numpy()


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.slow  # a NaFlex trainer from a SigLIP 2 directory, then a reload (~45 s): the default run's budget
def test_naflex_finetune_trains_from_the_checkpoint_and_reloads(dirs, manifest, tmp_path):
    path, torch_model = dirs["siglip2"]
    config = ft_config(manifest, path)
    # Sharded init (issue 8): the checkpoint's leaves are written straight into FSDP shards.
    config.update(dict(mesh=[("data", 2), ("fsdp", 4)], sharding_rules=[(".*", "fsdp")]))
    trainer = train.Trainer(config, str(tmp_path / "run"))
    for leaf, want in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(trainer.state_sh)):
        assert leaf.sharding == want
    kernel = trainer.state["params"]["txt"]["Embed_0"]["embedding"]
    assert all(s.data.size == kernel.size // 4 for s in kernel.addressable_shards)
    assert trainer.spec["naflex"] == {"patch_size": PATCH, "max_num_patches": 25}
    assert trainer.spec["logits"] == "sigmoid" and "image_size" not in trainer.spec
    # Step 0: every parameter is the checkpoint's, so the embeddings are the torch model's.
    _, loaded = factory.read_checkpoint(path)
    for a, b in zip(jax.tree.leaves(_host(trainer.state["params"])), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, np.asarray(b))
    ids = trainer.tokenizer(TEXTS[:3])
    images = _images()
    ours = _embed(trainer.model, trainer.state["params"], naflex_batch(images, PATCH, 25), ids)
    for got, want in zip(ours, _torch_siglip2(torch_model, path, images, ids)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The training batches: NaFlex dicts at the budget, mixed aspect ratios (some padding).
    batch = next(trainer.make_input())
    assert batch["image"]["patches"].shape == (16, 25, PATCH * PATCH * 3)
    assert batch["image"]["mask"].dtype == bool and not batch["image"]["mask"].all()
    assert len({tuple(s) for s in batch["image"]["shapes"]}) > 1

    final = trainer.fit()
    losses = losses_of(tmp_path / "run")
    assert len(losses) == 16 and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    # The workdir reloads as the trained model: same spec, same outputs.
    bundle = factory.load(tmp_path / "run")
    assert bundle.naflex == trainer.spec["naflex"] and bundle.sigmoid
    x = naflex_batch(images, PATCH, 25)
    trained = _embed(trainer.model, final["params"], x, ids)
    for got, want in zip(_embed(bundle.model, bundle.params, x, bundle.tokenizer(TEXTS[:3])), trained):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.abs(trained[0] - ours[0]).max() > 1e-3  # it did train


@pytest.mark.slow  # a second trainer compile (~40 s on 2 shared cores); the NaFlex run covers the path
def test_siglip_lit_finetune(dirs, manifest, tmp_path):
    """A fixed-resolution SigLIP directory, image tower locked (LiT): squash preprocessing, the
    image tower stays the checkpoint's, the text tower and t / b train, the loss goes down."""
    path, torch_model = dirs["siglip"]
    trainer = train.Trainer(ft_config(manifest, path, lock="image"), str(tmp_path / "lit"))
    assert (trainer.spec["image_size"], trainer.spec["resize"]) == (16, "squash")
    assert trainer.spec["tokenizer"]["kind"] == "sentencepiece"
    ids = trainer.tokenizer(TEXTS)
    images = _images(1)
    bundle = factory.Bundle(trainer.model, trainer.state["params"], trainer.tokenizer, trainer.spec)
    pixels = np.stack([bundle.preprocess(im) for im in images])
    proc = transformers.SiglipImageProcessorPil.from_pretrained(path)
    theirs = proc(images=images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        out = torch_model(input_ids=torch.from_numpy(ids[:3]).long(), pixel_values=torch.from_numpy(theirs))
    got = _embed(trainer.model, trainer.state["params"], pixels, ids[:3])
    np.testing.assert_allclose(got[0], out.image_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], out.text_embeds.numpy(), atol=1e-5, rtol=0)
    start = _host(trainer.state["params"])
    final = _host(trainer.fit()["params"])
    for a, b in zip(jax.tree.leaves(start["img"]), jax.tree.leaves(final["img"])):
        np.testing.assert_array_equal(a, b)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start["txt"]), jax.tree.leaves(final["txt"]))]
    assert all(moved), "every text-tower parameter trains"
    assert start["t"] != final["t"] and start["b"] != final["b"]
    losses = losses_of(tmp_path / "lit")
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


@pytest.mark.slow  # three trainer compiles and an evaluation (~120 s); test_train.py keeps resumption fast
def test_resume_equals_uninterrupted_without_reading_the_source(dirs, manifest, tmp_path, monkeypatch):
    path, _ = dirs["siglip2"]
    config = ft_config(manifest, path, steps=6)
    # Evaluated at the end, through the Embedder's NaFlex batches (the run's spec).
    config.evals = dict(shapes=dict(type="retrieval", data=dict(source="jsonl", path=manifest)))
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 3)
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config, workdir)
    assert len(losses_of(workdir)) == 3
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)

    def no_read(*a, **k):
        raise AssertionError("a resumed run read the init_from checkpoint again")
    monkeypatch.setattr(factory, "read_checkpoint", no_read)
    resumed = train.train_and_evaluate(config, workdir)
    np.testing.assert_allclose(losses_of(workdir), losses_of(tmp_path / "straight"), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    key = "retrieval/shapes/i2t_r1"
    evals = [[r[key] for r in metrics.read_metrics(str(w / "metrics.jsonl")) if key in r]
             for w in (tmp_path / "straight", tmp_path / "resumed")]
    assert len(evals[0]) == 1 and evals[0] == evals[1]


def test_bad_input_is_refused_before_anything_is_written(dirs, manifest, tmp_path):
    path, _ = dirs["siglip2"]
    cases = [
        (dict(init_from=str(tmp_path / "nowhere")), r"`init_from`: .*nowhere does not exist"),
        (dict(model=dict(text=dict(width=64))), r"`model.text.width`: 64 differs .* 32"),
        (dict(tokenizer=dict(max_len=99)), r"`tokenizer.max_len`: 99 .* 16 text positions"),
        (dict(lit_cache=True), r"`lit_cache`.*NaFlex"),
        (dict(model_init=dict(img="minilm")), r"`init_from` and `model_init`"),
    ]
    bare = tmp_path / "no_tok"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (bare / f).write_bytes((path / f).read_bytes())
    cases.append((dict(init_from=str(bare)), "no_tok"))
    for i, (change, match) in enumerate(cases):
        config = ft_config(manifest, path)
        config.update(change)
        workdir = tmp_path / f"run{i}"
        with pytest.raises(ValueError, match=match):
            train.Trainer(config, str(workdir))
        assert not workdir.exists(), change
    with pytest.raises(ValueError, match="finetune.py: give the checkpoint"):
        _load_config("finetune.py").get_config(None)
    # What may change: a shorter text length and the NaFlex budget.
    config = ft_config(manifest, path)
    config.tokenizer = dict(max_len=8)
    config.input.max_num_patches = 12
    config.model = dict(image=dict(dtype="bfloat16", width=32))  # a training choice; a repeated value
    resolved = init_from.resolve(config, factory.read_checkpoint(path, max_num_patches=12)[0])
    assert resolved.model.image.dtype == "bfloat16" and resolved.model.image.depth == 2
    assert resolved.tokenizer.max_len == 8 and resolved.model.text.max_len == 16
    assert resolved.input.naflex.max_num_patches == 12 == resolved.model.image.max_num_patches


@pytest.mark.slow  # two fresh interpreters (JAX start-up, the step's compile): ~80 s
def test_main_runs_configs_finetune(dirs, manifest, tmp_path):
    path, _ = dirs["siglip2"]
    workdir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "vljax.main",
         f"--config={REPO}/configs/finetune.py:init_from={path},data={manifest},batch=8,steps=3,lr=0.001",
         f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(str(workdir / "metrics.jsonl")) if "train/loss" in r]
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["train/loss"])
    assert factory.load(workdir).naflex == {"patch_size": PATCH, "max_num_patches": 25}
    missing = subprocess.run(
        [sys.executable, "-m", "vljax.main",
         f"--config={REPO}/configs/finetune.py:init_from={tmp_path}/absent,data={manifest}",
         f"--workdir={tmp_path / 'never'}"], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO})
    assert missing.returncode != 0 and "absent does not exist" in missing.stderr
    assert not (tmp_path / "never").exists()
