"""Training LaSO's set-operation nets and its classifier on frozen image features.

The features are a model's image embeddings (for a LiT model with a locked trunk, its head over
the feature store's stored trunk features: the embedder reads the store, vljax/features.py); the
backbone stays frozen, where the paper trains it with the nets (a deviation: vljax's feature
space is the trained model's). Pairs come from `vljax.data.pairs.pair_dataset` (seeded, batch s a
function of (seed, s)).

The classifier C is the paper's multi-label classifier trained with BCE on the real features,
here the cosine head of vljax/adapt/multilabel.py (s cos(z, w_j) + b_j) initialised from the
model's label-prompt embeddings (its zero-shot classifier), so it starts from the model's own
label semantics and needs few steps. `classifier="zeroshot"` keeps its label directions w_j (the
model's zero-shot classifier) and trains only its scale and biases, which leave every label's
ranking, hence its AP, unchanged (on the caption-trained LiT demo's emoji tags a BCE-trained
head's test mAP falls from the prompts' 39.1 to 17.2, yet the operated features' mAP under the
trained head was as high or higher: configs/laso.py). C learns only from the real features' term; the set-op
terms reach the nets alone (C's parameters enter them through `stop_gradient`), so C stays a
classifier of real features and cannot adapt to the synthesised ones. The paper does not say
whether its op terms update C; this is our choice.

Optimiser: Adam, learning rate `lr` with cosine decay, batch `batch_size` (our choices: the official
training script was out of reach).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vljax.adapt import multilabel as ml
from vljax.data import pairs as pairs_lib
from vljax.losses import laso as laso_loss
from vljax.models.laso import SetOps


@dataclasses.dataclass
class Laso:
    """Trained nets: `ops` (SetOps module), `variables` ({"params", "batch_stats"}), `head` (C's params)."""
    ops: SetOps
    variables: dict
    head: dict

    def __post_init__(self):
        self._apply = jax.jit(functools.partial(self.ops.apply, train=False))

    def apply(self, f_a, f_b) -> dict:
        """SetOps outputs (inference mode) of f_a, f_b [B, D]."""
        return self._apply(self.variables, jnp.asarray(f_a, jnp.float32), jnp.asarray(f_b, jnp.float32))

    def logits(self, z) -> np.ndarray:
        """C's logits [B, L] of features z [B, D]."""
        return np.asarray(ml.head_logits(self.head, jnp.asarray(z, jnp.float32)))


def init(features: int, ztxt, logit_scale: float, *, latent: int | None = None, layers: int = 3,
         dropout: float = 0.5, seed: int = 0) -> Laso:
    """Fresh nets over D=`features` (latent width default 4 D, as the official 2048 -> 8192) and
    C from the label prompts ztxt [L, D]."""
    ops = SetOps(features=features, latent=latent or 4 * features, layers=layers, dropout=dropout)
    x = jnp.zeros((2, features), jnp.float32)
    variables = ops.init({"params": jax.random.key(seed)}, x, x, train=False)
    return Laso(ops, dict(variables), ml.init_head(ztxt, logit_scale))


CLASSIFIERS = ("trained", "zeroshot")


def loss_fn(params, batch_stats, head, ops: SetOps, batch: dict, rng, *, sym_weight=1.0, rec_weight=1.0):
    """LaSO's loss of one batch (the keys of `pair_dataset`'s elements) -> (total, (parts, new batch_stats))."""
    outs, updated = ops.apply({"params": params, "batch_stats": batch_stats}, batch["f_a"], batch["f_b"],
                              train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    frozen = jax.lax.stop_gradient(head)
    total, parts = laso_loss.laso_loss(
        ml.head_logits(head, batch["f_a"]), ml.head_logits(head, batch["f_b"]),
        ml.head_logits(frozen, outs["int"]), ml.head_logits(frozen, outs["uni"]),
        ml.head_logits(frozen, outs["sub"]), batch["y_a"], batch["y_b"], batch["f_a"], batch["f_b"],
        outs, sym_weight=sym_weight, rec_weight=rec_weight)
    return total, (parts, updated.get("batch_stats", {}))


def train(features: np.ndarray, targets: np.ndarray, ztxt, logit_scale: float, *, steps: int = 1000,
          lr: float = 1e-3, batch_size: int = 64, latent: int | None = None, layers: int = 3,
          dropout: float = 0.5, shared_fraction: float = 0.5, sym_weight: float = 1.0,
          rec_weight: float = 1.0, classifier: str = "trained", seed: int = 0) -> tuple[Laso, list[dict]]:
    """(trained Laso, per-step logged parts) after `steps` Adam steps on features [N, D] (L2-normalised)
    with multi-hot targets [N, L]; ztxt [L, D] initialises C (`classifier`: see the module docstring)."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"LaSO classifier {classifier!r} is not one of {CLASSIFIERS}")
    frozen_w = classifier == "zeroshot"
    features = np.asarray(features, np.float32)
    model = init(features.shape[1], ztxt, logit_scale, latent=latent, layers=layers,
                 dropout=dropout, seed=seed)
    trainable = {"ops": model.variables["params"], "head": model.head}
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    ops = model.ops

    @jax.jit
    def step(p, stats, state, batch, rng):
        def f(q):
            head = dict(q["head"], w=jax.lax.stop_gradient(q["head"]["w"])) if frozen_w else q["head"]
            return loss_fn(q["ops"], stats, head, ops, batch, rng,
                           sym_weight=sym_weight, rec_weight=rec_weight)
        (total, (parts, stats)), g = jax.value_and_grad(f, has_aux=True)(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), stats, state, dict(parts, loss=total)

    state, stats = opt.init(trainable), model.variables.get("batch_stats", {})
    data = pairs_lib.pair_dataset(features, targets, batch=batch_size, steps=steps, seed=seed,
                                  shared_fraction=shared_fraction)
    key, log = jax.random.key(seed + 1), []
    for s, batch in enumerate(data.to_iter_dataset()):
        batch = {k: v for k, v in batch.items() if k not in ("i", "j")}
        trainable, stats, state, parts = step(trainable, stats, state, batch, jax.random.fold_in(key, s))
        log.append(parts)
    log = [{k: float(v) for k, v in p.items()} for p in jax.device_get(log)]
    return Laso(ops, {"params": trainable["ops"], "batch_stats": stats}, trainable["head"]), log
