"""LaSO's label-set operation networks on image features (Alfassy et al., "LaSO: Label-Set
Operations networks for multi-label few-shot learning", CVPR 2019; official code IBM/LaSO).

Three networks M_int, M_uni, M_sub each take a pair of feature vectors (F_a, F_b) and return one
feature vector whose label set is, ideally, L(a) ∩ L(b), L(a) ∪ L(b) and L(a) \\ L(b).

Architecture (the official `SetOpBlock_v2`, `oneshot/setops_models/setops.py`, read): the pair
concatenated [2D] -> Dense(latent) -> LeakyReLU(0.2), then `layers` times
[BatchNorm -> Dense(latent) -> LeakyReLU(0.2) -> Dropout(p)], then Dense(D). The block's defaults
are 3 hidden layers and dropout 0.5, its input the backbone's 2048-d features; the latent width
of the paper's runs is a constructor argument whose value we could not read (their training
script was out of reach), so the width here is `latent`, default 4 D (vljax/adapt/laso.py).
`SetOps` applies the three blocks as the official `SetOpsModule.forward` does (read): both
orders of each pair, and the reconstructions M_uni(M_sub(a, b), M_int(a, b)) of a and
M_uni(M_sub(b, a), M_int(b, a)) of b that the anti-mode-collapse loss compares with the inputs
(vljax/losses/laso.py).

Deviations, named: (1) every output is L2-normalised, since vljax's image features (the
joint-space `zimg`) live on the unit sphere and the classifier scores cosines; the official
outputs are unconstrained 2048-d vectors. (2) Dense layers use flax's default init (LeCun
normal) rather than torch's Linear default. BatchNorm's running averages follow torch's
momentum 0.1 (flax momentum 0.9) and eps 1e-5.

`apply(variables, a, b, train=...)`: a, b [B, D] -> dict of [B, D] arrays: "int", "int_rev"
(M_int(b, a)), "uni", "uni_rev", "sub" (a \\ b), "sub_rev" (b \\ a), "rec_a", "rec_b". In training
mode the "batch_stats" collection is mutable and the "dropout" rng is needed.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

OUTPUTS = ("int", "int_rev", "uni", "uni_rev", "sub", "sub_rev", "rec_a", "rec_b")


def _unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class SetOpBlock(nn.Module):
    """One set operation M(a, b): [B, D], [B, D] -> [B, D] (L2-normalised)."""
    features: int
    latent: int
    layers: int = 3
    dropout: float = 0.5

    @nn.compact
    def __call__(self, a, b, train: bool = False):
        x = jnp.concatenate([a, b], axis=-1)
        x = nn.leaky_relu(nn.Dense(self.latent, name="in")(x), 0.2)
        for i in range(self.layers):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name=f"bn{i}")(x)
            x = nn.leaky_relu(nn.Dense(self.latent, name=f"hidden{i}")(x), 0.2)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return _unit(nn.Dense(self.features, name="out")(x))


class SetOps(nn.Module):
    """M_int, M_uni, M_sub (params "int", "uni", "sub") applied as the module docstring says."""
    features: int
    latent: int
    layers: int = 3
    dropout: float = 0.5

    def setup(self):
        kw = dict(features=self.features, latent=self.latent, layers=self.layers, dropout=self.dropout)
        self.m_int = SetOpBlock(**kw, name="int")
        self.m_uni = SetOpBlock(**kw, name="uni")
        self.m_sub = SetOpBlock(**kw, name="sub")

    def __call__(self, a, b, train: bool = False) -> dict:
        out = {"int": self.m_int(a, b, train), "int_rev": self.m_int(b, a, train),
               "uni": self.m_uni(a, b, train), "uni_rev": self.m_uni(b, a, train),
               "sub": self.m_sub(a, b, train), "sub_rev": self.m_sub(b, a, train)}
        out["rec_a"] = self.m_uni(out["sub"], out["int"], train)
        out["rec_b"] = self.m_uni(out["sub_rev"], out["int_rev"], train)
        return out
