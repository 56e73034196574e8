"""Convert a TFDS dataset prepared in TFDS's default tfrecord format to array_record, in place and
without TensorFlow, so that `tfds.data_source` (vljax's TfdsSource) reads it by random access:

    python -m vljax.data.convert_tfds --name=imagenet2012 [--data_dir=~/tensorflow_datasets]

Each shard `<name>-<split>.tfrecord-XXXXX-of-YYYYY` gets a sibling `...array_record-XXXXX-of-YYYYY`
holding the same serialized tf.train.Example records in the same order (TFDS stores the same
bytes in both formats, and decodes them without TF: `features.deserialize_example_np`), written as
TFDS writes array_record (`group_size:1`); then "array_record" is added to the dataset_info.json's
`alternativeFileFormats` (the tfrecord files stay, and tf.data users keep reading them). Shards are
written under a temporary name and renamed, the info updated last: an interrupted conversion is
simply run again. The data dir must be local (ArrayRecordWriter writes local files).

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): per record, uint64 length (little
endian), uint32 masked CRC-32C of the length bytes, the data, uint32 masked CRC-32C of the data.
The reader checks each length's CRC (a damaged or truncated shard is an error naming the file and
record); the data CRC is not checked (pure-Python CRC-32C runs at a few MB/s): a damaged record
body fails to deserialize at read time and is counted as a "read_error" record by TfdsSource.
"""
from __future__ import annotations

import itertools
import json
import struct
from typing import Iterable, Iterator

from absl import app, flags
from array_record.python import array_record_module
from etils import epath
import tensorflow_datasets as tfds

from vljax import logs
from vljax.data.sources import base

_INFO = "dataset_info.json"
_ALTERNATIVES = "alternativeFileFormats"
_TFRECORD, _ARRAY_RECORD = "tfrecord", "array_record"
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (tensorflow/core/lib/hash/crc32c.h `Mask`)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path) -> Iterator[bytes]:
    """The records of tfrecord file `path` (any epath), in order; a truncated file or a length
    whose CRC does not match is a ValueError naming the file and the record number."""
    with epath.Path(path).open("rb") as f:
        for i in itertools.count():
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"tfrecord file {path}: record {i} is truncated (header)")
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if masked_crc(length_bytes) != length_crc:
                raise ValueError(f"tfrecord file {path}: record {i} has a damaged length (CRC mismatch)")
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"tfrecord file {path}: record {i} is truncated (data)")
            yield data


def write_tfrecord(path, records: Iterable[bytes]) -> int:
    """Writes `records` to tfrecord file `path` (the framing TF's TFRecordWriter writes);
    returns how many."""
    n = 0
    with epath.Path(path).open("wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data)))
            n += 1
    return n


def dataset_dir(name: str, data_dir=None) -> epath.Path:
    """The prepared dataset's folder: `data_dir/name/version` (`name:version`, else its newest
    version); an error naming the folder when there is none."""
    root = epath.Path(data_dir or base.default_data_dir()).expanduser()
    name, _, version = name.partition(":")
    if version:
        folder = root / name / version
    else:
        versions = [p.name for p in (root / name).iterdir() if (p / _INFO).exists()] if (root / name).is_dir() else []
        if not versions:
            raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under {root} (no "
                                    f"{root / name}/<version>/{_INFO})")
        folder = root / name / str(max(versions, key=tfds.core.Version))
    if not (folder / _INFO).exists():
        raise FileNotFoundError(f"TFDS dataset {name!r}: {folder / _INFO} does not exist")
    return folder


def _info(folder: epath.Path) -> dict:
    return json.loads((folder / _INFO).read_text())


def needs_conversion(name: str, data_dir=None) -> bool:
    """Whether dataset `name` is prepared as tfrecord only (no array_record to read by random
    access); False when it is not prepared at all."""
    try:
        info = _info(dataset_dir(name, data_dir))
    except FileNotFoundError:
        return False
    formats = [info.get("fileFormat", _TFRECORD), *info.get(_ALTERNATIVES, [])]
    return _TFRECORD in formats and _ARRAY_RECORD not in formats


def command(name: str, data_dir=None) -> str:
    """The command that converts dataset `name` (for error messages)."""
    return f"python -m vljax.data.convert_tfds --name={name}" + (f" --data_dir={data_dir}" if data_dir else "")


def convert(name: str, data_dir=None, progress: bool = True) -> epath.Path:
    """Converts dataset `name` (module docstring); returns its folder. A dataset that already has
    array_record files is left as it is."""
    folder = dataset_dir(name, data_dir)
    info = _info(folder)
    if not needs_conversion(name, data_dir):
        return folder
    shards = sorted(p for p in folder.iterdir() if f".{_TFRECORD}-" in p.name)
    total = sum(int(n) for split in info.get("splits", []) for n in split.get("shardLengths", []))
    if not shards:
        raise FileNotFoundError(f"TFDS dataset {name!r}: no *.{_TFRECORD}-* shard in {folder}")
    with logs.progress(desc=f"{name} to array_record", total=total or None, unit="ex",
                       enabled=progress) as bar:
        for shard in shards:
            out = folder / shard.name.replace(f".{_TFRECORD}-", f".{_ARRAY_RECORD}-", 1)
            tmp = out.parent / (out.name + ".incomplete")
            writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
            for record in read_tfrecord(shard):
                writer.write(record)
                bar.update(1)
            writer.close()
            tmp.replace(out)
    info[_ALTERNATIVES] = [*info.get(_ALTERNATIVES, []), _ARRAY_RECORD]
    tmp = folder / (_INFO + ".incomplete")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(folder / _INFO)  # epath rename() refuses to overwrite
    return folder


def _define_flags():
    """The command's flags, defined only when it runs: the module is imported by other CLIs and
    tests, whose own --name / --data_dir flags would otherwise collide (absl's DuplicateFlagError)."""
    return (flags.DEFINE_string("name", None, "TFDS dataset name, optionally name:version.", required=True),
            flags.DEFINE_string("data_dir", None, "TFDS data dir (default: vljax's, $VLJAX_ASSETS/tfds)."))


def main(argv, name_flag, data_dir_flag):
    del argv
    folder = convert(name_flag.value, data_dir_flag.value)
    print(f"{name_flag.value}: array_record shards in {folder}; read it with source='tfds'")


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, *_flags))
