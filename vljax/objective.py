"""The training objective: the one place a configured loss (`config.loss`) is resolved.

A loss is registered once, by name, with the inputs it takes (`register`); everything the rest of
vljax asks about the configured loss is answered here, from that entry:

  * `spec(loss_cfg)`         the `Loss` with the inputs its options choose and its regularisers;
  * `make_loss(config, mesh)` the scalar loss of the step, under one `jax.shard_map`;
  * `make_parts(config, mesh)` the loss's declared terms, logged beside it (`train/<part>`);
  * `loss_inputs(...)`       every value a loss may take, by name (model outputs, batch fields);
  * `option_keys(name)`      the config keys `loss.<key>` it accepts (vljax.config_check);
  * `check(config, ...)`     refuses a recipe that cannot give the loss its inputs (vljax.train);
  * `label_prompts(...)`     the label prompts a multi-label loss embeds (vljax.train);
  * `needs_tokens(loss_cfg)` whether stored LiT features must keep the trunk's tokens (vljax.features);
  * `inference_spec(loss_cfg)` how a model trained on it scores (`logits`, `similarity`; vljax.factory).

An in-tree loss that takes existing inputs is one entry of its family module's `LOSSES` (vljax.losses,
registered here); from outside vljax (a test's module included) it is one `register(...)` call. A
loss with a new kind of input also adds it to `loss_inputs`.
Nothing outside this module compares a loss name to a string.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from vljax import label_shards, losses, sharding, slip
from vljax.data import sources
from vljax.losses.structure import CENTERINGS, WEIGHTINGS, structure_loss
from vljax.text import canonicalize_name

# Keys of config.loss that the regularisers take (`with_regularisers`), beside the loss's own;
# REGULARISER_KEYS adds the added multi-label loss's prompt, which `label_prompts` reads.
_REGULARISER_OPTIONS = ("align_weight", "uniform_weight", "multilabel_weight", "multilabel_kind",
                        "structure_weight", "structure_sides", "structure_levels", "structure_temperature",
                        "structure_weighting", "structure_margin", "structure_centering", "structure_warmup")
# STRUCTURE's sides: the aligned embedding and the frozen features whose geometry it keeps.
_STRUCTURE_SIDES = {"image": ("zimg", "frozen/img_features"), "text": ("ztxt", "frozen/txt_features")}
REGULARISER_KEYS = (*_REGULARISER_OPTIONS, "multilabel_template")
# Loss arguments that are arrays the trainer passes (not config options), besides the ones
# without a default.
LOSS_ARRAYS = frozenset({"axis_name", "labels", "img_mask", "txt_mask", "label_mask", "patches"})
_DEFAULT_TEMPLATE = "a photo of a {}."


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss function and the inputs it takes, positionally, by name.

    Names are the model's outputs (`zimg`, `ztxt`, `t`, `b`, and every `img/<k>` / `txt/<k>` of
    the towers' out dicts: `img/tokens`, `img/tokens_proj`, `img/patches_proj`, `txt/mask`, ...), `frozen/zimg` /
    `frozen/ztxt` (the embeddings with their gradient stopped), `frozen/img_features` /
    `frozen/txt_features` (the towers' pre_logits with their gradient stopped; with stored LiT
    features, those features), `labels/ztxt` (the label prompts' embeddings, `label_prompts`),
    `sub/ztxt` (each image's sub-captions' embeddings [B, K, D], config.input.subcaptions), `step`
    (the optimizer step, an int32 scalar) and `batch/<field>` (a field of the input batch, e.g.
    `batch/label` with `config.input.label=True`).
    `make_loss` looks the names up, splits batched inputs over the mesh's batch axes and runs
    `fn(*inputs, axis_name=..., **options)` under one `jax.shard_map`.
    `chosen(options) -> names` appends the inputs that the loss's options choose (multi_positive's
    `positives`); `bind(config.loss)` gives the loss with them. `config_keys` are keys of
    config.loss that this module reads for the loss (its label prompt) and `fn` does not take.
    `logits` / `similarity` are how a model trained on it scores at inference (vljax.factory).
    `parts` = {name: (fn, inputs)}: terms of the loss logged beside it as `train/<name>`
    (`make_parts`; e.g. sigmoid_caption's caption term), each `fn(*inputs, axis_name=...)`; or
    `parts(options) -> {name: (fn, inputs)}`, the terms its options (config.loss) turn on
    (dreamlip's grouping loss with `loss.sgl_weight` > 0).
    """
    fn: Callable
    inputs: tuple[str, ...]
    chosen: Callable | None = None
    config_keys: tuple[str, ...] = ()
    logits: str = "softmax"
    similarity: str = "global"
    parts: dict | Callable = dataclasses.field(default_factory=dict)

    def bind(self, options) -> Loss:
        """The loss with the inputs its options (config.loss) choose; checks those options."""
        if self.chosen is None:
            return self
        return dataclasses.replace(self, inputs=self.inputs + self.chosen(options), chosen=None)


LOSSES: dict[str, Loss] = {}


def register(name: str, fn: Callable, inputs, *, chosen: Callable | None = None, config_keys=(),
             logits: str = "softmax", similarity: str = "global", parts=None,
             replace: bool = False) -> Loss:
    """Makes `fn` the loss `config.loss.name = name`, taking `inputs` (names, see `Loss`) first,
    then `axis_name=` and its options from config.loss. Returns the entry. A name already taken
    is refused unless `replace`."""
    if name in LOSSES and not replace:
        raise ValueError(f"loss {name!r} is already registered (to {LOSSES[name].fn.__qualname__}); "
                         "pass replace=True to override it")
    if logits not in ("softmax", "sigmoid") or similarity not in ("global", "filip"):
        raise ValueError(f"loss {name!r}: logits must be 'softmax' or 'sigmoid' and similarity "
                         f"'global' or 'filip', got {logits!r}, {similarity!r}")
    if not callable(parts):
        parts = {k: (f, tuple(names)) for k, (f, names) in (parts or {}).items()}
    LOSSES[name] = Loss(fn, tuple(inputs), chosen, tuple(config_keys), logits, similarity, parts)
    return LOSSES[name]


def _register_builtins(declared) -> None:
    """Registers every loss that a module of vljax.losses declares (`losses.DECLARED`: module ->
    {name: register's keywords}); a bad declaration or a name declared twice raises, naming the
    module (a declaration cannot pass `replace`: one family cannot override another's loss)."""
    for module, entries in declared.items():
        for name, entry in entries.items():
            try:
                register(name, **entry, replace=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{module}.LOSSES[{name!r}]: {e}") from e


_register_builtins(losses.DECLARED)


# ----------------------------------------------------------------------------------------------
# Resolving config.loss
# ----------------------------------------------------------------------------------------------


def resolve(name) -> Loss:
    """The registered loss `name`; ValueError naming `loss.name` for an unknown one."""
    if name not in LOSSES:
        raise ValueError(f"config key `loss.name`: unknown loss {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name]


def option_keys(name) -> set[str] | None:
    """The keys config.loss may hold for loss `name`: `name`, its function's keyword options (less
    the arrays the trainer passes), its `config_keys` and the regularisers'; None when the
    function takes **kwargs (anything goes)."""
    loss = resolve(name)
    params = inspect.signature(loss.fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    options = {p.name for p in params if p.default is not p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - LOSS_ARRAYS
    return options | {"name", *loss.config_keys, *REGULARISER_KEYS}


def _options(loss_cfg, loss: Loss) -> dict:
    """The config.loss entries that go to the loss function as keywords."""
    skip = {"name", *loss.config_keys, *REGULARISER_KEYS}
    return {k: v for k, v in loss_cfg.items() if k not in skip}


def with_regularisers(loss: Loss, align_weight=0.0, uniform_weight=0.0, multilabel_weight=0.0,
                      multilabel_kind="bce", structure_weight=0.0, structure_sides="image",
                      structure_levels=1, structure_temperature=0.05, structure_weighting="none",
                      structure_margin=0.0, structure_centering="mean", structure_warmup=1000) -> Loss:
    """`loss` plus
      align_weight * alignment_loss(zimg, ztxt) + uniform_weight * (uniformity_loss(zimg) +
      uniformity_loss(ztxt)) / 2 (Wang & Isola 2020 as regularisers), and
      multilabel_weight * multilabel_loss(zimg, labels/ztxt, t, b, batch/labels, kind=multilabel_kind)
      (the multi-label loss on the batch's tag sets added to a contrastive loss on its captions;
      its label prompts are `label_prompts`'), and
      structure_weight * min(1, step / structure_warmup) * mean over `structure_sides` ("image",
      "text" or "both") of structure_loss(z, frozen features, levels=structure_levels, ...)
      (STRUCTURE, vljax/losses/structure.py, the authors' code's form and defaults: the frozen
      encoder's neighbourhood geometry kept in the joint space; the image side's frozen features
      are LiT's stored features; `step` the optimizer step, 0 at the first; warmup 0: no ramp),
    from config `loss.align_weight`, ... Unchanged when every weight is 0."""
    if not align_weight and not uniform_weight and not multilabel_weight and not structure_weight:
        return loss
    k = len(loss.inputs)
    extra = ("zimg", "ztxt") if align_weight or uniform_weight else ()
    if multilabel_weight:
        if multilabel_kind not in losses.MULTILABEL:
            raise ValueError(f"config key `loss.multilabel_kind`: {multilabel_kind!r} is not one of "
                             f"{sorted(losses.MULTILABEL)}")
        extra += ("zimg", "labels/ztxt", "t", "b", "batch/labels")
    if structure_weight:
        structure, structure_inputs = structure_term(
            structure_sides, levels=structure_levels, temperature=structure_temperature,
            weighting=structure_weighting, margin=structure_margin, centering=structure_centering)
        warmup = _structure_warmup(structure_warmup)
        extra += structure_inputs + (("step",) if warmup else ())

    def fn(*args, axis_name=None, **kwargs):
        named, rest = args[:k], list(args[k:])
        value = loss.fn(*named, axis_name=axis_name, **kwargs)
        if align_weight or uniform_weight:
            zimg, ztxt = rest[:2]
            rest = rest[2:]
            if align_weight:
                value = value + align_weight * losses.alignment_loss(zimg, ztxt, axis_name)
            if uniform_weight:
                value = value + uniform_weight * (losses.uniformity_loss(zimg, axis_name)
                                                  + losses.uniformity_loss(ztxt, axis_name)) / 2
        if multilabel_weight:
            value = value + multilabel_weight * losses.multilabel_loss(*rest[:5], axis_name=axis_name,
                                                                       kind=multilabel_kind)
            rest = rest[5:]
        if structure_weight:
            pairs = rest[:len(structure_inputs)]
            weight = structure_weight
            if warmup:  # the code's CLIPLoss.step(): lambda * min(1, step / warmup)
                weight = structure_weight * structure_ramp(rest[len(structure_inputs)], warmup)
            value = value + weight * structure(*pairs, axis_name=axis_name)
        return value

    return dataclasses.replace(loss, fn=fn, inputs=loss.inputs + extra, chosen=None)


def structure_term(sides, *, levels, temperature, weighting, margin, centering):
    """(term(*inputs, axis_name=None) -> the mean over `sides` (`loss.structure_sides`) of
    STRUCTURE's structure_loss(z, frozen features, levels=..., ...), inputs); the options are
    checked here, a bad one named by its config key `loss.structure_<option>`."""
    sides = structure_sides_of(sides)
    options = dict(levels=levels, temperature=temperature, weighting=weighting, margin=margin,
                   centering=centering)
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"config key `loss.structure_levels`: {levels!r} is not an int >= 1 (the scales: "
                         f"powers of the similarity distributions; the code's configs use 1, 2, 3, 5)")
    for key, v, ok, what in (("temperature", temperature, lambda x: x > 0, "> 0"),
                             ("margin", margin, lambda x: x >= 0, ">= 0")):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not ok(v):
            raise ValueError(f"config key `loss.structure_{key}`: {v!r} is not a number {what}")
    for key, known in (("weighting", WEIGHTINGS), ("centering", CENTERINGS)):
        if options[key] not in known:
            raise ValueError(f"config key `loss.structure_{key}`: {options[key]!r} is not one of {list(known)}")
    inputs = tuple(k for side in sides for k in _STRUCTURE_SIDES[side])

    def term(*pairs, axis_name=None):
        return sum(structure_loss(pairs[2 * i], pairs[2 * i + 1], axis_name, **options)
                   for i in range(len(sides))) / len(sides)

    return term, inputs


_STRUCTURE_LOSS_OPTIONS = ("levels", "temperature", "weighting", "margin", "centering")


def _structure_config(loss_cfg) -> dict:
    """config.loss's `structure_*` keys over `with_regularisers`' defaults, by option (`levels`, ...)."""
    params = inspect.signature(with_regularisers).parameters
    return {k[len("structure_"):]: loss_cfg.get(k, p.default) for k, p in params.items()
            if k.startswith("structure_")}


def _structure_warmup(warmup) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"config key `loss.structure_warmup`: {warmup!r} is not an int >= 0 (optimizer "
                         f"steps over which the weight ramps up from 0; 0: no ramp)")
    return int(warmup)


def structure_ramp(step, warmup):
    """The code's lambda schedule (CLIPLoss.step): min(1, step / warmup), step the optimizer step."""
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)


def with_ssl(loss: Loss, opts) -> Loss:
    """`loss` + opts["scale"] * SimCLR's NT-Xent of the SLIP views (`slip.term`: inputs `ssl/z1`,
    `ssl/z2`, the SimCLR head's outputs); unchanged when `opts` (`slip.options`) is None."""
    if opts is None:
        return loss
    k, (term, extra), scale = len(loss.inputs), slip.term(opts), float(opts["scale"])

    def fn(*args, axis_name=None, **kwargs):
        return (loss.fn(*args[:k], axis_name=axis_name, **kwargs)
                + scale * term(*args[k:], axis_name=axis_name))

    return dataclasses.replace(loss, fn=fn, inputs=loss.inputs + extra, chosen=None)


def structure_sides_of(sides) -> tuple[str, ...]:
    """`loss.structure_sides` ("image", "text" or "both") -> the sides STRUCTURE regularises."""
    if sides == "both":
        return tuple(_STRUCTURE_SIDES)
    if sides not in _STRUCTURE_SIDES:
        raise ValueError(f"config key `loss.structure_sides`: {sides!r} is not 'image', 'text' or 'both'")
    return (sides,)


def spec(loss_cfg) -> Loss:
    """The configured loss (config.loss) with the inputs its options choose and its regularisers
    (`REGULARISER_KEYS`); ValueError naming the key of an unknown name or a bad option."""
    reg = {k: loss_cfg[k] for k in _REGULARISER_OPTIONS if k in loss_cfg}
    return with_regularisers(resolve(loss_cfg.get("name")).bind(loss_cfg), **reg)


def needs_tokens(loss_cfg) -> bool:
    """Whether the configured loss takes the image tower's token outputs (`img/...`: FILIP's
    `img/tokens_proj`, DreamLIP's grouping `img/patches_proj`), so that stored LiT features must
    keep the trunk's tokens."""
    return any(k.startswith("img/") for k in spec(loss_cfg).inputs)


def inference_spec(loss_cfg) -> dict:
    """How a model trained on the configured loss scores at inference, the model spec's fields:
    {"logits": "softmax" | "sigmoid", "similarity": "global" | "filip"}."""
    loss = resolve(loss_cfg.get("name"))
    return {"logits": loss.logits, "similarity": loss.similarity}


# ----------------------------------------------------------------------------------------------
# What the recipe must give the loss
# ----------------------------------------------------------------------------------------------


def check(config, trainable_mask, opened=()) -> None:
    """Refuses, before any work, a loss whose inputs this recipe cannot give: CWCL weights from a
    tower that is trained (the paper transfers the structure of a frozen pre-trained modality), and
    batch labels / label sets that the input does not read (`input.label` / `input.labels`) or a
    source among the `opened` ones does not have (`sources.missing_labels`), a logit bias the
    model lacks and a caption decoder's outputs (`dec/...`) without `model.decoder`."""
    loss = spec(config.loss)
    name = config.loss.name
    if config.loss.get("multilabel_weight"):
        name = f"{name} + multilabel_weight"
    for field in ("label", "labels"):
        if f"batch/{field}" not in loss.inputs:
            continue
        what = {"label": "class labels", "labels": "label sets"}[field]
        if not config.input.get(field, False):
            why = (f" (`loss.positives`={config.loss.get('positives', 'labels')!r})"
                   if resolve(config.loss.name).chosen is not None else "")
            raise ValueError(f"config key `input.{field}`: loss {name!r}{why} takes the batch's {what}; "
                             f"set `input.{field}=True` (and give each source its {what})")
        for i, source in enumerate(opened):
            why = sources.missing_labels(source, field)
            if why:
                raise ValueError(f"config key `input.data[{i}].{why}: loss {name!r} takes {what}, but "
                                 f"{source!r} has none; every record would be unlabeled")
    if any(k.startswith("dec/") for k in loss.inputs) and not config.model.get("decoder"):
        raise ValueError(f"config key `model.decoder`: loss {name!r} takes the caption decoder's "
                         "logits, and this model has no decoder; set model.decoder (e.g. "
                         "dict(variant='B', depth=6, vocab_size=..., pad_id=...): "
                         "vljax/models/decoder.py)")
    slip.check(config, trainable_mask)
    if "sub/ztxt" in loss.inputs and not config.input.get("subcaptions"):
        raise ValueError(f"config key `input.subcaptions`: loss {name!r} takes the embeddings of each image's "
                         "sub-captions; set input.subcaptions = dict(num=6) (vljax/data/subcaptions.py)")
    if "b" in loss.inputs and config.model.get("bias_init") is None:
        raise ValueError(f"config key `model.bias_init`: loss {name!r} takes the model's logit bias b, "
                         "which this model does not have; set it (e.g. -10.0, SigLIP's)")
    if any(k.startswith("teacher/") for k in loss.inputs) and not config.get("distill"):
        raise ValueError(f"config key `distill`: loss {name!r} takes a teacher's stored embeddings "
                         "(teacher/zimg, teacher/ztxt, teacher/t); set config.distill = dict(teacher="
                         "<a checkpoint vljax.factory.load reads>)")
    flat = traverse_util.flatten_dict(trainable_mask, sep="/")

    def trained_trunk(tower):
        return sorted(k for k, v in flat.items()
                      if v and k.startswith(f"{tower}/") and not k.startswith(f"{tower}/head/"))
    if config.loss.get("structure_weight"):
        for side in structure_sides_of(config.loss.get("structure_sides", "image")):
            tower = {"image": "img", "text": "txt"}[side]
            trained = trained_trunk(tower)
            if trained:
                raise ValueError(f"config key `loss.structure_sides`: STRUCTURE keeps the geometry of the "
                                 f"FROZEN {side} encoder's features, but `schedule` trains {trained[0]} (and "
                                 f"{len(trained) - 1} more); lock that tower's trunk (e.g. "
                                 f"('{tower}/(?!head/).*', None)) or leave the {side} side out")
    if "frozen/img_features" in resolve(config.loss.name).bind(config.loss).inputs:  # CWCL's own input
        tower = {"image": "img", "text": "txt"}[config.loss.get("ref_modality", "image")]
        trained = trained_trunk(tower)
        if trained:
            raise ValueError(f"config key `loss.ref_modality`: CWCL takes its weights from the frozen "
                             f"{tower!r} tower's features, but `schedule` trains {trained[0]} (and "
                             f"{len(trained) - 1} more); lock that tower's trunk (e.g. ('{tower}/(?!head/).*', None))")


def label_prompts(config, tokenizer, opened) -> np.ndarray | None:
    """[K, L] token ids of the label prompt (`loss.template` for a loss that takes the prompts
    itself, `loss.multilabel_template` when the multi-label loss is added to another; default
    "a photo of a {}.") filled with each name of the batches' label space (`sources.label_space`:
    the sorted union of the `opened` sources' label names, the columns of batch["labels"]), for a
    loss that takes "labels/ztxt"; None otherwise."""
    loss = resolve(config.loss.get("name"))
    if "labels/ztxt" not in spec(config.loss).inputs:
        return None
    key = "template" if "template" in loss.config_keys else "multilabel_template"
    template = config.loss.get(key) or _DEFAULT_TEMPLATE
    if "{}" not in template:
        raise ValueError(f"config key `loss.{key}`: {template!r} has no '{{}}' for the label name")
    names = sources.label_space(opened)
    # Each name written as the multi-label evaluator writes it.
    return np.asarray(tokenizer([template.format(canonicalize_name(n)) for n in names]), np.int32)


# ----------------------------------------------------------------------------------------------
# The loss in the step
# ----------------------------------------------------------------------------------------------


def loss_inputs(zimg, ztxt, out, batch, step=None) -> dict:
    """Everything a loss may take, by name (see `Loss`). Float inputs go to float32: losses run in
    float32 whatever the towers' compute dtype (bf16 logits lose the ranking). `step` (int32 [],
    the optimizer step, 0 at the first update; vljax/step.py) is the input `step` (STRUCTURE's
    warmup)."""
    img_features = batch["image_features"] if "image_features" in batch else out.get("img/pre_logits")
    values = {"zimg": zimg, "ztxt": ztxt, **out, "step": step,
              "frozen/zimg": jax.lax.stop_gradient(zimg), "frozen/ztxt": jax.lax.stop_gradient(ztxt),
              **{f"batch/{k}": v for k, v in batch.items()}}
    for k, v in (("frozen/img_features", img_features), ("frozen/txt_features", out.get("txt/pre_logits")),
                 ("teacher/zimg", batch.get("teacher_zimg")), ("teacher/ztxt", batch.get("teacher_ztxt"))):
        if v is not None:
            values[k] = jax.lax.stop_gradient(v)
    if "teacher_t" in batch:  # [B], the same in every row: the teacher's logit scale
        values["teacher/t"] = jax.lax.stop_gradient(batch["teacher_t"][0])
    def f32(v):
        return v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
    # tree.map: a NaFlex batch's "image" is a dict {"patches", "mask", "shapes"}.
    return {k: jax.tree.map(f32, v) for k, v in values.items() if v is not None}


def make_loss(config, mesh):
    """Returns loss(values) -> scalar: the configured loss (`spec(config.loss)`) on the inputs it
    declares, looked up in `values` (`loss_inputs`), under one shard_map over the batch axes.
    With `loss.label_axis` (vljax/label_shards.py) the label space is split over that axis:
    `labels/...` rows over it, `batch/labels` padded to the prompts' rows and its columns split
    alike, the loss given `label_mask` (False on padding) and its rows split over the other batch
    axes (`axis_name`)."""
    name = config.loss.get("name")
    loss = with_ssl(spec(config.loss), slip.options(config))
    kwargs = _options(config.loss, resolve(name))
    split = label_shards.axis(config)
    rows, spec_of = label_shards.layout(sharding.batch_axes(mesh), split)
    axis = rows[0] if len(rows) == 1 else (rows if rows or split is None else None)

    def fn(values):
        missing = [k for k in loss.inputs if k not in values]
        if missing:
            hint = "".join(f" (set `input.{k[6:]}=True` and give the data its labels)"
                           for k in missing if k in ("batch/label", "batch/labels"))
            raise ValueError(f"config key `loss.name`: loss {name!r} takes {', '.join(missing)}, which this "
                             f"model and batch do not provide{hint}; available: {', '.join(sorted(values))}")
        if split is not None:  # the label space padded to the prompts' rows (label_shards.place)
            values = dict(values)
            values["batch/labels"], mask = label_shards.padded_labels(values["batch/labels"],
                                                                      values["labels/ztxt"].shape[0])
        args = [values[k] for k in loss.inputs]
        # Scalars and `labels/...` (one row per label, not per example) are the same on every
        # device, or split over the label axis.
        specs = tuple(spec_of(k, a) for k, a in zip(loss.inputs, args))
        if split is None:
            local = lambda *a: loss.fn(*a, axis_name=axis, **kwargs)  # noqa: E731
        else:
            args, specs = [*args, mask], (*specs, P(split))
            local = lambda *a: loss.fn(*a[:-1], axis_name=axis, label_mask=a[-1], **kwargs)  # noqa: E731
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return fn


def make_parts(config, mesh):
    """Returns parts(values) -> {name: scalar}: the configured loss's declared terms (`Loss.parts`),
    for logging only (inputs with their gradient stopped), each under its own shard_map like the
    loss; {} for a loss without parts."""
    declared = resolve(config.loss.get("name")).parts
    parts = {k: (f, tuple(names)) for k, (f, names) in
             (declared(config.loss) if callable(declared) else declared).items()}
    if (ssl := slip.options(config)) is not None:  # SLIP's NT-Xent, unscaled
        parts["ssl"] = slip.term(ssl)
    st = _structure_config(config.loss)
    if st["weight"]:  # STRUCTURE's term before its weight, and the weight (the code logs both)
        parts["structure"] = structure_term(st["sides"], **{k: st[k] for k in _STRUCTURE_LOSS_OPTIONS})
        if _structure_warmup(st["warmup"]):
            parts["structure_lambda"] = (
                lambda step, axis_name=None: st["weight"] * structure_ramp(step, st["warmup"]), ("step",))
    axes = sharding.batch_axes(mesh)
    axis = axes[0] if len(axes) == 1 else axes

    def fn(values):
        out = {}
        for name, (part, inputs) in parts.items():
            args = [jax.lax.stop_gradient(values[k]) for k in inputs]
            specs = tuple(P() if np.ndim(a) == 0 or k.startswith("labels/") else P(axes)
                          for k, a in zip(inputs, args))
            local = lambda *a, f=part: f(*a, axis_name=axis)  # noqa: E731
            out[name] = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)
        return out

    return fn
