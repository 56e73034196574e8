"""The optimizer from config: locked towers, per-group lr, schedules, decay mask, accumulation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vljax import optim


def toy_params():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "img": {"Dense_0": {"kernel": arr(8, 16), "bias": arr(16)},
                "LayerNorm_0": {"scale": arr(16)}},
        "txt": {"Embed_0": {"embedding": arr(10, 4)},
                "Dense_0": {"kernel": arr(4, 8), "bias": arr(8)},
                "pos_embedding": arr(1, 5, 4)},
        "t": arr(),
        "b": arr(),
    }


def make_config(**kw):
    base = dict(lr=1e-2, total_steps=1000,
                optax=dict(name="sgd"),
                schedule=[(".*", dict(decay_type="constant"))])
    base.update(kw)
    return ml_collections.ConfigDict(base)


def random_grads(params, seed):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)


def run(tx, params, grads_list):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_list:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


LOCK_IMG = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=2))]


@pytest.mark.parametrize("accum", [1, 2])
def test_locked_params_unchanged_and_stateless(accum):
    params = toy_params()
    cfg = make_config(optax=dict(name="adamw", weight_decay=1e-2), schedule=LOCK_IMG,
                      grad_accum_steps=accum, grad_clip_norm=1.0)
    tx, _, mask = optim.make_optimizer(cfg, params)
    assert not any(jax.tree.leaves(mask["img"]))
    assert all(jax.tree.leaves(mask["txt"])) and mask["t"] and mask["b"]
    new, state = run(tx, params, [random_grads(params, s) for s in range(2 * accum)])
    jax.tree.map(np.testing.assert_array_equal, new["img"], params["img"])
    assert not np.allclose(new["txt"]["Dense_0"]["kernel"], params["txt"]["Dense_0"]["kernel"])

    # State: mu and nu (and the accumulator) for trainable params only, plus a few counters.
    per_copy = nbytes(params) - nbytes(params["img"])
    copies = 2 + (accum > 1)
    assert copies * per_copy <= nbytes(state) <= copies * per_copy + 64
    unlocked_tx, _, _ = optim.make_optimizer(
        make_config(optax=dict(name="adamw"), grad_accum_steps=accum), params)
    assert nbytes(unlocked_tx.init(params)) - nbytes(state) == copies * nbytes(params["img"])


def test_lr_multiplier_scales_updates():
    params = toy_params()
    cfg = make_config(schedule=[("img/.*", dict(decay_type="constant", mult=0.1)),
                                (".*", dict(decay_type="constant"))])
    tx, lr_fn, _ = optim.make_optimizer(cfg, params)
    lrs = lr_fn(5)
    assert set(lrs) == {"img", "all"}
    np.testing.assert_allclose(lrs["img"], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs["all"], 1e-2, rtol=1e-6)
    grads = random_grads(params, 0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["img"]["Dense_0"]["kernel"],
                               -1e-3 * grads["img"]["Dense_0"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(updates["txt"]["Dense_0"]["kernel"],
                               -1e-2 * grads["txt"]["Dense_0"]["kernel"], rtol=1e-6)


def test_warmup_cosine_values():
    lr, warmup, total, end = 1e-3, 100, 1100, 0.1
    cfg = make_config(lr=lr, total_steps=total, schedule=[(".*", dict(
        decay_type="cosine", warmup_steps=warmup, end=end, name="main"))])
    _, lr_fn, _ = optim.make_optimizer(cfg, toy_params())

    def expected(step):
        if step < warmup:
            return lr * step / warmup
        progress = min((step - warmup) / (total - warmup), 1.0)
        return lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in [0, 1, 50, 100, 350, 600, 1000, 1100, 1500]:
        np.testing.assert_allclose(lr_fn(step)["main"], expected(step), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(lr_fn(600)["main"], lr * (end + (1 - end) / 2), rtol=1e-5)
    # Traceable: the trainer logs it from inside jit.
    np.testing.assert_allclose(jax.jit(lr_fn)(jnp.int32(350))["main"], expected(350), rtol=1e-5)


@pytest.mark.parametrize("sched,step,want", [
    (dict(decay_type="linear", warmup_steps=10, end=0.5), 10, 1.0),
    (dict(decay_type="linear", warmup_steps=10, end=0.5), 55, 0.75),
    (dict(decay_type="rsqrt", warmup_steps=10, timescale=30), 100, 0.5),
    (dict(decay_type="rsqrt", timescale=30, cooldown_steps=20), 90, 0.5 * 0.5),
    (dict(decay_type="rsqrt", timescale=30, cooldown_steps=20), 100, 0.0),
    (dict(decay_type="constant", warmup_steps=10), 5, 0.5),
    (dict(decay_type="constant", warmup_steps=10), 99, 1.0),
])
def test_other_schedules(sched, step, want):
    cfg = make_config(lr=1.0, total_steps=100, schedule=[(".*", sched)])
    _, lr_fn, _ = optim.make_optimizer(cfg, toy_params())
    np.testing.assert_allclose(lr_fn(step)["all"], want, rtol=1e-5)


@pytest.mark.parametrize("wd_kw,scale_by_lr", [
    (dict(optax=dict(name="sgd", weight_decay=0.1)), True),
    (dict(optax=dict(name="sgd", weight_decay=0.1, scale_wd_by_lr=False)), False),
    (dict(wd=0.1), True),  # big_vision's key
])
def test_weight_decay_mask_and_scale(wd_kw, scale_by_lr):
    params = toy_params()
    wd, lr = 0.1, 1e-2
    cfg = make_config(lr=lr, **wd_kw)
    tx, _, _ = optim.make_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    shrink = lr * wd if scale_by_lr else wd
    for path in [("img", "Dense_0", "kernel"), ("txt", "Dense_0", "kernel"),
                 ("txt", "Embed_0", "embedding")]:
        p = params
        u = updates
        for k in path:
            p, u = p[k], u[k]
        np.testing.assert_allclose(u, -shrink * p, rtol=1e-6)
    undecayed = [updates["img"]["Dense_0"]["bias"], updates["img"]["LayerNorm_0"]["scale"],
                 updates["txt"]["Dense_0"]["bias"], updates["txt"]["pos_embedding"],
                 updates["t"], updates["b"]]
    assert all(np.all(np.asarray(u) == 0) for u in undecayed)


def test_grad_accumulation_equals_mean_gradient_step():
    params = toy_params()
    kw = dict(optax=dict(name="adamw", b2=0.95, weight_decay=1e-3), grad_clip_norm=0.5,
              schedule=[("img/.*", dict(decay_type="cosine", warmup_steps=1, mult=0.5)),
                        (".*", dict(decay_type="cosine", warmup_steps=1))])
    k = 3
    micro = [random_grads(params, s) for s in range(2 * k)]
    accum_tx, _, _ = optim.make_optimizer(make_config(grad_accum_steps=k, **kw), params)
    plain_tx, _, _ = optim.make_optimizer(make_config(**kw), params)

    state = accum_tx.init(params)
    p_accum = params
    update = jax.jit(accum_tx.update)
    for i, g in enumerate(micro):
        updates, state = update(g, state, p_accum)
        if (i + 1) % k:  # micro steps inside a window apply nothing
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        p_accum = optax.apply_updates(p_accum, updates)

    means = [jax.tree.map(lambda *g: sum(g) / k, *micro[j:j + k]) for j in (0, k)]
    p_plain, _ = run(plain_tx, params, means)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p_accum, p_plain)
    assert not np.allclose(p_plain["t"], params["t"])


def test_grad_clipping_uses_trainable_grads_only():
    params = toy_params()
    cfg = make_config(lr=1.0, grad_clip_norm=1.0,
                      schedule=[("img/.*", None), (".*", dict(decay_type="constant"))])
    tx, _, _ = optim.make_optimizer(cfg, params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), params)  # locked grads huge too
    update = jax.jit(tx.update)
    updates, _ = update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)
    # Below the threshold gradients pass unchanged.
    small = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3), params)
    updates, _ = update(small, tx.init(params), params)
    np.testing.assert_allclose(updates["txt"]["Dense_0"]["kernel"], -1e-3, rtol=1e-6)


@pytest.mark.parametrize("opt", [dict(name="adamw"), dict(name="adafactor", b1=0.9),
                                 dict(name="sgd", momentum=0.9)])
def test_each_optimizer_reduces_a_quadratic(opt):
    params = toy_params()
    target = random_grads(params, 7)
    cfg = make_config(lr=0.05, optax=opt, schedule=LOCK_IMG, total_steps=30)
    tx, _, _ = optim.make_optimizer(cfg, params)

    def loss(p):
        return sum(jnp.sum((a - b) ** 2)
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    state, p = tx.init(params), params
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(30):
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
    assert loss(p) < 0.9 * loss(params)
    jax.tree.map(np.testing.assert_array_equal, p["img"], params["img"])


def test_unmatched_param_raises_naming_it():
    cfg = make_config(schedule=[("img/.*", None), ("txt/.*", dict(decay_type="constant"))])
    with pytest.raises(ValueError, match=r"config.schedule: parameters \['b', 't'\] match no rule"):
        optim.make_optimizer(cfg, toy_params())


@pytest.mark.parametrize("kw,match", [
    (dict(optax=dict(name="adamax")), "config.optax.name"),
    (dict(optax=dict(name="adamw", beta1=0.9)), "config.optax"),
    (dict(total_steps=None, schedule=[(".*", dict(decay_type="cosine"))]), "config.total_steps"),
    (dict(schedule=[(".*", dict(decay_type="step"))]), r"config.schedule\[0\].*decay_type"),
    (dict(schedule=[(".*", dict(decay_type="constant", warmup=3))]), r"config.schedule\[0\]"),
    (dict(lr=0.0), "config.lr"),
    (dict(grad_accum_steps=0), "config.grad_accum_steps"),
    (dict(wd=0.1, optax=dict(name="sgd", weight_decay=0.1)), "config.wd"),
])
def test_bad_config_names_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(make_config(**kw), toy_params())
