"""How evaluators name and read their data: a source from a config entry, record subsets, and
metadata (labels, captions, tags) read WITHOUT decoding images. The images themselves are only
ever read by the embedder's pipeline (vljax/embedder.py), one batch at a time.

Config entry (`evals.<name>.data`): dict(name=..., split=..., label=..., exclude=...,
max_examples=..., data_dir=...). `name` is a TFDS name under data_dir or one of the demo
aliases "emoji", "openclipart", "fashion_mnist". `max_examples` keeps the first records in
storage order, which TFDS hashes, so it is a fixed pseudo-random sample. Class names are
human-readable for prompts, as each demo builder documents (emoji subcategories
"animal mammal", Fashion-MNIST "t-shirt/top").

An evaluator whose DATA_KEYS hold "source" also takes a full source entry of any registered kind
(vljax/data/sources): dict(source="jsonl", path=..., class_names=[...]), dict(source="folder",
path=...), dict(source="tfds", name=..., split=...), beside its own keys (`max_examples`, ...).
Labels, class names and captions are read through the source's metadata accessors
(`label_of`, `class_names_of`, `captions_of`, ...), never by decoding an image.

Evaluators that read several splits of one dataset (few-shot: train and test; label-free: target
and test) declare each split `<s>` by a `<s>_split` key in their DATA_KEYS. Without `source`, the
entry is TFDS `name` with `<s>_split`. With `source`, split `<s>`'s entry is the entry's keys of
that kind with each `<s>_<key>` given replacing `<key>` (`split_entry`):

    dict(name="emoji", train_split="train", test_split="test")                  # TFDS, as ever
    dict(source="jsonl", path="test.jsonl", train_path="train.jsonl", class_names=[...])
    dict(source="folder", path="shapes/test", train_path="shapes/train")
    dict(source="tfds", name="vljax_emoji", train_split="train", test_split="test")
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from vljax.data import sources as sources_lib
from vljax.data import transforms as T
from vljax.data.sources import base as source_base

ALIASES = {"emoji": "vljax_emoji", "openclipart": "vljax_openclipart",
           "fashion_mnist": "vljax_fashion_mnist"}


class Subset:
    """Records `indices` of a source, in that order (a source itself, with its metadata)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]

    def raw(self, i):
        return raw_record(self.source, self.indices[i])

    @property
    def info(self):
        return self.source.info

    def cache_key(self) -> str:
        return source_base.digest("subset", sources_lib.cache_key(self.source),
                                  source_base.indices_digest(self.indices))

    def missing_labels(self, field: str) -> str | None:
        return sources_lib.missing_labels(self.source, field)

    def captions_of(self, i: int) -> list[str]:
        return self.source.captions_of(self.indices[i])

    def label_of(self, i: int, key: str | None = None) -> int:
        return self.source.label_of(self.indices[i], key)

    def label_set_of(self, i: int, key: str | None = None) -> list[int]:
        return self.source.label_set_of(self.indices[i], key)

    def class_names_of(self, key: str | None = None) -> list[str]:
        return self.source.class_names_of(key)

    def label_set_names(self, key: str | None = None) -> list[str]:
        return self.source.label_set_names(key)

    def __repr__(self):
        # The indices' digest: a repr names the images.
        return f"Subset({self.source!r}, n={len(self)}, indices={source_base.indices_digest(self.indices)[:12]})"


@dataclasses.dataclass(frozen=True)
class AugmentedView:
    """View number `view` of every record of `source` (a source itself): the image after a random
    resized crop (area fraction in `crop_scale`, aspect ratio log-uniform in [3/4, 4/3]) and,
    when `flip`, a horizontal flip with probability 1/2, drawn from rng(seed, view, i). A view is
    therefore the same at every read, in every process and grain worker.

    Tip-Adapter's cache augmentation (official `build_cache_model`: RandomResizedCrop(size=224,
    scale=(0.5, 1), bicubic) and RandomHorizontalFlip, one pass over the few-shot set per view).
    With `size` (the model's input size) the crop is resized straight to size x size, bicubic, as
    torchvision does: the eval transform then leaves it as it is (a square of the model's size),
    so the view is resampled once. Without it the crop is stretched to a square of its own longer
    side (no more pixels than it has), which the eval transform then scales: one more resampling.
    A record that cannot be decoded is passed on unchanged, and the embedder skips it as usual.
    """
    source: object
    view: int
    seed: int = 0
    crop_scale: tuple = (0.5, 1.0)
    flip: bool = True
    size: int | None = None

    def __len__(self):
        return len(self.source)

    @property
    def augmentation(self) -> tuple:
        """What, beside the source, determines the images (part of its cache key)."""
        return (self.view, self.seed, tuple(self.crop_scale), self.flip, self.size)

    def cache_key(self) -> str:
        return source_base.digest("augmented", sources_lib.cache_key(self.source), list(self.augmentation))

    def __getitem__(self, i):
        record = self.source[i]
        if not isinstance(record, dict) or "error" in record or "image" not in record:
            return record
        try:
            img = T.decode_image(record["image"])
        except (FileNotFoundError, *T.DECODE_ERRORS):
            return record
        rng = np.random.default_rng([self.seed, self.view, int(i)])
        w, h = img.size
        # No crop found in 10 draws: the central square, as random_resized_crop falls back to.
        box = T.random_crop_box(w, h, rng, scale=tuple(self.crop_scale)) or T.central_square_box(w, h)
        side = self.size or max(box[2] - box[0], box[3] - box[1])  # else no more pixels than the crop
        img = img.resize((side, side), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.uniform() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {**record, "image": np.asarray(img, np.uint8)}

    def raw(self, i):
        return raw_record(self.source, i)

    @property
    def info(self):
        return self.source.info

    def __repr__(self):
        return (f"AugmentedView({self.source!r}, view={self.view}, seed={self.seed}, "
                f"crop_scale={tuple(self.crop_scale)}, flip={self.flip}, size={self.size})")


def open_source(name: str, split: str, data_dir=None, label_key: str | None = None):
    """TFDS dataset `name` (or a demo alias, `ALIASES`), split `split`."""
    return sources_lib.TfdsSource(ALIASES.get(name, name), split, data_dir=data_dir,
                                  label_key=label_key)


def open_entry(name: str, data: dict, default_split: str = "test"):
    """The source of data entry `evals.<name>.data`: with `source`, that registered kind built from
    the entry's keys it declares (errors name `evals.<name>.data.<key>`); without, TFDS `name` (a
    TFDS name or a demo alias) and `split` (default `default_split`) under `data_dir`."""
    if "source" not in data:
        return open_source(data["name"], data.get("split", default_split), data.get("data_dir"))
    where = f"evals.{name}.data"
    cls = sources_lib.source_class(data["source"], where)
    entry = {k: v for k, v in data.items() if k in cls.config_keys() or k == "source"}
    if cls is sources_lib.TfdsSource and "name" in entry:
        entry["name"] = ALIASES.get(entry["name"], entry["name"])
    return sources_lib.get_source(entry, where=where)


def first(source, max_examples: int | None):
    """The first `max_examples` records of `source` (all of them for None)."""
    if max_examples is None or max_examples >= len(source):
        return source
    return Subset(source, range(max_examples))


def raw_record(source, i: int) -> dict:
    """Record i with its stored fields (TFDS: `raw`, image bytes undecoded), else `source[i]`
    (JSONL / folder records hold an image path, not pixels)."""
    return source.raw(i) if hasattr(source, "raw") else source[i]


def field(source, i: int, key: str):
    """Record i's feature `key` ("a/b" for nested features), read without decoding the image."""
    value = raw_record(source, i)
    for part in key.split("/"):
        value = value[part]
    return value


def default_label_key(source) -> str:
    """The integer class feature of TFDS `source` that an entry without `label` reads."""
    return source.class_key()


def class_names(source, label_key: str) -> list[str]:
    """The names of `source`'s classes of feature `label_key` (a ClassLabel or a label set)."""
    return source.class_names_of(label_key)


def text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def split_spec(name: str, spec: dict) -> tuple[dict, dict]:
    """(data entry, evaluator kwargs) of config entry `evals.<name>`, checking the data entry."""
    spec = dict(spec)
    spec.pop("type", None)
    data = dict(spec.pop("data", None) or {})
    if "name" not in data and "source" not in data:
        raise ValueError(f"config key `evals.{name}.data.name` is missing")
    return data, spec


# The keys of an entry without `source` that name its TFDS set (a `source` entry has its kind's).
TFDS_KEYS = ("name", "split", "data_dir")


def split_names(allowed) -> tuple[str, ...]:
    """The splits an evaluator declaring data keys `allowed` reads: `<s>` of each `<s>_split` key."""
    return tuple(k[:-len("_split")] for k in allowed if k.endswith("_split"))


def _prefixed(splits, keys) -> set[str]:
    return {f"{s}_{k}" for s in splits for k in keys}


def entry_keys(data: dict, allowed, where: str = "evals.data") -> set[str]:
    """The keys entry `data` may hold, of an evaluator that declares `allowed`: with `source` (when
    the evaluator takes one: "source" in `allowed`), TFDS_KEYS (and their `<s>_` forms for each of
    its splits, `split_names`) give way to the kind's keys (and their `<s>_` forms)."""
    allowed = set(allowed)
    if "source" not in data or "source" not in allowed:
        return allowed
    kind_keys = sources_lib.source_class(data["source"], where).config_keys()
    splits = split_names(allowed)
    tfds_keys = set(TFDS_KEYS) | _prefixed(splits, TFDS_KEYS)
    return (allowed - tfds_keys) | kind_keys | _prefixed(splits, kind_keys)


def split_entry(name: str, data: dict, split: str, default: str) -> dict:
    """The source entry of split `split` of a several-split entry `evals.<name>.data` (module
    docstring): without `source`, TFDS `name` with `<split>_split` (default `default`) under
    `data_dir`; with `source`, the kind's keys of `data`, each `<split>_<key>` given replacing
    `<key>` (a kind that takes a `split` defaults it to `default`)."""
    if "source" not in data:
        entry = {"source": sources_lib.DEFAULT_KIND, "name": data["name"],
                 "split": data.get(f"{split}_split", default)}
        return {**entry, **({"data_dir": data["data_dir"]} if data.get("data_dir") else {})}
    kind_keys = sources_lib.source_class(data["source"], f"evals.{name}.data").config_keys()
    entry = {k: v for k, v in data.items() if k in kind_keys or k == "source"}
    entry.update({k: data[f"{split}_{k}"] for k in kind_keys if f"{split}_{k}" in data})
    if "split" in kind_keys:
        entry.setdefault("split", default)
    return entry


def open_splits(name: str, data: dict, defaults: dict[str, str]) -> dict:
    """{split: source} of entry `evals.<name>.data` for each split of `defaults` ({split: its
    default TFDS split}), see `split_entry`. Two splits of a `source` entry that name the same
    records are an error naming the key that tells them apart (few-shot probes trained on their
    test images would report nothing)."""
    entries = {s: split_entry(name, data, s, d) for s, d in defaults.items()}
    if "source" in data:
        seen = {}
        for s, entry in entries.items():
            key = repr(sorted(entry.items()))
            if key in seen:
                cls = sources_lib.source_class(data["source"])
                which = (cls.REQUIRED or sorted(cls.config_keys()))[0]
                raise ValueError(f"config key `evals.{name}.data.{seen[key]}_{which}` is missing: without "
                                 f"it the {seen[key]} split of source {data['source']!r} is its {s} split")
            seen[key] = s
    return {s: open_entry(name, entry) for s, entry in entries.items()}


def labelled(name: str, source, label_key: str | None, max_examples: int | None = None):
    """(the first `max_examples` records of `source`, their labels [N] ints, the class names) of
    integer class feature `label_key` (None: the source's own labels); a record without a label
    is an error naming `evals.<name>.data`."""
    names = source.class_names_of(label_key)
    source = first(source, max_examples)
    labels = [source.label_of(i, label_key) for i in range(len(source))]
    if labels and min(labels) < 0:
        raise ValueError(f"config key `evals.{name}.data`: record {labels.index(min(labels))} of "
                         f"{source!r} has no class label")
    return source, labels, names


def check_keys(name: str, data: dict, allowed) -> None:
    allowed = entry_keys(data, allowed, f"evals.{name}.data")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"config key `evals.{name}.data`: unknown keys {unknown} "
                         f"(allowed: {sorted(allowed)})")


CLASSIFICATION_KEYS = ("name", "split", "label", "label_key", "data_dir", "max_examples", "source")


def classification(name: str, data: dict):
    """(source, labels [N] ints, class names) of a classification entry `evals.<name>.data`.

    `label` (or `label_key`): an integer ClassLabel feature of a TFDS set; default the source's
    `label_key`, else "label", else "category" (emoji and openclipart also have "subcategory" /
    "top_category"). Other kinds give their own labels and names (a folder: its folders; JSONL:
    `label` and the source's `class_names`)."""
    check_keys(name, data, CLASSIFICATION_KEYS)
    source = open_entry(name, data)
    label_key = data.get("label") or data.get("label_key")
    names = source.class_names_of(label_key)
    source = first(source, data.get("max_examples"))
    labels = [source.label_of(i, label_key) for i in range(len(source))]
    return source, labels, names
