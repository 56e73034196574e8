"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022), on frozen, L2-normalised embeddings.

The cache model (Sec. 3.1): the few-shot training images' embeddings are the keys
F_train [NK, D] and their one-hot labels the values L_train [NK, N]. A test embedding f [1, D]
attends to the keys with the affinity (Eq. 3)

    A = exp(-beta (1 - f F_train^T))                                   [1, NK]

and the prediction blends the cache with the zero-shot classifier W_c [N, D] (Eq. 4)

    logits = alpha A L_train + f W_c^T .

The zero-shot term is scaled by the model's logit scale, as the official code does (its CLIP
logits are 100 f W_c^T), so alpha weighs the cache against the model's own logits. alpha
(the residual ratio) and beta (the sharpness) are chosen by grid search: here on held-out
images of the few-shot TRAIN split, never on test images.

Tip-Adapter-F (Sec. 3.3) unfreezes the keys F_train (initialised from the cache; the values
and both towers stay frozen) and fine-tunes them with cross-entropy on the few-shot images
(AdamW, lr 1e-3, cosine schedule, as the paper), then searches alpha and beta again.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The official search (`search_scale` [7, 3]) covers beta in [0.1, 7], alpha in [0.1, 3]; alpha
# also gets 0 (the zero-shot classifier alone) and larger ratios, since a weak zero-shot
# classifier (demo model) can need the cache to dominate.
DEFAULT_BETAS = tuple(np.round(np.linspace(0.5, 10.0, 20), 3))
DEFAULT_ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)


def cache_logits(zimg, keys, values, beta):
    """alpha-free cache term A L_train (Eq. 3-4). zimg [M, D], keys [NK, D], values [NK, N]."""
    return jnp.exp(-beta * (1.0 - zimg @ keys.T)) @ values


def tip_logits(zimg, keys, values, ztxt, logit_scale, alpha, beta):
    """Tip-Adapter logits [M, N] = alpha exp(-beta (1 - f K^T)) L + logit_scale f W_c^T."""
    return logit_scale * zimg @ ztxt.T + alpha * cache_logits(zimg, keys, values, beta)


def search(zimg, labels, keys, values, ztxt, logit_scale,
           alphas: Sequence[float] = DEFAULT_ALPHAS, betas: Sequence[float] = DEFAULT_BETAS
           ) -> tuple[float, float, float]:
    """(alpha, beta, accuracy) maximising accuracy on (zimg [M, D], labels [M]).

    Ties go to the smaller alpha (closer to zero-shot), then to the smaller beta."""
    zimg, keys = np.asarray(zimg, np.float32), np.asarray(keys, np.float32)
    zs = logit_scale * zimg @ np.asarray(ztxt, np.float32).T
    sim = 1.0 - zimg @ keys.T
    best = (-1.0, 0.0, 0.0)
    for beta in betas:
        cache = np.exp(-beta * sim) @ values
        for alpha in sorted(alphas):
            acc = float(np.mean(np.argmax(zs + alpha * cache, axis=1) == labels))
            if acc > best[0]:
                best = (acc, float(alpha), float(beta))
    return best[1], best[2], best[0]


def finetune_keys(zimg, labels, keys, values, ztxt, logit_scale, *, alpha: float = 1.0,
                  beta: float = 1.0, steps: int = 200, lr: float = 1e-3, seed: int = 0,
                  batch_size: int = 256) -> np.ndarray:
    """Tip-Adapter-F: the keys [NK, D] after `steps` AdamW steps of cross-entropy on the
    few-shot images (zimg [M, D], labels [M]); values, text weights, alpha and beta fixed
    (the paper's initial alpha = beta = 1). Mini-batches of `batch_size` (the paper's 256)."""
    zimg = jnp.asarray(zimg, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    values, ztxt = jnp.asarray(values, jnp.float32), jnp.asarray(ztxt, jnp.float32)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), eps=1e-4)

    def loss_fn(k, x, y):
        logits = tip_logits(x, k, values, ztxt, logit_scale, alpha, beta)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(k, state, x, y):
        g = jax.grad(loss_fn)(k, x, y)
        updates, state = opt.update(g, state, k)
        return optax.apply_updates(k, updates), state

    k = jnp.asarray(keys, jnp.float32)
    state = opt.init(k)
    rng = np.random.default_rng(seed)
    n, b = len(zimg), min(batch_size, len(zimg))
    for _ in range(steps):
        idx = rng.choice(n, b, replace=False) if b < n else np.arange(n)
        k, state = step(k, state, zimg[idx], labels[idx])
    return np.asarray(k)


def one_hot(labels, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
