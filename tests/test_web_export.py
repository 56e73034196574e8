"""vljax.data.web_export: TFDS records written in img2dataset's layout read back equal, with the
`webdataset` package and with pyarrow (ids, image bytes, captions, keys, file names, stats)."""
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys

from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest
import tensorflow_datasets as tfds
import webdataset as wds

from helpers import REPO, tiny_config_file
from vljax import metrics
from vljax.data import sources
from vljax.data.sources import shards
from vljax.data import tfds_writer
from vljax.data import web_export

N, SHARD = 23, 10  # 3 shards: 10, 10, 3 records
JPEG_AT, BAD_AT = 4, 17  # one JPEG record, one whose bytes are no image


def _image(k: int) -> bytes:
    im = Image.new("RGB", (6 + k, 5), ((37 * k) % 256, 90, 200))
    if k == JPEG_AT:
        buf = io.BytesIO()
        im.save(buf, format="JPEG")
        return buf.getvalue()
    return b"not an image at all" if k == BAD_AT else tfds_writer.encode_png(im)


def _spec():
    def examples():
        for k in range(N):
            yield f"r{k}", {"id": f"r{k:02d}", "image": _image(k),
                            "captions": [f"caption {k} {j}" for j in range(1 + k % 3)]}
    return tfds_writer.DatasetSpec(
        name="vljax_webtiny",
        features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                  "captions": tfds.features.Sequence(tfds.features.Text())},
        splits={"train": examples})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_writer.write_tfds(_spec(), data_dir)
    return sources.TfdsSource("vljax_webtiny", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def expected(source):
    """TFDS records by id: (image bytes, captions), in TFDS index order."""
    out = {}
    for i in range(len(source)):
        r = source[i]
        out[r["id"]] = (bytes(r["image"]), r["captions"])
    return out


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    totals = {fmt: web_export.export(source, root / fmt, fmt, shard_size=SHARD, progress=False)
              for fmt in web_export.FORMATS}
    return root, totals


def _bad_ids(expected):
    return {rid for rid, (data, _) in expected.items() if web_export.image_format(data) is None}


def test_layout_names_and_keys_are_img2datasets(exported):
    root, totals = exported
    shards = ["00000", "00001", "00002"]
    assert sorted(p.name for p in (root / "webdataset").iterdir()) == sorted(
        f"{s}{ext}" for s in shards for ext in (".tar", ".parquet", "_stats.json"))
    assert sorted(p.name for p in (root / "parquet").iterdir()) == sorted(
        f"{s}{ext}" for s in shards for ext in (".parquet", "_stats.json"))
    # img2dataset's compute_key: 10**ceil(log10(10)) * shard + index, 5 + 1 digits.
    assert web_export.sample_key(4, 2, SHARD) == "000024"
    assert web_export.sample_key(7, 3, 1000) == "00003007"
    assert web_export.sample_key(0, 12, 10000) == "000120000"
    keys = pq.read_table(root / "webdataset" / "00002.parquet").column("key").to_pylist()
    assert keys == ["000020", "000021", "000022"]
    for fmt in web_export.FORMATS:
        stats = json.loads((root / fmt / "00001_stats.json").read_text())
        assert set(stats) == {"count", "successes", "failed_to_download", "failed_to_resize",
                              "duration", "start_time", "end_time", "status_dict"}
        assert stats["count"] == SHARD and stats["failed_to_download"] == 0
    assert totals["webdataset"]["status_dict"] == {"success": N - 1, "failed_to_resize": 1}
    # Parquet has one image column (png here): the JPEG record is counted too.
    assert totals["parquet"]["status_dict"] == {"success": N - 2, "failed_to_resize": 2}


def test_webdataset_shards_read_back_equal_tfds(exported, expected):
    root, _ = exported
    ds = wds.WebDataset(str(root / "webdataset" / "{00000..00002}.tar"), shardshuffle=False,
                        empty_check=False)
    samples = list(ds)
    assert len(samples) == N - 1
    assert {s["__key__"] for s in samples}.isdisjoint(_bad_ids(expected))
    for s in samples:
        meta = json.loads(s["json"])
        image_ext = {"png", "jpg"} & set(s)
        assert len(image_ext) == 1, sorted(s)
        ext = image_ext.pop()
        data, captions = expected[meta["id"]]
        assert s[ext] == data  # the stored bytes, not re-encoded
        assert ext == ("jpg" if meta["id"] == f"r{JPEG_AT:02d}" else "png")
        assert s["txt"].decode() == captions[0] == meta["caption"]
        assert meta["captions"] == captions
        assert meta["key"] == s["__key__"] and meta["status"] == "success"
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(data)).size
    assert [json.loads(s["json"])["id"] for s in samples] == [
        rid for rid in expected if rid not in _bad_ids(expected)]  # TFDS order


def test_webdataset_metadata_parquet_lists_every_record(exported, expected):
    root, _ = exported
    table = pa.concat_tables(pq.read_table(root / "webdataset" / f"0000{k}.parquet") for k in range(3))
    assert "png" not in table.column_names
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(expected)
    bad = [r for r in rows if r["status"] != "success"]
    assert [(r["id"], r["status"]) for r in bad] == [(f"r{BAD_AT:02d}", "failed_to_resize")]
    assert "not a PNG / JPEG / WebP / GIF image" in bad[0]["error_message"]


def test_parquet_shards_read_back_equal_tfds(exported, expected):
    root, _ = exported
    files = [root / "parquet" / f"0000{k}.parquet" for k in range(3)]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 1  # 10 rows < 100 a row group
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.column_names == [*web_export.SCHEMA.names, "png"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(expected)
    for r in rows:
        data, captions = expected[r["id"]]
        assert r["captions"] == captions and r["caption"] == captions[0]
        if r["id"] in (f"r{JPEG_AT:02d}", f"r{BAD_AT:02d}"):
            assert r["png"] is None and r["status"] == "failed_to_resize"
        else:
            assert r["png"] == data and r["status"] == "success"


def test_parquet_row_groups_of_100(tmp_path):
    """img2dataset's BufferedParquetWriter flushes every 100 rows: 250 rows, 3 row groups."""
    writer = web_export._RowGroups(tmp_path / "x.parquet", web_export.SCHEMA)
    for k in range(250):
        writer.write(dict.fromkeys(web_export.SCHEMA.names) | {"id": str(k), "captions": []})
    writer.close()
    f = pq.ParquetFile(tmp_path / "x.parquet")
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [100, 100, 50]
    assert f.read().column("id").to_pylist() == [str(k) for k in range(250)]


def test_image_format_from_magic_bytes():
    assert web_export.image_format(_image(0)) == "png"
    assert web_export.image_format(_image(JPEG_AT)) == "jpg"
    assert web_export.image_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert web_export.image_format(b"GIF89a...") == "gif"
    assert web_export.image_format(b"") is None


def test_bad_arguments_are_refused_before_any_work(source, tmp_path):
    with pytest.raises(ValueError, match="--format='tfrecord'"):
        web_export.export(source, tmp_path / "a", "tfrecord")
    with pytest.raises(ValueError, match="--shard_size=0"):
        web_export.export(source, tmp_path / "b", "parquet", shard_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lit_web_entries_name_exactly_the_exported_shards(source, tmp_path):
    """configs/lit_web.py's `urls` match web_export's shards and nothing else (not the metadata
    parquet files beside the tars)."""
    spec = importlib.util.spec_from_file_location("lit_web", os.path.join(REPO, "configs", "lit_web.py"))
    lit_web = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lit_web)
    for fmt, ext in (("webdataset", "tar"), ("parquet", "parquet")):
        for name in lit_web.DATASETS:
            web_export.export(source, tmp_path / fmt / name / "train", fmt, shard_size=SHARD, progress=False)
        config = lit_web.get_config(f"format={fmt},dir={tmp_path}")
        assert [e["source"] for e in config.input.data] == [fmt, fmt]
        for entry, name in zip(config.input.data, lit_web.DATASETS):
            assert shards.expand(entry["urls"]) == [
                str(tmp_path / fmt / name / "train" / f"0000{k}.{ext}") for k in range(3)]


@pytest.mark.slow  # a `python -m vljax.main` subprocess (JAX start-up, compiles): ~70 s on 2 cores
def test_main_trains_from_exported_webdataset_and_parquet_shards(exported, tmp_path):
    """The user's path: web_export's shards, both kinds mixed in one config (the entries
    configs/lit_web.py writes), `python -m vljax.main` trains. (One run for both kinds: their own tests
    check their records, hostile files and resume.)"""
    root, _ = exported
    spec = importlib.util.spec_from_file_location("lit_web", os.path.join(REPO, "configs", "lit_web.py"))
    lit_web = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lit_web)
    entries = [dict(source=fmt, urls=str(root / fmt / f"*.{ext}"), image_key="png;jpg;webp",
                    caption_key=lit_web.KEYS[fmt][2]["all"]) for fmt, ext in (("webdataset", "tar"), ("parquet", "parquet"))]
    config = tiny_config_file(tmp_path / "config.py", tmp_path / "shapes", steps=6, batch=8,
                              lines=[f"c.input.data = {entries!r}"])
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={config}",
                           f"--workdir={tmp_path / 'wd'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 6 and all(np.isfinite(r["train/loss"]) for r in rows)
