"""The one place a data source kind is declared: the `Source` contract and the registry of kinds.

A kind is a `Source` subclass registered under the name a config entry gives in `source=`
(`@register("jsonl")`). Its class attributes declare the entry's keys, and everyone reads them:
`get_source` (the pipeline, the trainer, the feature store, the evaluators), the config check
(`vljax/config_check.py`: unknown and missing keys, named `input.data[i].<key>`). An instance
states its cache key (the embedder's cache, the feature store's fingerprint) and its label fields
(`missing_labels`). A test or user module adds a kind by registering it; nothing in vljax changes.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path

from absl import logging
from etils import epath

from vljax.registry import Registry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# Keys of an input.data entry that the pipeline reads, whatever the kind.
ENTRY_KEYS = ("source", "weight", "prefix", "label_prompts")  # the last two: vljax/data/prefix.py
DEFAULT_KIND = "tfds"
LABEL_FIELDS = ("label", "labels")


def default_assets_dir() -> Path:
    """$VLJAX_ASSETS, else ~/.cache/vljax."""
    return Path(os.environ.get("VLJAX_ASSETS", Path.home() / ".cache" / "vljax")).expanduser()


def default_data_dir() -> Path:
    """Where the demo TFDS datasets live: <assets>/tfds."""
    return default_assets_dir() / "tfds"


def text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def bad_record(record_id: str, reason: str, detail: str) -> dict:
    """The record of one that cannot be read (`reason`: one of preprocess.SKIP_REASONS)."""
    logging.log_every_n_seconds(logging.WARNING, "skipping record %s: %s (%s)", 10,
                                record_id, reason, detail)
    return {"id": record_id, "image": b"", "captions": [], "label": -1, "labels": [],
            "error": reason, "detail": detail}


def digest(*parts) -> str:
    """A stable cache key from JSON-able parts (paths as strings)."""
    return json.dumps([str(p) if isinstance(p, Path) else p for p in parts])


def read_class_names(names, where: str) -> list[str]:
    """A config's `class_names`: a non-empty list of strings, or a text file (any etils.epath path)
    of one name a line. `where` begins the error messages (the config key or the manifest)."""
    if isinstance(names, (str, os.PathLike)):
        file = epath.Path(names).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{where}: class_names file {file} does not exist")
        names = [n.strip() for n in file.read_text(encoding="utf-8").splitlines() if n.strip()]
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}: class_names must be a non-empty list of strings or a file of "
                         f"one name a line, got {names!r}")
    return list(names)


def indices_digest(indices) -> str:
    """The SHA-1 of a list of record indices (a subset's part of its cache key)."""
    return hashlib.sha1(json.dumps([int(i) for i in indices]).encode()).hexdigest()


class Source(abc.ABC):
    """A random-access record source (records: see the package docstring).

    A kind declares, as class attributes, the keys of its config entry (besides ENTRY_KEYS):
      REQUIRED / OPTIONAL: config keys; ALIASES: {other name: config key} (a key given under its
      other name); ARGS: {config key: constructor argument} where the two differ; DATA_DIR: the
      constructor takes `data_dir`, defaulting to the caller's (config.input.data_dir).
      LABEL_HINTS: {field: the config key that gives it, with what it takes}, for `missing_labels`.
    An instance has `__len__`, `__getitem__`, `cache_key()` (all three abstract), `num_labels` /
    `label_names` (its label sets' K and names, None when none), `gives_label()` (whether records
    have integer labels), `missing_labels(field)`, and the metadata accessors below, which
    evaluators read without decoding images (override them where a record's metadata is cheaper
    to read than the record).
    """
    KIND: str = ""
    REQUIRED: tuple[str, ...] = ()
    OPTIONAL: tuple[str, ...] = ()
    ALIASES: dict[str, str] = {}
    ARGS: dict[str, str] = {}
    DATA_DIR: bool = False
    LABEL_HINTS: dict[str, str] = {}
    num_labels: int | None = None
    label_names: list[str] | None = None
    # A sharded kind (webdataset tars, parquet files) sets `shard_sizes`: its records per shard,
    # in index order (shard k's records are the indices after those of shards 0..k-1). The
    # training order may then read each process's shards in place (the pipeline's shard order);
    # None: records are read in any order (random access costs the same everywhere).
    shard_sizes: list[int] | None = None

    @classmethod
    def config_keys(cls) -> set[str]:
        """Every key its config entry may hold (besides ENTRY_KEYS)."""
        return {*cls.REQUIRED, *cls.OPTIONAL, *cls.ALIASES}

    @classmethod
    def from_config(cls, entry, data_dir=None, where: str = "input.data") -> "Source":
        """An instance from config entry `entry` of this kind (its keys checked, errors naming
        `<where>.<key>`)."""
        cls.check_keys(entry, where)
        kwargs = {}
        for alias, key in cls.ALIASES.items():
            if alias in entry and key not in entry:
                kwargs[cls.ARGS.get(key, key)] = entry[alias]
        for key in (*cls.REQUIRED, *cls.OPTIONAL):
            if key in entry:
                kwargs[cls.ARGS.get(key, key)] = entry[key]
        if cls.DATA_DIR:
            kwargs.setdefault("data_dir", data_dir)
        return cls(**kwargs)

    @classmethod
    def check_keys(cls, entry, where: str = "input.data") -> None:
        """No key of `entry` outside the declared ones (and ENTRY_KEYS), and every required one."""
        unknown = sorted(set(entry.keys()) - cls.config_keys() - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"config key `{where}.{unknown[0]}`: unknown for source {cls.KIND!r} "
                             f"(known: {', '.join(sorted(cls.config_keys() | set(ENTRY_KEYS)))})")
        for key in cls.REQUIRED:
            if key not in entry:
                raise ValueError(f"config key `{where}.{key}` is missing (source {cls.KIND!r})")

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of records."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict:
        """Record `index` (the package docstring's contract)."""

    @abc.abstractmethod
    def cache_key(self) -> str:
        """A stable string naming which records (images) this source holds (`digest`): equal for
        sources of the same images, different otherwise (the embedder's cache, the feature store)."""

    def missing_labels(self, field: str) -> str | None:
        """None when the records give `field` ("label": integer class labels, "labels": label
        sets); otherwise the key of the config entry that would give them, with what it takes."""
        _check_field(field)
        has = bool(self.num_labels) if field == "labels" else self.gives_label()
        return None if has else self.LABEL_HINTS.get(field, f"source` ({self.KIND!r} has no {field!r})")

    def gives_label(self) -> bool:
        """Whether records carry integer class labels (record["label"] >= 0)."""
        return False

    # -- metadata, read without decoding images (evaluators) ------------------------------------
    def _no_key(self, key, what: str):
        if key is not None:
            raise ValueError(f"source {self.KIND!r} has no named features: {what}={key!r} cannot be read "
                             f"from {self!r}")

    def captions_of(self, index: int) -> list[str]:
        """Record `index`'s captions."""
        return list(self[index]["captions"])

    def label_of(self, index: int, key: str | None = None) -> int:
        """Record `index`'s integer class label (`key`: a named feature, for kinds that have them)."""
        self._no_key(key, "label")
        return int(self[index]["label"])

    def label_set_of(self, index: int, key: str | None = None) -> list[int]:
        """Record `index`'s label set (class indices)."""
        self._no_key(key, "label")
        return list(self[index]["labels"])

    def class_names_of(self, key: str | None = None) -> list[str]:
        """The names of the integer class labels."""
        raise ValueError(f"{self!r} has no class names for its labels")

    def label_set_names(self, key: str | None = None) -> list[str]:
        """The names of the label sets' classes."""
        self._no_key(key, "label")
        if not self.label_names:
            raise ValueError(f"{self!r} has no label sets (config key `{self.missing_labels('labels')})")
        return list(self.label_names)


def _set_kind(kind: str, cls: type) -> None:
    cls.KIND = kind


SOURCES = Registry("source kind", "source", on_register=_set_kind)


def register(kind: str, cls: type | None = None):
    """Registers source class `cls` under config name `kind` (`source=kind`); as a decorator,
    `@register(kind)`. Registering a taken name with another class is an error (the same class
    again, e.g. from a reloaded module, replaces it)."""
    return SOURCES.register(kind, cls)


def source_class(kind, where: str = "input.data") -> type:
    """The class registered as `kind`; an unknown kind is an error naming `<where>.source`."""
    return SOURCES.lookup(kind, where)


def check_entry(entry, where: str = "input.data") -> type:
    """The class of config entry `entry`, after checking its kind and keys (errors name
    `<where>.<key>`)."""
    cls = source_class(entry.get("source", DEFAULT_KIND), where)
    cls.check_keys(entry, where)
    return cls


def get_source(cfg, data_dir=None, where: str = "input.data") -> Source:
    """A source from one entry of config.input.data, e.g.
    dict(source="tfds", name="vljax_emoji", split="train", label_key="category", labels_key="tags"),
    dict(source="folder", path=...), dict(source="jsonl", path=..., num_labels=K); `source`
    defaults to "tfds". `data_dir`: the default of kinds that take one (TFDS)."""
    return source_class(cfg.get("source", DEFAULT_KIND), where).from_config(cfg, data_dir=data_dir, where=where)


def cache_key(source) -> str:
    """`source.cache_key()`; an object that is not a source is an error naming its type."""
    if not callable(getattr(source, "cache_key", None)):
        raise TypeError(f"{type(source).__name__} is not a data source: it has no cache_key() "
                        f"naming its records (see vljax/data/sources/base.py)")
    return source.cache_key()


def _check_field(field: str) -> None:
    if field not in LABEL_FIELDS:
        raise ValueError(f"unknown label field {field!r} (expected 'label' or 'labels')")


def missing_labels(source, field: str) -> str | None:
    """`source.missing_labels(field)` (see `Source.missing_labels`); a source without it (a
    wrapper of records) is taken to give its labels."""
    _check_field(field)
    if hasattr(source, "missing_labels"):
        return source.missing_labels(field)
    if field == "labels" and not getattr(source, "num_labels", None):
        return f"source` ({type(source).__name__} has no label sets)"
    return None
