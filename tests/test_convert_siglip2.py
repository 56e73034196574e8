"""transformers Siglip2Model (NaFlex) directories and big_vision SigLIP 2 NaFlex npz load into vljax
with identical outputs, at several aspect ratios and patch budgets."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from siglip_dirs import jitter  # noqa: E402
from test_naflex import hf_processor, random_images, random_params  # noqa: E402

from vljax.convert import flatten  # noqa: E402
from vljax.convert.big_vision import load_big_vision  # noqa: E402
from vljax.convert.hf_siglip2 import load_hf_siglip2  # noqa: E402
from vljax.data.naflex import naflex_batch  # noqa: E402
from vljax.models import TwoTowers  # noqa: E402
from vljax.models.naflex import example_input  # noqa: E402

VOCAB, MAX_LEN, PATCH, GRID = 100, 12, 4, 4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# Wide, tall, tiny (upsampled past the 4 x 4 grid), large (downsampled).
SIZES = [(20, 60), (64, 16), (8, 8), (100, 100)]


def tiny_siglip2(seed=0):
    torch.manual_seed(seed)
    config = transformers.Siglip2Config(
        text_config=dict(**TOWER, vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                         eos_token_id=1, pad_token_id=0, bos_token_id=2, projection_size=32),
        vision_config=dict(**TOWER, patch_size=PATCH, num_patches=GRID * GRID))
    return jitter(transformers.Siglip2Model(config).eval(), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Siglip2Model saved as a user's directory, with a processor of budget 25."""
    path = tmp_path_factory.mktemp("siglip2")
    model = tiny_siglip2()
    model.save_pretrained(path)
    processor = transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=25)
    processor.save_pretrained(path)
    return model, str(path)


def random_ids(batch, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, MAX_LEN)).astype(np.int32)


def hf_outputs(model, batch, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    pixel_values=torch.from_numpy(np.asarray(batch["patches"])),
                    pixel_attention_mask=torch.from_numpy(np.asarray(batch["mask"])).long(),
                    spatial_shapes=torch.from_numpy(np.asarray(batch["shapes"])).long())
    return (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy(),
            out.vision_model_output.last_hidden_state.numpy())


def vljax_outputs(apply, params, batch, ids):
    """apply: a jitted TwoTowers.apply (one per test: one compile per budget)."""
    zimg, ztxt, out = apply({"params": params}, batch, jnp.asarray(ids))
    logits = out["t"] * zimg @ ztxt.T + out.get("b", 0.0)
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits), np.asarray(out["img/tokens"])


def assert_parity(ours, ref, atol=1e-5):
    names = ("image embeddings", "text embeddings", "logits", "image tokens")
    for name, a, b in zip(names, ours, ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


def test_kwargs_record_patch_size_and_budget(saved):
    _, path = saved
    kwargs, params = load_hf_siglip2(path)
    assert kwargs["image_model"] == "naflex_vit"
    image = kwargs["image"]
    assert (image["patch_size"], image["max_num_patches"]) == (PATCH, 25)
    assert image["posemb_grid"] == GRID
    assert params["img"]["pos_embedding"].shape == (GRID, GRID, 32)
    assert kwargs["bias_init"] == pytest.approx(-3.0)
    assert kwargs["text"]["pool_type"] == "last" and kwargs["text"]["vocab_size"] == VOCAB


@pytest.mark.parametrize("budget", [8, 25, 40])
def test_siglip2_parity_mixed_batch(saved, budget):
    """A batch of four aspect ratios at one budget; every budget has images resized up and down."""
    model, path = saved
    kwargs, params = load_hf_siglip2(path)
    images = random_images(SIZES, seed=budget)
    batch = naflex_batch(images, PATCH, budget)
    ids = random_ids(len(images), seed=budget)
    ref = hf_outputs(model, batch, ids)
    apply = jax.jit(TwoTowers(**kwargs).apply)
    assert_parity(vljax_outputs(apply, params, batch, ids), ref)
    assert abs(ref[2]).max() > 1.0   # the logit scale really enters the comparison
    # Inputs made by transformers' own processor from the same uint8 images: the same outputs.
    theirs = hf_processor(images, PATCH, budget)
    hf_batch = {"patches": theirs["pixel_values"], "mask": theirs["pixel_attention_mask"] > 0,
                "shapes": theirs["spatial_shapes"].astype(np.int32)}
    assert_parity(vljax_outputs(apply, params, hf_batch, ids), ref)


def test_siglip2_loader_errors_name_the_problem(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "siglip2"
    from vljax.convert.hf import load_hf_siglip
    with pytest.raises(ValueError, match="model_type is 'siglip2', expected 'siglip'"):
        load_hf_siglip(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size 16 differs.*patch_size 4"):
        load_hf_siglip2(str(tmp_path))
    (tmp_path / "preprocessor_config.json").unlink()
    kwargs, _ = load_hf_siglip2(str(tmp_path))
    assert kwargs["image"]["max_num_patches"] == 256   # transformers' default budget

    from safetensors.numpy import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    bad = dict(weights)
    bad["vision_model.embeddings.position_embedding.weight"] = np.zeros((15, 32), np.float32)
    save_file(bad, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="position_embedding.*num_patches=15 is not a square"):
        load_hf_siglip2(str(tmp_path))


BV_IMAGE = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=PATCH,
                posemb_grid=GRID, max_num_patches=256, pool_type="map", act="gelu_tanh",
                ln_eps=1e-6, num_classes=0)
BV_TEXT = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=VOCAB,
               max_len=MAX_LEN, causal=False, pool_type="last", eot_id=None, pad_id=None,
               act="gelu_tanh", ln_eps=1e-6, num_classes=32, head_bias=True)


def test_big_vision_naflex_npz(tmp_path):
    """An npz in big_vision's SigLIP 2 NaFlex layout ("params/img/embedding/kernel" [P*P*3, D],
    "params/img/pos_embedding" [G, G, D], ...) loads with its sizes inferred, unchanged."""
    kwargs = dict(image_model="naflex_vit", image=BV_IMAGE, text_model="text_transformer",
                  text=BV_TEXT, temperature_init=10.0, bias_init=-10.0)
    params = random_params(TwoTowers(**kwargs), example_input(BV_IMAGE, num_patches=16),
                           np.zeros((1, MAX_LEN), np.int32))
    np.savez(tmp_path / "siglip2_naflex.npz",
             **{f"params/{k}": np.asarray(v) for k, v in flatten(params).items()})
    loaded_kwargs, loaded = load_big_vision(str(tmp_path / "siglip2_naflex.npz"))
    assert loaded_kwargs["image_model"] == "naflex_vit"
    assert {k: loaded_kwargs["image"][k] for k in BV_IMAGE} == BV_IMAGE
    assert loaded_kwargs["text"] == BV_TEXT
    want, got = flatten(params), flatten(loaded)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
