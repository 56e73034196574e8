"""Writes TFDS datasets (the demo's) in img2dataset's output layout: webdataset tars or parquet.

    python -m vljax.data.web_export --format=webdataset --out=/tmp/vljax_web/wds
    python -m vljax.data.web_export --format=parquet --out=/tmp/vljax_web/parquet \
        --datasets=vljax_emoji --split=train --shard_size=1000

Each dataset's split goes to OUT/<dataset>/<split>/, shard k holding records [k*N, (k+1)*N) of
the split in TFDS order (N = --shard_size), named and laid out as img2dataset 1.47 writes them
(rom1504/img2dataset: writer.py, downloader.py, logger.py), run as
`img2dataset(..., encode_format=<the stored format>, disable_all_reencoding=True, extract_exif=False,
compute_hash="sha256", save_additional_columns=["id", "captions"], oom_shard_count=5)`:

  webdataset: `{shard:05d}.tar` (webdataset.TarWriter) holding `KEY.png` (or `.jpg`, `.webp`: the
              image bytes as stored in TFDS, never re-encoded; the extension says their format),
              `KEY.txt` (the caption) and `KEY.json` (the metadata row below, indent=4), and
              `{shard:05d}.parquet`, the metadata rows of the shard (no image column);
  parquet:    `{shard:05d}.parquet`, the metadata columns plus the image bytes in a binary column
              named by the format (`png`), in row groups of 100 rows (img2dataset's buffer);
  both:       `{shard:05d}_stats.json` ({"count", "successes", "failed_to_download",
              "failed_to_resize", "duration", "start_time", "end_time", "status_dict"}), written
              last: img2dataset takes a shard with its stats file as done.

KEY is img2dataset's `compute_key`: the shard id times 10**ceil(log10(N)) plus the index in the
shard, zero-padded to 5 + ceil(log10(N)) digits. The metadata row, in img2dataset's column order:
id (the TFDS record id), captions (all of the record's captions), caption (the first), url
(`tfds:<dataset>/<split>[<index>]`, where the record came from), key, status ("success"),
error_message, width, height, original_width, original_height (the stored image's size), sha256
(of the image bytes).

Several captions: img2dataset has one caption a sample. A record is written once, its first
caption as `caption` / `.txt`, all of them as `captions` (in the json and the parquet): a source
reading `captions` (`caption_key="json:captions"` / `"captions"`) draws a random caption of each
record as the TFDS recipe does (vljax/data/transforms.choose_caption); one reading `txt` /
`caption` sees the first. One sample a caption would instead weight records by their caption count.

A record the TFDS source cannot read is counted as "failed_to_download", one whose bytes are no
PNG / JPEG / WebP / GIF image (or, in parquet, not in the format of the split's first image,
which names the image column) as "failed_to_resize": in the stats and the metadata (status,
error_message), with no image, as img2dataset does. A dataset whose image feature is decoded (a TFDS Image feature) has no bytes
to keep and is refused before any work.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time

from absl import app
from absl import flags
from etils import epath
import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import tqdm
import webdataset as wds

from vljax.data import sources

FORMATS = ("webdataset", "parquet")
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names of 5 digits
ROW_GROUP = 100  # img2dataset's BufferedParquetWriter buffer: the parquet row group size
TAR_MTIME = 0.0  # a fixed member time: the same records give the same tar bytes
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"))

# The metadata columns, in img2dataset's order (save_additional_columns, caption, url, then its own).
SCHEMA = pa.schema([
    ("id", pa.string()), ("captions", pa.list_(pa.string())), ("caption", pa.string()),
    ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
])


def image_format(data: bytes) -> str | None:
    """The extension of encoded image `data` from its magic bytes ("png", "jpg", "webp", "gif"),
    None when it is none of them."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def sample_key(index_in_shard: int, shard_id: int, shard_size: int) -> str:
    """img2dataset's `compute_key`: e.g. shard 3, index 7, 1000 a shard -> "00003007"."""
    oom_sample = math.ceil(math.log10(shard_size))
    return f"{10 ** oom_sample * shard_id + index_in_shard:0{oom_sample + OOM_SHARD_COUNT}d}"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def _meta(record: dict, url: str, key: str) -> tuple[dict, bytes | None, str | None]:
    """(metadata row, image bytes or None, image format or None) of one source record."""
    caps = [str(c) for c in record.get("captions", [])]
    meta = dict(id=str(record["id"]), captions=caps, caption=caps[0] if caps else None, url=url,
                key=key, status="success", error_message=None, width=None, height=None,
                original_width=None, original_height=None, sha256=None)
    if "error" in record:
        meta.update(status="failed_to_download", error_message=f"{record['error']}: {record['detail']}")
        return meta, None, None
    data = bytes(record["image"])
    fmt = image_format(data)
    try:
        if fmt is None:
            raise ValueError(f"not a PNG / JPEG / WebP / GIF image (first bytes {data[:8]!r})")
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Exception as e:  # PIL raises several types on bad headers
        meta.update(status="failed_to_resize", error_message=str(e))
        return meta, None, None
    meta.update(width=width, height=height, original_width=width, original_height=height,
                sha256=hashlib.sha256(data).hexdigest())
    return meta, data, fmt


def _check_bytes(source: sources.TfdsSource) -> None:
    """Refuses a dataset whose image feature decodes to pixels (nothing to keep as stored)."""
    feature = source.info.features
    for part in source.image_key.split("/"):  # "a/b": a nested feature, as TfdsSource reads it
        feature = feature[part]
    # `np_dtype`, not `dtype`: the latter imports TensorFlow.
    if getattr(feature, "np_dtype", None) != np.object_ or getattr(feature, "shape", None) != ():
        raise ValueError(f"TFDS dataset {source.name!r}: feature {source.image_key!r} is "
                         f"{feature!r}, not encoded image bytes; web_export keeps images as stored "
                         "and cannot write decoded pixels")


def _first_format(source) -> str:
    """The format of the first record of `source` whose bytes are an image: names the image
    column of parquet shards (img2dataset's `encode_format`); "jpg" when none is."""
    for index in range(len(source)):
        record = source[index]
        fmt = None if "error" in record else image_format(bytes(record["image"]))
        if fmt:
            return fmt
    return "jpg"


class _Stats:
    """One shard's img2dataset stats."""

    def __init__(self):
        self.start, self.count, self.status = time.time(), 0, {}

    def add(self, meta: dict) -> None:
        self.count += 1
        self.status[meta["status"]] = self.status.get(meta["status"], 0) + 1

    def write(self, path: epath.Path) -> None:
        end = time.time()
        stats = dict(count=self.count, successes=self.status.get("success", 0),
                     failed_to_download=self.status.get("failed_to_download", 0),
                     failed_to_resize=self.status.get("failed_to_resize", 0),
                     duration=end - self.start, start_time=self.start, end_time=end,
                     status_dict=self.status)
        path.write_text(json.dumps(stats, indent=4))


class _RowGroups:
    """A parquet file written ROW_GROUP rows at a time (img2dataset's BufferedParquetWriter)."""

    def __init__(self, path: epath.Path, schema: pa.Schema):
        self._file = path.open("wb")
        self._writer = pq.ParquetWriter(self._file, schema)
        self._schema, self._rows = schema, []

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) == ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._file.close()


def _write_webdataset_shard(out: epath.Path, shard_id: int, rows) -> _Stats:
    stats, name = _Stats(), shard_name(shard_id)
    meta_file = _RowGroups(out / f"{name}.parquet", SCHEMA)
    with (out / f"{name}.tar").open("wb") as f:
        tar = wds.TarWriter(f, mtime=TAR_MTIME)
        for meta, data, fmt in rows:
            if data is not None:
                tar.write({"__key__": meta["key"], fmt: data, "txt": meta["caption"] or "",
                           "json": json.dumps(meta, indent=4)})
            meta_file.write(meta)
            stats.add(meta)
        tar.close()
    meta_file.close()
    return stats


def _write_parquet_shard(out: epath.Path, shard_id: int, rows, column: str) -> _Stats:
    stats, name = _Stats(), shard_name(shard_id)
    table = _RowGroups(out / f"{name}.parquet", SCHEMA.append(pa.field(column, pa.binary())))
    for meta, data, fmt in rows:
        if data is not None and fmt != column:
            meta.update(status="failed_to_resize", width=None, height=None, original_width=None,
                        original_height=None, sha256=None,
                        error_message=f"a {fmt} image in a parquet shard of {column} images")
            data = None
        table.write({**meta, column: data})
        stats.add(meta)
    table.close()
    return stats


def export(source: sources.TfdsSource, out, fmt: str, shard_size: int = 1000,
           progress: bool = True) -> dict:
    """Writes `source` (a TfdsSource of encoded images) to folder `out` in format `fmt`
    ("webdataset" | "parquet"; module docstring). Returns {"shards": n, "count", "successes",
    "status_dict"} over the whole split."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}: expected one of {FORMATS}")
    if shard_size < 1:
        raise ValueError(f"--shard_size={shard_size}: give a positive number of samples a shard")
    _check_bytes(source)
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(source)
    num_shards = math.ceil(n / shard_size)
    bar = tqdm.tqdm(total=n, desc=f"{source.name}/{source.split} -> {fmt}", unit="img",
                    disable=not progress)
    column = _first_format(source) if fmt == "parquet" else None
    totals = dict(shards=num_shards, count=0, successes=0, status_dict={})
    for shard_id in range(num_shards):
        def rows(shard_id=shard_id):
            for j, index in enumerate(range(shard_id * shard_size, min(n, (shard_id + 1) * shard_size))):
                bar.update(1)
                yield _meta(source[index], f"tfds:{source.name}/{source.split}[{index}]",
                            sample_key(j, shard_id, shard_size))
        if fmt == "webdataset":
            stats = _write_webdataset_shard(out, shard_id, rows())
        else:
            stats = _write_parquet_shard(out, shard_id, rows(), column)
        stats.write(out / f"{shard_name(shard_id)}_stats.json")
        totals["count"] += stats.count
        totals["successes"] += stats.status.get("success", 0)
        for k, v in stats.status.items():
            totals["status_dict"][k] = totals["status_dict"].get(k, 0) + v
    bar.close()
    return totals


_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Output format (img2dataset's output_format).")
_OUT = flags.DEFINE_string("out", None, "Output folder (local or gs://); each dataset in OUT/<name>/<split>/.")
_DATASETS = flags.DEFINE_list("datasets", ["vljax_emoji", "vljax_openclipart"], "TFDS datasets to write.")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Samples a shard (img2dataset's "
                                   "number_sample_per_shard; 1000 gives the demo sets several shards).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default <assets>/tfds.")


def main(argv):
    del argv
    if not _FORMAT.value or not _OUT.value:
        raise app.UsageError("--format and --out are required")
    opened = [sources.TfdsSource(name, _SPLIT.value, data_dir=_DATA_DIR.value) for name in _DATASETS.value]
    for source in opened:
        _check_bytes(source)
    for source in opened:
        out = epath.Path(_OUT.value) / source.name / source.split
        totals = export(source, out, _FORMAT.value, _SHARD_SIZE.value)
        ext = "tar" if _FORMAT.value == "webdataset" else "parquet"
        print(f"[web_export] {source.name}/{source.split}: {totals['successes']} of {totals['count']} "
              f"samples in {totals['shards']} shards: {out}/{{{shard_name(0)}.."
              f"{shard_name(totals['shards'] - 1)}}}.{ext} (status {totals['status_dict']})")


if __name__ == "__main__":
    app.run(main)
