"""Random-access record sources for grain: TFDS array_record, a folder of images + captions, a JSONL manifest.

Every source has `__len__` and `__getitem__(i) -> record`, a plain dict:

    {"id": str, "image": bytes | str | uint8 array (encoded image, a file path, or pixels),
     "captions": list[str], "label": int (-1 when the source has no label_key),
     "labels": list[int] (a label set, e.g. multi-hot tags; empty when none)}

Label sets: a source that has them says how many classes they index (`num_labels`, K) and their
names (`label_names`, K strings); the pipeline maps every source's sets into one label space (the
union of the names) and batches them multi-hot (`config.input.labels`).

plus, for a record that cannot be read, `"error": reason` (one of preprocess.SKIP_REASONS) and
`"detail"`. Per-record problems never raise: the pipeline skips such records and counts them, so
one bad file cannot stop a training run. Problems with the source itself (a missing dataset or
manifest, a malformed manifest line) raise at construction, naming the file and line.
"""
import json
import os
from pathlib import Path

from absl import logging
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def default_assets_dir() -> Path:
    """$VLJAX_ASSETS, else ~/.cache/vljax."""
    return Path(os.environ.get("VLJAX_ASSETS", Path.home() / ".cache" / "vljax")).expanduser()


def default_data_dir() -> Path:
    """Where the demo TFDS datasets live: <assets>/tfds."""
    return default_assets_dir() / "tfds"


def _text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _bad(record_id: str, reason: str, detail: str) -> dict:
    logging.log_every_n_seconds(logging.WARNING, "skipping record %s: %s (%s)", 10,
                                record_id, reason, detail)
    return {"id": record_id, "image": b"", "captions": [], "label": -1, "labels": [],
            "error": reason, "detail": detail}


def _lookup(tree, key: str):
    """tree["a/b"] as tree["a"]["b"]: nested features such as coco_captions' "captions/text"."""
    for part in key.split("/"):
        tree = tree[part]
    return tree


class TfdsSource:
    """A split of a TFDS dataset stored as array_record (no TensorFlow needed).

    Args:
      name: dataset name, optionally with a version ("vljax_emoji:1.0.0").
      split: TFDS split spec ("train", "test[:10%]", ...).
      data_dir: TFDS data dir; default `default_data_dir()`.
      label_key: integer feature copied to record["label"] (e.g. "category"); None for -1.
      labels_key: a `Sequence(ClassLabel)` feature (a label set, e.g. the demo sets' "tags")
        copied to record["labels"]; `num_labels` / `label_names` are its ClassLabel's.
      image_key / caption_key: features holding the image (encoded bytes, or a decoded uint8
        array for TFDS Image features) and the caption(s); "a/b" names a nested feature.
    """

    def __init__(self, name: str, split: str, data_dir=None, label_key: str | None = None,
                 image_key: str = "image", caption_key: str = "captions", labels_key: str | None = None):
        self.name, self.split = name, split
        self.data_dir = str(data_dir or default_data_dir())
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=self.data_dir)
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...)
            # tfds' own message lists every registered dataset: keep only its first line.
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"TFDS dataset {name!r} split {split!r} cannot be opened under {self.data_dir} "
                f"({why}); the demo sets are built by `python3 -m vljax.data.build_demo`") from e
        features = self._ds.dataset_info.features
        for key in (image_key, caption_key) + tuple(k for k in (label_key, labels_key) if k):
            try:
                _lookup(features, key)
            except KeyError:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} "
                                 f"(features: {sorted(features.keys())})") from None
        self.label_key, self.image_key, self.caption_key = label_key, image_key, caption_key
        self.labels_key, self.num_labels, self.label_names = labels_key, None, None
        if labels_key:
            f = _lookup(features, labels_key)
            if not (isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.ClassLabel)):
                raise ValueError(f"labels_key={labels_key!r}: feature {labels_key!r} of TFDS dataset {name!r} "
                                 f"is {type(f).__name__}, not a Sequence(ClassLabel) label set")
            self.num_labels, self.label_names = f.feature.num_classes, list(f.feature.names)

    @property
    def info(self):
        return self._ds.dataset_info

    def __len__(self) -> int:
        return len(self._ds)

    def raw(self, index: int) -> dict:
        """The TFDS record as stored (bytes strings, all features)."""
        return self._ds[index]

    def __getitem__(self, index: int) -> dict:
        rid = f"{self.name}/{self.split}[{index}]"
        try:
            r = self._ds[index]
        except Exception as e:  # a damaged array_record entry; anything else should not happen
            return _bad(rid, "read_error", repr(e))
        caps = _lookup(r, self.caption_key)
        caps = [_text(caps)] if isinstance(caps, (bytes, str)) else [_text(c) for c in caps]
        label = int(_lookup(r, self.label_key)) if self.label_key else -1
        labels = [int(x) for x in _lookup(r, self.labels_key)] if self.labels_key else []
        return {"id": _text(r.get("id", rid)), "image": _lookup(r, self.image_key),
                "captions": caps, "label": label, "labels": labels}

    def __repr__(self):
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class FolderSource:
    """Images under `root` (recursively) with captions in a same-named .txt (one caption a line).

    `a/b/cat.jpg` takes its captions from `a/b/cat.txt`. An image without its .txt is counted as
    `missing_file` at read time. With `label_from_folder`, the label is the index of the image's
    parent folder (relative to root) in `self.class_names` (sorted).
    """

    def __init__(self, root, label_from_folder: bool = False):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source: {self.root} is not a directory")
        self.paths = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise ValueError(f"folder source: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.class_names = sorted({str(p.parent.relative_to(self.root)) for p in self.paths})
        self._label_of = {c: i for i, c in enumerate(self.class_names)}
        self.label_from_folder = label_from_folder
        self.num_labels = self.label_names = None  # no label sets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        txt = path.with_suffix(".txt")
        try:
            captions = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return _bad(str(path), "missing_file", f"no caption file {txt}")
        label = self._label_of[str(path.parent.relative_to(self.root))] if self.label_from_folder else -1
        return {"id": str(path), "image": str(path), "captions": captions, "label": label, "labels": []}

    def __repr__(self):
        return f"FolderSource({str(self.root)!r}, n={len(self)})"


def _parse_labels(obj: dict, where: str, num_labels: int | None) -> list[int]:
    """A record's label set: 'labels' (a list of class indices in [0, num_labels)), [] if absent."""
    labels = obj.get("labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in labels)):
        raise ValueError(f"{where}: 'labels' must be a list of integers (a label set), got {labels!r}")
    if num_labels is not None:
        bad = [x for x in labels if not 0 <= x < num_labels]
        if bad:
            raise ValueError(f"{where}: label {bad[0]} in 'labels' is outside [0, {num_labels}) "
                             f"(the source's `num_labels`={num_labels})")
    return labels


def _parse_manifest_line(line: str, where: str, base: Path, num_labels: int | None = None) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise ValueError(f"{where}: expected an object with an 'image' path string")
    if "captions" in obj:
        caps = obj["captions"]
        if not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
            raise ValueError(f"{where}: 'captions' must be a list of strings")
    elif isinstance(obj.get("caption"), str):
        caps = [obj["caption"]]
    else:
        raise ValueError(f"{where}: needs 'captions' (list of strings) or 'caption' (string)")
    label = obj.get("label", -1)
    if not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be an integer")
    image = Path(os.path.expanduser(obj["image"]))  # "~nobody/x" stays as it is (Path raises)
    return {"id": where, "image": str(image if image.is_absolute() else base / image),
            "captions": caps, "label": label, "labels": _parse_labels(obj, where, num_labels)}


class JsonlSource:
    """A JSONL manifest, one object a line:
    `{"image": path, "captions": [...] | "caption": str, "label": int?, "labels": [int, ...]?}`;
    relative image paths are relative to the manifest's folder. Blank lines are ignored.
    `labels` is a label set (class indices); `num_labels` (K) declares the label space, and then
    every index must be in [0, K) (named by `file:line` when not). A record without `labels` has
    an empty set (unlabeled).

    The manifest is parsed at construction: a malformed line raises ValueError naming
    `file:line`. Image files are only opened at read time (a missing one is counted, not fatal).
    """

    def __init__(self, path, num_labels: int | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL manifest {self.path} does not exist")
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                       or num_labels <= 0):
            raise ValueError(f"JSONL manifest {self.path}: num_labels must be a positive integer, got {num_labels!r}")
        base = self.path.parent
        with open(self.path, encoding="utf-8") as f:
            self.records = [_parse_manifest_line(line, f"{self.path}:{i}", base, num_labels)
                            for i, line in enumerate(f, 1) if line.strip()]
        if not self.records:
            raise ValueError(f"JSONL manifest {self.path} has no records")
        if num_labels is not None:
            if not any(r["labels"] for r in self.records):
                raise ValueError(f"num_labels={num_labels}: no record of JSONL manifest {self.path} has "
                                 "'labels' (a label set); every record would be unlabeled")
        self.num_labels = num_labels
        self.label_names = None if num_labels is None else [str(i) for i in range(num_labels)]
        self.has_label = any(r["label"] >= 0 for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[index])

    def __repr__(self):
        return f"JsonlSource({str(self.path)!r}, n={len(self)})"


class WithFeatures:
    """A source whose records carry a locked trunk's stored features instead of the image, so no
    image is decoded: `"features": f32 [V, F]` (views, vljax/features.py; and `"tokens"` [V, N, W]
    from a store with tokens), or `"features_skip": reason`
    when the store could not read the image (counted as that reason, after the caption check, as
    the image pipeline counts it)."""

    def __init__(self, source, features, where: str = "config.input.data"):
        if len(source) != len(features):
            raise ValueError(f"{where}: {source!r} has {len(source)} records but its feature store "
                             f"{features!r} has {len(features)}")
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        record.pop("image", None)
        if "error" not in record:
            f = self.features[index]
            record.update({k: f[k] for k in ("features", "tokens") if k in f} if "features" in f
                          else {"features_skip": f["error"]})
        return record

    def __repr__(self):
        return f"WithFeatures({self.source!r}, {self.features!r})"


def get_source(cfg, data_dir=None):
    """A source from one entry of config.input.data, e.g.
    dict(source="tfds", name="vljax_emoji", split="train", label_key="category", labels_key="tags"),
    dict(source="folder", path=...), dict(source="jsonl", path=..., num_labels=K).
    For tfds, `text_key` is accepted as another name of `caption_key`."""
    kind = cfg.get("source", "tfds")
    if kind == "tfds":
        return TfdsSource(cfg["name"], cfg["split"], data_dir=cfg.get("data_dir", data_dir),
                          label_key=cfg.get("label_key"), labels_key=cfg.get("labels_key"),
                          image_key=cfg.get("image_key", "image"),
                          caption_key=cfg.get("caption_key", cfg.get("text_key", "captions")))
    if kind == "folder":
        return FolderSource(cfg["path"], label_from_folder=cfg.get("label_from_folder", False))
    if kind == "jsonl":
        return JsonlSource(cfg["path"], num_labels=cfg.get("num_labels"))
    raise ValueError(f"config.input.data: unknown source {kind!r} (expected 'tfds', 'folder' or 'jsonl')")


def missing_labels(source, field: str) -> str | None:
    """None when `source` gives `field` ("label": integer class labels, "labels": label sets);
    otherwise the key of its config entry that would give them, with what it takes (for errors)."""
    if field == "labels":
        if getattr(source, "num_labels", None):
            return None
        if isinstance(source, TfdsSource):
            return "labels_key` (a Sequence(ClassLabel) feature, e.g. 'tags')"
        if isinstance(source, JsonlSource):
            return "num_labels` (and 'labels' lists in its records)"
        return "source` (a folder source has no label sets)"
    if field != "label":
        raise ValueError(f"unknown label field {field!r} (expected 'label' or 'labels')")
    if isinstance(source, TfdsSource):
        return None if source.label_key else "label_key` (an integer class feature)"
    if isinstance(source, FolderSource):
        return None if source.label_from_folder else "label_from_folder` (True)"
    if isinstance(source, JsonlSource):
        return None if source.has_label else "path` (its records have no integer 'label')"
    return None


def label_space(sources_: list) -> list[str]:
    """The label names of one label space shared by `sources_` (the sorted union of their label
    sets' names, so the tag "cat" of two datasets is one class); raises naming the config entry
    of a source without label sets."""
    names = set()
    for i, src in enumerate(sources_):
        why = missing_labels(src, "labels")
        if why:
            raise ValueError(f"config key `input.data[{i}].{why}: `input.labels` takes label sets, "
                             f"but {src!r} has none")
        names.update(src.label_names)
    return sorted(names)


class LabelsIn:
    """record -> record with its label set's indices mapped into a shared label space
    (`label_space`). Picklable (grain workers)."""

    def __init__(self, source_names: list[str], space: list[str]):
        index = {n: i for i, n in enumerate(space)}
        self.table = [index[n] for n in source_names]

    def __call__(self, record: dict) -> dict:
        return {**record, "labels": [self.table[x] for x in record.get("labels", [])]}
