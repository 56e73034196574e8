"""Write image-text datasets as TFDS array_record datasets, without TensorFlow.

TFDS `Image` features need TensorFlow to encode, so images are stored as already-encoded PNG
bytes in a scalar string `Tensor` feature (read back as `bytes` by `tfds.data_source`; decode with
`transforms.decode_image`). Strings, string sequences and ClassLabels work without TensorFlow.

    spec = DatasetSpec(name="my_set", features={...}, splits={"train": lambda: examples()})
    write_tfds(spec, data_dir)   # then tfds.data_source("my_set", split="train", data_dir=data_dir)
"""
import dataclasses
import hashlib
import io
import json
from pathlib import Path
import types
from typing import Callable, Iterable

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vljax import logs

CLASS_NAMES_FILE = "class_names.json"


def png_bytes_feature():
    """A scalar string feature holding encoded image bytes."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def split_of(key: str, fractions=(("train", 0.8), ("val", 0.1), ("test", 0.1))) -> str:
    """Deterministic split from a hash of `key` (stable across runs, machines and Python versions)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


@dataclasses.dataclass
class DatasetSpec:
    """What to write: features, one example generator per split, metadata.

    splits: split name -> zero-argument callable returning an iterable of (unique key, example).
    class_names: feature name -> human-readable class names (saved in the metadata and in
      class_names.json next to the data), for features whose raw ClassLabel names are not.
    """
    name: str
    features: dict
    splits: dict[str, Callable[[], Iterable[tuple[str, dict]]]]
    description: str = ""
    version: str = "1.0.0"
    homepage: str | None = None
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)


def dataset_dir(name: str, data_dir, version: str = "1.0.0") -> Path:
    return Path(data_dir) / name / version


def is_built(name: str, data_dir, version: str = "1.0.0") -> bool:
    return (dataset_dir(name, data_dir, version) / "dataset_info.json").is_file()


def _builder_class(spec: DatasetSpec, progress: bool = True):
    """A GeneratorBasedBuilder subclass for `spec`, kept out of the global TFDS registry (tests
    may write several datasets of the same name into different dirs); `progress`: a bar per split."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=spec.description, homepage=spec.homepage,
            features=tfds.features.FeaturesDict(spec.features),
            metadata=tfds.core.MetadataDict(class_names=spec.class_names, **spec.metadata))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, make) for split, make in spec.splits.items()}

    def _generate_examples(self, split, make):
        yield from logs.progress(make(), desc=f"{spec.name} {split}", unit="ex", enabled=progress)

    def body(ns):
        ns.update(name=spec.name, VERSION=tfds.core.Version(spec.version), _info=_info,
                  _split_generators=_split_generators, _generate_examples=_generate_examples)

    return types.new_class(f"Builder_{spec.name}", (tfds.core.GeneratorBasedBuilder,),
                           {"skip_registration": True}, body)


def write_tfds(spec: DatasetSpec, data_dir, progress: bool = True) -> Path:
    """Writes `spec` under data_dir/name/version (array_record); returns that directory.
    A dataset already there is left as is (TFDS reuses complete datasets). `progress`: a bar
    per split (off where several builds share a terminal)."""
    tfds.disable_progress_bar()
    builder = _builder_class(spec, progress)(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    out = dataset_dir(spec.name, data_dir, spec.version)
    (out / CLASS_NAMES_FILE).write_text(json.dumps(spec.class_names, indent=1))
    return out


def read_class_names(info, feature: str) -> list[str]:
    """Human-readable class names of a ClassLabel feature (or a Sequence of one) from a dataset's
    info: the spec's class_names where given, else the ClassLabel's own names."""
    names = dict(info.metadata or {}).get("class_names", {}).get(feature)
    if names:
        return list(names)
    f = info.features[feature]
    f = getattr(f, "feature", f)  # Sequence(ClassLabel) -> ClassLabel
    if not isinstance(f, tfds.features.ClassLabel):
        raise ValueError(f"feature {feature!r} is not a ClassLabel (it is {f!r})")
    return list(f.names)
