"""Transformer building blocks shared by the image (ViT) and text towers.

Parameter names follow google-research/big_vision (`encoderblock_{i}`, `MlpBlock_0/Dense_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `MAPHead_0/probe`, `encoder_norm`) so that
a big_vision checkpoint loads with a plain rename of its flattened keys.
"""
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": partial(nn.gelu, approximate=False),     # exact erf (torch GELU, open_clip)
    "gelu_tanh": partial(nn.gelu, approximate=True),  # big_vision / SigLIP (gelu_pytorch_tanh)
    "quick_gelu": quick_gelu,                         # OpenAI CLIP
}


def get_activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Dtype = jnp.float32) -> jax.Array:
    """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision layout).

    Returns: [1, h * w, width], rows in row-major (y, x) order, columns
    [sin x, cos x, sin y, cos y].
    """
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.reshape(-1), omega)
    x = np.einsum("m,d->md", x.reshape(-1), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None]


class MlpBlock(nn.Module):
    """Transformer feed-forward block: Dense(mlp_dim) -> act -> Dense(width)."""
    mlp_dim: int | None = None  # defaults to 4x the input width
    act: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """x: [B, L, D] -> [B, L, D]."""
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.normal(stddev=1e-6))
        d = x.shape[-1]
        x = dense(self.mlp_dim or 4 * d)(x)
        x = get_activation(self.act)(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return dense(d)(x)


class Attention(nn.Module):
    """Multi-head dot-product attention with a fused kernel (`jax.nn.dot_product_attention`).

    Projections are DenseGeneral layers named like flax's MultiHeadDotProductAttention
    (query/key/value kernels [D, H, Dh], out kernel [H, Dh, D]); the softmax runs in fp32.
    """
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q, x_kv, mask=None):
        """x_q: [B, T, D], x_kv: [B, S, D] -> [B, T, D].

        mask: optional bool [B, S], True = a real key; padded keys get no attention weight
        (NaFlex padding; transformers' key-padding mask). Every row needs one real key."""
        d = x_q.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads
        proj = partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
        q = proj(name="query")(x_q)
        k = proj(name="key")(x_kv)
        v = proj(name="value")(x_kv)
        if mask is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                             is_causal=self.causal)
        return nn.DenseGeneral(d, axis=(-2, -1), name="out", dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=nn.initializers.xavier_uniform())(y)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
    num_heads: int
    mlp_dim: int | None = None
    act: str = "gelu"
    ln_eps: float = 1e-6
    causal: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, mask=None):
        """x: [B, L, D] -> (x [B, L, D], None); the pair makes the block an nn.scan body.
        mask: optional bool [B, L] of real tokens, the keys attention may use (see Attention)."""
        ln = partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        y = ln(name="LayerNorm_0")(x)
        y = Attention(self.num_heads, causal=self.causal, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      name="MultiHeadDotProductAttention_0")(y, y, mask)
        x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
        y = ln(name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, self.act, self.dropout, self.dtype, self.param_dtype,
                     name="MlpBlock_0")(y, deterministic)
        x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
        return x, None


def split_range(depth, prefix, stop_after, lower) -> tuple[int, int]:
    """The layers [start, stop) a call runs (the `stop_after` / `lower` split of a text
    tower: the states after layer k are computed once and fed back in)."""
    if stop_after is not None and lower is not None:
        raise ValueError("pass stop_after (the lower part) or lower (the rest), not both")
    if lower is not None and prefix is not None:
        raise ValueError("a prefix enters below the first layer: it cannot join a lower=(k, states) "
                         "call, whose first k layers already ran")
    k = stop_after if lower is None else lower[0]
    if k is not None and not 0 <= k <= depth:
        raise ValueError(f"split after layer {k} of a tower of {depth} layers")
    return (0, depth) if k is None else ((0, k) if lower is None else (k, depth))


class Encoder(nn.Module):
    """A stack of `depth` Encoder1DBlocks followed by the final LayerNorm `encoder_norm`.

    remat: recompute each block in the backward pass (activation memory O(1) in depth).
    scan: one `encoderblock` whose parameters are stacked along a leading [depth] axis
      (faster compiles for deep models); otherwise blocks are `encoderblock_{i}`.
    """
    depth: int
    num_heads: int
    mlp_dim: int | None = None
    act: str = "gelu"
    ln_eps: float = 1e-6
    causal: bool = False
    dropout: float = 0.0
    remat: bool = False
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, start: int = 0, stop: int | None = None,
                 mask=None):
        """x: [B, L, D] -> (normed [B, L, D], pre-norm [B, L, D]).

        mask: optional bool [B, L], True = a real token: padded tokens are keys of no block's
        attention (they still get states, which no real token reads).

        start / stop: run blocks [start, stop) only (x: the states after block start - 1); with
        stop < depth the final norm is not applied and both outputs are the states after block
        stop - 1. A scanned stack runs whole or not at all."""
        stop = self.depth if stop is None else stop
        if self.scan and (start, stop) not in ((0, self.depth), (self.depth, self.depth)):
            raise ValueError(f"a scanned encoder (scan=True) stacks its blocks: it cannot run "
                             f"blocks [{start}, {stop}) of {self.depth}")
        block_cls = Encoder1DBlock
        if self.remat:
            # argnums count `self`: 0=self, 1=x, 2=deterministic (a Python bool, kept static).
            block_cls = nn.remat(Encoder1DBlock, prevent_cse=not self.scan, static_argnums=(2,))
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
                  ln_eps=self.ln_eps, causal=self.causal, dropout=self.dropout,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        args = (deterministic,) if mask is None else (deterministic, mask)
        if self.scan and start < stop:
            stack = nn.scan(block_cls, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.depth)
            x, _ = stack(name="encoderblock", **kw)(x, *args)
        elif not self.scan:
            for i in range(start, stop):
                x, _ = block_cls(name=f"encoderblock_{i}", **kw)(x, *args)
        if stop < self.depth:
            return x, x
        normed = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="encoder_norm")(x)
        return normed, x


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead == HF SiglipMultiheadAttentionPoolingHead).

    A learned probe attends over the tokens, then a residual MLP: y = a + MLP(LN(a)).
    """
    num_heads: int
    mlp_dim: int | None = None
    act: str = "gelu"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """x: [B, L, D] -> [B, D]; mask: optional bool [B, L], the tokens to pool (True = real)."""
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(x.dtype), (b, 1, d))
        a = Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="MultiHeadDotProductAttention_0")(probe, x, mask)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="LayerNorm_0")(a)
        a = a + MlpBlock(self.mlp_dim, self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="MlpBlock_0")(y)
        return a[:, 0]
