"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022), on frozen, L2-normalised embeddings.

The cache model (Sec. 3.1): the few-shot training images' embeddings are the keys
F_train [NK, D] and their one-hot labels the values L_train [NK, N]. A test embedding f [1, D]
attends to the keys with the affinity (Eq. 3)

    A = exp(-beta (1 - f F_train^T))                                   [1, NK]

and the prediction blends the cache with the zero-shot classifier W_c [N, D] (Eq. 4)

    logits = alpha A L_train + f W_c^T .

The zero-shot term is the model's own logits, t f W_c^T: the official code's 100 f W_c^T is
CLIP's logit scale t = 100. Only alpha / t matters for the argmax, so alpha here is in the
model's logit units: the paper's alpha a_p corresponds to a_p * t / 100 (t = 12 for the demo
model: the official ImageNet range a_p in [0.1, 3] is alpha in [0.012, 0.36]).

alpha (the residual ratio) and beta (the sharpness) are chosen by grid search (official
`search_hp`: every pair, the best accuracy wins), here on held-out images of the few-shot
TRAIN split, never on test images (the official code searches on the dataset's val split).
The beta grid is the official one, `search_grid(search_scale, 200)`, with the widest
search_scale of the official configs (50); the alpha grid adds 0 (the zero-shot classifier
alone) to a range wide enough for the cache to dominate, since the demo model's zero-shot
classifier is weak.

Tip-Adapter-F (Sec. 3.3) unfreezes the keys F_train (initialised from the cache; the values
and both towers stay frozen, the keys are not re-normalised) and fine-tunes them with
cross-entropy on the few-shot images at fixed alpha and beta, with the official recipe: AdamW
(lr 1e-3, eps 1e-4, weight decay 0.01 = torch's default), cosine schedule over all steps,
batch 256, 20 epochs; then alpha and beta are searched again.

Augmentation (official `build_cache_model` and `run_tip_adapter_F`): each cache key is the mean
of the image's embeddings over V augmented views (`augment_epoch` = 10: random resized crop of
area 0.5-1 resized straight to the model's input size, bicubic, and a horizontal flip,
`evaluators.data.AugmentedView`), re-normalised, and
Tip-Adapter-F trains on augmented images, fresh ones every epoch; here epoch e takes view
e mod V of the same V views (20 epochs over 10 views: each view twice). `cache_keys` averages
the views; the keys and the held-out / test images the search and the predictions see are
unaugmented, as the official val / test features. One deviation: the official code averages
the tower's raw features and normalises the mean; the embedder protocol returns normalised
embeddings, so here the views are normalised before they are averaged (the mean's direction
weights every view equally instead of by its feature norm).

Not reproduced: the official Tip-Adapter-F keeps the epoch with the best TEST accuracy; here
the last epoch is used (no choice is made on test images).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def search_grid(scale: float, steps: int) -> tuple[float, ...]:
    """The official `search_hp` grid: `steps` values from 0.1 up to (excluding) `scale`."""
    return tuple(round(i * (scale - 0.1) / steps + 0.1, 6) for i in range(steps))


# beta: official grid, widest official search_scale (50). alpha: model logit units (see above).
DEFAULT_BETAS = search_grid(50.0, 200)
DEFAULT_ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)


def cache_keys(views) -> np.ndarray:
    """Keys [NK, D] from the embeddings of V augmented views [V, NK, D] of the few-shot images:
    the L2-normalised mean over views (official `build_cache_model`; module docstring)."""
    mean = np.asarray(views, np.float32).mean(axis=0)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


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

    Ties go to the smaller alpha (closer to zero-shot), then to the smaller beta (the official
    `search_hp` loops beta outside alpha, so its ties go to the smaller beta first)."""
    zimg, keys = np.asarray(zimg, np.float32), np.asarray(keys, np.float32)
    zs = logit_scale * zimg @ np.asarray(ztxt, np.float32).T
    sim = 1.0 - zimg @ keys.T
    betas = sorted(betas)
    caches = [np.exp(-beta * sim) @ values for beta in betas]
    best = (-1.0, 0.0, 0.0)
    for alpha in sorted(alphas):
        for beta, cache in zip(betas, caches):
            acc = float(np.mean(np.argmax(zs + alpha * cache, axis=1) == labels))
            if acc > best[0]:
                best = (acc, float(alpha), float(beta))
    return best[1], best[2], best[0]


def finetune_keys(zimg, labels, keys, values, ztxt, logit_scale, *, alpha: float = 1.0,
                  beta: float = 1.0, epochs: int = 20, lr: float = 1e-3,
                  weight_decay: float = 0.01, batch_size: int = 256, seed: int = 0
                  ) -> np.ndarray:
    """Tip-Adapter-F: the keys [NK, D] after `epochs` epochs of AdamW on the cross-entropy of
    the Tip-Adapter logits of the few-shot images (zimg [M, D], or [V, M, D]: V augmented views
    of them, epoch e training on view e mod V), labels [M], shuffled into mini-batches of
    `batch_size` (the last one smaller); values, text weights, alpha and beta fixed. Defaults:
    the official recipe (module docstring); alpha = beta = 1 (the official init_beta; init_alpha
    is 1.17-10 per dataset at scale 100, i.e. 0.14-1.2 at t = 12)."""
    zimg = jnp.asarray(zimg, jnp.float32)
    views = zimg if zimg.ndim == 3 else zimg[None]
    labels = jnp.asarray(labels, jnp.int32)
    values, ztxt = jnp.asarray(values, jnp.float32), jnp.asarray(ztxt, jnp.float32)
    n = views.shape[1]
    per_epoch = -(-n // batch_size)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, epochs * per_epoch), eps=1e-4,
                      weight_decay=weight_decay)

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
    for epoch in range(epochs):
        x = views[epoch % len(views)]
        order = rng.permutation(n)
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            k, state = step(k, state, x[idx], labels[idx])
    return np.asarray(k)


def one_hot(labels, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
