"""A TFDS dataset prepared in TFDS's default tfrecord format: TfdsSource names the command that
converts it, `python -m vljax.data.convert_tfds` converts it in place without TensorFlow, and the
records then equal those of the same dataset prepared as array_record."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from helpers import REPO

from vljax.data import convert_tfds, sources, tfds_writer

NAME = "vljax_tfr"
SPLITS = {"train": 10, "test": 4}


def _examples(split, n):
    rng = np.random.default_rng(len(split))
    for i in range(n):
        yield f"{split}{i}", {"id": f"{split}{i}", "image": rng.bytes(20 + i),
                              "captions": [f"{split} caption {i}", "another"], "label": i % 3}


def _as_tfrecord(folder):
    """Rewrites an array_record TFDS dataset folder as TFDS prepares it in tfrecord format: the same
    serialized examples in tfrecord shards, `fileFormat: tfrecord` in dataset_info.json."""
    for shard in sorted(folder.glob("*.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(shard))
        records = reader.read_all()
        reader.close()
        convert_tfds.write_tfrecord(str(shard).replace(".array_record-", ".tfrecord-"), records)
        shard.unlink()
    info = json.loads((folder / "dataset_info.json").read_text())
    (folder / "dataset_info.json").write_text(json.dumps(dict(info, fileFormat="tfrecord"), indent=2))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfr")
    spec = tfds_writer.DatasetSpec(
        name=NAME, features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                             "captions": tfds.features.Sequence(tfds.features.Text()),
                             "label": tfds.features.ClassLabel(names=["a", "b", "c"])},
        splits={s: (lambda s=s, n=n: _examples(s, n)) for s, n in SPLITS.items()})
    tfds_writer.write_tfds(spec, root / "array_record")
    shutil.copytree(root / "array_record", root / "tfrecord")
    _as_tfrecord(root / "tfrecord" / NAME / "1.0.0")
    return root


def test_crc32c_and_the_framing_round_trip(tmp_path):
    assert convert_tfds.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    records = [b"", b"x", bytes(range(256)) * 3]
    path = tmp_path / "a.tfrecord"
    assert convert_tfds.write_tfrecord(path, records) == 3
    assert list(convert_tfds.read_tfrecord(path)) == records
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"a.tfrecord: record 2 is truncated \(data\)"):
        list(convert_tfds.read_tfrecord(path))
    path.write_bytes(data[:16] + b"\x07" + data[17:])  # record 1 (after 16 bytes of record 0): its length
    with pytest.raises(ValueError, match=r"a.tfrecord: record 1 has a damaged length"):
        list(convert_tfds.read_tfrecord(path))


def test_tfrecord_dataset_is_named_converted_in_place_and_equals_array_record(dirs, tmp_path):
    data_dir = str(tmp_path / "tfrecord")
    shutil.copytree(dirs / "tfrecord", data_dir)
    assert convert_tfds.needs_conversion(NAME, data_dir)
    with pytest.raises(ValueError, match=rf"prepared as tfrecord.*`python -m vljax.data.convert_tfds "
                                         rf"--name={NAME} --data_dir={data_dir}`"):
        sources.get_source(dict(name=NAME, split="train", data_dir=data_dir))
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "vljax.data.convert_tfds", f"--name={NAME}", f"--data_dir={data_dir}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{NAME} to array_record: 100%" in proc.stderr and "14/14" in proc.stderr  # the progress bar
    assert not convert_tfds.needs_conversion(NAME, data_dir)
    folder = convert_tfds.dataset_dir(NAME, data_dir)
    assert sorted(p.name for p in folder.glob("*-0000*")) == sorted(
        f"{NAME}-{s}.{fmt}-00000-of-00001" for s in SPLITS for fmt in ("tfrecord", "array_record"))
    for split in ("train", "test", "train[2:7]"):
        src = sources.get_source(dict(name=NAME, split=split, data_dir=data_dir, label_key="label"))
        ref = sources.get_source(dict(name=NAME, split=split, data_dir=str(dirs / "array_record"), label_key="label"))
        assert len(src) == len(ref) > 0
        for i in range(len(ref)):
            assert src[i] == ref[i], (split, i)
        assert src.class_names_of() == ["a", "b", "c"]
    assert convert_tfds.convert(NAME, data_dir) == folder  # converted already: nothing to do


def test_a_dataset_not_prepared_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"TFDS dataset 'nothing' is not prepared under {tmp_path}"):
        convert_tfds.convert("nothing", tmp_path)
