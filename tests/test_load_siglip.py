"""SigLIP / SigLIP 2 checkpoints load through `factory.load` (the path a user takes) and run as the
transformers models do: the directory's tokenizer gives transformers' ids, `Bundle.preprocess`
gives its processor's inputs, embeddings and logits agree within 1e-5 (tiny random-weight models,
SentencePiece tokenizers trained on shipped text: tests/siglip_dirs.py). Refusals name the file
or value and come before the weights are read."""
import atexit
import functools
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from siglip_dirs import (IMAGE_SIZE, MAX_LEN, PATCH, SIGLIP2_VOCAB, TOWER, jitter,  # noqa: E402
                         captions, siglip2_dir, siglip_dir)
from test_naflex import random_images  # noqa: E402

from vljax import factory  # noqa: E402
from vljax.convert import flatten  # noqa: E402
from vljax.data.naflex import stack  # noqa: E402

TEXTS = ["a photo of a cat.", "A Photo Of A CAT", "", "café naïve über 東京 🐈 😀", "x " * 50,
         *captions(5, seed=7)]
SIZES = [(20, 60), (64, 16), (8, 8), (100, 100), (33, 47)]  # wide, tall, tiny, large, odd


def siglip2_fixed_dir(root, gemma_dir, seed=1):
    """As google/siglip2-*-224: a SiglipModel ("siglip") with SigLIP 2's Gemma tokenizer files."""
    path = root / "siglip2_fixed"
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        text_config=dict(**TOWER, vocab_size=SIGLIP2_VOCAB, max_position_embeddings=MAX_LEN,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(**TOWER, patch_size=PATCH, image_size=IMAGE_SIZE))
    model = jitter(transformers.SiglipModel(config).eval(), seed)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model"):
        if (gemma_dir / name).exists():
            shutil.copy(gemma_dir / name, path / name)
    transformers.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         resample=2).save_pretrained(path)
    return path, model


@functools.lru_cache(maxsize=None)
def made_dirs() -> dict:
    """{name: (path, torch model)}, made once per test process and shared by the
    test_load_siglip* modules (read only: tests copy a directory before changing it)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="vljax_siglip_dirs_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    made = {"siglip": siglip_dir(root), "siglip2": siglip2_dir(root, max_num_patches=25)}
    made["siglip2_fixed"] = siglip2_fixed_dir(root, made["siglip2"][0])
    return made


@pytest.fixture(scope="module")
def dirs():
    return made_dirs()


def hf_ids(path, texts):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN,
               return_tensors="np")["input_ids"].astype(np.int32)


def ours(bundle, images, ids):
    """(image embeddings, text embeddings, logits [images, texts]) of a bundle."""
    zimg, ztxt, out = jax.jit(bundle.model.apply)({"params": bundle.params}, images,
                                                  jnp.asarray(ids))
    logits = out["t"] * zimg @ ztxt.T + out.get("b", 0.0)
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)


def assert_close(got, want, atol=1e-5):
    for name, a, b in zip(("image embeddings", "text embeddings", "logits"), got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("name,kind,resample", [("siglip", "sentencepiece", "bicubic"),
                                                ("siglip2_fixed", "hf", "bilinear")])
def test_siglip_directory(dirs, name, kind, resample):
    """SigLIP (spiece.model) and fixed-resolution SigLIP 2 (a "siglip" directory with Gemma's
    tokenizer.json, which transformers reads as GemmaTokenizer: no lower case, left padding)."""
    path, model = dirs[name]
    bundle = factory.load(path)
    spec = bundle.spec
    assert spec["tokenizer"]["kind"] == kind and spec["tokenizer"]["max_len"] == MAX_LEN
    assert (spec["logits"], spec["image_size"], spec["resize"], spec["resample"]) == (
        "sigmoid", IMAGE_SIZE, "squash", resample)
    assert spec["value_range"] == [-1.0, 1.0]
    ids = bundle.tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, hf_ids(path, TEXTS))
    images = random_images(SIZES[:4], seed=1)
    pixels = np.stack([bundle.preprocess(im) for im in images])
    processor = transformers.SiglipImageProcessorPil.from_pretrained(path)
    theirs = processor(images=images, return_tensors="np",
                       input_data_format="channels_last")["pixel_values"]
    np.testing.assert_allclose(pixels, theirs.transpose(0, 2, 3, 1), atol=1e-6, rtol=0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(theirs))
    ref = (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy())
    assert abs(ref[2]).max() > 1.0  # the logit scale / bias really enter the comparison
    assert_close(ours(bundle, pixels, ids), ref)


@pytest.mark.parametrize("budget", [None, 12])
def test_siglip2_naflex_directory(dirs, budget):
    """The directory's budget (25) and an override: a mixed batch of aspect ratios."""
    path, model = dirs["siglip2"]
    bundle = factory.load(path, max_num_patches=budget)
    n = budget or 25
    assert bundle.naflex == {"patch_size": PATCH, "max_num_patches": n}
    assert bundle.spec["model"]["image"]["max_num_patches"] == n
    assert bundle.spec["tokenizer"]["kind"] == "hf" and bundle.spec["logits"] == "sigmoid"
    ids = bundle.tokenizer(TEXTS[:len(SIZES)])
    np.testing.assert_array_equal(bundle.tokenizer(TEXTS), hf_ids(path, TEXTS))
    images = random_images(SIZES, seed=n)
    batch = stack([bundle.preprocess(im) for im in images])
    assert batch["patches"].shape[1] == n and not batch["mask"].all()
    processor = transformers.Siglip2ImageProcessorPil.from_pretrained(path, max_num_patches=n)
    theirs = processor(images=images, return_tensors="np", input_data_format="channels_last")
    np.testing.assert_array_equal(batch["patches"], theirs["pixel_values"])
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    pixel_values=torch.from_numpy(theirs["pixel_values"]),
                    pixel_attention_mask=torch.from_numpy(theirs["pixel_attention_mask"]).long(),
                    spatial_shapes=torch.from_numpy(theirs["spatial_shapes"]).long())
    ref = (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy())
    assert_close(ours(bundle, batch, ids), ref)


def _npz(params, path):
    np.savez(path, **{f"params/{k}": np.asarray(v) for k, v in flatten(params).items()})


@pytest.mark.parametrize("name,model_file", [("siglip", "spiece.model"),
                                             ("siglip2", "tokenizer.model")])
def test_big_vision_npz_with_its_sentencepiece_model(dirs, tmp_path, name, model_file):
    """The same weights as a big_vision npz, the .model beside it (found) or given: the same
    outputs on the same ids; big_vision's tokenizer rules (no canonicalisation, sticky eos)."""
    path, _ = dirs[name]
    hf_bundle = factory.load(path)
    npz = tmp_path / f"{name}.npz"
    _npz(hf_bundle.params, npz)
    shutil.copy(path / model_file, tmp_path / f"{name}.model")
    bundle = factory.load(npz)
    assert bundle.spec["tokenizer"]["model_file"] == str(tmp_path / f"{name}.model")
    assert bundle.spec["tokenizer"]["canonicalize"] == "none"
    rows = bundle.tokenizer(TEXTS)
    assert rows.shape == (len(TEXTS), MAX_LEN)
    assert (rows == bundle.tokenizer.eot_id).any(axis=1).all()  # eos kept on truncation
    if name == "siglip":
        assert (bundle.spec["image_size"], bundle.spec["resize"]) == (IMAGE_SIZE, "squash")
        images = np.stack([hf_bundle.preprocess(im) for im in random_images(SIZES[:3])])
    else:
        assert bundle.naflex == {"patch_size": PATCH, "max_num_patches": 256}
        bundle = factory.load(npz, tokenizer=tmp_path / f"{name}.model", max_num_patches=25)
        images = stack([hf_bundle.preprocess(im) for im in random_images(SIZES[:3])])
    ids = hf_bundle.tokenizer(TEXTS[:3])
    assert_close(ours(bundle, images, ids), ours(hf_bundle, images, ids), atol=1e-6)


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_refusals_name_the_file_or_value_before_the_weights(dirs, tmp_path):
    path, _ = dirs["siglip"]
    # No tokenizer (and no weights: the tokenizer is checked first).
    bare = _copy(path, tmp_path / "no_tok", drop=("spiece.model", "tokenizer*", "model.safetensors"))
    with pytest.raises(ValueError, match="no_tok.*without spiece.model"):
        factory.load(bare)
    # A tokenizer with ids past the text tower's embedding table.
    path2, _ = dirs["siglip2"]
    small = _copy(path2, tmp_path / "small_table", drop=("model.safetensors",))
    cfg = json.loads((small / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"small_table.*{SIGLIP2_VOCAB} tokens.* only 100 rows"):
        factory.load(small)
    # A processor whose normalisation is no value range (per-channel mean), before the weights.
    odd = _copy(path2, tmp_path / "odd_norm", drop=("model.safetensors",))
    pp = json.loads((odd / "preprocessor_config.json").read_text())
    (odd / "preprocessor_config.json").write_text(json.dumps(dict(pp, image_mean=[0.4, 0.5, 0.6])))
    with pytest.raises(ValueError, match="odd_norm/preprocessor_config.json: image_mean"):
        factory.load(odd)
    # A patch budget that allows nothing, and a budget for a fixed-resolution model.
    with pytest.raises(ValueError, match="max_num_patches=0"):
        factory.load(path2, max_num_patches=0)
    with pytest.raises(ValueError, match="max_num_patches=9.*siglip"):
        factory.load(path, max_num_patches=9)
    # An npz with no .model beside it.
    (tmp_path / "lone").mkdir()
    np.savez(tmp_path / "lone" / "m.npz", **{"params/txt/Embed_0/embedding": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="m.npz: no tokenizer"):
        factory.load(tmp_path / "lone" / "m.npz")
