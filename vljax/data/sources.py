"""Random-access record sources for grain: TFDS array_record, a folder of images + captions, a JSONL manifest.

Every source has `__len__` and `__getitem__(i) -> record`, a plain dict:

    {"id": str, "image": bytes | str | uint8 array (encoded image, a file path, or pixels),
     "captions": list[str], "label": int (-1 when the source has no label_key)}

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
    return {"id": record_id, "image": b"", "captions": [], "label": -1,
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
      image_key / caption_key: features holding the image (encoded bytes, or a decoded uint8
        array for TFDS Image features) and the caption(s); "a/b" names a nested feature.
    """

    def __init__(self, name: str, split: str, data_dir=None, label_key: str | None = None,
                 image_key: str = "image", caption_key: str = "captions"):
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
        for key in (image_key, caption_key) + ((label_key,) if label_key else ()):
            try:
                _lookup(features, key)
            except KeyError:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} "
                                 f"(features: {sorted(features.keys())})") from None
        self.label_key, self.image_key, self.caption_key = label_key, image_key, caption_key

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
        return {"id": _text(r.get("id", rid)), "image": _lookup(r, self.image_key),
                "captions": caps, "label": label}

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
        return {"id": str(path), "image": str(path), "captions": captions, "label": label}

    def __repr__(self):
        return f"FolderSource({str(self.root)!r}, n={len(self)})"


def _parse_manifest_line(line: str, where: str, base: Path) -> dict:
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
            "captions": caps, "label": label, "labels": obj.get("labels")}


class JsonlSource:
    """A JSONL manifest, one object a line:
    `{"image": path, "captions": [...] | "caption": str, "label": int?, "labels": [...]?}`;
    relative image paths are relative to the manifest's folder. Blank lines are ignored.

    The manifest is parsed at construction: a malformed line raises ValueError naming
    `file:line`. Image files are only opened at read time (a missing one is counted, not fatal).
    """

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL manifest {self.path} does not exist")
        base = self.path.parent
        with open(self.path, encoding="utf-8") as f:
            self.records = [_parse_manifest_line(line, f"{self.path}:{i}", base)
                            for i, line in enumerate(f, 1) if line.strip()]
        if not self.records:
            raise ValueError(f"JSONL manifest {self.path} has no records")

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
    dict(source="tfds", name="vljax_emoji", split="train", label_key="category"),
    dict(source="folder", path=...), dict(source="jsonl", path=...).
    For tfds, `text_key` is accepted as another name of `caption_key`."""
    kind = cfg.get("source", "tfds")
    if kind == "tfds":
        return TfdsSource(cfg["name"], cfg["split"], data_dir=cfg.get("data_dir", data_dir),
                          label_key=cfg.get("label_key"),
                          image_key=cfg.get("image_key", "image"),
                          caption_key=cfg.get("caption_key", cfg.get("text_key", "captions")))
    if kind == "folder":
        return FolderSource(cfg["path"], label_from_folder=cfg.get("label_from_folder", False))
    if kind == "jsonl":
        return JsonlSource(cfg["path"])
    raise ValueError(f"config.input.data: unknown source {kind!r} (expected 'tfds', 'folder' or 'jsonl')")
