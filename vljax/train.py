"""The one trainer for every recipe (CLIP, SigLIP, LiT, ...): recipes differ by config only.

Sections: mesh -> model and initial state -> shardings -> input -> update step (vljax/step.py, on
the loss of vljax/objective.py) -> loop (log, evaluate, checkpoint, preempt; vljax/nonfinite.py,
vljax/selection.py). The training state is one pytree:
`{"params", "opt_state", "step", "rng"}`; the data iterator's state is saved beside it.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from vljax import (acid, catlip, checkpoints, config_check, eval_builder, factory, features, init_from,
                   label_shards, logs, metrics, mixing, momentum, nonfinite, objective, optim, perf,
                   selection, sharding, slip, stages, teacher, teacher_features)
from vljax.data import pipeline, sources
from vljax.step import flat as _flat, make_train_step
from vljax.text_memo import TextMemo, locked_text_blocks
from vljax.embedder import Embedder
from vljax.models.two_towers import TwoTowers
# The initial state (random, model_init towers, an init_from checkpoint): train.* since they began.
from vljax.state_init import _dummy_inputs, init_params, init_state, make_init_fns  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------


def build_model(config) -> TwoTowers:
    return factory.build_model(factory.spec_from_config(config))


def build_tokenizer(config):
    return factory.build_tokenizer(factory.spec_from_config(config))


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Trainer:
    """Everything a run needs, built from one config; `fit()` trains, `evaluate()` evaluates.

    The state is built in big_vision's order: its abstract form first (`jax.eval_shape`) with the
    shardings of `config.sharding_rules`; a checkpoint in the workdir is restored straight into
    those shardings (no random init, no pretrained tower read); otherwise the jitted init creates
    every parameter and optimizer moment directly in its shards and the pretrained towers of
    `config.model_init` are written in leaf by leaf. Nothing full-size exists on one device or on
    the host unless a rule replicates it.
    """

    def __init__(self, config, workdir: str, devices=None, write_config: bool = True,
                 require_checkpoint: bool = False):
        self._loaded = None  # config.init_from: the checkpoint's params, host arrays, for a fresh run
        if init_from.requested(config):  # its spec decides the model, tokenizer and preprocessing
            spec, self._loaded = init_from.read_source(config, workdir)
            config = init_from.resolve(config, spec)
            config_check.validate(config)
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh, devices=devices)
        self.spec = factory.spec_from_config(config)
        self.tokenizer = factory.build_tokenizer(self.spec)
        self.model = factory.build_model(self.spec)
        self.rules = list(config.get("sharding_rules", [(".*", "replicate")]))
        # The data sources are opened (manifests parsed, TFDS datasets found) before anything is
        # written: a bad source is refused with the workdir untouched.
        opened = [sources.get_source(entry, data_dir=config.input.get("data_dir")) for entry in config.input.data]

        params = factory.abstract_params(self.model, self.spec)
        self.sd_opts = teacher.options(config)  # self-distillation: heads params["ssl"], a teacher
        if self.sd_opts is not None:
            params = teacher.with_heads(params, self.model, self.sd_opts)
        self.ssl_opts = slip.options(config)  # SLIP: the SimCLR head params["simclr"]
        if self.ssl_opts is not None:
            params = slip.with_head(params, self.model, self.ssl_opts, _dummy_inputs(config)[0])
        # CatLIP: the caption vocabulary (written to / read from the workdir), its head params["catlip"]
        self.catlip = catlip.CatLIP.setup(config, opened, workdir)  # written with config.json below
        if self.catlip is not None:
            params = self.catlip.with_head(params, self.model, _dummy_inputs(config)[0])
        self.tx, self.lr_fn, self.trainable_mask = optim.make_optimizer(config, params)
        if self.catlip is not None:
            catlip.check(self.trainable_mask)
        objective.check(config, self.trainable_mask, opened)
        # loss.label_axis: the prompts padded to, and split over, that axis (vljax/label_shards.py)
        self.label_text, self.label_sharding = label_shards.place(
            config, self.mesh, objective.label_prompts(config, self.tokenizer, opened))
        self.text_blocks = locked_text_blocks(self.spec, self.trainable_mask)
        self.label_blocks = self.text_blocks if self.label_text is not None else 0
        if config.get("text_cache", False) and not self.text_blocks:
            raise ValueError("config key `text_cache`: the text tower has no locked lowest blocks to run "
                             "once per caption (lock its embeddings and lowest blocks in `schedule`, with "
                             "dropout off and blocks not scanned), or set text_cache=False")
        init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
        self._init_params, self._init_opt = make_init_fns(self.model, self.tx, config, self.catlip)
        abstract = {"params": params, "opt_state": jax.eval_shape(self._init_opt, params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda r: r, train_rng)}
        if self.sd_opts is not None:
            abstract["teacher"] = teacher.abstract(params)
        # config.queue: momentum towers and queues of negatives (vljax/momentum.py)
        self.momentum = momentum.Momentum.build(config, self.model, params, *_dummy_inputs(config))
        if self.momentum is not None:
            abstract["queue"] = self.momentum.abstract(params)
        self.mixing = mixing.Mixing.build(config, self.model)  # config.mixing (vljax/mixing.py)
        self.state_sh = sharding.state_shardings(abstract, self.mesh, self.rules)
        # config.acid: the frozen teacher that selects each step's sub-batch, beside the state
        # (vljax/acid.py): its params are read from its path, never trained nor checkpointed.
        self.acid, self.acid_params, self.acid_sh = None, None, None
        acid_opts = acid.options(config)
        if acid_opts is not None:
            self.acid, self.acid_params, self.acid_sh = acid.Acid.load(acid_opts, config, self.spec,
                                                                       self.mesh, self.rules)
        if self.sd_opts is not None:
            self.state_sh["teacher"] = teacher.shardings(abstract["teacher"], self.mesh, self.rules)
        if self.momentum is not None:
            self.state_sh["queue"] = self.momentum.shardings(abstract["queue"], self.mesh, self.rules)
        self.abstract_state = _with_shardings(abstract, self.state_sh)

        self.ckpt = checkpoints.Checkpointer(
            epath.Path(workdir) / "checkpoints", max_to_keep=config.get("keep_ckpts", 2))
        self.start_step, self.data_state = 0, None
        if self.ckpt.latest_step() is not None:
            # The latest intact checkpoint: a damaged one is moved aside and the previous one used.
            self.state, self.data_state = self.ckpt.restore(None, self.abstract_state)
            self.start_step = int(jax.device_get(self.state["step"]))
            logs.info("resumed from step %d", self.start_step)
        elif require_checkpoint:
            raise FileNotFoundError(f"no checkpoint in {self.ckpt.directory}")
        else:
            self.state = self.initial_state(init_rng, train_rng)

        # Inference and evaluation read the model spec from here; --mode=eval keeps the config.
        if write_config and jax.process_index() == 0:
            path = epath.Path(workdir)
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text(config.to_json_best_effort(indent=1))
            factory.write_spec(path, self.spec)
            if self.catlip is not None:  # the caption vocabulary (vljax/caption_labels.py)
                self.catlip.write(path)
            if config.input.get("hide_labels"):  # partial labels: which ones training never sees
                record = sources.hidden_labels_record(opened, *sources.check_hide_labels(config.input.hide_labels))
                (path / "hidden_labels.json").write_text(json.dumps(record))
        self._evaluators = self._embedder = self._text_memo = None

    def initial_state(self, init_rng, train_rng):
        loaded, self._loaded = self._loaded, None  # host copy freed once written
        return init_state(self._init_params, self._init_opt, self.state_sh, self.config.get("model_init"),
                          init_rng, train_rng, loaded, self.momentum)

    # -- input ---------------------------------------------------------------------------------
    def make_input(self, stage: stages.Stage | None = None):
        """The training iterator (of `stage`: its image size, text length and own stream); with
        `config.lit_cache` it reads the locked trunk's stored features (written once under
        <workdir>/features/ with the current sharded params) instead of images."""
        stage = stage or stages.parse(self.config)[0]
        stores = None
        if self.config.get("lit_cache", False):
            stores = features.training_stores(self.config, self.model, self.state["params"],
                                              _flat(self.trainable_mask), self.mesh, self.workdir)
        inp, tokenizer = self.config.input, self.tokenizer
        if self.acid is not None:  # the super-batch the step selects from (vljax/acid.py)
            inp = inp.copy_and_resolve_references()
            inp.batch_size = acid.super_batch_size(inp.batch_size, float(self.config.acid.get(
                "filter_ratio", acid.DEFAULTS["filter_ratio"])))
        fixed = bool(inp.get("naflex")) and not stage.naflex  # a NaFlex tower's fixed-res stage
        if stage.image_size != inp.image_size or stage.self_distill or fixed or self.ssl_opts is not None:
            inp = inp.copy_and_resolve_references()
            inp.image_size = stage.image_size
            if fixed:  # square images as the tower's full patch grid (vljax/data/naflex_train.py)
                inp.naflex = {**dict(inp.naflex), "fixed_resolution": True}
            if stage.self_distill:  # the multi-crop views (vljax/teacher.py)
                with inp.unlocked():
                    inp.multi_crop = teacher.multi_crop(self.sd_opts, stage.image_size, self.model)
            if self.ssl_opts is not None:  # SLIP's two views (vljax/slip.py)
                with inp.unlocked():
                    inp.multi_crop = slip.multi_crop(self.ssl_opts, stage.image_size)
        if stage.max_len != self.spec["tokenizer"]["max_len"]:
            tokenizer = factory.build_tokenizer({"tokenizer": {**self.spec["tokenizer"], "max_len": stage.max_len}})
        seed = self.config.seed + 1_000_003 * stage.index  # stage 0: the unstaged stream
        return pipeline.make_train_iterator(inp, tokenizer, seed=seed, features=stores,
                                            teachers=teacher_features.teacher_stores(self.config, self.mesh, self.workdir),
                                            caption_targets=None if self.catlip is None else self.catlip.targets())

    def stage_model(self, stage: stages.Stage) -> TwoTowers:
        """The model as the stage trains it (its patch dropout); the same parameters."""
        return stages.model_for(self.model, stage)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluators(self):
        if self._evaluators is None:
            self._evaluators = eval_builder.build(self.config, str(epath.Path(self.workdir) / "plots"))
        return self._evaluators

    def embedder(self, params=None) -> Embedder:
        """One Embedder per evaluation, over the training state's params as they are sharded; the
        towers compile once per run (`Embedder.with_params`)."""
        params = self.state["params"] if params is None else params
        if self._embedder is None:
            # The run's model bundle: image size, value range and similarity (the trained loss's)
            # from its spec, as `vljax.evaluate` reads them from the workdir's model_spec.json.
            bundle = factory.Bundle(self.model, params, self.tokenizer, self.spec)
            # A locked image trunk is evaluated from the feature store training uses (features
            # written once per eval set, then only the head runs at each evaluation).
            store = epath.Path(self.workdir) / "features" if self._image_trunk_locked() else None
            self._embedder = Embedder.from_bundle(
                bundle, mesh=self.mesh, batch_size=self.config.get("eval_batch_size", 64),
                workers=self.config.input.get("eval_workers", 0),  # decoding: threads when 0
                feature_store=store, text_memo=self.text_memo(),
                progress=False)  # inside training: one line per round
            return self._embedder
        return self._embedder.with_params(params)

    def text_memo(self) -> TextMemo | None:
        """With `config.text_cache`, the captions' and evaluation texts' states after the text
        tower's locked lowest blocks, computed once per distinct text (vljax/text_memo.py)."""
        if self._text_memo is None and self.config.get("text_cache", False):
            gb = float(self.config.get("text_cache_gb", 4.0))
            self._text_memo = TextMemo(self.model, self.state["params"], self.text_blocks,
                                       chunk=self.config.input.batch_size // jax.process_count(),
                                       max_bytes=int(gb * (1 << 30)))
            logs.info("text_cache: the text tower's %d locked lowest blocks run once per distinct text "
                      "(up to %.1f GiB of states)", self.text_blocks, gb)
        return self._text_memo

    def label_states(self, model=None):
        """The label prompts' states after the text tower's locked lowest blocks
        (`self.label_blocks` of them, `locked_text_blocks`), replicated (or split over
        `loss.label_axis`): computed once from the current (locked, so final) parameters and fed
        to every step."""
        model = self.model if model is None else model
        rows = self.label_sharding or NamedSharding(self.mesh, P())
        fn = jax.jit(lambda p, text: model.apply({"params": p}, text, self.label_blocks,
                                                 method=TwoTowers.text_lower), out_shardings=rows)
        states = fn(self.state["params"], jax.device_put(self.label_text, rows))
        logs.info("label prompts: %d locked text blocks run once for the %d prompts, not in every step",
                  self.label_blocks, len(self.label_text))
        return states

    def _image_trunk_locked(self) -> bool:
        """Every image-tower parameter outside its head is locked (LiT) and lit_cache is on."""
        return (bool(self.config.get("lit_cache", False))
                and features.image_trunk_locked(_flat(self.trainable_mask)))

    def evaluate(self, step: int, params=None) -> dict:
        if not self.evaluators():  # no evals configured: no embedder to build
            return {}
        emb = self.embedder(params)
        with logs.phase(f"evaluation at step {step}", evals=len(self.evaluators())):
            return eval_builder.run_all(self.evaluators(), emb)

    # -- training ------------------------------------------------------------------------------
    def fit(self):
        config, mesh = self.config, self.mesh
        writer_enabled = jax.process_index() == 0
        start = self.start_step
        writer = metrics.MetricWriter(self.workdir, enabled=writer_enabled,
                                      resume_step=start if self.data_state is not None else None)
        loss, parts = objective.make_loss(config, mesh), objective.make_parts(config, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        schedule = stages.parse(config)

        def enter(stage, data_state=None):
            """The stage's input stream (restored to `data_state` when it is this stage's), step, and
            `cost(state, batch)`: the compiled step's `perf.StepCost` (read after its first call:
            the executable already compiled, not a second compile)."""
            it = self.make_input(stage)
            if data_state is not None and data_state.get("stage", 0) == stage.index:
                it.set_state(data_state["iterator"])
            model = self.stage_model(stage)
            sd = (teacher.SelfDistill.build(model, self.sd_opts, config.input.image_size)
                  if stage.self_distill else None)
            step_fn = make_train_step(model, self.tx, loss, self.trainable_mask,
                                      self.label_text, self.label_blocks, self.text_blocks, sd,
                                      self.acid, self.momentum, parts=parts,
                                      ssl=None if self.ssl_opts is None else slip.Slip.build(self.ssl_opts),
                                      mixing=self.mixing, catlip=self.catlip, label_sharding=self.label_sharding,
                                      grad_accum_steps=config.get("grad_accum_steps", 1) or 1)
            if not self.label_blocks and self.acid is None:
                fn = jax.jit(step_fn, in_shardings=(self.state_sh, batch_sh),
                             out_shardings=(self.state_sh, None), donate_argnums=(0,))
                return stage, it, fn, lambda state, batch: perf.compiled_cost(fn, n_dev, state, batch)
            # Arguments beside the state: the label prompts' states, the ACID teacher's params.
            states = self.label_states(model) if self.label_blocks else None
            args = (states, self.acid_params)
            fn = jax.jit(step_fn, in_shardings=(self.state_sh, batch_sh, None if states is None else states.sharding,
                                                self.acid_sh),
                         out_shardings=(self.state_sh, None), donate_argnums=(0,))
            return (stage, it, lambda state, batch: fn(state, batch, *args),
                    lambda state, batch: perf.compiled_cost(fn, n_dev, state, batch, *args))

        n_dev = mesh.devices.size
        stage, data_iter, train_step, step_cost = enter(stages.at(schedule, start), self.data_state)
        cost = None  # the current stage's perf.StepCost, read after its first step
        text_memo = self.text_memo()
        self.train_step = train_step  # kept for inspection (compilations, lowering)

        total = config.total_steps
        log_every = config.get("log_every", 50)
        accum = config.get("grad_accum_steps", 1)  # the schedules count optimizer steps
        eval_every = config.get("eval_every", 0)
        ckpt_every = config.get("ckpt_every", 0)
        selector = selection.Selector(self.workdir, config.get("select_metric"), config.get("early_stop_patience", 0))
        guard = checkpoints.PreemptionGuard()
        bar = None
        if writer_enabled and config.get("progress", True):
            bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        pairs_per_step = config.input.batch_size
        guard_nonfinite = nonfinite.NonFiniteGuard(config.get("nonfinite", "stop"))
        acc, t_last, s_last = [], time.perf_counter(), start
        step, in_flight, prev = start, None, None
        try:
            with jax.set_mesh(mesh):
                while step < total:
                    if step >= stage.until:  # the next stage: its input and its compiled step
                        skipped = data_iter.skipped
                        stage, data_iter, train_step, step_cost = enter(stages.at(schedule, step))
                        cost = None
                        data_iter.skipped = dict(skipped)
                        logs.info("stage %d from step %d: image size %d, text length %d, patch dropout %s%s",
                                  stage.index, step, stage.image_size, stage.max_len, stage.patch_dropout,
                                  ", NaFlex" if stage.naflex else "")
                    batch = next(data_iter)
                    skipped = {k: v for k, v in batch.items() if k.startswith("skipped/")}
                    batch = {k: v for k, v in batch.items() if not k.startswith("skipped/")}
                    if text_memo is not None:
                        batch["text_states"] = text_memo(batch["text"])
                    batch = sharding.shard_batch(batch, mesh)
                    self.state, m = train_step(self.state, batch)
                    if self.acid is not None:  # the rows chosen: kept for inspection, not a metric
                        self.acid_indices = m.pop("acid/indices")
                    if cost is None:
                        cost = _read_cost(step_cost, self.state, batch, mesh, config.get("dtype", "float32"))
                    step += 1
                    acc.append(m)
                    # Checked one step behind (the step in flight keeps the device busy), and the
                    # current step before it is logged, evaluated or saved: in "stop" mode fit()
                    # raises at the first non-finite step and nothing after it is written.
                    guard_nonfinite.check(prev, step - 1)
                    prev = cur = m
                    if bar is not None:
                        # One step stays in flight (the next batch is read while it runs); the bar
                        # counts finished steps, so its rate is the real one.
                        if in_flight is not None:
                            jax.block_until_ready(in_flight)
                            bar.update(1)
                        in_flight = m["train/loss"]
                    stop = guard.reached(step)  # collective on several processes: every process agrees
                    evaluate = (eval_every and step % eval_every == 0) or step == total
                    save = (ckpt_every and step % ckpt_every == 0) or step == total or stop
                    log = step % log_every == 0 or step == total
                    if log or evaluate or save:
                        guard_nonfinite.check(cur, step)
                        prev = None
                    if log:
                        m = jax.device_get(acc)
                        row = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
                        dt = time.perf_counter() - t_last
                        row["train/pairs_per_s"] = pairs_per_step * (step - s_last) / dt
                        row["train/pairs_per_s_per_device"] = row["train/pairs_per_s"] / jax.device_count()
                        row.update({f"lr/{k}": float(v) for k, v in self.lr_fn(step // accum).items()})
                        row.update({f"data/{k}": float(v) for k, v in skipped.items()})
                        if cost:  # FLOPs, MFU and memory of the step (vljax/perf.py)
                            peak, _ = perf.peak_flops(config.get("dtype", "float32"), mesh.devices.flat)
                            row.update(perf.metrics_row(cost, dt / (step - s_last), peak))
                        writer.write(step, row)
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['train/loss']:.3f}")
                        acc, t_last, s_last = [], time.perf_counter(), step
                    if evaluate:
                        results = self.evaluate(step)
                        writer.write(step, results)
                        if selector.update(step, results, self.state["params"]):
                            logs.info("early stopping at step %d: %s has not improved for %d evaluations",
                                         step, selector.metric, selector.patience)
                            stop = True
                        t_last = time.perf_counter()
                    if save:
                        self.ckpt.save(step, self.state, {"stage": stage.index, "iterator": data_iter.get_state()},
                                       force=True)
                    if stop:
                        if step < total and not selector.stopped:
                            logging.warning("preempted (SIGTERM) at step %d: checkpoint saved, exiting", step)
                        break
        except nonfinite.NonFiniteError as e:
            writer.write(e.step, {"train/loss": e.loss, "train/grad_norm": e.grad_norm, "train/nonfinite": 1.0})
            raise
        finally:
            if bar is not None:
                if in_flight is not None:
                    bar.update(1)
                bar.close()
            self.ckpt.wait()
            guard.restore()
        writer.write(step, selector.summary())
        selector.close()
        writer.close()
        if writer_enabled and config.get("plot", True):
            metrics.plot_curves(self.workdir)
        return self.state


def _read_cost(step_cost, state, batch, mesh, dtype) -> perf.StepCost | bool:
    """The step's analyses (logged once at verbosity info, with the peak they are measured
    against), or False when this backend gives no FLOP count (no perf/* keys then, a warning)."""
    try:
        cost = step_cost(state, batch)
    except ValueError as e:
        logging.warning("no perf/* metrics: %s", e)
        return False
    jax.block_until_ready(state["step"])  # a CPU peak is measured with no step running beside it
    _, source = perf.peak_flops(dtype, mesh.devices.flat)
    logging.info("step cost: %.4g TFLOPs on %d devices, %.3f GiB peak per device; peak from %s%s",
                 cost.flops / 1e12, cost.devices, cost.peak_bytes / perf.GIB, source,
                 " (a while loop with matmuls in the step, e.g. scanned blocks or a ring loss: XLA counts "
                 "its body once, so FLOPs are undercounted)"
                 if cost.has_loops else "")
    return cost


def train_and_evaluate(config, workdir: str, devices=None):
    trainer = Trainer(config, workdir, devices=devices)
    return trainer.fit()


def evaluate_workdir(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint of `workdir` and appends the results to its metrics."""
    trainer = Trainer(config, workdir, write_config=False, require_checkpoint=True)
    latest = trainer.start_step
    results = trainer.evaluate(latest)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(latest, results)
    writer.close()
    for k, v in sorted(results.items()):
        logging.info("%s = %.4f", k, v)
    return results
