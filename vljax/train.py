"""The one trainer for every recipe (CLIP, SigLIP, LiT, ...): recipes differ by config only.

Sections: mesh -> model and initial state -> shardings -> input -> update step -> loop
(log, evaluate, checkpoint, preempt). The training state is one pytree:
`{"params", "opt_state", "step", "rng"}`; the data iterator's state is saved beside it.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from vljax import checkpoints, losses, metrics, optim, pretrained, sharding, tokenizers
from vljax.embedder import Embedder
from vljax.models.two_towers import TwoTowers

# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------


def build_tokenizer(config):
    kw = dict(config.tokenizer)
    return tokenizers.get_tokenizer(kw.pop("kind"), **kw)


def build_model(config) -> TwoTowers:
    kw = dict(config.model)
    dtype = config.get("dtype", "float32")
    for tower in ("image", "text"):
        kw[tower] = dict(kw[tower])
        kw[tower].setdefault("dtype", jnp.dtype(dtype))
        if config.get("remat", False):
            kw[tower].setdefault("remat", True)
    return TwoTowers(**kw)


def _dummy_inputs(config, batch=1):
    s = config.input.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32),
            jnp.zeros((batch, config.tokenizer.max_len), jnp.int32))


def init_params(model, config, rng):
    """Random init, then the pretrained towers named in `config.model_init`."""
    params = jax.jit(lambda r: model.init(r, *_dummy_inputs(config))["params"])(rng)
    params = jax.tree.map(np.asarray, params)
    for tower, spec in (config.get("model_init") or {}).items():
        if spec:
            params, _ = pretrained.merge_pretrained(params, pretrained.load_tower(spec), tower)
    return params


def to_global(tree, shardings):
    """Host values (the same in every process) -> global jax.Arrays with the given shardings.

    Unlike device_put, this works when the shardings span devices of other processes.
    """
    def put(x, s):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            glob = jax.make_array_from_callback(data.shape, s, lambda idx: data[idx])
            return jax.random.wrap_key_data(glob, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def to_host(tree):
    """Global jax.Arrays -> numpy on every process (gathers shards held by other processes)."""
    from jax.experimental import multihost_utils
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _split(params, mask):
    """Splits params into (trainable, frozen) flat dicts by a bool pytree of the same structure."""
    fp, fm = _flat(params), _flat(mask)
    return ({k: v for k, v in fp.items() if fm[k]}, {k: v for k, v in fp.items() if not fm[k]})


def _join(trainable, frozen):
    return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def make_loss(config, mesh):
    """Returns loss(zimg, ztxt, out, batch) -> scalar, the loss running under shard_map over the batch."""
    name = config.loss.name
    if name not in losses.LOSSES:
        raise ValueError(f"config key `loss.name`: unknown loss {name!r} (known: {', '.join(losses.LOSSES)})")
    fn = losses.LOSSES[name]
    kwargs = {k: v for k, v in config.loss.items() if k != "name"}
    axes = sharding.batch_axes(mesh)
    axis = axes[0] if len(axes) == 1 else axes
    bspec = P(axes)

    def run(local_fn, *args):
        specs = tuple(P() if np.ndim(a) == 0 else bspec for a in args)
        return jax.shard_map(local_fn, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    def loss(zimg, ztxt, out, batch):
        # Losses run in float32 whatever the towers' compute dtype (bf16 logits lose the ranking).
        zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
        out = {k: (v.astype(jnp.float32) if k.endswith("/tokens") else v) for k, v in out.items()}
        t = out["t"]
        if name == "sigmoid":
            return run(lambda zi, zt, t, b: fn(zi, zt, t, b, axis_name=axis, **kwargs), zimg, ztxt, t, out["b"])
        if name == "filip":
            return run(lambda it, tt, tm, t: fn(it, tt, tm, t, axis_name=axis, **kwargs),
                       out["img/tokens"], out["txt/tokens"], out["txt/mask"], t)
        if name == "multi_positive":
            return run(lambda zi, zt, t, lab: fn(zi, zt, t, lab, axis_name=axis, **kwargs),
                       zimg, ztxt, t, batch["label"])
        if name == "cwcl":
            zref = jax.lax.stop_gradient(zimg)  # intra-modal similarity of the (locked) image tower
            return run(lambda zi, zt, t, zr: fn(zi, zt, t, zr, axis_name=axis, **kwargs), zimg, ztxt, t, zref)
        return run(lambda zi, zt, t: fn(zi, zt, t, axis_name=axis, **kwargs), zimg, ztxt, t)

    return loss


# ----------------------------------------------------------------------------------------------
# Update step
# ----------------------------------------------------------------------------------------------


def make_train_step(model, tx, loss, trainable_mask):
    """One optimizer (micro-)step. Gradients are computed for trainable parameters only.

    A batch with "image_features" ([B, F], a locked trunk's stored features, vljax/features.py)
    instead of "image" runs only the image tower's head on them.
    """

    def forward(params, batch, rng):
        if "image_features" in batch:
            zimg = model.apply({"params": params}, batch["image_features"], train=True,
                               rngs={"dropout": rng}, method=model.image_head)
            _, ztxt, out = model.apply({"params": params}, None, batch["text"], train=True,
                                       rngs={"dropout": rng})
            return zimg, ztxt, out
        return model.apply({"params": params}, batch["image"], batch["text"], train=True,
                           rngs={"dropout": rng})

    def step_fn(state, batch):
        rng, step_rng = jax.random.split(state["rng"])
        trainable, frozen = _split(state["params"], trainable_mask)

        def objective(tr):
            params = _join(tr, jax.lax.stop_gradient(frozen))
            zimg, ztxt, out = forward(params, batch, step_rng)
            return loss(zimg, ztxt, out, batch), out

        (value, out), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
        grads = _join(grads, zeros)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        m = {"train/loss": value, "train/grad_norm": grad_norm, "train/t": out["t"]}
        if "b" in out:
            m["train/b"] = out["b"]
        return new_state, m

    return step_fn


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_state(config, model, mesh, rules):
    """The training state's structure, shapes and shardings, without computing or loading anything."""
    params = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(config))["params"], jax.random.key(0))
    tx, _, _ = optim.make_optimizer(config, params)
    state = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                                      "rng": jax.random.key(0)}, params)
    return _with_shardings(state, sharding.state_shardings(state, mesh, rules))


def restore_params(config, model, workdir: str, step: int | None = None):
    """Params of a workdir's checkpoint (the latest by default), on the host."""
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, _ = ckpt.restore(step, abstract_state(config, model, mesh, [(".*", "replicate")]))
    finally:
        ckpt.close()
    return jax.device_get(state["params"])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Everything a run needs, built from one config; `fit()` trains, `evaluate()` evaluates."""

    def __init__(self, config, workdir: str, devices=None, write_config: bool = True):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh, devices=devices)
        self.tokenizer = build_tokenizer(config)
        self.model = build_model(config)
        self.rules = list(config.get("sharding_rules", [(".*", "replicate")]))

        rng = jax.random.key(config.seed)
        init_rng, self.train_rng = jax.random.split(rng)
        params = init_params(self.model, config, init_rng)
        self.tx, self.lr_fn, self.trainable_mask = optim.make_optimizer(config, params)
        state = {"params": params, "opt_state": self.tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": self.train_rng}
        abstract = jax.eval_shape(lambda s: s, state)
        self.state_sh = sharding.state_shardings(abstract, self.mesh, self.rules)
        self.abstract_state = _with_shardings(abstract, self.state_sh)
        self.state = to_global(state, self.state_sh)

        # Inference reads the run's config from here; --mode=eval (write_config=False) keeps it.
        if write_config and jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=1))
        self.ckpt = checkpoints.Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.get("keep_ckpts", 2))
        self._evaluators = None

    # -- input ---------------------------------------------------------------------------------
    def make_input(self):
        """The training iterator; with `config.lit_cache` it reads the locked trunk's stored features
        (written once under <workdir>/features/ with the current sharded params) instead of images."""
        from vljax.data import pipeline
        stores = None
        if self.config.get("lit_cache", False):
            from vljax import features
            stores = features.training_stores(self.config, self.model, self.state["params"],
                                              _flat(self.trainable_mask), self.mesh, self.workdir)
        return pipeline.make_train_iterator(self.config.input, self.tokenizer, seed=self.config.seed,
                                            features=stores)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluators(self):
        if self._evaluators is None:
            from vljax import eval_builder
            self._evaluators = eval_builder.build(self.config, os.path.join(self.workdir, "plots"))
        return self._evaluators

    def embedder(self, params=None):
        params = to_host(self.state["params"] if params is None else params)
        return Embedder(self.model, params, self.tokenizer,
                        batch_size=self.config.get("eval_batch_size", 64),
                        image_feature_cache=self._image_trunk_locked())

    def _image_trunk_locked(self) -> bool:
        flat = _flat(self.trainable_mask)
        img = [v for k, v in flat.items() if k.startswith("img/") and not k.startswith("img/head/")]
        return bool(img) and not any(img)

    def evaluate(self, step: int, params=None) -> dict:
        emb = self.embedder(params)
        if self._image_trunk_locked() and getattr(self, "_emb_cache", None) is not None:
            emb._cache = self._emb_cache  # the locked trunk's features are reused across evaluations
        self._emb_cache = emb._cache
        results = {}
        for name, ev in self.evaluators().items():
            t0 = time.perf_counter()
            results.update(ev.run(emb))
            results[f"time/eval_{name}_s"] = time.perf_counter() - t0
        return results

    # -- training ------------------------------------------------------------------------------
    def fit(self):
        config, mesh = self.config, self.mesh
        writer_enabled = jax.process_index() == 0
        data_iter = self.make_input()
        start = 0
        latest = self.ckpt.latest_step()
        if latest is not None:
            self.state, data_state = self.ckpt.restore(latest, self.abstract_state)
            data_iter.set_state(data_state)
            start = latest
            logging.info("resumed from step %d", latest)
        writer = metrics.MetricWriter(self.workdir, enabled=writer_enabled,
                                      resume_step=start if latest is not None else None)

        loss = make_loss(config, mesh)
        step_fn = make_train_step(self.model, self.tx, loss, self.trainable_mask)
        batch_sh = sharding.batch_sharding(mesh)
        train_step = jax.jit(step_fn, in_shardings=(self.state_sh, batch_sh),
                             out_shardings=(self.state_sh, None), donate_argnums=(0,))
        self.train_step = train_step  # kept for inspection (compilations, lowering)

        total = config.total_steps
        log_every = config.get("log_every", 50)
        accum = config.get("grad_accum_steps", 1)  # the schedules count optimizer steps
        eval_every = config.get("eval_every", 0)
        ckpt_every = config.get("ckpt_every", 0)
        selector = _Selector(self.workdir, config.get("select_metric"), config.get("early_stop_patience", 0))
        guard = checkpoints.PreemptionGuard()
        bar = None
        if writer_enabled and config.get("progress", True):
            from tqdm import tqdm
            bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        pairs_per_step = config.input.batch_size
        acc, t_last, s_last = [], time.perf_counter(), start
        step, in_flight = start, None
        with jax.set_mesh(mesh):
            while step < total:
                batch = next(data_iter)
                skipped = {k: v for k, v in batch.items() if k.startswith("skipped/")}
                batch = {k: v for k, v in batch.items() if not k.startswith("skipped/")}
                self.state, m = train_step(self.state, sharding.shard_batch(batch, mesh))
                step += 1
                acc.append(m)
                if bar is not None:
                    # One step stays in flight (the next batch is read while it runs); the bar
                    # counts finished steps, so its rate is the real one.
                    if in_flight is not None:
                        jax.block_until_ready(in_flight)
                        bar.update(1)
                    in_flight = m["train/loss"]
                if step % log_every == 0 or step == total:
                    m = jax.device_get(acc)
                    row = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
                    dt = time.perf_counter() - t_last
                    row["train/pairs_per_s"] = pairs_per_step * (step - s_last) / dt
                    row["train/pairs_per_s_per_device"] = row["train/pairs_per_s"] / jax.device_count()
                    row.update({f"lr/{k}": float(v) for k, v in self.lr_fn(step // accum).items()})
                    row.update({f"data/{k}": float(v) for k, v in skipped.items()})
                    writer.write(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['train/loss']:.3f}")
                    acc, t_last, s_last = [], time.perf_counter(), step
                stop = guard.reached(step)  # collective on several processes: every process agrees
                if (eval_every and step % eval_every == 0) or step == total:
                    results = self.evaluate(step)
                    writer.write(step, results)
                    if selector.update(step, results, self.state["params"]):
                        logging.info("early stopping at step %d: %s has not improved for %d evaluations",
                                     step, selector.metric, selector.patience)
                        stop = True
                    t_last = time.perf_counter()
                if (ckpt_every and step % ckpt_every == 0) or step == total or stop:
                    self.ckpt.save(step, self.state, data_iter.get_state(), force=True)
                if stop:
                    if step < total and not selector.stopped:
                        logging.warning("preempted (SIGTERM) at step %d: checkpoint saved, exiting", step)
                    break
        if bar is not None:
            if in_flight is not None:
                bar.update(1)
            bar.close()
        writer.write(step, selector.summary())
        self.ckpt.wait()
        selector.close()
        writer.close()
        if writer_enabled and config.get("plot", True):
            metrics.plot_curves(self.workdir)
        guard.restore()
        return self.state


class _Selector:
    """Model selection on a held-out metric (`config.select_metric`, e.g. a val-split retrieval R@1):
    the best evaluation's params go to WORKDIR/best (orbax), its metrics to the final `best/...`
    row; with `early_stop_patience` > 0 training stops after that many evaluations without gain."""

    def __init__(self, workdir, metric, patience):
        self.metric, self.patience = metric, int(patience or 0)
        self.path = os.path.join(workdir, "best.json")
        self.best = {}
        if metric and os.path.exists(self.path):
            with open(self.path) as f:
                self.best = json.load(f)
        self.bad_evals = self.best.get("bad_evals", 0)
        self.stopped = False
        self._ckpt = checkpoints.Checkpointer(os.path.join(workdir, "best"), max_to_keep=1) if metric else None

    def update(self, step, results, params) -> bool:
        """Records an evaluation; True when training should stop early."""
        if not self.metric:
            return False
        if self.metric not in results:
            raise ValueError(f"config key `select_metric`: {self.metric!r} is not among the evaluation "
                             f"metrics ({', '.join(sorted(k for k in results if not k.startswith('time/')))})")
        value = float(results[self.metric])
        if not self.best or value > self.best["value"]:
            self.best = {"step": int(step), "value": value,
                         "metrics": {k: float(v) for k, v in results.items() if not k.startswith("time/")}}
            self.bad_evals = 0
            self._ckpt.save(step, {"params": params}, {}, force=True)
        else:
            self.bad_evals += 1
        self.best["bad_evals"] = self.bad_evals
        if jax.process_index() == 0:
            with open(self.path, "w") as f:
                json.dump(self.best, f, indent=1)
        self.stopped = bool(self.patience) and self.bad_evals >= self.patience
        return self.stopped

    def summary(self) -> dict:
        if not self.best:
            return {}
        out = {f"best/{k}": v for k, v in self.best["metrics"].items()}
        out["best/step"] = self.best["step"]
        return out

    def close(self):
        if self._ckpt is not None:
            self._ckpt.close()


def train_and_evaluate(config, workdir: str, devices=None):
    trainer = Trainer(config, workdir, devices=devices)
    return trainer.fit()


def evaluate_workdir(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint of `workdir` and appends the results to its metrics."""
    trainer = Trainer(config, workdir, write_config=False)
    latest = trainer.ckpt.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    trainer.state, _ = trainer.ckpt.restore(latest, trainer.abstract_state)
    results = trainer.evaluate(latest)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(latest, results)
    writer.close()
    for k, v in sorted(results.items()):
        logging.info("%s = %.4f", k, v)
    return results
