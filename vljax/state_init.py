"""The initial train state of a fresh run, created in its shards: random params (`make_init_fns`),
then the pretrained towers of `config.model_init` (vljax/pretrained.py) or every param of a
`config.init_from` checkpoint (vljax/init_from.py) written in leaf by leaf, then the optimizer
state. `train.Trainer` uses it when the workdir holds no checkpoint (names re-exported by train).
"""
from __future__ import annotations

import ctypes

from flax import traverse_util
import jax
import jax.numpy as jnp

from vljax import init_from, pretrained, slip, teacher
from vljax.models.naflex import example_input


def _dummy_inputs(config, batch=1):
    """Zero images (NaFlex: the patch dict at the budget, `example_input`) and texts of the config."""
    if config.input.get("naflex"):
        images = {k: jnp.zeros((batch, *a.shape[1:]), a.dtype)
                  for k, a in example_input(config.model.image.to_dict(), batch).items()}
    else:
        s = config.input.image_size
        images = jnp.zeros((batch, s, s, 3), jnp.float32)
    return images, jnp.zeros((batch, config.tokenizer.max_len), jnp.int32)


def make_init_fns(model, tx, config, catlip=None):
    """(init_params(init_rng) -> params, init_opt(params) -> optimizer state): random params
    (pretrained towers are written into them afterwards, see `pretrained.write_tower`) and the
    optimizer state for them. Run each under `jax.jit(..., out_shardings=...)`: every parameter
    and moment is then created directly in its shards. Two programs, not one, so that the init's
    scratch space (random bits) is freed before the moments are allocated: the peak stays at the
    state's own size. `catlip` (a `catlip.CatLIP`) adds its head, params["catlip"]."""
    opts, ssl = teacher.options(config), slip.options(config)

    def init_params(init_rng):
        params = model.init(init_rng, *_dummy_inputs(config))["params"]
        if ssl is not None:  # SLIP's SimCLR head (params["simclr"], vljax/slip.py), its own stream
            params = slip.with_head(params, model, ssl, _dummy_inputs(config)[0],
                                    jax.random.fold_in(init_rng, 0x511F))
        if catlip is not None:  # CatLIP's head (params["catlip"], vljax/catlip.py), its own stream
            params = catlip.with_head(params, model, _dummy_inputs(config)[0], jax.random.fold_in(init_rng, 0xCA7))
        if opts is None:
            return params
        # The self-distillation heads (params["ssl"], vljax/teacher.py), their own random stream.
        return teacher.with_heads(params, model, opts, jax.random.fold_in(init_rng, 0x55D))
    return init_params, tx.init


def init_params(model, config, rng):
    """Random params of `model` at `config`'s input shapes, on one device, without pretrained towers
    (tests and benchmarks; training builds its state in its shards with `init_state`)."""
    return jax.jit(lambda r: model.init(r, *_dummy_inputs(config))["params"])(rng)


def init_state(init_params, init_opt, shardings, model_init, init_rng, train_rng, loaded=None,
               momentum=None) -> dict:
    """A fresh train state created in its `shardings` (see `make_init_fns`), with the pretrained
    towers of `model_init` ({"img": NAME_OR_PATH, ...}), or every param of an `init_from`
    checkpoint (`loaded`, host arrays: `init_from.write_params`), written into the params' shards;
    with a "teacher" in `shardings`, the EMA teacher's initial state (`teacher.init`); with
    `momentum` (config.queue), the momentum towers and queues (`momentum.Momentum.init`)."""
    # A tower configured shallower than its checkpoint takes the checkpoint's lowest layers.
    towers = {tower: pretrained.lowest_layers(pretrained.load_tower(spec), shardings["params"][tower], tower)
              for tower, spec in (model_init or {}).items() if spec}
    params = _random_params_except(init_params, shardings["params"], init_rng, {
        f"{tower}/{key}" for tower, host in towers.items() for key in pretrained.written_keys(host)})
    _release_host_memory()
    for tower in list(towers):
        params = pretrained.write_tower(params, towers.pop(tower), tower)
        _release_host_memory()
    if loaded is not None:
        params = init_from.write_params(params, loaded)
    opt_state = jax.jit(init_opt, out_shardings=shardings["opt_state"])(params)
    meta = jax.jit(lambda r: {"step": jnp.zeros((), jnp.int32), "rng": r},
                   out_shardings={"step": shardings["step"], "rng": shardings["rng"]})(train_rng)
    if "teacher" in shardings:  # config.self_distill: the EMA teacher (vljax/teacher.py)
        meta["teacher"] = jax.jit(teacher.init, out_shardings=shardings["teacher"])(params)
    if momentum is not None:
        meta["queue"] = jax.jit(momentum.init, out_shardings=shardings["queue"])(
            params, jax.random.fold_in(init_rng, 0x0E0E))
    return {"params": params, "opt_state": opt_state, **meta}


def _random_params_except(init_params, shardings, init_rng, written: set[str]) -> dict:
    """The random init of every param but the `written` ones ("tower/a/b" names that a pretrained
    tower fills next), created in its shards; those are placeholders (`jax.ShapeDtypeStruct`
    with their sharding) for `pretrained.write_tower`. The program then holds no random draws for
    the pretrained towers: its compile is what a fresh run waits for (LiT demo: 17 s -> 1 s for
    EfficientNet-Lite0 + MiniLM's 330 random tensors), and its scratch space is the heads' only.
    The kept params equal the whole init's bit for bit (each param's key comes from its module
    path and its module's draw count, not from what else is drawn: flax's `make_rng`)."""
    abstract = traverse_util.flatten_dict(jax.eval_shape(init_params, init_rng), sep="/")
    flat_sh = traverse_util.flatten_dict(shardings, sep="/")
    kept = [k for k in abstract if k not in written]

    def kept_params(rng):
        flat = traverse_util.flatten_dict(init_params(rng), sep="/")
        return {k: flat[k] for k in kept}
    compiled = jax.jit(kept_params, out_shardings={k: flat_sh[k] for k in kept}).lower(init_rng).compile()
    _release_host_memory()
    flat = compiled(init_rng)
    del compiled
    flat.update({k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_sh[k])
                 for k, a in abstract.items() if k in written})
    return traverse_util.unflatten_dict(flat, sep="/")


def _release_host_memory() -> None:
    """Hands freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). XLA's
    compiler and the init's random-bit scratch space are freed but would stay in the process's
    RSS, adding to the peak of what follows (measured: +0.2x of a B/16 CLIP state)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
