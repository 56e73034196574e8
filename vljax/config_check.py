"""Checks a training config before anything heavy runs or is written: every key of every nested
dict is known, required keys are there, values have the right types; errors name the full key.

ml_collections already refuses command-line overrides of keys the config file does not define and
overrides of the wrong type; this module catches what the config file itself gets wrong: a typo
such as `loss.temprature` would otherwise be ignored or fail deep inside a trace.

The known keys come from what consumes them, read at run time so that new options need no edit
here: `model` from `TwoTowers`' fields, `model.image` / `model.text` from the tower class named by
`image_model` / `text_model` in vljax.models.MODELS (flax modules are dataclasses), `tokenizer`
from the tokenizer class, `loss` from vljax.objective (the registered loss function's signature,
less the arrays and `axis_name` the trainer passes), `optax` from the optimizer builder in
vljax.optim.OPTIMIZERS, `schedule` entries from `optim.make_schedule`, `input.data[i]` from the
source class of its kind (its declared keys), `evals.<name>` from the evaluator class's constructor and its data
loader. Only keys that no signature gives are listed here (`input`, `input.augment`, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
import os

from ml_collections import ConfigDict, FrozenConfigDict

from vljax import (acid, catlip, init_from, label_shards, mixing, momentum, objective, pretrained, slip, stages,
                   teacher)
from vljax.data import sources, text_aug
from vljax.data.prefix import check as check_data_prefix
from vljax.evaluators import EVALUATORS
from vljax.evaluators import data as eval_data
from vljax.losses import dcd
from vljax.models import MODELS, TwoTowers, text_adapter
from vljax.optim import OPTIMIZERS, make_schedule
from vljax.tokenizers import TOKENIZERS

# key -> (required, allowed types)
_TOP = {
    "seed": (True, (int,)),
    "total_steps": (True, (int,)),
    "log_every": (False, (int,)),
    "eval_every": (False, (int,)),
    "ckpt_every": (False, (int,)),
    "keep_ckpts": (False, (int,)),
    "mesh": (True, (list, tuple)),
    "sharding_rules": (False, (list, tuple)),
    "input": (True, (dict,)),
    "tokenizer": (True, (dict,)),
    "model": (True, (dict,)),
    "model_init": (False, (dict, type(None))),
    "loss": (True, (dict,)),
    "optax": (True, (dict,)),
    "lr": (True, (numbers.Real,)),
    "wd": (False, (numbers.Real, type(None))),
    "schedule": (True, (list, tuple, dict, type(None))),
    "grad_clip_norm": (False, (numbers.Real, type(None))),
    "grad_accum_steps": (False, (int,)),
    "total_steps_eval": (False, (int,)),
    "lit_cache": (False, (bool,)),
    "text_cache": (False, (bool,)),
    "text_cache_gb": (False, (numbers.Real,)),
    "evals": (False, (dict, type(None))),
    "select_metric": (False, (str, type(None))),
    "early_stop_patience": (False, (int,)),
    "eval_batch_size": (False, (int,)),
    "dtype": (False, (str,)),
    "remat": (False, (bool,)),
    "plot": (False, (bool,)),
    "progress": (False, (bool,)),
    "nonfinite": (False, (str,)),
    "stages": (False, (list, tuple, type(None))),
    "self_distill": (False, (dict, type(None))),  # vljax/teacher.py
    "ssl": (False, (dict, type(None))),  # SLIP, vljax/slip.py
    "catlip": (False, (dict, type(None))),  # CatLIP, vljax/catlip.py
    "distill": (False, (dict, type(None))),  # vljax/teacher_features.py
    "acid": (False, (dict, type(None))),  # vljax/acid.py
    "queue": (False, (dict, type(None))),  # vljax/momentum.py
    "mixing": (False, (dict, type(None))),  # vljax/mixing.py
    "init_from": (False, (str, type(None))),  # vljax/init_from.py
    "init_from_tokenizer": (False, (str, type(None))),
}
# config.input is read key by key (vljax/data/pipeline.py's docstring lists them).
_INPUT = {
    "data": (True, (list, tuple)),
    "batch_size": (True, (int,)),
    "image_size": (True, (int,)),
    "value_range": (False, (str, list, tuple)),
    "augment": (False, (dict, type(None))),
    "num_workers": (False, (int,)),
    "read_threads": (False, (int,)),
    "eval_workers": (False, (int,)),
    "worker_buffer": (False, (int,)),
    "label": (False, (bool,)),
    "labels": (False, (bool,)),
    "hide_labels": (False, (dict, type(None))),  # partial labels (vljax/data/sources/wrappers.py)
    "keep_captions": (False, (bool,)),
    "shard_lanes": (False, (int, type(None))),
    "shard_window": (False, (int, type(None))),
    "data_dir": (False, (str, type(None))),
    # From an init_from checkpoint's spec (vljax/init_from.py): the NaFlex patch budget (the one
    # a user sets), and what init_from writes: SigLIP's squash resize, the NaFlex preprocessing.
    "max_num_patches": (False, (int, type(None))),
    "resize": (False, (str,)),
    "resample": (False, (str,)),
    "naflex": (False, (dict, type(None))),
    # Set by the trainer on a self-distillation stage's input (vljax/teacher.py `multi_crop`).
    "multi_crop": (False, (dict, type(None))),
    "text_aug": (False, (dict, type(None))),  # vljax/data/text_aug.py
    # DreamLIP's sub-captions (vljax/data/subcaptions.py `SubCaptions` kwargs: num, merged).
    "subcaptions": (False, (dict, type(None))),
    # LocCa's decoder tasks on the records' regions (vljax/data/locca.py `Locca` kwargs).
    "locca": (False, (dict, type(None))),
}
_AUGMENT = {
    "random_resized_crop": (False, (list, tuple, type(None))),
    "greyscale": (False, (numbers.Real, type(None))),
    "colour_jitter": (False, (numbers.Real, type(None))),
}
_MODEL = {"image_model": (True, (str,)), "text_model": (True, (str,)),
          "image": (True, (dict,)), "text": (True, (dict,))}
# Keys of config.optax that optim.py takes out before calling the optimizer builder.
_OPTAX_EXTRA = {"name", "weight_decay", "wd_mask", "scale_wd_by_lr"}
# Schedule-entry keys that optim.make_optimizer takes out before calling make_schedule.
_SCHEDULE_EXTRA = {"mult", "name"}
# Evaluator constructor arguments that eval_builder fills in (from the data, or the entry's name).
_EVAL_FILLED = {"self", "name", "images", "labels", "class_names", "captions", "train_images",
                "train_labels", "test_images", "test_labels"}


def _is_dict(value) -> bool:
    return isinstance(value, (dict, ConfigDict, FrozenConfigDict))


def _is(value, types):
    if dict in types and _is_dict(value):
        return True
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int in Python; a boolean is never a step count.
    return isinstance(value, tuple(t for t in types if t is not dict))


def _unknown(key: str, known) -> ValueError:
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, list(known), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return ValueError(f"config key `{key}`: unknown (known: {', '.join(sorted(known))}){hint}")


def _check_keys(cfg, known, prefix: str) -> None:
    """Every key of `cfg` is in `known`."""
    for key in cfg.keys():
        if key not in known:
            raise _unknown(prefix + key, known)


def _check(cfg, schema, prefix: str, known=None) -> None:
    """Types and required keys of `schema`, and no key outside `known` (default: the schema's)."""
    _check_keys(cfg, schema if known is None else known, prefix)
    for key, (required, types) in schema.items():
        if key not in cfg.keys():
            if required:
                raise ValueError(f"config key `{prefix}{key}` is missing")
            continue
        value = cfg[key]
        if not _is(value, types):
            names = "/".join("None" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"config key `{prefix}{key}` must be {names}, got {type(value).__name__}: {value!r}")


def _dict(value, key: str):
    if not _is_dict(value):
        raise ValueError(f"config key `{key}` must be a dict, got {type(value).__name__}: {value!r}")
    return value


def arguments(fn, drop=()) -> set[str] | None:
    """Names `fn` accepts as keywords, less `drop`; None when it takes **kwargs (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", *drop}


def module_fields(cls) -> set[str]:
    """A flax.linen module's configurable fields (it is a dataclass)."""
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


# ---------------------------------------------------------------------------------------------


def _optional(schema: dict, *keys) -> dict:
    return {k: (False, types) if k in keys else (req, types) for k, (req, types) in schema.items()}


def _input(cfg, required_size: bool = True) -> None:
    _check(cfg, _INPUT if required_size else _optional(_INPUT, "image_size"), "input.")
    if cfg.batch_size <= 0:
        raise ValueError(f"config key `input.batch_size` must be positive, got {cfg.batch_size}")
    if cfg.get("augment"):
        _check(cfg.augment, _AUGMENT, "input.augment.")
        grey = cfg.augment.get("greyscale") or 0.0
        if not 0.0 <= grey <= 1.0:
            raise ValueError(f"config key `input.augment.greyscale` is a probability, got {grey}")
    if cfg.get("text_aug") is not None:  # the caption augmentation (vljax/data/text_aug.py)
        opts = text_aug.options(cfg.text_aug)
        if opts["synonyms"]:  # the table read now: a bad file is refused before any work
            text_aug.read_synonyms(opts["synonyms"])
    for key in ("shard_lanes", "shard_window"):  # the shard order (vljax/data/shard_order.py)
        if cfg.get(key) is not None and cfg[key] <= 0:
            raise ValueError(f"config key `input.{key}` must be positive, got {cfg[key]}")
    if cfg.get("shard_lanes") and cfg.batch_size % cfg.shard_lanes:
        raise ValueError(f"config key `input.shard_lanes`={cfg.shard_lanes} does not divide "
                         f"input.batch_size={cfg.batch_size}")
    if cfg.get("hide_labels"):
        sources.check_hide_labels(cfg.hide_labels)
        if not cfg.get("labels"):
            raise ValueError("config key `input.hide_labels`: hides labels of the label sets, which "
                             "this input does not read; set `input.labels=True`")
    for i, entry in enumerate(cfg.data):
        where = f"input.data[{i}]"
        _dict(entry, where)
        # The kind's class declares its keys (vljax/data/sources/base.py); typos get a suggestion.
        cls = sources.source_class(entry.get("source", sources.DEFAULT_KIND), where)
        _check_keys(entry, cls.config_keys() | set(sources.ENTRY_KEYS), where + ".")
        sources.check_entry(entry, where)


def _tokenizer(cfg) -> None:
    kind = cfg.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"config key `tokenizer.kind`: {kind!r} is not one of {sorted(TOKENIZERS)}")
    args = arguments(TOKENIZERS[kind].__init__)
    if args is not None:
        _check_keys(cfg, args | {"kind"}, "tokenizer.")


def _model(config) -> None:
    cfg = config.model
    _check(cfg, _MODEL, "model.", known=module_fields(TwoTowers))
    for tower in ("image", "text"):
        name = cfg[f"{tower}_model"]
        if name not in MODELS:
            raise ValueError(f"config key `model.{tower}_model`: {name!r} is not one of {sorted(MODELS)}")
        fields = module_fields(MODELS[name]())
        _check_keys(cfg[tower], fields, f"model.{tower}.")
        if config.get("remat", False) and "remat" not in fields:
            raise ValueError(f"config key `remat`: the {tower} tower {name!r} has no `remat` option "
                             f"(set `remat=False`, or `model.{tower}.remat` on towers that have it)")


def _text_adapter(config) -> None:
    """LLM2CLIP's adapter (`model.text.adapter_layers`, vljax/models/text_adapter.py): its fields,
    the head it ends in, and no token-level loss (the head then reads the adapter's output, which
    no token has). A text tower without the fields was refused above (unknown key)."""
    text = config.model.text
    layers = text.get("adapter_layers", 0)
    text_adapter.check(layers, text.get("adapter_expansion", 2), text.get("num_classes", 0),
                       config.model.text_model)
    if layers and config.get("loss"):
        if "txt/tokens_proj" in objective.spec(config.loss).inputs:
            raise ValueError(f"config key `loss.name`: {config.loss.name!r} takes the text tower's "
                             f"projected tokens (txt/tokens_proj), which `model.text.adapter_layers` "
                             f"= {layers} leaves without a projection (the head reads the adapter's "
                             "pooled output); set adapter_layers=0 or another loss")


def _image_patches(config) -> None:
    """A loss that takes the image patches in the joint space (`img/patches_proj`: dreamlip with
    `loss.sgl_weight` > 0) needs an image tower with a head (the projection the patches go
    through) and patches that are all real (NaFlex pads them)."""
    if not config.get("loss") or "img/patches_proj" not in objective.spec(config.loss).inputs:
        return
    why = (f"loss {config.loss.name!r} with `loss.sgl_weight`={config.loss.get('sgl_weight')} groups "
           "the image's patch tokens")
    if config.model.image_model == "naflex_vit":
        raise ValueError(f"config key `model.image_model`: {why}, and 'naflex_vit' pads them (no grouping "
                         "over a patch mask is built); use 'vit' or set loss.sgl_weight=0")
    if not config.model.image.get("num_classes"):
        raise ValueError(f"config key `model.image.num_classes`: {why} in the joint space, through the "
                         "image tower's head, and this tower has none; set num_classes (the joint width) "
                         "or loss.sgl_weight=0")


def _model_init(cfg) -> None:
    if not cfg:
        return
    _check_keys(cfg, {"img", "txt"}, "model_init.")
    for tower, spec in cfg.items():
        if not spec:
            continue
        key = f"model_init.{tower}"
        if not isinstance(spec, str):
            raise ValueError(f"config key `{key}` must be a name or a .npz path, got {spec!r}")
        if spec.endswith(".npz"):
            if not os.path.isfile(os.path.expanduser(spec)):
                raise ValueError(f"config key `{key}`: {spec} does not exist")
        elif spec not in pretrained.LOADERS:
            raise _unknown_value(key, spec, pretrained.LOADERS)


def _unknown_value(key, value, known) -> ValueError:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"config key `{key}`: {value!r} is not one of {sorted(known)}{hint}")


def _loss(cfg) -> None:
    """The loss name and its options, as vljax.objective resolves them."""
    name = cfg.get("name")
    if name not in objective.LOSSES:
        raise _unknown_value("loss.name", name, objective.LOSSES)
    known = objective.option_keys(name)
    if known is not None:
        _check_keys(cfg, known, "loss.")
    objective.spec(cfg)  # checks the options that choose inputs (multi_positive's) and the regularisers'


def _optax(cfg) -> None:
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise _unknown_value("optax.name", name, OPTIMIZERS)
    args = arguments(OPTIMIZERS[name])
    if args is not None:
        _check_keys(cfg, args | _OPTAX_EXTRA, "optax.")


def _schedule(rules, total_steps) -> None:
    """Keys of each entry, then the entry itself through optim.make_schedule (which checks its
    values against total_steps; it only builds a function, nothing runs)."""
    known = arguments(make_schedule, drop=("total_steps", "where")) | _SCHEDULE_EXTRA
    if rules is None:
        return
    if _is_dict(rules):
        rules = [(".*", rules)]
        where = ["schedule"]
    else:
        where = [f"schedule[{i}]" for i in range(len(rules))]
    for key, rule in zip(where, rules):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"config key `{key}` must be (regex, dict or None), got {rule!r}")
        if rule[1] is not None:
            _check_keys(_dict(rule[1], key), known, key + ".")
            sched = {k: v for k, v in rule[1].items() if k not in _SCHEDULE_EXTRA}
            make_schedule(**sched, total_steps=total_steps, where=f"config key `{key}` ({rule[0]!r})")


def validate_evals(evals) -> None:
    """`config.evals` alone (vljax.evaluate runs a config's evals on any model)."""
    if not evals:
        return
    for name, spec in evals.items():
        where = f"evals.{name}"
        _dict(spec, where)
        kind = spec.get("type")
        if kind not in EVALUATORS:
            raise _unknown_value(where + ".type", kind, EVALUATORS)
        cls = EVALUATORS[kind]
        args = arguments(cls.__init__, drop=_EVAL_FILLED)
        if args is not None:
            _check_keys(spec, args | {"type", "data"}, where + ".")
        data = spec.get("data")
        if data is None:
            raise ValueError(f"config key `{where}.data` is missing")
        _dict(data, where + ".data")
        if hasattr(cls, "DATA_KEYS"):  # each evaluator type declares the keys of its data entry
            # (with `source`, where it takes one, the source kind's keys replace TFDS `name`/`split`)
            _check_keys(data, eval_data.entry_keys(data, cls.DATA_KEYS, where + ".data"), where + ".data.")


def validate(config) -> None:
    """Raises ValueError naming the first offending key (its full dotted path)."""
    start = init_from.requested(config)
    # A run from a checkpoint takes its model, tokenizer and image size from it (vljax/init_from.py):
    # the config may leave them out; those it gives are checked here and against the checkpoint.
    _check(config, _TOP if not start else _optional(_TOP, "model", "tokenizer"), "")
    if config.total_steps <= 0:
        raise ValueError(f"config key `total_steps` must be positive, got {config.total_steps}")
    _input(config.input, required_size=not start)
    if config.get("tokenizer") or not start:
        _tokenizer(config.tokenizer)
    if config.get("model") or not start:
        _model(config)
    init_from.check_exclusive(config)
    _model_init(config.get("model_init"))
    _loss(config.loss)
    if config.get("model"):
        _text_adapter(config)
        _image_patches(config)
    dcd.check_config(config)  # loss.k against input.batch_size
    label_shards.axis(config)  # loss.label_axis: an axis of config.mesh
    _optax(config.optax)
    _schedule(config.schedule, config.total_steps)
    if config.get("nonfinite", "stop") not in ("stop", "skip"):
        raise ValueError(f"config key `nonfinite`: {config.nonfinite!r} is not 'stop' or 'skip'")
    if config.get("tokenizer") and config.input.get("image_size"):  # init_from: once resolved
        stages.parse(config)
    teacher.options(config)
    slip.options(config)
    catlip.options(config)
    acid.options(config)
    momentum.options(config)
    mixing.options(config)
    check_data_prefix(config)  # Prefix Conditioning: input.data[i].prefix / label_prompts
    validate_evals(config.get("evals"))
    _decoder_evals(config)
    _locca(config)


def _locca(config) -> None:
    """input.locca (LocCa's ARef / GCap rows, vljax/data/locca.py) needs a caption decoder whose
    vocabulary holds the box and task tokens after the text ids, images (not stored features)
    whose crop the boxes follow, and no batch mixing or selection that would part rows from
    their boxes; loss `sigmoid_locca` logs its tasks and needs it."""
    spec = config.input.get("locca")
    if not spec:
        if (config.get("loss") or {}).get("name") == "sigmoid_locca":
            raise ValueError("config key `loss.name`: 'sigmoid_locca' logs LocCa's tasks and needs "
                             "`input.locca` (configs/siglip2.py locca=on); use 'sigmoid_caption'")
        return
    from vljax.data.locca import Locca  # noqa: PLC0415  (numpy only)
    unknown = sorted(set(spec) - {"vocab_offset", "bins", "tasks", "pad_id"})
    if unknown:
        raise ValueError(f"config key `input.locca`: unknown keys {unknown}; it takes vocab_offset, "
                         "bins, tasks, pad_id")
    if "vocab_offset" not in spec:
        raise ValueError("config key `input.locca.vocab_offset`: required (the text vocabulary's "
                         "size, model.text.vocab_size: the first box token's id)")
    locca = Locca(**{k: tuple(v) if k == "tasks" else v for k, v in dict(spec).items()})
    model = config.get("model")
    if model and not model.get("decoder"):
        raise ValueError("config key `input.locca`: LocCa's rows train the caption decoder, and the "
                         "model has none: set `model.decoder` (configs/siglip2.py decoder=on)")
    if model:
        text_vocab = (model.get("text") or {}).get("vocab_size")
        if text_vocab is not None and locca.vocab_offset < text_vocab:
            raise ValueError(f"config key `input.locca.vocab_offset`: {locca.vocab_offset} < "
                             f"model.text.vocab_size={text_vocab}: box tokens would take text ids")
        if model.decoder.get("vocab_size", 0) < locca.vocab_size:
            raise ValueError(f"config key `model.decoder.vocab_size`: "
                             f"{model.decoder.get('vocab_size')} < {locca.vocab_size} = "
                             "input.locca's vocab_offset + bins + 2 (box bins, <aref>, <gcap>)")
    for key in ("lit_cache", "acid", "mixing"):
        if config.get(key):
            raise ValueError(f"config key `{key}`: not made with `input.locca` (LocCa's boxes follow "
                             "each image's own crop; stored features, selection and mixed images "
                             "would part rows from their boxes)")


def _decoder_evals(config) -> None:
    """Evaluators that read the caption decoder (`NEEDS_DECODER`) need `model.decoder` in the
    config's own model (a model from a checkpoint is checked when the evaluator runs)."""
    model = config.get("model")
    if not model or model.get("decoder"):
        return
    for name, spec in (config.get("evals") or {}).items():
        if getattr(EVALUATORS.get(spec.get("type")), "NEEDS_DECODER", False):
            raise ValueError(f"config key `evals.{name}`: type {spec['type']!r} scores captions with "
                             "the caption decoder, and the model has none: set `model.decoder` "
                             "(configs/siglip2.py decoder=on) or remove the evaluator")
