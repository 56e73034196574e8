"""CatLIP: classification-style pre-training from captions (Mehta et al. 2024, arXiv 2404.15653;
apple/corenet projects/catlip), switched on by `config.catlip` with `loss.name="catlip"`:

    config.catlip = dict(min_count=2, max_terms=0, bigrams=False)   # `options`: DEFAULTS
    config.loss = dict(name="catlip", kind="bce")                    # vljax/losses/catlip.py

The label vocabulary is extracted from the training captions and written to the workdir once
(vljax/caption_labels.py: settings `min_count`, `max_terms`, `bigrams`); each example's multi-hot
target is made in the input workers (batch "caption_labels" bool [B, V]). A linear head on the image
embedding, logits = zimg @ kernel + bias with kernel [D, V] and bias [V] (params["catlip"]), gives
`catlip/logits` [B, V] for the loss. When the configured loss takes nothing of the text side
(`image_only`: CatLIP's own loss), the step does not run the text tower at all, as CatLIP has none. CatLIP puts its classifier on the image backbone's output; ours
sits on the image tower's embedding `zimg` (after its projection and L2 normalisation), so the whole
image tower, projection included, is what the exported encoder keeps. The head's params are trained,
sharded by `sharding_rules` (the vocabulary axis: `("catlip/.*", "fsdp")` splits the kernel's V
columns and the bias over `fsdp`; or an explicit rule such as `("catlip/kernel", (None, "model"))`)
and checkpointed like the towers, and left out of the exported encoder (`factory.encoder_only`).
Flax's Dense init (lecun normal kernel, zero bias); CatLIP's own init is not stated in what we read.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from vljax import caption_labels, config_args, objective

DEFAULTS = dict(min_count=2, max_terms=0, bigrams=False)
PARAMS_KEY = "catlip"  # params["catlip"] = {"kernel": [D, V], "bias": [V]}
INPUT = "catlip/logits"  # the loss input: the head's logits [B, V]
LOSS_INPUT = f"batch/{caption_labels.FIELD}"


def options(config) -> dict | None:
    """`config.catlip` over DEFAULTS, or None when unset. A bad value, `loss.name="catlip"` without
    it, it with a loss that does not take the head's logits, or a recipe whose batch targets cannot
    follow the images (`mixing`) is a ValueError naming the keys."""
    raw = config.get("catlip")
    takes = _loss_takes_head(config)
    if raw is None:
        if takes:
            raise ValueError(f"config key `catlip`: loss {config.loss.get('name')!r} takes the CatLIP head's "
                             f"logits ({INPUT}); set config.catlip = dict(min_count=...) (vljax/catlip.py)")
        return None
    o = config_args.over_defaults(raw, "catlip", DEFAULTS)
    if int(o["min_count"]) < 1 or int(o["max_terms"]) < 0 or not isinstance(o["bigrams"], bool):
        raise ValueError(f"config key `catlip`: min_count must be >= 1, max_terms >= 0 (0: all) and bigrams "
                         f"a bool, got {o['min_count']!r}, {o['max_terms']!r}, {o['bigrams']!r}")
    if not takes:
        raise ValueError(f"config keys `catlip` and `loss.name`: the CatLIP head is trained only by a loss "
                         f"that takes {INPUT} (loss.name='catlip'), not {config.loss.get('name')!r}")
    if config.get("mixing") is not None:
        raise ValueError("config keys `catlip` and `mixing`: the mixed images have no caption labels "
                         "(each image's targets are its own caption's); remove one of them")
    return o


def _loss_takes_head(config) -> bool:
    name = (config.get("loss") or {}).get("name")
    return name in objective.LOSSES and INPUT in objective.LOSSES[name].inputs


def image_only(config) -> bool:
    """Whether the configured loss (with its regularisers) takes nothing from the text tower: no
    `ztxt`, `txt/...`, text features, label prompts, sub-captions or decoder outputs. CatLIP's own loss
    does not (the paper trains the image encoder alone); `loss.align_weight` would."""
    text = ("ztxt", "frozen/ztxt", "frozen/txt_features")
    return not any(k in text or k.startswith(("txt/", "labels/", "sub/", "dec/"))
                   for k in objective.spec(config.loss).inputs)


def check(trainable_mask) -> None:
    """Refuses a `schedule` that locks part of the head (it has nothing else to learn from)."""
    flat = traverse_util.flatten_dict(trainable_mask, sep="/")
    locked = [k for k, v in flat.items() if k.startswith(f"{PARAMS_KEY}/") and not v]
    if locked:
        raise ValueError(f"config keys `catlip` and `schedule`: the CatLIP head params['{PARAMS_KEY}'] must be "
                         f"trained; `schedule` locks {locked[0]}")


def embed_width(model, params, images) -> int:
    """D, the width of the image embedding zimg, from shapes only."""
    z = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, None, train=False)[0], params, images)
    return int(z.shape[-1])


def init_head(width: int, vocab: int, rng, dtype=jnp.float32) -> dict:
    """{"kernel": [width, vocab] lecun normal, "bias": [vocab] zeros} (flax Dense's init)."""
    kernel = jax.nn.initializers.lecun_normal()(rng, (width, vocab), dtype)
    return {"kernel": kernel, "bias": jnp.zeros((vocab,), dtype)}


def logits(head: dict, zimg):
    """zimg [B, D] -> [B, V] float32: zimg @ kernel + bias."""
    k = head["kernel"]
    return (jnp.einsum("bd,dv->bv", zimg.astype(k.dtype), k, preferred_element_type=jnp.float32)
            + head["bias"].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class CatLIP:
    """A run's CatLIP: its vocabulary (`terms`, from `caption_labels.vocabulary_for`) and settings.
    Built per run, never hashed (`record` is a dict)."""
    terms: tuple[str, ...]
    bigrams: bool = False
    image_only: bool = True  # the configured loss takes nothing of the text side: the step skips it
    record: dict | None = None  # the vocabulary file's content (`caption_labels.vocabulary_for`)

    @classmethod
    def setup(cls, config, opened, workdir) -> CatLIP | None:
        """None without config.catlip; else the vocabulary of the `opened` training sources, read
        from `workdir` or extracted (vljax/caption_labels.py; `write` puts it in the workdir)."""
        o = options(config)
        if o is None:
            return None
        record = caption_labels.vocabulary_for(opened, workdir, o)
        return cls(tuple(record["terms"]), bool(o["bigrams"]), image_only=image_only(config), record=record)

    def write(self, workdir) -> None:
        """Writes the vocabulary file into `workdir` unless it is there (process 0, with config.json)."""
        caption_labels.write_vocabulary(workdir, self.record)

    @property
    def vocab_size(self) -> int:
        return len(self.terms)

    def targets(self) -> caption_labels.Targets:
        """The input workers' per-example map that adds batch "caption_labels"."""
        return caption_labels.Targets(self.terms, self.bigrams)

    def with_head(self, params, model, images, rng=None) -> dict:
        """`params` plus "catlip": the head's random params (`rng`), or their ShapeDtypeStructs."""
        width = embed_width(model, params, images)
        if rng is None:
            head = jax.eval_shape(lambda r: init_head(width, self.vocab_size, r), jax.random.key(0))
        else:
            head = init_head(width, self.vocab_size, rng)
        return {**params, PARAMS_KEY: head}

    def inputs(self, params, zimg) -> dict:
        """The step's loss input {INPUT: [B, V]} from the image embedding."""
        return {INPUT: logits(params[PARAMS_KEY], zimg)}
