"""big_vision npz checkpoints load into vljax with identical outputs.

No big_vision checkpoint exists offline, so the test writes one: a random transformers
SiglipModel, renamed key by key into big_vision's flattened layout (the table of transformers'
convert_siglip_to_hf.py, inverted here independently of vljax's own converters), saved as npz.
Loading it must reproduce the transformers model.
"""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_hf import (  # noqa: E402
    assert_parity, example_inputs, hf_outputs, tiny_siglip, vljax_outputs)

from vljax.convert.big_vision import load_big_vision, load_big_vision_vit  # noqa: E402
from vljax.models import ViT  # noqa: E402


def _block_keys(hf, bv):
    """HF encoder layer -> big_vision encoderblock: (hf name, bv name) pairs."""
    pairs = [(f"{hf}.layer_norm1", f"{bv}/LayerNorm_0"), (f"{hf}.layer_norm2", f"{bv}/LayerNorm_1"),
             (f"{hf}.mlp.fc1", f"{bv}/MlpBlock_0/Dense_0"),
             (f"{hf}.mlp.fc2", f"{bv}/MlpBlock_0/Dense_1")]
    for a, b in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
        pairs.append((f"{hf}.self_attn.{a}", f"{bv}/MultiHeadDotProductAttention_0/{b}"))
    return pairs


def siglip_to_big_vision_npz(model, path, scan=False):
    """Writes `model` (transformers SiglipModel) as a big_vision SigLIP npz."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    v_cfg, t_cfg = model.config.vision_config, model.config.text_config
    out = {}

    def linear(hf, bv, heads=None, width=None, out_proj=False):
        w, b = sd[f"{hf}.weight"], sd[f"{hf}.bias"]
        if heads is None:                       # Dense: kernel [in, out]
            out[f"{bv}/kernel"], out[f"{bv}/bias"] = w.T, b
        elif out_proj:                          # DenseGeneral out: [H, Dh, D]
            out[f"{bv}/kernel"] = w.T.reshape(heads, width // heads, width)
            out[f"{bv}/bias"] = b
        else:                                   # DenseGeneral q/k/v: [D, H, Dh]
            out[f"{bv}/kernel"] = w.T.reshape(width, heads, width // heads)
            out[f"{bv}/bias"] = b.reshape(heads, width // heads)

    def layer_norm(hf, bv):
        out[f"{bv}/scale"], out[f"{bv}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def tower(hf_enc, bv_enc, cfg):
        for i in range(cfg.num_hidden_layers):
            for hf, bv in _block_keys(f"{hf_enc}.layers.{i}", f"{bv_enc}/encoderblock_{i}"):
                if "LayerNorm" in bv:
                    layer_norm(hf, bv)
                elif "MultiHead" in bv:
                    linear(hf, bv, cfg.num_attention_heads, cfg.hidden_size, bv.endswith("out"))
                else:
                    linear(hf, bv)

    pe = "vision_model.embeddings"
    out["params/img/embedding/kernel"] = sd[f"{pe}.patch_embedding.weight"].transpose(2, 3, 1, 0)
    out["params/img/embedding/bias"] = sd[f"{pe}.patch_embedding.bias"]
    out["params/img/pos_embedding"] = sd[f"{pe}.position_embedding.weight"][None]
    tower("vision_model.encoder", "params/img/Transformer", v_cfg)
    layer_norm("vision_model.post_layernorm", "params/img/Transformer/encoder_norm")
    h, m = "vision_model.head", "params/img/MAPHead_0"
    out[f"{m}/probe"] = sd[f"{h}.probe"]
    for (name, w), b in zip(zip(("query", "key", "value"),
                                np.split(sd[f"{h}.attention.in_proj_weight"], 3)),
                            np.split(sd[f"{h}.attention.in_proj_bias"], 3)):
        sd[f"{h}.{name}.weight"], sd[f"{h}.{name}.bias"] = w, b
        linear(f"{h}.{name}", f"{m}/MultiHeadDotProductAttention_0/{name}",
               v_cfg.num_attention_heads, v_cfg.hidden_size)
    linear(f"{h}.attention.out_proj", f"{m}/MultiHeadDotProductAttention_0/out",
           v_cfg.num_attention_heads, v_cfg.hidden_size, out_proj=True)
    layer_norm(f"{h}.layernorm", f"{m}/LayerNorm_0")
    linear(f"{h}.mlp.fc1", f"{m}/MlpBlock_0/Dense_0")
    linear(f"{h}.mlp.fc2", f"{m}/MlpBlock_0/Dense_1")

    out["params/txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
    out["params/txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
    tower("text_model.encoder", "params/txt/Encoder_0", t_cfg)
    layer_norm("text_model.final_layer_norm", "params/txt/Encoder_0/encoder_norm")
    linear("text_model.head", "params/txt/head")
    out["params/t"] = sd["logit_scale"].reshape(1)   # big_vision stores t and b with shape [1]
    out["params/b"] = sd["logit_bias"].reshape(1)

    if scan:   # big_vision scan=True: one `encoderblock` with a leading [depth] axis
        for enc, depth in (("params/img/Transformer", v_cfg.num_hidden_layers),
                           ("params/txt/Encoder_0", t_cfg.num_hidden_layers)):
            names = {k.split("/", len(enc.split("/")) + 1)[-1] for k in out
                     if k.startswith(f"{enc}/encoderblock_")}
            for n in names:
                out[f"{enc}/encoderblock/{n}"] = np.stack(
                    [out.pop(f"{enc}/encoderblock_{i}/{n}") for i in range(depth)])
    np.savez(path, **out)


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_siglip_npz_matches_transformers(tmp_path, scan):
    model = tiny_siglip(seed=3)
    siglip_to_big_vision_npz(model, tmp_path / "siglip.npz", scan=scan)
    kwargs, params = load_big_vision(str(tmp_path / "siglip.npz"))
    assert kwargs["image"]["pool_type"] == "map" and kwargs["text"]["pool_type"] == "last"
    assert kwargs["image"]["num_heads"] == 2 and kwargs["image"]["depth"] == 2
    images, ids = example_inputs(seed=3)
    ids[ids == 0] = 1
    assert_parity(vljax_outputs(kwargs, params, images, ids), hf_outputs(model, images, ids))


def test_big_vision_vit_npz_and_errors(tmp_path):
    model = tiny_siglip(seed=4)
    siglip_to_big_vision_npz(model, tmp_path / "siglip.npz")
    with np.load(tmp_path / "siglip.npz") as npz:
        img = {k.removeprefix("params/img/"): npz[k] for k in npz.files
               if k.startswith("params/img/")}
    np.savez(tmp_path / "vit.npz", **img)
    kw, params = load_big_vision_vit(str(tmp_path / "vit.npz"))
    images, _ = example_inputs(seed=4)
    feats, _ = ViT(**kw).apply({"params": params}, jnp.asarray(images))
    with torch.no_grad():
        ref = model.get_image_features(
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(feats), ref, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="use load_big_vision_vit"):
        load_big_vision(str(tmp_path / "vit.npz"))
    img["Transformer/encoderblock_0/MlpBlock_0/Dense_9/kernel"] = np.zeros((2, 2), np.float32)
    np.savez(tmp_path / "bad.npz", **img)
    with pytest.raises(ValueError, match=r"unexpected key 'Transformer/encoderblock_0/MlpBlock_0"
                                         r"/Dense_9/kernel'"):
        load_big_vision_vit(str(tmp_path / "bad.npz"))
