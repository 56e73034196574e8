"""LLM2CLIP's text adapter: residual MLP blocks on a text tower's pooled output, before its head.

Huang et al. 2024, "LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation"
(arXiv 2411.04997). The text side is a frozen LLM whose pooled caption embeddings are precomputed;
a trainable adapter maps them into the joint space. The official code, microsoft/LLM2CLIP
`llm2clip/eva_clip/model.py` (`LinearBlock`, `TextProj`; commit 7b10301):

    LinearBlock(dim, expansion_factor, dropout):  x + Linear(E*D -> D)(Dropout(GELU(Linear(D -> E*D)(LN(x)))))
    TextProj(embedding_dim, output_dim, expansion_factor=2, num_layers_text=4, proj_bias=True, dropout=0):
        Sequential(LinearBlock x num_layers_text, nn.LayerNorm(embedding_dim), Linear(D -> out, bias))
        then F.normalize(x, p=2, dim=-1)

Here `adapter_layers` blocks `adapter_{i}` (each `LayerNorm_0`, `Dense_0` [D, E*D], `Dense_1`
[E*D, D]) and the final LayerNorm `adapter_norm` run on the tower's pooled output (`pre_logits`,
the frozen trunk's embedding: LLM2CLIP's "embedding as data"); the tower's own `head` is
TextProj's last Linear and TwoTowers' L2 normalisation its `F.normalize`. Read from the code:
  * LayerNorm eps 1e-5 everywhere: the blocks' `norm_layer=LayerNorm` is eva_clip's subclass of
    torch's `nn.LayerNorm` (transformer.py, `F.layer_norm(..., self.eps)`), built as
    `norm_layer(dim)`; the final one is `nn.LayerNorm(embedding_dim)`: both torch's default eps.
  * GELU: `nn.GELU()`, torch's default, the exact erf form.
  * Dropout: TextProj's default 0 (no config of the repository sets it): not built.
  * Init: torch's `nn.Linear` default, kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and
    LayerNorm scale 1, bias 0 (nothing in the code re-initialises the text side); `LINEAR_INIT`
    gives the same distribution to the blocks and, with an adapter, to the tower's head.
Deviations: the L2 normalisation is TwoTowers' z / (|z| + 1e-8), not F.normalize's
z / max(|z|, 1e-12) (equal to float precision for any embedding of non-negligible norm); the
adapter runs at the text tower's width (TextProj's `embedding_dim` is the LLM's, 4096, hard-coded
in `_build_text_tower`); with `adapter_layers` = 0 nothing is added (TextProj would still apply
its LayerNorm before the Linear).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5  # torch's nn.LayerNorm default, which both of TextProj's norms use


def _torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def linear_init(fan_in: int) -> dict:
    """Dense kwargs for torch's `nn.Linear` default init: kernel and bias U(+-1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt(5) is variance 1/(3 fan_in), uniform)."""
    return dict(kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_bias_init(fan_in))


class AdapterBlock(nn.Module):
    """LLM2CLIP's `LinearBlock`: x + Dense_1(GELU(Dense_0(LayerNorm_0(x)))); x: [B, D] -> [B, D]."""
    expansion: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(epsilon=LN_EPS, **kw)(x)
        y = nn.Dense(self.expansion * d, **linear_init(d), **kw)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(d, **linear_init(self.expansion * d), **kw)(y)
        return x + y


def check(layers, expansion, num_classes, tower: str) -> None:
    """A text tower's adapter fields; errors name the config keys (`model.text.<field>`)."""
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 0:
        raise ValueError(f"config key `model.text.adapter_layers`: a number of blocks >= 0, got {layers!r}")
    if not layers:
        return
    if isinstance(expansion, bool) or not isinstance(expansion, (int, np.integer)) or expansion < 1:
        raise ValueError(f"config key `model.text.adapter_expansion`: an integer >= 1, got {expansion!r}")
    if not num_classes:
        raise ValueError(f"config key `model.text.adapter_layers` = {layers} needs the {tower} tower's "
                         "projection head (`model.text.num_classes` > 0): LLM2CLIP's adapter ends in "
                         "LayerNorm + Linear into the joint space")


def adapt(x, layers: int, expansion: int, dtype, param_dtype):
    """Inside a text tower's compact `__call__`: pooled features [B, D] through `layers` blocks
    `adapter_{i}` and the LayerNorm `adapter_norm` -> [B, D] (the head's input). 0 layers: x."""
    if not layers:
        return x
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    for i in range(layers):
        x = AdapterBlock(expansion, name=f"adapter_{i}", **kw)(x)
    return nn.LayerNorm(epsilon=LN_EPS, name="adapter_norm", **kw)(x)


def head_init(layers: int, fan_in: int) -> dict:
    """The tower's head Dense kwargs: TextProj's last Linear (torch init) with an adapter; the
    tower's own init (nothing changed) without one."""
    return linear_init(fan_in) if layers else {}
