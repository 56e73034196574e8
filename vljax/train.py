"""The one trainer for every recipe (CLIP, SigLIP, LiT, ...): recipes differ by config only.

Sections: mesh -> model and initial state -> shardings -> input -> update step -> loop
(log, evaluate, checkpoint, preempt). The training state is one pytree:
`{"params", "opt_state", "step", "rng"}`; the data iterator's state is saved beside it.
"""
from __future__ import annotations

import ctypes
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import (checkpoints, eval_builder, factory, features, logs, losses, metrics, optim,
                   pretrained, sharding, stages)
from vljax.embedder import Embedder
from vljax.models.two_towers import TwoTowers

# ----------------------------------------------------------------------------------------------
# Model and state
# ----------------------------------------------------------------------------------------------


def build_model(config) -> TwoTowers:
    return factory.build_model(factory.spec_from_config(config))


def build_tokenizer(config):
    return factory.build_tokenizer(factory.spec_from_config(config))


def _dummy_inputs(config, batch=1):
    s = config.input.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32),
            jnp.zeros((batch, config.tokenizer.max_len), jnp.int32))


def make_init_fns(model, tx, config):
    """(init_params(init_rng) -> params, init_opt(params) -> optimizer state): random params
    (pretrained towers are written into them afterwards, see `pretrained.write_tower`) and the
    optimizer state for them. Run each under `jax.jit(..., out_shardings=...)`: every parameter
    and moment is then created directly in its shards. Two programs, not one, so that the init's
    scratch space (random bits) is freed before the moments are allocated: the peak stays at the
    state's own size."""
    def init_params(init_rng):
        return model.init(init_rng, *_dummy_inputs(config))["params"]
    return init_params, tx.init


def init_params(model, config, rng):
    """Random params of `model` at `config`'s input shapes, on one device, without pretrained towers
    (tests and benchmarks; training builds its state in its shards with `init_state`)."""
    return jax.jit(lambda r: model.init(r, *_dummy_inputs(config))["params"])(rng)


def init_state(init_params, init_opt, shardings, model_init, init_rng, train_rng) -> dict:
    """A fresh train state created in its `shardings` (see `make_init_fns`), with the pretrained
    towers of `model_init` ({"img": NAME_OR_PATH, ...}) written into the params' shards."""
    compiled = jax.jit(init_params, out_shardings=shardings["params"]).lower(init_rng).compile()
    _release_host_memory()
    params = compiled(init_rng)
    del compiled
    _release_host_memory()
    for tower, spec in (model_init or {}).items():
        if spec:
            params = pretrained.write_tower(params, pretrained.load_tower(spec), tower)
            _release_host_memory()
    opt_state = jax.jit(init_opt, out_shardings=shardings["opt_state"])(params)
    meta = jax.jit(lambda r: {"step": jnp.zeros((), jnp.int32), "rng": r},
                   out_shardings={"step": shardings["step"], "rng": shardings["rng"]})(train_rng)
    return {"params": params, "opt_state": opt_state, **meta}


def _release_host_memory() -> None:
    """Hands freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). XLA's
    compiler and the init's random-bit scratch space are freed but would stay in the process's
    RSS, adding to the peak of what follows (measured: +0.2x of a B/16 CLIP state)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    """Returns loss(values) -> scalar: the configured loss (`losses.LOSSES[config.loss.name]`)
    on the inputs it declares, looked up in `values` (model outputs, `frozen/...`, `batch/...`),
    under one shard_map over the batch axes."""
    name = config.loss.name
    if name not in losses.LOSSES:
        raise ValueError(f"config key `loss.name`: unknown loss {name!r} (known: {', '.join(losses.LOSSES)})")
    spec = loss_spec(config)
    kwargs = {k: v for k, v in config.loss.items() if k != "name" and k not in losses.REGULARISER_KEYS}
    axes = sharding.batch_axes(mesh)
    axis = axes[0] if len(axes) == 1 else axes
    bspec = P(axes)

    def loss(values):
        missing = [k for k in spec.inputs if k not in values]
        if missing:
            hint = "".join(f" (set `input.{k[6:]}=True` and give the data its labels)"
                           for k in missing if k in ("batch/label", "batch/labels"))
            raise ValueError(f"config key `loss.name`: loss {name!r} takes {', '.join(missing)}, which this "
                             f"model and batch do not provide{hint}; available: {', '.join(sorted(values))}")
        args = [values[k] for k in spec.inputs]
        # Scalars and `labels/...` (one row per label, not per example) are the same on every device.
        specs = tuple(P() if np.ndim(a) == 0 or k.startswith("labels/") else bspec
                      for k, a in zip(spec.inputs, args))
        local = lambda *a: spec.fn(*a, axis_name=axis, **kwargs)  # noqa: E731
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return loss


def loss_spec(config) -> losses.Loss:
    """The configured loss with the inputs its options choose and its regularisers
    (`losses.REGULARISER_KEYS`); raises KeyError for an unknown `loss.name`."""
    reg = {k: config.loss[k] for k in losses.REGULARISER_KEYS if k in config.loss}
    return losses.with_regularisers(losses.LOSSES[config.loss.name].bind(config.loss), **reg)


def check_loss(config, trainable_mask, sources=()) -> None:
    """Refuses, before any work, a loss whose inputs this recipe cannot give: CWCL weights from a
    tower that is trained (the paper transfers the structure of a frozen pre-trained modality), and
    batch labels / label sets that the input does not read (`input.label` / `input.labels`) or a
    source does not have (`data.sources.missing_labels`)."""
    name = config.loss.name
    if name not in losses.LOSSES:
        return  # make_loss names the unknown loss
    spec = loss_spec(config)
    from vljax.data.sources import missing_labels
    if config.loss.get("multilabel_weight"):
        name = f"{name} + multilabel_weight"
    for field in ("label", "labels"):
        if f"batch/{field}" not in spec.inputs:
            continue
        what = {"label": "class labels", "labels": "label sets"}[field]
        if not config.input.get(field, False):
            why = (f" (`loss.positives`={config.loss.get('positives', 'labels')!r})"
                   if config.loss.name == "multi_positive" else "")
            raise ValueError(f"config key `input.{field}`: loss {name!r}{why} takes the batch's {what}; "
                             f"set `input.{field}=True` (and give each source its {what})")
        for i, source in enumerate(sources):
            why = missing_labels(source, field)
            if why:
                raise ValueError(f"config key `input.data[{i}].{why}: loss {name!r} takes {what}, but "
                                 f"{source!r} has none; every record would be unlabeled")
    if "b" in spec.inputs and config.model.get("bias_init") is None:
        raise ValueError(f"config key `model.bias_init`: loss {name!r} takes the model's logit bias b, "
                         "which this model does not have; set it (e.g. -10.0, SigLIP's)")
    if "frozen/img_features" in spec.inputs:
        tower = {"image": "img", "text": "txt"}[config.loss.get("ref_modality", "image")]
        trained = sorted(k for k, v in _flat(trainable_mask).items()
                         if v and k.startswith(f"{tower}/") and not k.startswith(f"{tower}/head/"))
        if trained:
            raise ValueError(f"config key `loss.ref_modality`: CWCL takes its weights from the frozen "
                             f"{tower!r} tower's features, but `schedule` trains {trained[0]} (and "
                             f"{len(trained) - 1} more); lock that tower's trunk (e.g. ('{tower}/(?!head/).*', None))")


def label_prompts(config, tokenizer, opened) -> np.ndarray | None:
    """[K, L] token ids of `config.loss.template` (`loss.multilabel_template` when the multi-label
    loss is added to another; default "a photo of a {}.") filled with each name
    of the batches' label space (`sources.label_space`: the sorted union of the sources' label
    names, the columns of batch["labels"]), for a loss that takes "labels/ztxt"; None otherwise."""
    if config.loss.name not in losses.LOSSES or "labels/ztxt" not in loss_spec(config).inputs:
        return None
    from vljax.data import sources
    key = "template" if config.loss.name == "multilabel" else "multilabel_template"
    template = config.loss.get(key) or "a photo of a {}."
    if "{}" not in template:
        raise ValueError(f"config key `loss.{key}`: {template!r} has no '{{}}' for the label name")
    from vljax.evaluators.prompts import canonicalize_name  # as the multi-label evaluator writes them
    names = sources.label_space(opened)
    return np.asarray(tokenizer([template.format(canonicalize_name(n)) for n in names]), np.int32)


_TXT_BLOCK = re.compile(r"^txt/(?:Encoder_0/)?encoderblock_(\d+)/")
_TXT_AFTER_BLOCKS = re.compile(r"^txt/(?:Encoder_0/encoder_norm|MAPHead_0|pooler|head)/")


def locked_text_blocks(spec: dict, trainable_mask) -> int:
    """How many of the text tower's lowest blocks are locked together with everything below them
    (embeddings, position embedding): those run on the label prompts once, not in every step
    (`TwoTowers.text_lower`). 0 when nothing is locked there, when the tower's dropout is on (a
    locked block still draws dropout masks in training, so its output is not fixed), or when
    the blocks are scanned (stacked: one parameter for every block)."""
    text = spec["model"].get("text") or {}
    if spec["model"].get("text_model", "text_transformer") not in ("text_transformer", "bert"):
        return 0  # the towers that take stop_after / lower
    if text.get("dropout") or text.get("dropout_rate") or text.get("scan"):
        return 0
    trainable = {k: v for k, v in _flat(trainable_mask).items() if k.startswith("txt/")}
    blocks: dict[int, bool] = {}
    for k, v in trainable.items():
        m = _TXT_BLOCK.match(k)
        if m:
            i = int(m.group(1))
            blocks[i] = blocks.get(i, False) or bool(v)
        elif not _TXT_AFTER_BLOCKS.match(k) and v:
            return 0  # an embedding table trains: every block's input changes
    n = 0
    while n in blocks and not blocks[n]:
        n += 1
    return n


def loss_inputs(zimg, ztxt, out, batch) -> dict:
    """Everything a loss may take, by name (see `losses.Loss`). Float inputs go to float32: losses
    run in float32 whatever the towers' compute dtype (bf16 logits lose the ranking)."""
    img_features = batch["image_features"] if "image_features" in batch else out.get("img/pre_logits")
    values = {"zimg": zimg, "ztxt": ztxt, **out,
              "frozen/zimg": jax.lax.stop_gradient(zimg), "frozen/ztxt": jax.lax.stop_gradient(ztxt),
              **{f"batch/{k}": v for k, v in batch.items()}}
    for k, v in (("frozen/img_features", img_features), ("frozen/txt_features", out.get("txt/pre_logits"))):
        if v is not None:
            values[k] = jax.lax.stop_gradient(v)
    return {k: (v.astype(jnp.float32) if v is not None and jnp.issubdtype(v.dtype, jnp.floating) else v)
            for k, v in values.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Update step
# ----------------------------------------------------------------------------------------------


def make_train_step(model, tx, loss, trainable_mask, label_text=None, label_blocks=0):
    """One optimizer (micro-)step, `step_fn(state, batch[, label_states])`. Gradients are
    computed for trainable parameters only.

    A batch with "image_features" ([B, F], a locked trunk's stored features, vljax/features.py)
    instead of "image" runs only the image tower's head on them; with "image_tokens" ([B, N, W],
    the trunk's stored tokens) also the tower's token projection (out["img/tokens_proj"], FILIP).
    `label_text` ([K, L] token ids of one prompt per label, `label_prompts`) is embedded by the text
    tower in every step (out["labels/ztxt"], the multi-label loss's classifier). With
    `label_blocks` = k > 0 (`locked_text_blocks`) the step takes `label_states`, the prompts'
    states after the k locked lowest blocks (`TwoTowers.text_lower`, computed once per run), and
    runs only the blocks above them: the same embeddings, without recomputing fixed values.
    """

    def forward(params, batch, rng, label_states):
        zimg, ztxt, out = _towers(params, batch, rng)
        if label_text is not None:
            lower = None if not label_blocks else (label_blocks, label_states)
            _, out["labels/ztxt"], _ = model.apply({"params": params}, None, label_text, train=True,
                                                   rngs={"dropout": rng}, text_lower=lower)
        return zimg, ztxt, out

    def _towers(params, batch, rng):
        kw = dict(train=True, rngs={"dropout": rng})
        if "image_features" not in batch:
            return model.apply({"params": params}, batch["image"], batch["text"], **kw)
        _, ztxt, out = model.apply({"params": params}, None, batch["text"], **kw)
        if "image_tokens" in batch:
            zimg, out["img/tokens_proj"] = model.apply(
                {"params": params}, batch["image_features"], batch["image_tokens"].astype(jnp.float32),
                method=model.image_head_tokens, **kw)
        else:
            zimg = model.apply({"params": params}, batch["image_features"], method=model.image_head, **kw)
        return zimg, ztxt, out

    def step_fn(state, batch, label_states=None):
        if label_blocks and label_states is None:
            raise ValueError(f"this step skips the label prompts' {label_blocks} locked text "
                             f"blocks: pass their states (TwoTowers.text_lower)")
        rng, step_rng = jax.random.split(state["rng"])
        trainable, frozen = _split(state["params"], trainable_mask)

        def objective(tr):
            params = _join(tr, jax.lax.stop_gradient(frozen))
            zimg, ztxt, out = forward(params, batch, step_rng, label_states)
            return loss(loss_inputs(zimg, ztxt, out, batch)), out

        (value, out), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
        grads = _join(grads, zeros)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
        # A non-finite loss or gradient never reaches the state: the update is dropped (params and
        # optimizer state stay as they were) and the step reports it; the loop stops or counts it.
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "rng": rng}
        m = {"train/loss": value, "train/grad_norm": grad_norm, "train/t": out["t"],
             "train/nonfinite": 1.0 - finite.astype(jnp.float32)}
        if "b" in out:
            m["train/b"] = out["b"]
        return new_state, m

    return step_fn


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
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh, devices=devices)
        self.spec = factory.spec_from_config(config)
        self.tokenizer = factory.build_tokenizer(self.spec)
        self.model = factory.build_model(self.spec)
        self.rules = list(config.get("sharding_rules", [(".*", "replicate")]))
        # The data sources are opened (manifests parsed, TFDS datasets found) before anything is
        # written: a bad source is refused with the workdir untouched.
        from vljax.data import sources
        opened = [sources.get_source(entry, data_dir=config.input.get("data_dir")) for entry in config.input.data]

        params = factory.abstract_params(self.model, self.spec)
        self.tx, self.lr_fn, self.trainable_mask = optim.make_optimizer(config, params)
        check_loss(config, self.trainable_mask, opened)
        self.label_text = label_prompts(config, self.tokenizer, opened)
        self.label_blocks = (locked_text_blocks(self.spec, self.trainable_mask)
                             if self.label_text is not None else 0)
        init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
        self._init_params, self._init_opt = make_init_fns(self.model, self.tx, config)
        abstract = {"params": params, "opt_state": jax.eval_shape(self._init_opt, params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda r: r, train_rng)}
        self.state_sh = sharding.state_shardings(abstract, self.mesh, self.rules)
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
        self._evaluators = self._embedder = None

    def initial_state(self, init_rng, train_rng):
        return init_state(self._init_params, self._init_opt, self.state_sh, self.config.get("model_init"),
                          init_rng, train_rng)

    # -- input ---------------------------------------------------------------------------------
    def make_input(self, stage: stages.Stage | None = None):
        """The training iterator (of `stage`: its image size, text length and own stream); with
        `config.lit_cache` it reads the locked trunk's stored features (written once under
        <workdir>/features/ with the current sharded params) instead of images."""
        from vljax.data import pipeline
        stage = stage or stages.parse(self.config)[0]
        stores = None
        if self.config.get("lit_cache", False):
            from vljax import features
            stores = features.training_stores(self.config, self.model, self.state["params"],
                                              _flat(self.trainable_mask), self.mesh, self.workdir)
        inp, tokenizer = self.config.input, self.tokenizer
        if stage.image_size != inp.image_size:
            inp = inp.copy_and_resolve_references()
            inp.image_size = stage.image_size
        if stage.max_len != self.spec["tokenizer"]["max_len"]:
            tokenizer = factory.build_tokenizer({"tokenizer": {**self.spec["tokenizer"], "max_len": stage.max_len}})
        seed = self.config.seed + 1_000_003 * stage.index  # stage 0: the unstaged stream
        return pipeline.make_train_iterator(inp, tokenizer, seed=seed, features=stores)

    def stage_model(self, stage: stages.Stage) -> TwoTowers:
        """The model as the stage trains it (its patch dropout); the same parameters."""
        if stage.patch_dropout is None:
            return self.model
        return self.model.clone(image={**(self.model.image or {}), "patch_dropout": stage.patch_dropout})

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
                feature_store=store, progress=False)  # inside training: one line per round
            return self._embedder
        return self._embedder.with_params(params)

    def label_states(self, model=None):
        """The label prompts' states after the text tower's locked lowest blocks
        (`self.label_blocks` of them, `locked_text_blocks`), replicated: computed once from the
        current (locked, so final) parameters and fed to every step."""
        model = self.model if model is None else model
        fn = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(self.label_text),
                                           self.label_blocks, method=TwoTowers.text_lower),
                     out_shardings=NamedSharding(self.mesh, P()))
        states = fn(self.state["params"])
        logs.info("label prompts: %d locked text blocks run once for the %d prompts, not in every step",
                  self.label_blocks, len(self.label_text))
        return states

    def _image_trunk_locked(self) -> bool:
        """Every image-tower parameter outside its head is locked (LiT) and lit_cache is on."""
        return (bool(self.config.get("lit_cache", False))
                and features.image_trunk_locked(_flat(self.trainable_mask)))

    def evaluate(self, step: int, params=None) -> dict:
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
        loss = make_loss(config, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        schedule = stages.parse(config)

        def enter(stage, data_state=None):
            """The stage's input stream (restored to `data_state` when it is this stage's) and step."""
            it = self.make_input(stage)
            if data_state is not None and data_state.get("stage", 0) == stage.index:
                it.set_state(data_state["iterator"])
            model = self.stage_model(stage)
            step_fn = make_train_step(model, self.tx, loss, self.trainable_mask,
                                      self.label_text, self.label_blocks)
            if not self.label_blocks:
                fn = jax.jit(step_fn, in_shardings=(self.state_sh, batch_sh),
                             out_shardings=(self.state_sh, None), donate_argnums=(0,))
                return stage, it, fn
            states = self.label_states(model)
            fn = jax.jit(step_fn, in_shardings=(self.state_sh, batch_sh, states.sharding),
                         out_shardings=(self.state_sh, None), donate_argnums=(0,))
            return stage, it, lambda state, batch: fn(state, batch, states)

        stage, data_iter, train_step = enter(stages.at(schedule, start), self.data_state)
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
        guard_nonfinite = _NonFiniteGuard(config.get("nonfinite", "stop"))
        acc, t_last, s_last = [], time.perf_counter(), start
        step, in_flight, prev = start, None, None
        try:
            with jax.set_mesh(mesh):
                while step < total:
                    if step >= stage.until:  # the next stage: its input and its compiled step
                        skipped = data_iter.skipped
                        stage, data_iter, train_step = enter(stages.at(schedule, step))
                        data_iter.skipped = dict(skipped)
                        logs.info("stage %d from step %d: image size %d, text length %d, patch dropout %s",
                                  stage.index, step, stage.image_size, stage.max_len, stage.patch_dropout)
                    batch = next(data_iter)
                    skipped = {k: v for k, v in batch.items() if k.startswith("skipped/")}
                    batch = {k: v for k, v in batch.items() if not k.startswith("skipped/")}
                    self.state, m = train_step(self.state, sharding.shard_batch(batch, mesh))
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
        except NonFiniteError as e:
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


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm (config.nonfinite="stop")."""

    def __init__(self, message, step, loss, grad_norm):
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class _NonFiniteGuard:
    """`config.nonfinite`: "stop" (default) ends the run at the first non-finite step with a
    message naming it and the last finite values; the step dropped its update, so the state is
    the last good one and no checkpoint of it is written (the kept ones stay). "skip" drops such
    updates and goes on; `train/nonfinite` (the fraction of dropped steps) is logged either way."""

    def __init__(self, mode: str):
        if mode not in ("stop", "skip"):
            raise ValueError(f"config key `nonfinite`: {mode!r} is not 'stop' or 'skip'")
        self.mode, self.last_good = mode, None

    def check(self, m, step: int) -> None:
        if m is None or self.mode == "skip":
            return
        loss, grad_norm, bad = (float(m[k]) for k in ("train/loss", "train/grad_norm", "train/nonfinite"))
        if not bad:
            self.last_good = (step, loss, grad_norm)
            return
        last = ("no finite step before it" if self.last_good is None else
                "last finite step {}: loss {:.4g}, grad norm {:.4g}".format(*self.last_good))
        raise NonFiniteError(f"non-finite training at step {step}: loss {loss}, grad norm {grad_norm} "
                             f"({last}). The update was dropped and no checkpoint was written; lower "
                             "`lr`, set `grad_clip_norm`, or `nonfinite='skip'` to drop such steps and go on.",
                             step, loss, grad_norm)


class _Selector:
    """Model selection on a held-out metric (`config.select_metric`, e.g. a val-split retrieval R@1):
    the best evaluation's params go to WORKDIR/best (orbax), its metrics to the final `best/...`
    row; with `early_stop_patience` > 0 training stops after that many evaluations without gain."""

    def __init__(self, workdir, metric, patience):
        self.metric, self.patience = metric, int(patience or 0)
        self.path = epath.Path(workdir) / "best.json"
        self.best = {}
        if metric and self.path.exists():
            self.best = json.loads(self.path.read_text())
        self.bad_evals = self.best.get("bad_evals", 0)
        self.stopped = False
        self._ckpt = checkpoints.Checkpointer(epath.Path(workdir) / "best", max_to_keep=1) if metric else None

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
            self.path.write_text(json.dumps(self.best, indent=1))
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
    trainer = Trainer(config, workdir, write_config=False, require_checkpoint=True)
    latest = trainer.start_step
    results = trainer.evaluate(latest)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(latest, results)
    writer.close()
    for k, v in sorted(results.items()):
        logging.info("%s = %.4f", k, v)
    return results
