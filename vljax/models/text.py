"""Text transformer: causal CLIP / open_clip style or bidirectional SigLIP / big_vision style."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vljax.models import text_adapter
from vljax.models.common import Encoder, MAPHead, split_range
from vljax.models.vit import decode_variant

Dtype = Any

POOL_TYPES = ("eot", "argmax", "first", "last", "mean", "map")
# Prefix Conditioning (Saito et al., CVPR 2023, arXiv 2206.01125): the kinds of text a learned
# prefix token announces, in the order of the rows of `txt/prefix_embedding`. The abstract: the
# prefix "inform[s] the language encoder of the type of the input dataset (e.g.,
# image-classification or caption)"; "we use image-caption mode in the zero-shot evaluation".
PREFIX_NAMES = ("caption", "label")


def prefix_index(name: str, where: str = "model.text.prefix_at_eval") -> int:
    """The row of `name` in `PREFIX_NAMES`; raises naming the config key `where` otherwise."""
    if name not in PREFIX_NAMES:
        raise ValueError(f"config key `{where}`: unknown prefix {name!r}; known: {list(PREFIX_NAMES)}")
    return PREFIX_NAMES.index(name)


def conditioning_prefix(module: nn.Module, prefix, prefix_ids, batch: int, width: int, dtype):
    """Inside a text tower's compact `__call__`: its `prefix_embedding` param [len(PREFIX_NAMES),
    width] and the row of each text (`prefix_ids` [B], else the tower's `prefix_at_eval`) as one
    token [B, 1, width], put before `prefix` (a CoOp context [B, M, width], or None)."""
    table = module.param("prefix_embedding", nn.initializers.normal(stddev=0.02),
                         (len(PREFIX_NAMES), width), module.param_dtype)
    if prefix_ids is None:
        prefix_ids = jnp.full((batch,), prefix_index(module.prefix_at_eval), jnp.int32)
    cond = jnp.take(jnp.asarray(table, dtype), prefix_ids, axis=0)[:, None]
    return cond if prefix is None else jnp.concatenate([cond, prefix.astype(dtype)], axis=1)


def check_prefix_ids(module: nn.Module, prefix_ids, lower) -> None:
    """A text tower's `prefix_ids` argument: refused without `prefix_conditioning`, or with a
    lower=(k, states) split (the prefix enters below the first layer); `prefix_at_eval` checked."""
    prefix_index(module.prefix_at_eval)
    if prefix_ids is not None and not module.prefix_conditioning:
        raise ValueError("prefix_ids given to a text tower without prefix_conditioning "
                         "(config key `model.text.prefix_conditioning`)")
    if prefix_ids is not None and lower is not None:
        raise ValueError("prefix_ids enter below the first layer: they cannot join lower=(k, states)")


class TextTransformer(nn.Module):
    """Token ids [B, L] -> (features, out).

    causal: CLIP-style autoregressive mask (pool at the end-of-text token); False gives the
      bidirectional SigLIP / big_vision encoder.
    pool_type:
      "eot"    the FIRST position holding `eot_id` (HF CLIP, open_clip 'eos'); a row without it
               pools its last position.
      "argmax" the position of the largest id (OpenAI CLIP, open_clip default, HF CLIP configs
               with the legacy eos_token_id == 2): the same as "eot" when eot is the top id.
      "first" / "last" / "mean" (plain mean over all L positions, as big_vision) / "map".
    out["mask"] ([B, L] bool, True = a real token) for token-level consumers (FILIP): with
      `pad_id`, tokens != pad_id; else with "eot" / "argmax" pooling, the positions up to and
      including the end-of-text one (CLIP pads after it, with 0 or eot); else every position.
      Attention is never masked (CLIP relies on the causal mask, SigLIP trains unmasked).
    variant: a ViT size string ("B", "So400m", ...) for width/depth/mlp_dim/num_heads.
    prefix_conditioning: Prefix Conditioning (Saito et al. 2023): a learned embedding per kind of
      text (`PREFIX_NAMES`, param `prefix_embedding` [len(PREFIX_NAMES), width]) is inserted as one
      token after the first (start) token, the slot `prefix` below uses (so it joins a CoOp
      context, before it). Which row: `__call__(prefix_ids=...)` per text (the batch's
      "prefix_id", the source entry's `prefix`), else `prefix_at_eval` for every text (the
      evaluators, exports, `vljax.inference`): "caption", the mode the paper evaluates zero-shot
      with. The paper's placement of the token was not readable here (only its abstract): after
      the start token is our choice; CLIP's causal mask lets every later position see it. The
      text then takes L + 1 positions (max_len must allow it). Off: the tower is unchanged.
    adapter_layers > 0: LLM2CLIP's adapter (vljax/models/text_adapter.py: residual MLP blocks of
      `adapter_expansion`, then a LayerNorm) between the pooled features and the head;
      out["pre_logits"] stays the pooled features (the adapter's input), out["adapted"] is its
      output. 0: the tower is unchanged.
    """
    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    vocab_size: int = 49408
    max_len: int = 77
    causal: bool = True
    pool_type: str = "eot"
    eot_id: int | None = 49407
    pad_id: int | None = None
    num_classes: int = 0
    head_bias: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0
    remat: bool = False
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    prefix_conditioning: bool = False
    prefix_at_eval: str = "caption"
    adapter_layers: int = 0
    adapter_expansion: int = 2

    def config(self) -> dict:
        """Resolved sizes; without a variant: CLIP's text tower (width 512, depth 12, 8 heads)."""
        cfg = dict(width=512, depth=12, num_heads=8)
        cfg.update({k: v for k, v in decode_variant(self.variant).items() if k != "patch_size"})
        for k in ("width", "depth", "mlp_dim", "num_heads"):
            if getattr(self, k) is not None:
                cfg[k] = getattr(self, k)
        if self.variant is None and self.mlp_dim is None:
            cfg["mlp_dim"] = 4 * cfg["width"]
        return cfg

    @nn.compact
    def __call__(self, tokens, train: bool = False, prefix=None, stop_after=None, lower=None,
                 prefix_ids=None):
        """tokens: int [B, L] with L <= max_len -> (features [B, num_classes or width], out).

        prefix: optional [B, M, width] embeddings inserted after the first token (the start
          token), before the rest of the prompt (CoOp's learned context, vljax/adapt/coop.py);
          the sequence is then L + M long (<= max_len), pooling positions shift by M.
          Without it the tower is unchanged.
        prefix_ids: optional int [B], rows of `PREFIX_NAMES` (with `prefix_conditioning`; None:
          `prefix_at_eval` for all). The conditioning token counts in M above (it comes first).
        out["tokens"]: [B, L (+ M), width] after the final norm; out["pre_logits"]: pooled
        [B, width]; out["logits"] with a head; out["mask"]: [B, L (+ M)] bool, the real tokens
        (see the class; prefix positions count as real).

        Split at a block (a locked lower part run once, `TwoTowers.text_lower`):
          stop_after=k: returns only the states after the position embedding and the first k
            blocks, [B, L, width] (k = depth: before the final norm);
          lower=(k, states): `states` is that output for the same `tokens`; the embeddings and
            the first k blocks are skipped, so the result equals the unsplit call's.
        """
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        if tokens.ndim != 2:
            raise ValueError(f"TextTransformer expects token ids [B, L], got shape {tokens.shape}")
        b, seq_len = tokens.shape
        check_prefix_ids(self, prefix_ids, lower)
        text_adapter.check(self.adapter_layers, self.adapter_expansion, self.num_classes,
                           "text_transformer")
        num_prefix = (0 if prefix is None else prefix.shape[1]) + int(self.prefix_conditioning)
        if seq_len + num_prefix > self.max_len:
            raise ValueError(f"Text length {seq_len} (+ {num_prefix} prefix) exceeds "
                             f"max_len={self.max_len}")
        cfg = self.config()
        width = cfg["width"]
        start, stop = split_range(cfg["depth"], prefix, stop_after, lower)
        out = {}

        if lower is None:
            x = nn.Embed(self.vocab_size, width, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(stddev=0.02), name="Embed_0")(tokens)
            if self.prefix_conditioning:
                prefix = conditioning_prefix(self, prefix, prefix_ids, b, width, x.dtype)
            if prefix is not None:
                x = jnp.concatenate([x[:, :1], prefix.astype(x.dtype), x[:, 1:]], axis=1)
            seq_len += num_prefix
            pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(width)),
                            (1, self.max_len, width), self.param_dtype)
            x = x + pe[:, :seq_len].astype(x.dtype)
            x = nn.Dropout(rate=self.dropout)(x, not train)
        else:
            x = lower[1]
            seq_len += num_prefix
        normed, x = Encoder(depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
                            act=self.act, ln_eps=self.ln_eps, causal=self.causal,
                            dropout=self.dropout, remat=self.remat, scan=self.scan,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="Encoder_0")(
                                x, not train, start, stop)
        if stop_after is not None:
            return x
        x = out["tokens"] = normed
        positions = jnp.arange(seq_len)[None, :]
        if self.pad_id is not None:
            mask = tokens != self.pad_id
            if num_prefix:
                mask = jnp.concatenate([mask[:, :1], jnp.ones((b, num_prefix), bool),
                                        mask[:, 1:]], axis=1)
            out["mask"] = mask
        else:
            out["mask"] = jnp.ones((b, seq_len), bool)

        if self.pool_type in ("eot", "argmax"):
            if self.pool_type == "argmax":
                idx = jnp.argmax(tokens, axis=1) + num_prefix
            else:
                if self.eot_id is None:
                    raise ValueError("pool_type='eot' needs eot_id")
                is_eot = tokens == self.eot_id
                idx = jnp.where(is_eot.any(axis=1), jnp.argmax(is_eot, axis=1) + num_prefix,
                                seq_len - 1)
            if self.pad_id is None:
                out["mask"] = positions <= idx[:, None]
            x = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "mean":
            x = x.mean(axis=1)
        else:
            x = MAPHead(num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], act=self.act,
                        ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="MAPHead_0")(x)
        out["pre_logits"] = x
        if self.adapter_layers:
            x = out["adapted"] = text_adapter.adapt(x, self.adapter_layers, self.adapter_expansion,
                                                    self.dtype, self.param_dtype)

        if self.num_classes:
            x = out["logits"] = nn.Dense(self.num_classes, use_bias=self.head_bias,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="head",
                                         **text_adapter.head_init(self.adapter_layers, x.shape[-1]))(x)
        return x, out
