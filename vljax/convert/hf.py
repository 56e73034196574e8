"""HF transformers CLIP / SigLIP directories (config.json + model.safetensors) -> vljax TwoTowers.

No torch is needed: weights are read with safetensors.numpy, the config with transformers' config
classes (which fill in the defaults that `save_pretrained` leaves out of config.json).

The key tables below map each HF tensor to its vljax parameter with a pair of functions
(to vljax, back to HF); vljax.convert.to_hf uses the same tables in reverse.
"""
import json
import os
from collections.abc import Callable

import numpy as np
from safetensors.numpy import load_file

from vljax.convert import StateDict, check_two_towers, unflatten

# HF hidden_act -> vljax act. gelu_new / gelu_pytorch_tanh are both the tanh approximation.
HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_new": "gelu_tanh"}
VLJAX_TO_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# (hf_key, vljax_key, hf -> vljax, vljax -> hf)
Row = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x):
    return x


def _t(x):
    # torch Linear weight [out, in] <-> flax Dense kernel [in, out]
    return np.ascontiguousarray(x.T)


def layer_norm_rows(hf: str, ours: str) -> list[Row]:
    return [(f"{hf}.weight", f"{ours}/scale", _same, _same),
            (f"{hf}.bias", f"{ours}/bias", _same, _same)]


def linear_rows(hf: str, ours: str, bias: bool = True) -> list[Row]:
    rows = [(f"{hf}.weight", f"{ours}/kernel", _t, _t)]
    if bias:
        rows.append((f"{hf}.bias", f"{ours}/bias", _same, _same))
    return rows


def attention_rows(hf: str, ours: str, width: int, heads: int) -> list[Row]:
    """HF q/k/v/out_proj ([D, D] Linear) <-> flax DenseGeneral kernels [D, H, Dh] / [H, Dh, D]."""
    dh = width // heads
    rows = []
    for hf_name, our_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rows += [(f"{hf}.{hf_name}.weight", f"{ours}/{our_name}/kernel",
                  lambda w: w.T.reshape(width, heads, dh),
                  lambda k: np.ascontiguousarray(k.reshape(width, width).T)),
                 (f"{hf}.{hf_name}.bias", f"{ours}/{our_name}/bias",
                  lambda b: b.reshape(heads, dh), lambda b: b.reshape(width))]
    rows += [(f"{hf}.out_proj.weight", f"{ours}/out/kernel",
              lambda w: w.T.reshape(heads, dh, width),
              lambda k: np.ascontiguousarray(k.reshape(width, width).T)),
             (f"{hf}.out_proj.bias", f"{ours}/out/bias", _same, _same)]
    return rows


def mlp_rows(hf: str, ours: str) -> list[Row]:
    return linear_rows(f"{hf}.fc1", f"{ours}/Dense_0") + linear_rows(f"{hf}.fc2", f"{ours}/Dense_1")


def encoder_rows(hf: str, ours: str, depth: int, width: int, heads: int) -> list[Row]:
    """HF `encoder.layers.{i}` (CLIP / SigLIP encoder layer) <-> vljax `encoderblock_{i}`."""
    rows = []
    for i in range(depth):
        h, o = f"{hf}.layers.{i}", f"{ours}/encoderblock_{i}"
        rows += layer_norm_rows(f"{h}.layer_norm1", f"{o}/LayerNorm_0")
        rows += attention_rows(f"{h}.self_attn", f"{o}/MultiHeadDotProductAttention_0", width,
                               heads)
        rows += layer_norm_rows(f"{h}.layer_norm2", f"{o}/LayerNorm_1")
        rows += mlp_rows(f"{h}.mlp", f"{o}/MlpBlock_0")
    return rows


def patch_rows(hf: str, ours: str, bias: bool) -> list[Row]:
    # torch Conv2d weight [D, C, p, p] <-> flax Conv kernel [p, p, C, D]
    rows = [(f"{hf}.weight", f"{ours}/kernel",
             lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
             lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)))]
    if bias:
        rows.append((f"{hf}.bias", f"{ours}/bias", _same, _same))
    return rows


def _add_batch(x):
    return x[None]


def _drop_batch(x):
    return x[0]


def text_embedding_rows(hf: str, ours: str) -> list[Row]:
    return [(f"{hf}.token_embedding.weight", f"{ours}/Embed_0/embedding", _same, _same),
            (f"{hf}.position_embedding.weight", f"{ours}/pos_embedding", _add_batch, _drop_batch)]


def split_in_proj(sd: StateDict, prefix: str):
    """Fused `{prefix}.in_proj_{weight,bias}` ([3D, D], torch MultiheadAttention) -> q/k/v_proj."""
    w = sd.pop(f"{prefix}.in_proj_weight")
    b = sd.pop(f"{prefix}.in_proj_bias")
    if w.ndim != 2 or w.shape[0] != 3 * w.shape[1] or b.shape != (w.shape[0],):
        raise ValueError(f"{sd.source}: {prefix}.in_proj_weight {w.shape} / in_proj_bias {b.shape}"
                         " are not a fused [3D, D] / [3D] projection")
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), np.split(w, 3), np.split(b, 3)):
        sd.put(f"{prefix}.{name}.weight", wi)
        sd.put(f"{prefix}.{name}.bias", bi)


def apply_rows(sd: StateDict, rows: list[Row]) -> dict[str, np.ndarray]:
    """Pops every HF key of `rows` from `sd` and returns the flat vljax params."""
    flat = {}
    for hf_key, our_key, to_ours, _ in rows:
        v = sd.pop(hf_key)
        try:
            flat[our_key] = np.asarray(to_ours(v), np.float32)
        except ValueError as e:
            raise ValueError(f"{sd.source}: key {hf_key!r} with shape {v.shape} does not fit "
                             f"{our_key!r}: {e}") from e
    return flat


def pop_scalar(sd: StateDict, key: str) -> np.ndarray:
    """A logit scale / bias stored as [] or [1] -> float32 []."""
    v = sd.pop(key)
    if v.size != 1:
        raise ValueError(f"{sd.source}: key {key!r} has shape {v.shape}, expected a scalar")
    return np.asarray(v, np.float32).reshape(())


def act_from_hf(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise ValueError(f"{where}: hidden_act {name!r} has no vljax equivalent "
                         f"(supported: {sorted(HF_ACTS)})")
    return HF_ACTS[name]


def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards a model.safetensors.index.json lists."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        arrays = {}
        for shard in shards:
            arrays.update(load_file(os.path.join(path, shard)))
        return arrays
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json "
                     "(legacy pytorch_model.bin is not read: re-save with safetensors)")


def load_hf_config(path: str, model_type: str):
    """The transformers config class of `model_type` read from path/config.json (defaults filled
    in); refuses a directory whose model_type differs, naming both."""
    # Imported on use: transformers takes about 2 s to import, and only reading an HF config needs
    # it (open_clip, to_hf and the factory import this module for its key tables).
    import transformers  # noqa: PLC0415  (configs only: no torch import)

    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path}: no config.json")
    with open(cfg_file) as f:
        found = json.load(f).get("model_type")
    if found != model_type:
        raise ValueError(f"{cfg_file}: model_type is {found!r}, expected {model_type!r}")
    cls = {"clip": transformers.CLIPConfig, "siglip": transformers.SiglipConfig,
           "siglip2": transformers.Siglip2Config}[model_type]
    return cls.from_pretrained(path)


def _tower_sizes(c) -> dict:
    return dict(variant=None, width=c.hidden_size, depth=c.num_hidden_layers,
                mlp_dim=c.intermediate_size, num_heads=c.num_attention_heads)


def clip_model_kwargs(config) -> dict:
    """TwoTowers kwargs for a transformers CLIPConfig."""
    v, t = config.vision_config, config.text_config
    image = dict(**_tower_sizes(v), patch_size=v.patch_size, pool_type="cls", posemb="learn",
                 ln_pre=True, patch_bias=False, num_classes=config.projection_dim,
                 head_bias=False, act=act_from_hf(v.hidden_act, "vision_config"),
                 ln_eps=v.layer_norm_eps)
    # HF CLIP pools at argmax(ids) when eos_token_id == 2 (configs from before transformers
    # PR #24773), else at the first eos_token_id.
    pool = dict(pool_type="argmax") if t.eos_token_id == 2 else dict(pool_type="eot",
                                                                     eot_id=t.eos_token_id)
    # pad_id only labels out["mask"]; 0 is the padding of the CLIP tokenizer in vljax/open_clip.
    text = dict(**_tower_sizes(t), vocab_size=t.vocab_size, max_len=t.max_position_embeddings,
                causal=True, **pool, pad_id=0, num_classes=config.projection_dim,
                head_bias=False, act=act_from_hf(t.hidden_act, "text_config"),
                ln_eps=t.layer_norm_eps)
    return dict(image_model="vit", image=image, text_model="text_transformer", text=text)


def clip_rows(config) -> list[Row]:
    """Every CLIPModel tensor but the class token / position embedding (see fold_cls_posemb)."""
    v, t = config.vision_config, config.text_config
    rows = patch_rows("vision_model.embeddings.patch_embedding", "img/embedding", bias=False)
    rows += layer_norm_rows("vision_model.pre_layrnorm", "img/ln_pre")
    rows += encoder_rows("vision_model.encoder", "img/Transformer", v.num_hidden_layers,
                         v.hidden_size, v.num_attention_heads)
    rows += layer_norm_rows("vision_model.post_layernorm", "img/Transformer/encoder_norm")
    rows += linear_rows("visual_projection", "img/head", bias=False)
    rows += text_embedding_rows("text_model.embeddings", "txt")
    rows += encoder_rows("text_model.encoder", "txt/Encoder_0", t.num_hidden_layers,
                         t.hidden_size, t.num_attention_heads)
    rows += layer_norm_rows("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm")
    rows += linear_rows("text_projection", "txt/head", bias=False)
    return rows


def fold_cls_posemb(cls: np.ndarray, posemb: np.ndarray, source: str):
    """CLIP's class token + its position row -> vljax `cls` [1, 1, D], `pos_embedding` [1, N, D].

    CLIP adds position row 0 to the class token; vljax (like big_vision) adds position terms to
    the patches only, so row 0 folds into `cls`: the sum the first layer sees is unchanged.
    cls: [D]; posemb: [N + 1, D].
    """
    if posemb.ndim != 2 or cls.shape != (posemb.shape[1],):
        raise ValueError(f"{source}: class embedding {cls.shape} and position embedding "
                         f"{posemb.shape} do not fit ([D] and [N + 1, D])")
    return (cls + posemb[0])[None, None], posemb[None, 1:]


def load_hf_clip(path: str) -> tuple[dict, dict]:
    """A transformers CLIPModel directory -> (TwoTowers kwargs, params)."""
    config = load_hf_config(path, "clip")
    sd = StateDict(read_safetensors_dir(path), source=path, ignore=("position_ids",))
    flat = apply_rows(sd, clip_rows(config))
    flat["img/cls"], flat["img/pos_embedding"] = fold_cls_posemb(
        sd.pop("vision_model.embeddings.class_embedding"),
        sd.pop("vision_model.embeddings.position_embedding.weight"), path)
    flat["t"] = pop_scalar(sd, "logit_scale")
    sd.finish()
    kwargs = clip_model_kwargs(config)
    kwargs["temperature_init"] = float(np.exp(flat["t"]))
    params = unflatten(flat)
    size = config.vision_config.image_size
    check_two_towers(kwargs, params, image_size=(size, size))
    return kwargs, params


def siglip_model_kwargs(config) -> dict:
    """TwoTowers kwargs for a transformers SiglipConfig."""
    v, t = config.vision_config, config.text_config
    if not getattr(v, "vision_use_head", True):
        raise ValueError("SigLIP vision_use_head=False (no attention-pooling head) is not "
                         "supported: SiglipModel's image embedding is the head's output")
    image = dict(**_tower_sizes(v), patch_size=v.patch_size, pool_type="map", posemb="learn",
                 ln_pre=False, patch_bias=True, num_classes=0,
                 act=act_from_hf(v.hidden_act, "vision_config"), ln_eps=v.layer_norm_eps)
    proj = getattr(t, "projection_size", None) or t.hidden_size
    text = dict(**_tower_sizes(t), vocab_size=t.vocab_size, max_len=t.max_position_embeddings,
                causal=False, pool_type="last", eot_id=t.eos_token_id, pad_id=t.pad_token_id,
                num_classes=proj, head_bias=True, act=act_from_hf(t.hidden_act, "text_config"),
                ln_eps=t.layer_norm_eps)
    return dict(image_model="vit", image=image, text_model="text_transformer", text=text)


def siglip_rows(config) -> list[Row]:
    """Every SiglipModel tensor except the logit scale / bias."""
    v, t = config.vision_config, config.text_config
    rows = patch_rows("vision_model.embeddings.patch_embedding", "img/embedding", bias=True)
    rows.append(("vision_model.embeddings.position_embedding.weight", "img/pos_embedding",
                 _add_batch, _drop_batch))
    rows += encoder_rows("vision_model.encoder", "img/Transformer", v.num_hidden_layers,
                         v.hidden_size, v.num_attention_heads)
    rows += layer_norm_rows("vision_model.post_layernorm", "img/Transformer/encoder_norm")
    h, o = "vision_model.head", "img/MAPHead_0"
    rows.append((f"{h}.probe", f"{o}/probe", _same, _same))
    rows += attention_rows(f"{h}.attention", f"{o}/MultiHeadDotProductAttention_0",
                           v.hidden_size, v.num_attention_heads)
    rows += layer_norm_rows(f"{h}.layernorm", f"{o}/LayerNorm_0")
    rows += mlp_rows(f"{h}.mlp", f"{o}/MlpBlock_0")
    rows += text_embedding_rows("text_model.embeddings", "txt")
    rows += encoder_rows("text_model.encoder", "txt/Encoder_0", t.num_hidden_layers,
                         t.hidden_size, t.num_attention_heads)
    rows += layer_norm_rows("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm")
    rows += linear_rows("text_model.head", "txt/head", bias=True)
    return rows


def load_hf_siglip(path: str) -> tuple[dict, dict]:
    """A transformers SiglipModel directory -> (TwoTowers kwargs, params)."""
    config = load_hf_config(path, "siglip")
    sd = StateDict(read_safetensors_dir(path), source=path, ignore=("position_ids",))
    split_in_proj(sd, "vision_model.head.attention")
    flat = apply_rows(sd, siglip_rows(config))
    flat["t"] = pop_scalar(sd, "logit_scale")
    flat["b"] = pop_scalar(sd, "logit_bias")
    sd.finish()
    kwargs = siglip_model_kwargs(config)
    kwargs["temperature_init"] = float(np.exp(flat["t"]))
    kwargs["bias_init"] = float(flat["b"])
    params = unflatten(flat)
    size = config.vision_config.image_size
    check_two_towers(kwargs, params, image_size=(size, size))
    return kwargs, params
