"""transformers CLIPModel / SiglipModel directories load into vljax with identical outputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vljax.convert.hf import load_hf_clip, load_hf_siglip  # noqa: E402
from vljax.models import TwoTowers  # noqa: E402

VOCAB, MAX_LEN, IMAGE, PATCH = 100, 12, 32, 8
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_clip(eos_token_id=VOCAB - 1, hidden_act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(**TOWER, vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                         eos_token_id=eos_token_id, bos_token_id=VOCAB - 2, pad_token_id=0,
                         hidden_act=hidden_act),
        vision_config=dict(**TOWER, image_size=IMAGE, patch_size=PATCH, hidden_act=hidden_act),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(1 / 0.07) + 0.3)
        # Random init leaves class embedding / LN params trivial; perturb so they matter.
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_siglip(seed=0):
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        text_config=dict(**TOWER, vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                         eos_token_id=1, pad_token_id=1, bos_token_id=VOCAB - 2,
                         projection_size=32),
        vision_config=dict(**TOWER, image_size=IMAGE, patch_size=PATCH))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))   # random init leaves scale and bias at 0
        model.logit_bias.fill_(-3.0)
        for name, p in model.named_parameters():
            if not name.startswith("logit") and ("norm" in name or name.endswith("bias")
                                                 or "probe" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


def example_inputs(batch=4, seed=0):
    """images [B, H, W, 3] float32, ids [B, L] int32: BOS, words, EOS at varied places, 0 pad."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = np.zeros((batch, MAX_LEN), np.int32)
    for i, n in enumerate(rng.integers(2, MAX_LEN - 1, size=batch)):
        ids[i, 0] = VOCAB - 2
        ids[i, 1:n] = rng.integers(3, VOCAB - 2, size=n - 1)
        ids[i, n] = VOCAB - 1
    return images, ids


def hf_outputs(model, images, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    return (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy())


def vljax_outputs(kwargs, params, images, ids):
    apply = jax.jit(TwoTowers(**kwargs).apply)
    zimg, ztxt, out = apply({"params": params}, jnp.asarray(images), jnp.asarray(ids))
    logits = out["t"] * zimg @ ztxt.T + out.get("b", 0.0)
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)


def assert_parity(ours, ref, atol=1e-5):
    for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("eos_token_id,hidden_act", [(VOCAB - 1, "quick_gelu"), (2, "gelu")])
def test_hf_clip_parity(tmp_path, eos_token_id, hidden_act):
    model = tiny_clip(eos_token_id, hidden_act)
    model.save_pretrained(tmp_path)
    kwargs, params = load_hf_clip(str(tmp_path))
    assert kwargs["text"]["pool_type"] == ("argmax" if eos_token_id == 2 else "eot")
    images, ids = example_inputs()
    ref = hf_outputs(model, images, ids)
    assert_parity(vljax_outputs(kwargs, params, images, ids), ref)
    assert abs(ref[2]).max() > 1.0   # the logit scale really enters the comparison


def test_hf_siglip_parity(tmp_path):
    model = tiny_siglip()
    model.save_pretrained(tmp_path)
    kwargs, params = load_hf_siglip(str(tmp_path))
    assert kwargs["bias_init"] == pytest.approx(-3.0)
    images, ids = example_inputs()
    ids[ids == 0] = 1   # SigLIP pads with its EOS id and pools the last position
    assert_parity(vljax_outputs(kwargs, params, images, ids), hf_outputs(model, images, ids))


def test_hf_loader_errors_name_the_problem(tmp_path):
    model = tiny_siglip()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'siglip', expected 'clip'"):
        load_hf_clip(str(tmp_path))

    from safetensors.numpy import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    extra = dict(weights, **{"vision_model.extra.weight": np.zeros((3,), np.float32)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys.*vision_model\.extra\.weight"):
        load_hf_siglip(str(tmp_path))

    missing = {k: v for k, v in weights.items() if k != "text_model.head.bias"}
    save_file(missing, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing key 'text_model\.head\.bias'"):
        load_hf_siglip(str(tmp_path))

    wrong = dict(weights, **{"logit_bias": np.zeros((2,), np.float32)})
    save_file(wrong, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'logit_bias' has shape \(2,\), expected a scalar"):
        load_hf_siglip(str(tmp_path))

    bad = dict(weights)
    bad["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    save_file(bad, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"MlpBlock_0/Dense_0/kernel.*\(32, 65\).*\(32, 64\)"):
        load_hf_siglip(str(tmp_path))


def test_config_json_is_read_with_transformers_defaults(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "clip"
    kwargs, _ = load_hf_clip(str(tmp_path))
    assert kwargs["image"]["act"] == "quick_gelu" and kwargs["image"]["ln_pre"]
    assert kwargs["image"]["ln_eps"] == 1e-5 and kwargs["text"]["max_len"] == MAX_LEN
