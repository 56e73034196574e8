"""Caption decoder (LocCa / CapPa): a transformer decoder that cross-attends to the image tower's
patch tokens and predicts the caption, trained beside the sigmoid loss (SigLIP 2) and dropped
from the exported encoder.

Architecture as big_vision's CapPa decoder (`big_vision/models/proj/cappa/cappa.py`, Tschannen et
al. 2023, "Image Captioners Are Scalable Vision Learners Too"), which LocCa (Wan et al. 2024) and
SigLIP 2 (Tschannen et al. 2025, Sec. 2.2) reuse: token embedding + learned positions, `depth`
pre-LN blocks of [self-attention, cross-attention to the image tokens, MLP], a final LayerNorm
and an output projection to the vocabulary. The output projection is NOT tied to the input
embedding (CapPa's `LogitsDense`, zero-initialised, is a separate matrix from `EmbedTargets`).

Two ways to read a caption (CapPa, Sec. 3):
  * autoregressive (teacher forcing): inputs = the caption shifted right behind a BOS token,
    causal self-attention; position i predicts token i from tokens < i and the image;
  * parallel prediction: every input is the mask token and self-attention is not causal, so all
    tokens are predicted at once from the image alone.
With `parallel_fraction` = p > 0, each training example independently takes parallel prediction
with probability p (CapPa's `masked_pred_prob`, 0.75 in its configs, masking ratio 1: all inputs
masked; SigLIP 2 uses parallel prediction for 50% of the decoder's examples); evaluation
(`train=False`) is always autoregressive. The draw uses the "dropout" rng, one value per global
example, so it is the same on any mesh.

The embedding has `vocab_size + 2` rows: row `vocab_size` is the mask token, row `vocab_size + 1`
the BOS token (big_vision shifts in id 0, which is its pad id; a row of its own keeps BOS apart from
any real token). The logits cover the `vocab_size` real ids only.

Parameter names follow the encoders' (vljax/models/common.py: `MultiHeadDotProductAttention_0/
{query,key,value,out}`, `MlpBlock_0/Dense_{0,1}`, `LayerNorm_{i}`, `Embed_0/embedding`,
`pos_embedding`), so the regex sharding rules that place the text tower's kernels
(vljax/sharding.py) place the decoder's (`dec/...`) alike.
"""
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.models.common import MlpBlock
from vljax.models.vit import decode_variant

Dtype = Any


def shift_right(tokens, bos_id: int):
    """tokens: int [B, L] -> [B, L]: `bos_id`, then tokens[:, :-1] (teacher forcing's inputs)."""
    return jnp.concatenate([jnp.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], axis=1)


def decoder_inputs(tokens, parallel, bos_id: int, mask_id: int):
    """CapPa's mix of the two modes. tokens: int [B, L] captions; parallel: bool [B] ->
    (inputs int [B, L], self-attention mask bool [B, 1, L, L]): the autoregressive rows get the
    caption shifted right and a causal mask; the parallel rows all-`mask_id` inputs and a full
    mask (every position sees every other)."""
    b, length = tokens.shape
    inputs = jnp.where(parallel[:, None], mask_id, shift_right(tokens, bos_id))
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None] | parallel[:, None, None]
    return inputs, mask[:, None]


class _Attention(nn.Module):
    """Multi-head attention with an explicit mask, named like common.Attention (query / key /
    value kernels [D, H, Dh], out [H, Dh, D]) so its parameters shard by the same rules."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q, x_kv, mask=None):
        """x_q: [B, T, D], x_kv: [B, S, E] -> [B, T, D]; mask: bool broadcastable to
        [B, H, T, S] (True = may attend)."""
        d = x_q.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"decoder width {d} is not divisible by num_heads={self.num_heads}")
        proj = partial(nn.DenseGeneral, features=(self.num_heads, d // self.num_heads),
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=nn.initializers.xavier_uniform())
        q, k, v = proj(name="query")(x_q), proj(name="key")(x_kv), proj(name="value")(x_kv)
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=nn.initializers.xavier_uniform(), name="out")(y)


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: x + SelfAttn(LN(x)), x + CrossAttn(LN(x), image), x + MLP(LN(x))."""
    num_heads: int
    mlp_dim: int | None = None
    act: str = "gelu"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic, image, self_mask, image_mask):
        """x: [B, L, D]; image: [B, N, E]; self_mask: bool [B, 1, L, L]; image_mask: bool
        [B, 1, 1, N] or None -> [B, L, D]."""
        ln = partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        attn = partial(_Attention, self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype)
        drop = partial(nn.Dropout(rate=self.dropout), deterministic=deterministic)
        y = ln(name="LayerNorm_0")(x)
        x = x + drop(attn(name="MultiHeadDotProductAttention_0")(y, y, self_mask))
        y = ln(name="LayerNorm_1")(x)
        x = x + drop(attn(name="MultiHeadDotProductAttention_1")(y, image.astype(y.dtype),
                                                                 image_mask))
        y = ln(name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.act, self.dropout, self.dtype, self.param_dtype,
                     name="MlpBlock_0")(y, deterministic)
        return x + drop(y)


class TextDecoder(nn.Module):
    """(image tokens [B, N, E], captions int [B, L]) -> logits [B, L, vocab_size] (see module).

    variant: a ViT size string ("B", "So400m", ...) for width / depth / mlp_dim / num_heads, each
      overridable (SigLIP 2: the text encoder's shape with half its layers).
    pad_id: the tokenizer's pad id: positions holding it are no targets (`out["mask"]`).
    parallel_fraction: the probability that a training example uses parallel prediction.
    """
    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    vocab_size: int = 32_000
    max_len: int = 64
    pad_id: int = 0
    parallel_fraction: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def config(self) -> dict:
        """Resolved sizes (variant overlaid with the fields set); a missing size is an error."""
        cfg = {k: v for k, v in decode_variant(self.variant).items() if k != "patch_size"}
        for k in ("width", "depth", "mlp_dim", "num_heads"):
            if getattr(self, k) is not None:
                cfg[k] = getattr(self, k)
        if "width" in cfg:
            cfg.setdefault("mlp_dim", 4 * cfg["width"])
        missing = [k for k in ("width", "depth", "num_heads") if k not in cfg]
        if missing:
            raise ValueError(f"model.decoder: set `variant` or {', '.join(missing)}")
        return cfg

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1

    @nn.compact
    def __call__(self, image, tokens, train: bool = False, image_mask=None, parallel=None,
                 no_parallel=None):
        """image: [B, N, E] the image tower's tokens (out["tokens"]); tokens: int [B, L], L <=
        max_len, the captions (the targets); image_mask: optional bool [B, N] (NaFlex padding);
        parallel: optional bool [B], which rows use parallel prediction (default: drawn with
        probability `parallel_fraction` when training, none otherwise); no_parallel: optional
        bool [B], rows read autoregressively whatever the draw (LocCa's prompted rows,
        vljax/data/locca.py: parallel prediction would hide their prompt).

        Returns (logits [B, L, vocab_size], out) with out["targets"] = tokens, out["mask"]
        bool [B, L] (tokens != pad_id: the positions the loss counts), out["parallel"] bool [B].
        """
        if not 0.0 <= self.parallel_fraction <= 1.0:
            raise ValueError(f"model.decoder.parallel_fraction must be in [0, 1], got "
                             f"{self.parallel_fraction}")
        if tokens.ndim != 2 or image.ndim != 3 or image.shape[0] != tokens.shape[0]:
            raise ValueError(f"TextDecoder expects image tokens [B, N, E] and captions [B, L], "
                             f"got {image.shape} and {tokens.shape}")
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"caption length {length} exceeds model.decoder.max_len={self.max_len}")
        cfg = self.config()
        if parallel is None:
            if train and self.parallel_fraction > 0:
                u = jax.random.uniform(self.make_rng("dropout"), (b,))
                parallel = u < self.parallel_fraction
            else:
                parallel = jnp.zeros((b,), bool)
        if no_parallel is not None:
            parallel = parallel & ~jnp.asarray(no_parallel, bool)
        inputs, self_mask = decoder_inputs(tokens, parallel, self.bos_id, self.mask_id)

        x = nn.Embed(self.vocab_size + 2, cfg["width"], dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(stddev=1.0), name="Embed_0")(inputs)
        pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(cfg["width"])),
                        (1, self.max_len, cfg["width"]), self.param_dtype)
        x = x + pe[:, :length].astype(x.dtype)
        kv_mask = None if image_mask is None else jnp.asarray(image_mask, bool)[:, None, None, :]
        block = DecoderBlock
        if self.remat:
            # argnums count `self`: 0=self, 1=x, 2=deterministic (a Python bool, kept static).
            block = nn.remat(DecoderBlock, static_argnums=(2,))
        for i in range(cfg["depth"]):
            x = block(num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], act=self.act,
                      ln_eps=self.ln_eps, dropout=self.dropout, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"decoderblock_{i}")(
                          x, not train, image, self_mask, kv_mask)
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="decoder_norm")(x)
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="head")(x)
        return logits, {"targets": tokens, "mask": tokens != self.pad_id, "parallel": parallel}
