"""The optax optimizer of a config: per-group lr schedules, locked towers, weight decay, clipping.

Config keys (an ml_collections ConfigDict)::

  config.lr = 1e-3                       # base learning rate
  config.total_steps = 10_000            # optimizer steps (cosine / linear / rsqrt cooldown)
  config.optax = dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4)
  config.schedule = [                    # first matching regex (re.fullmatch) wins
      ("img/.*", None),                  # None locks: no update, no optimizer state
      ("txt/.*", dict(decay_type="cosine", warmup_steps=100, mult=0.1)),
      (".*", dict(decay_type="cosine", warmup_steps=100)),
  ]
  config.grad_clip_norm = 1.0            # optional, on the global norm of trainable grads
  config.grad_accum_steps = 1            # optional, optax.MultiSteps

Schedules (``decay_type``; every type takes ``warmup_steps``, a linear ramp from 0, and ``mult``,
a multiplier on ``config.lr``): ``"cosine"`` to ``end`` (a fraction of the peak, default 0),
``"linear"`` to ``end``, ``"rsqrt"`` (``1 / sqrt(1 + (step - warmup) / timescale)``, default
timescale 10k, then an optional linear ``cooldown_steps`` to 0 at ``total_steps``), ``"constant"``.
A group may be named for the lr metrics with ``name=``; by default the name comes from its regex.

Optimizers (``config.optax.name``) and their keys:
  ``"adamw"``: b1=0.9, b2=0.999, eps=1e-8, mu_dtype=None;
  ``"adafactor"``: factored second moments (big_vision style, no parameter scaling):
  decay_rate=0.8, eps=1e-30, min_dim_size_to_factor=32, clipping_threshold=1.0, b1=None
  (momentum when set, with momentum_dtype="bfloat16");
  ``"sgd"``: momentum=0.0, nesterov=False.

Weight decay (``config.optax.weight_decay``, or big_vision's name ``config.wd``; not both) is
decoupled: added to the update, never to the gradient or the adaptive moments. By default it
is scaled by the group's learning rate, as in optax.adamw and PyTorch's AdamW (each step
shrinks a parameter by ``lr * mult * schedule(step) * weight_decay``; open_clip uses 0.1-0.2).
``scale_wd_by_lr=False`` gives big_vision's convention, independent of the base lr (shrink by
``weight_decay * mult * schedule(step)``; big_vision configs use about 1e-4). ``wd_mask`` lists
the regexes of the parameters that ARE decayed; the default (``.*/kernel``, ``.*/embedding``)
leaves biases, norm scales, ``t``, ``b``, positional embeddings and cls/probe tokens undecayed.

Gradient accumulation: with ``grad_accum_steps = k`` the trainer calls ``tx.update`` on every
micro step; the first k-1 calls return zero updates and the k-th applies the mean of the k
gradients (clipping applies to that mean). Schedules count optimizer steps (micro steps // k).
"""
import re

import jax
import jax.numpy as jnp
import optax

from vljax.sharding import tree_names

LOCKED = "locked"
TRAINABLE = "trainable"
DEFAULT_WD_MASK = (r".*/kernel", r".*/embedding")


# --------------------------------------------------------------------------- schedules


def make_schedule(decay_type="cosine", warmup_steps=0, total_steps=None, end=0.0,
                  timescale=10_000, cooldown_steps=0, *, where="config.schedule"):
    """``step -> multiplier`` in [0, 1] (traceable); ``where`` names the config entry in errors."""
    if decay_type not in ("cosine", "linear", "rsqrt", "constant"):
        raise ValueError(f"{where}: unknown decay_type {decay_type!r}; "
                         f"use 'cosine', 'linear', 'rsqrt' or 'constant'")
    needs_total = decay_type in ("cosine", "linear") or cooldown_steps
    if needs_total and (total_steps is None or total_steps <= warmup_steps + cooldown_steps):
        raise ValueError(f"{where}: decay_type {decay_type!r} needs config.total_steps > "
                         f"warmup_steps + cooldown_steps, got total_steps={total_steps}, "
                         f"warmup_steps={warmup_steps}, cooldown_steps={cooldown_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
        after = jnp.maximum(step - warmup_steps, 0.0)
        if decay_type in ("cosine", "linear"):
            progress = jnp.minimum(after / (total_steps - warmup_steps), 1.0)
            if decay_type == "cosine":
                decay = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            else:
                decay = 1.0 - (1.0 - end) * progress
        elif decay_type == "rsqrt":
            decay = jax.lax.rsqrt(1.0 + after / timescale)
        else:
            decay = 1.0
        if cooldown_steps:
            decay = decay * jnp.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
        return warm * decay

    return schedule


def _group_name(regex, sched, index, taken):
    name = sched.get("name") or re.sub(r"\W+", "_", re.sub(r"/?\.\*$", "", regex)).strip("_")
    name = name or "all"
    return name if name not in taken else f"{name}_{index}"


# --------------------------------------------------------------------------- optimizers


def _adamw(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=None):
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def _adafactor(decay_rate=0.8, eps=1e-30, min_dim_size_to_factor=32, clipping_threshold=1.0,
               b1=None, momentum_dtype="bfloat16"):
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=decay_rate, epsilon=eps,
                                    min_dim_size_to_factor=min_dim_size_to_factor),
        optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity(),
        optax.ema(b1, debias=False, accumulator_dtype=momentum_dtype) if b1 else optax.identity(),
    )


def _sgd(momentum=0.0, nesterov=False):
    return optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()


OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor, "sgd": _sgd}


def _direction(optax_cfg: dict):
    """The lr-free update direction of ``config.optax`` (and the weight-decay options it held)."""
    kw = dict(optax_cfg)
    name = kw.pop("name", "adamw")
    wd = {k: kw.pop(k) for k in ("weight_decay", "wd_mask", "scale_wd_by_lr") if k in kw}
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optax.name: unknown optimizer {name!r}; "
                         f"use one of {list(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](**kw), wd
    except TypeError as e:
        raise ValueError(f"config.optax: bad options {sorted(kw)} for {name!r}: {e}") from e


# --------------------------------------------------------------------------- labels


def _assign_groups(params, rules):
    """Per-parameter group index into ``rules`` (first fullmatch wins); unmatched params raise."""
    def assign(name):
        return next((i for i, (regex, _) in enumerate(rules) if re.fullmatch(regex, name)), -1)

    names = tree_names(params)
    groups = jax.tree.map(assign, names)
    unmatched = [n for n, g in zip(jax.tree.leaves(names), jax.tree.leaves(groups)) if g < 0]
    if unmatched:
        raise ValueError(f"config.schedule: parameters {unmatched} match no rule; add a rule "
                         f"(regex, schedule) for them, or (regex, None) to lock them")
    return groups


def _regex_mask(params, regexes):
    return jax.tree.map(lambda n: any(re.fullmatch(r, n) for r in regexes), tree_names(params))


def scale_by_group_lr(groups, lr_fns) -> optax.GradientTransformation:
    """Multiplies each leaf's update by ``-lr_fns[group](count)``; ``groups`` mirrors params.

    Leaves missing from the updates (``optax.MaskedNode``, e.g. locked params inside
    ``optax.partition``) stay missing.
    """
    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lrs = {g: fn(state.count) for g, fn in lr_fns.items()}
        updates = jax.tree.map(
            lambda g, u: u if isinstance(u, optax.MaskedNode) else (-lrs[g] * u).astype(u.dtype),
            groups, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- entry point


def make_optimizer(config, params):
    """Builds the optimizer of ``config`` for ``params`` (arrays or ShapeDtypeStructs).

    Returns:
      tx: the optax.GradientTransformation (its update needs ``params`` for weight decay).
      lr_fn: ``optimizer_step -> {group_name: lr}`` for every unlocked group (traceable),
        the learning rates actually applied, for metrics.
      trainable_mask: a pytree of bools like ``params``; False for locked parameters. Their
        updates are zero whatever gradient is passed, so the trainer may skip computing it
        (``stop_gradient`` on them, or zeros), but ``tx.update`` takes the full params tree.
    """
    lr = config.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"config.lr must be a positive number, got {lr!r}")
    rules = config.get("schedule", dict(decay_type="cosine"))
    if rules is None or hasattr(rules, "keys"):  # one dict (or ConfigDict) for all params
        rules = [(".*", None if rules is None else dict(rules))]
    rules = [tuple(r) for r in rules]
    if not all(len(r) == 2 and isinstance(r[0], str) for r in rules):
        raise ValueError(f"config.schedule must be a list of (regex, schedule dict or None), "
                         f"got {rules!r}")
    total_steps = config.get("total_steps")

    group_idx = _assign_groups(params, rules)
    trainable_mask = jax.tree.map(lambda i: rules[i][1] is not None, group_idx)
    names, lr_fns = {}, {}
    for i, (regex, sched) in enumerate(rules):
        if sched is None:
            continue
        sched = dict(sched)
        name = _group_name(regex, sched, i, lr_fns)
        sched.pop("name", None)
        mult = sched.pop("mult", 1.0)
        where = f"config.schedule[{i}] ({regex!r})"
        try:
            shape = make_schedule(**sched, total_steps=total_steps, where=where)
        except TypeError as e:
            raise ValueError(f"{where}: bad schedule options {sorted(sched)}: {e}") from e
        names[i] = name
        lr_fns[name] = lambda step, s=shape, m=mult: lr * m * s(step)
    groups = jax.tree.map(lambda i: names.get(i, LOCKED), group_idx)

    direction, wd_cfg = _direction(config.get("optax", dict(name="adamw")))
    if "weight_decay" in wd_cfg and config.get("wd") is not None:
        raise ValueError("weight decay is set twice: keep config.optax.weight_decay or config.wd")
    wd = wd_cfg.get("weight_decay", config.get("wd")) or 0.0
    chain = [direction]
    if wd:
        # The decay joins the update before the group lr multiplies both; dividing by the
        # base lr here leaves big_vision's lr-free decay.
        coef = wd if wd_cfg.get("scale_wd_by_lr", True) else wd / lr
        mask = _regex_mask(params, wd_cfg.get("wd_mask", DEFAULT_WD_MASK))
        chain.append(optax.add_decayed_weights(coef, mask=mask))
    chain.append(scale_by_group_lr(groups, lr_fns))
    clip = config.get("grad_clip_norm")
    if clip:
        chain.insert(0, optax.clip_by_global_norm(clip))
    trainable_tx = optax.chain(*chain)

    accum = config.get("grad_accum_steps", 1)
    accum = 1 if accum is None else accum
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"config.grad_accum_steps must be a positive int, got {accum!r}")
    if accum > 1:
        trainable_tx = optax.MultiSteps(trainable_tx, every_k_schedule=accum)
        trainable_tx = trainable_tx.gradient_transformation()

    # Locked params go to set_to_zero: optax.partition hands the trainable branch a tree in
    # which they are MaskedNode, so no moments or accumulators are allocated for them.
    labels = jax.tree.map(lambda t: TRAINABLE if t else LOCKED, trainable_mask)
    tx = optax.partition({TRAINABLE: trainable_tx, LOCKED: optax.set_to_zero()}, labels)

    def lr_fn(step):
        return {name: fn(step) for name, fn in lr_fns.items()}

    return tx, lr_fn, trainable_mask
