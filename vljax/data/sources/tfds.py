"""`source="tfds"`: a split of a TFDS dataset stored as array_record (no TensorFlow needed); a
dataset prepared as tfrecord is an error naming `python -m vljax.data.convert_tfds`, which adds
array_record files in place."""
from __future__ import annotations

from etils import epath
import tensorflow_datasets as tfds

from vljax.data import tfds_writer
from vljax.data.sources import base

# Integer class features an evaluator reads when its entry names none (the demo sets' own).
DEFAULT_LABEL_FEATURES = ("label", "category")
DEFAULT_LABEL_SET_FEATURE = "tags"  # the label set feature read when none is named


def _lookup(tree, key: str):
    """tree["a/b"] as tree["a"]["b"]: nested features such as coco_captions' "captions/text"."""
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _tfrecord_only(name: str, data_dir: str) -> bool:
    """Whether dataset `name` is prepared under `data_dir` in tfrecord format and no other
    (`vljax.data.convert_tfds` adds array_record)."""
    try:
        info = tfds.builder(name, data_dir=data_dir).info
    except Exception:  # not prepared, or not a dataset: the caller's error says so
        return False
    formats = {f.value for f in info.available_file_formats()}
    return formats == {"tfrecord"}


@base.register("tfds")
class TfdsSource(base.Source):
    """A split of a TFDS dataset stored as array_record (no TensorFlow needed).

    Args:
      name: dataset name, optionally with a version ("vljax_emoji:1.0.0").
      split: TFDS split spec ("train", "test[:10%]", ...).
      data_dir: TFDS data dir; default `default_data_dir()`.
      label_key: integer feature copied to record["label"] (e.g. "category"); None for -1.
      labels_key: a `Sequence(ClassLabel)` feature (a label set, e.g. the demo sets' "tags")
        copied to record["labels"]; `num_labels` / `label_names` are its ClassLabel's.
      image_key / caption_key: features holding the image (encoded bytes, or a decoded uint8
        array for TFDS Image features) and the caption(s); "a/b" names a nested feature;
        caption_key None: a set without captions (records carry none).
        Config key `text_key` is another name of `caption_key`.
    """
    REQUIRED = ("name", "split")
    OPTIONAL = ("data_dir", "label_key", "labels_key", "image_key", "caption_key")
    ALIASES = {"text_key": "caption_key"}
    DATA_DIR = True
    LABEL_HINTS = {"label": "label_key` (an integer class feature)",
                   "labels": "labels_key` (a Sequence(ClassLabel) feature, e.g. 'tags')"}

    def __init__(self, name: str, split: str, data_dir=None, label_key: str | None = None,
                 image_key: str = "image", caption_key: str | None = "captions", labels_key: str | None = None):
        self.name, self.split = name, split
        self.data_dir = str(data_dir or base.default_data_dir())
        try:
            # download=False: tfds' default would download and prepare a registered set that is
            # missing (ImageNet-sized archives online; minutes of retries offline).
            self._ds = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...)
            # tfds' own message lists every registered dataset: keep only its first line; a set
            # that is not there at all gets a misleading "file format TFRECORD" message.
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not (epath.Path(self.data_dir) / name.split(":")[0].split("/")[0]).exists():
                why = "not prepared there"
            if _tfrecord_only(name, self.data_dir):
                raise ValueError(
                    f"TFDS dataset {name!r} under {self.data_dir} is prepared as tfrecord, which only "
                    f"tf.data reads; convert it in place (array_record beside the tfrecord files) with "
                    f"`python -m vljax.data.convert_tfds --name={name} --data_dir={self.data_dir}`") from e
            raise ValueError(
                f"TFDS dataset {name!r} split {split!r} cannot be opened under {self.data_dir} "
                f"({why}); the demo sets are built by `python3 -m vljax.data.build_demo`") from e
        features = self._ds.dataset_info.features
        for key in (image_key,) + tuple(k for k in (caption_key, label_key, labels_key) if k):
            self._feature(key)
        self.label_key, self.image_key, self.caption_key = label_key, image_key, caption_key
        self.labels_key, self.num_labels, self.label_names = labels_key, None, None
        if labels_key:
            f = _lookup(features, labels_key)
            if not (isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.ClassLabel)):
                raise ValueError(f"labels_key={labels_key!r}: feature {labels_key!r} of TFDS dataset {name!r} "
                                 f"is {type(f).__name__}, not a Sequence(ClassLabel) label set")
            self.num_labels, self.label_names = f.feature.num_classes, list(f.feature.names)

    def _feature(self, key: str):
        features = self._ds.dataset_info.features
        try:
            return _lookup(features, key)
        except KeyError:
            raise ValueError(f"TFDS dataset {self.name!r} has no feature {key!r} "
                             f"(features: {sorted(features.keys())})") from None

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
            return base.bad_record(rid, "read_error", repr(e))
        caps = _lookup(r, self.caption_key) if self.caption_key else []
        caps = [base.text(caps)] if isinstance(caps, (bytes, str)) else [base.text(c) for c in caps]
        label = int(_lookup(r, self.label_key)) if self.label_key else -1
        labels = [int(x) for x in _lookup(r, self.labels_key)] if self.labels_key else []
        return {"id": base.text(r.get("id", rid)), "image": _lookup(r, self.image_key),
                "captions": caps, "label": label, "labels": labels}

    def cache_key(self) -> str:
        return base.digest("tfds", self.name, self.split, self.data_dir, self.image_key)

    def gives_label(self) -> bool:
        return bool(self.label_key)

    # -- metadata: features read from the stored record, the image left undecoded ---------------
    def class_key(self, key: str | None = None) -> str:
        """`key`, else the source's `label_key`, else the first of DEFAULT_LABEL_FEATURES it has."""
        key = key or self.label_key
        if key:
            return key
        for key in DEFAULT_LABEL_FEATURES:
            if key in self.info.features:
                return key
        raise ValueError(f"{self!r}: no 'label' or 'category' feature; set `label` in the eval's data")

    def captions_of(self, index: int) -> list[str]:
        if not self.caption_key:
            return []
        caps = _lookup(self.raw(index), self.caption_key)
        return [base.text(c) for c in ([caps] if isinstance(caps, (bytes, str)) else caps)]

    def label_of(self, index: int, key: str | None = None) -> int:
        return int(_lookup(self.raw(index), self.class_key(key)))

    def label_set_of(self, index: int, key: str | None = None) -> list[int]:
        return [int(x) for x in _lookup(self.raw(index), key or self.labels_key or DEFAULT_LABEL_SET_FEATURE)]

    def class_names_of(self, key: str | None = None) -> list[str]:
        return tfds_writer.read_class_names(self.info, self.class_key(key))

    def label_set_names(self, key: str | None = None) -> list[str]:
        return tfds_writer.read_class_names(self.info, key or self.labels_key or DEFAULT_LABEL_SET_FEATURE)

    def __repr__(self):
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"
