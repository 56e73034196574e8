"""Prefix Conditioning's data side (Saito et al., "Prefix Conditioning Unifies Language and Label
Supervision", CVPR 2023, arXiv 2206.01125): each training source says which kind of text it gives,
and every example carries that kind to the text tower as the batch field "prefix_id".

From the paper (its abstract, the part that was readable here): image-classification data, its
labels turned into sentences with templates ("prompts"), and image-caption data are trained
together with one contrastive loss; prefix tokens "inform the language encoder of the type of the
input" (classification vs caption) at training time, and "we use image-caption mode in the
zero-shot evaluation". The tower side (the learned prefix embeddings, the eval prefix) is
vljax/models/text.py `prefix_conditioning` / `prefix_at_eval`.

Config keys of an `input.data[i]` entry (besides its kind's own, vljax/data/sources/base.py
ENTRY_KEYS):
    prefix="caption" | "label"    the kind of text of this source (`text.PREFIX_NAMES`); default
                                  "caption". Any entry naming one adds batch "prefix_id" int32 [B]
                                  (the row of `PREFIX_NAMES`) to every batch, and needs
                                  `model.text.prefix_conditioning=True`.
    label_prompts=[template, ...] the source's captions are replaced by its class label's name put
                                  into each template ("an emoji of {}."): a classification source
                                  as prompts, UniCL / the paper's label-to-text conversion. The
                                  training view draws one of them per example (`choose_caption`).
                                  Needs the kind's label key (tfds `label_key`); a record with no
                                  label (-1) has no caption and is skipped ("empty_caption").
"""
from collections.abc import Sequence

from vljax.models.text import prefix_index

FIELD = "prefix_id"  # the batch field: int32 [B]
DEFAULT = "caption"


def entry_prefix(entry, i: int) -> int:
    """The `PREFIX_NAMES` row of `input.data[i]`'s `prefix` (default "caption"); raises naming the key."""
    return prefix_index(entry.get("prefix", DEFAULT), f"input.data[{i}].prefix")


def conditioned(entries) -> bool:
    """Whether any entry names a prefix (the batches then carry "prefix_id")."""
    return any(e.get("prefix") is not None for e in entries)


def templates_of(entry, i: int) -> tuple[str, ...] | None:
    """`input.data[i].label_prompts` checked: a non-empty list of strings with exactly one "{}"."""
    templates = entry.get("label_prompts")
    if templates is None:
        return None
    where = f"config key `input.data[{i}].label_prompts`"
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"{where}: takes a non-empty list of templates (\"an emoji of {{}}.\"), "
                         f"got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{where}: template {t!r} must be a string with exactly one '{{}}'")
    return tuple(templates)


def check(config) -> None:
    """The config check: every entry's `prefix` and `label_prompts`, and a prefix given with a text
    tower that has no prefix conditioning (or a bad `model.text.prefix_at_eval`). Errors name the keys."""
    entries = list(config.input.data)
    for i, entry in enumerate(entries):
        entry_prefix(entry, i)
        templates_of(entry, i)
    model = config.get("model")
    text = (model.get("text") if model else None) or {}
    if text.get("prefix_at_eval") is not None:
        prefix_index(text["prefix_at_eval"], "model.text.prefix_at_eval")
    if model and conditioned(entries) and not text.get("prefix_conditioning"):
        named = [i for i, e in enumerate(entries) if e.get("prefix") is not None]
        raise ValueError(f"config key `input.data[{named[0]}].prefix` needs a text tower with "
                         "prefix conditioning: set `model.text.prefix_conditioning=True`")
    if conditioned(entries):
        # Paths that embed training texts without the batch's prefix ids: they would give a label
        # source's texts the caption prefix, so the combination is refused rather than run.
        unsupported = [k for k in ("text_cache", "queue", "acid") if config.get(k)]
        unsupported += ["input.subcaptions"] if config.input.get("subcaptions") else []
        if unsupported:
            raise ValueError(f"config keys `{'`, `'.join(unsupported)}` cannot be combined with a source's "
                             "`input.data[i].prefix` (Prefix Conditioning): those paths embed training "
                             "texts without the batch's prefix ids")


class PrefixTag:
    """record -> record with "prefix_id" (its source's `PREFIX_NAMES` row). Picklable (grain workers)."""

    def __init__(self, index: int):
        self.index = int(index)

    def __call__(self, record: dict) -> dict:
        return {**record, FIELD: self.index}


class LabelPrompts:
    """record -> record whose captions are its class label's name in each template (none for a
    record without a label, label -1). Picklable (grain workers)."""

    def __init__(self, class_names: Sequence[str], templates: Sequence[str]):
        self.class_names, self.templates = list(class_names), tuple(templates)

    def __call__(self, record: dict) -> dict:
        label = int(record.get("label", -1))
        if "error" in record or label < 0:
            return {**record, "captions": []}
        name = self.class_names[label]
        return {**record, "captions": [t.format(name) for t in self.templates]}
