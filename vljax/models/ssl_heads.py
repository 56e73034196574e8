"""The self-distillation heads of SigLIP 2's last stage (Tschannen et al. 2025, Sec. 2.3: "the
matching is performed in a separate high-dimensional feature space obtained with an auxiliary
head"), in the DINO / iBOT form that SILC and TIPS build on (Caron et al. 2021,
`dino/vision_transformer.py` DINOHead; Zhou et al. 2022, iBOT): an MLP to a bottleneck, L2
normalisation, then a weight-normalised linear layer without bias (DINO's `norm_last_layer=True`:
each prototype column is divided by its norm) giving K prototype logits.

`SelfDistillHeads` holds the two heads (pooled features -> `out_dim` logits for SILC's
consistency loss; patch tokens -> `patch_out_dim` logits for TIPS' masked prediction, separate
heads as iBOT's default) and TIPS' learned mask token ([W], replacing masked patch embeddings of
the student's view, `vljax/models/vit.py` `token_mask`). Its params live in the train state under
`ssl/...` (vljax/teacher.py), beside the towers: trained, sharded and checkpointed like them, and
not part of the exported encoder. `SimCLRHead` is SLIP's projection MLP (vljax/slip.py, params
`simclr/...`, likewise left out of exports). Sizes are DINO's (hidden 2048, bottleneck 256, 3 layers,
K 65536) and iBOT's for patches (K 8192); SigLIP 2 does not state its own in what we could read.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DINOHead(nn.Module):
    """x: [..., W] -> [..., out_dim]: `num_layers` Dense layers (GELU between; the last to
    `bottleneck_dim`), L2 normalisation, a weight-normalised linear map to `out_dim` (no bias)."""
    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        if self.num_layers < 1:
            raise ValueError(f"DINOHead: num_layers must be >= 1, got {self.num_layers}")
        init = nn.initializers.truncated_normal(0.02)  # DINO's trunc_normal_(std=.02)
        x = jnp.asarray(x, self.dtype)
        for i in range(self.num_layers - 1):
            x = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=init, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"mlp_{i}")(x), approximate=False)
        x = nn.Dense(self.bottleneck_dim, kernel_init=init, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"mlp_{self.num_layers - 1}")(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        v = self.param("prototypes", init, (self.bottleneck_dim, self.out_dim), self.param_dtype)
        v = v.astype(jnp.float32)
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        return x @ w


class SelfDistillHeads(nn.Module):
    """The SILC head (`pooled`), the TIPS patch head (`patches`) and the mask token [width]."""
    width: int
    out_dim: int = 65536
    patch_out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self):
        kw = dict(hidden_dim=self.hidden_dim, bottleneck_dim=self.bottleneck_dim,
                  num_layers=self.num_layers, dtype=self.dtype, param_dtype=self.param_dtype)
        self.pooled_head = DINOHead(self.out_dim, **kw)
        self.patch_head = DINOHead(self.patch_out_dim, **kw)
        self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.width,),
                                     self.param_dtype)

    def __call__(self, pooled, tokens):
        """pooled: [B, W] -> [B, out_dim]; tokens: [B, N, W] -> [B, N, patch_out_dim]."""
        return self.pooled(pooled), self.patches(tokens)

    def pooled(self, x):
        return self.pooled_head(x)

    def patches(self, x):
        return self.patch_head(x)


def init_heads(heads: SelfDistillHeads, rng) -> dict:
    """Random params of `heads` (every head and the mask token)."""
    w = heads.width
    return heads.init(rng, jnp.zeros((1, w)), jnp.zeros((1, 1, w)))["params"]


def abstract_heads(heads: SelfDistillHeads) -> dict:
    """The params' ShapeDtypeStructs, without computing them."""
    return jax.eval_shape(lambda r: init_heads(heads, r), jax.random.key(0))


class SimCLRHead(nn.Module):
    """SLIP's SimCLR projection MLP (Mu et al. 2022, Sec. 3: "a 3-layer MLP", hidden 4096, output
    256; facebookresearch/SLIP `models.py` SLIP._build_mlp): Linear(W, hidden) -> BatchNorm ->
    ReLU -> Linear(hidden, hidden) -> BatchNorm -> ReLU -> Linear(hidden, out).

    x: [V, B, W] (V views of B images) -> [V, B, out]. SLIP applies the MLP to each view's batch
    separately, with SyncBatchNorm in training mode: each BatchNorm normalises with the mean and
    (biased) variance of ITS view over the whole batch, here axis 1 of x; under `jax.jit` with the
    batch sharded over devices that mean is the global batch's, as SyncBatchNorm's. The head is
    used only in training, so no running statistics are kept (nothing but params in the state).
    BatchNorm: PyTorch's `eps`, scale 1 and bias 0 at init. The Dense layers take flax's
    default init (lecun normal, zero bias), not PyTorch's uniform one."""
    hidden: int = 4096
    out: int = 256
    eps: float = 1e-5  # PyTorch BatchNorm's
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        if x.ndim != 3:
            raise ValueError(f"SimCLRHead: x must be [views, batch, width], got shape {x.shape}")
        x = jnp.asarray(x, self.dtype)
        for i in range(2):
            x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer{i + 1}")(x)
            x = nn.relu(self._batch_norm(x, f"bn{i + 1}"))
        return nn.Dense(self.out, dtype=self.dtype, param_dtype=self.param_dtype, name="layer3")(x)

    def _batch_norm(self, x, name):
        scale = self.param(f"{name}_scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param(f"{name}_bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


def init_simclr_head(head: SimCLRHead, width: int, rng) -> dict:
    """Random params of `head` for pooled features of `width`."""
    return head.init(rng, jnp.zeros((2, 2, width)))["params"]
