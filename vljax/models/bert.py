"""BERT-family text encoder (BERT, MiniLM, ...): post-LN transformer over WordPiece ids.

Matches transformers' `BertModel` (absolute positions, one token type, exact-erf GELU,
LayerNorm after each residual add). Padding is derived from the ids (`tokens != pad_id`);
padded keys are masked out of attention, padded positions out of mean pooling.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vljax.models import text_adapter
from vljax.models.common import split_range
from vljax.models.text import check_prefix_ids, conditioning_prefix

POOL_TYPES = ("mean", "cls", "first")


class BertLayer(nn.Module):
    """Self-attention + MLP, each followed by residual add and LayerNorm (post-LN)."""

    num_heads: int
    intermediate_size: int
    ln_eps: float = 1e-12
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, train=False):
        """x: [B, L, W]; mask: [B, L] bool (True = real token). Returns [B, L, W]."""
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(epsilon=self.ln_eps, **kw)
        # Key mask only: padded queries still attend (as in BertModel), pooling drops them.
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dropout_rate=self.dropout_rate, name="attention", **kw,
        )(x, x, mask=mask[:, None, None, :], deterministic=not train)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        x = nn.LayerNorm(name="attention_ln", **ln)(x + y)
        y = nn.Dense(self.intermediate_size, name="intermediate", **kw)(x)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(width, name="output", **kw)(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        return nn.LayerNorm(name="output_ln", **ln)(x + y)


class Bert(nn.Module):
    """BERT encoder; `__call__(tokens [B, L] int32) -> (features [B, D], out)`.

    pool_type: "mean" (over real tokens; sentence-transformers' pooling), "cls" (BERT's
    pooler: tanh(Dense(first token))), or "first" (the first token's state as is).
    num_classes > 0 adds a Dense "head" (the projection in a two-tower model).
    adapter_layers > 0 puts LLM2CLIP's adapter (vljax/models/text_adapter.py: residual MLP
    blocks of `adapter_expansion`, then a LayerNorm) between the pooled features and the head.
    out: "tokens" [B, L, W] final states, "mask" [B, L] bool, "pre_logits" [B, W] (the pooled
    features; with an adapter, its input), "adapted" [B, W] (the adapter's output, with one),
    "logits" [B, num_classes] when there is a head.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pool_type: str = "mean"
    num_classes: int = 0
    head_bias: bool = True
    normalize: bool = False
    pad_id: int = 0
    dropout_rate: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    adapter_layers: int = 0  # LLM2CLIP's TextProj blocks before the head (0: none)
    adapter_expansion: int = 2
    prefix_conditioning: bool = False  # Prefix Conditioning: as TextTransformer's (vljax/models/text.py)
    prefix_at_eval: str = "caption"

    @nn.compact
    def __call__(self, tokens, train=False, prefix=None, stop_after=None, lower=None, prefix_ids=None):
        """tokens: int [B, L]; prefix: optional [B, M, hidden_size] embeddings inserted after the
        first token ([CLS]) in place of word embeddings (CoOp's learned context,
        vljax/adapt/coop.py); they take positions 1..M, the prompt's tokens shift by M.
        prefix_ids: optional int [B] with `prefix_conditioning` (TextTransformer's): the learned
          prefix token comes first among the M (None: `prefix_at_eval` for every text).

        Split at a layer (a locked lower part run once, `TwoTowers.text_lower`):
          stop_after=k: returns only the states after the embeddings and the first k layers,
            [B, L, hidden_size];
          lower=(k, states): `states` is that output for the same `tokens`; the embeddings and
            the first k layers are skipped, so the result equals the unsplit call's.
        """
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Bert expects int token ids [B, L], got {tokens.dtype}{tokens.shape}")
        check_prefix_ids(self, prefix_ids, lower)
        num_prefix = (0 if prefix is None else prefix.shape[1]) + int(self.prefix_conditioning)
        length = tokens.shape[1] + num_prefix
        if length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} > max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type {self.pool_type!r} not in {POOL_TYPES}")
        text_adapter.check(self.adapter_layers, self.adapter_expansion, self.num_classes, "bert")
        start, stop = split_range(self.num_layers, prefix, stop_after, lower)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask = tokens != self.pad_id
        out = {}

        if lower is None:
            embed = lambda n, name: nn.Embed(n, self.hidden_size, name=name, **kw)  # noqa: E731
            x = embed(self.vocab_size, "word_embeddings")(tokens)
            if self.prefix_conditioning:
                prefix = conditioning_prefix(self, prefix, prefix_ids, tokens.shape[0],
                                             self.hidden_size, x.dtype)
            if prefix is not None:
                x = jnp.concatenate([x[:, :1], prefix.astype(x.dtype), x[:, 1:]], axis=1)
            x = x + embed(self.max_position_embeddings, "position_embeddings")(jnp.arange(length))
            # A single segment: every token has type 0 (row 0 of the table).
            x = x + embed(self.type_vocab_size, "token_type_embeddings")(
                jnp.zeros(x.shape[:2], jnp.int32))
            x = nn.LayerNorm(epsilon=self.ln_eps, name="embeddings_ln", **kw)(x)
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        else:
            x = lower[1]
        if num_prefix:  # the prefix positions are real tokens
            mask = jnp.concatenate([mask[:, :1], jnp.ones((tokens.shape[0], num_prefix), bool),
                                    mask[:, 1:]], axis=1)

        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        for i in range(start, stop):
            x = layer_cls(self.num_heads, self.intermediate_size, self.ln_eps,
                          self.dropout_rate, name=f"encoderblock_{i}", **kw)(x, mask, train)
        if stop_after is not None:
            return x
        out["tokens"], out["mask"] = x, mask

        if self.pool_type == "mean":
            m = mask[..., None].astype(x.dtype)
            x = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        elif self.pool_type == "cls":
            x = jnp.tanh(nn.Dense(self.hidden_size, name="pooler", **kw)(x[:, 0]))
        else:
            x = x[:, 0]
        out["pre_logits"] = x
        if self.adapter_layers:
            x = out["adapted"] = text_adapter.adapt(x, self.adapter_layers, self.adapter_expansion,
                                                    self.dtype, self.param_dtype)

        if self.num_classes:
            x = out["logits"] = nn.Dense(
                self.num_classes, use_bias=self.head_bias, name="head", **kw,
                **text_adapter.head_init(self.adapter_layers, x.shape[-1]))(x)
        if self.normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x, out
