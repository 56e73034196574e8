"""`source="parquet"`: parquet files of image bytes and captions, read in place (local or any
scheme etils.epath opens, e.g. gs://), with random access by record index.

Two layouts are read as they are written:
  - img2dataset's parquet output (rom1504/img2dataset, writer.py `ParquetSampleWriter`): one file
    a shard (`00000.parquet`), columns `key`, `jpg` (binary; null when the download failed), the
    caption as `caption` (img2dataset's `caption_col`), `status` ("success", "failed_to_download",
    ...) and other metadata. Rows whose `status` is not "success" are not records.
  - Hugging Face `datasets` exports (`Dataset.to_parquet`, the Hub's parquet files): an `Image`
    feature is a struct column {bytes: binary, path: string}; a `ClassLabel`'s names are in the
    schema's b"huggingface" metadata (read as the default `class_names` of `label_key`).

Records are numbered file by file in the order `urls` gives them (`shard_sizes`: records a file),
rows in file order. File metadata (row groups, row counts, the `status` column) is read once at
construction with a thread pool; a missing or non-parquet file is an error naming it. A record
read decodes its whole row group (the columns used only), kept in a per-thread LRU of
`ROW_GROUPS_CACHED` row groups, so reading a shard in order decodes each row group once; memory:
at most ROW_GROUPS_CACHED decoded row groups (a writer's row group: img2dataset writes 100 rows) a
reading thread, plus FILES_OPEN open files with their footers. A row group that cannot be read
gives its records as bad records ("read_error"), a null image a "missing_file" record: counted by
the pipeline, never raised.
"""
from __future__ import annotations

import bisect
import collections
from concurrent import futures
import json
import threading

from etils import epath
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vljax.data.sources import base, shards

ROW_GROUPS_CACHED = 2
FILES_OPEN = 4  # open files (and their parsed footers) a reading thread keeps
_META_THREADS = 32
_STATUS_COLUMN, _STATUS_OK = "status", "success"
_KEY_COLUMN = "key"


def _first_column(spec: str, schema: pa.Schema, path: str, what: str) -> str:
    """The first of the ';'-separated column names `spec` that `schema` has."""
    names = [n for n in spec.split(";") if n]
    for name in names:
        if name in schema.names:
            return name
    raise ValueError(f"parquet file {path}: no {what} column among {names} "
                     f"(its columns: {schema.names}); set `{what}_key`")


def _hf_class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The ClassLabel names of `column` in a Hugging Face export's schema metadata, else None."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return list(names) if names else None


class _Shard:
    """One file's layout: rows per row group and which rows are records, in 1 bit a row (a
    source of 10,000 img2dataset shards of 10,000 rows holds 12.5 MB of it, in every worker)."""

    def __init__(self, path: str, group_rows: list[int], kept: np.ndarray | None):
        """kept: bool [rows] (None: every row is a record)."""
        self.path = path
        self.group_starts = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
        self.mask = None if kept is None or kept.all() else np.packbits(kept)
        if self.mask is None:
            self.kept_starts, self.size = self.group_starts, int(self.group_starts[-1])
        else:
            counts = [int(kept[a:b].sum()) for a, b in zip(self.group_starts[:-1], self.group_starts[1:])]
            self.kept_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self.size = int(self.kept_starts[-1])

    def locate(self, j: int) -> tuple[int, int]:
        """Record j of this file -> (row group, row within it)."""
        g = int(np.searchsorted(self.kept_starts, j, side="right")) - 1
        within = j - int(self.kept_starts[g])
        if self.mask is None:
            return g, within
        a, b = int(self.group_starts[g]), int(self.group_starts[g + 1])
        return g, int(np.flatnonzero(np.unpackbits(self.mask, count=b)[a:])[within])


def _read_layout(path: str) -> tuple[_Shard, pa.Schema, tuple]:
    """A file's layout, its schema and its (size, mtime): reads the footer and the `status`
    column (a row group whose status cannot be read keeps all its rows: they come back as
    read_error records)."""
    p = epath.Path(path)
    stat = p.stat()
    try:
        with p.open("rb") as f:
            pf = pq.ParquetFile(f)
            meta, schema = pf.metadata, pf.schema_arrow
            group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            kept = None
            if _STATUS_COLUMN in schema.names:
                parts = []
                for g, n in enumerate(group_rows):
                    try:
                        status = pf.read_row_group(g, columns=[_STATUS_COLUMN]).column(0).to_pylist()
                        parts.append(np.array(status, object) == _STATUS_OK)
                    except (OSError, pa.ArrowException):
                        parts.append(np.ones(n, bool))
                kept = np.concatenate(parts) if parts else np.zeros(0, bool)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"parquet file {path} cannot be read as parquet ({e})") from e
    return _Shard(path, group_rows, kept), schema, (stat.length, stat.mtime)


@base.register("parquet")
class ParquetSource(base.Source):
    """Parquet shards of images and captions (module docstring: layouts, reading, memory).

    Args:
      urls: the files (`shards.expand`: a brace pattern, a glob, or a list; local or gs://).
      image_key: ';'-separated candidate columns, the first present is the image: binary (encoded
        bytes) or a struct {bytes, path} (Hugging Face `Image`; `path` is used when `bytes` is null).
      caption_key: candidate caption columns: a string (one caption) or a list of strings.
        Config key `text_key` is another name of `caption_key`.
      label_key: an integer column copied to record["label"] (null: -1); None: no labels.
      class_names: names of the integer labels (a list, or a file of one name a line); default:
        the ClassLabel names a Hugging Face export stores for `label_key`, if any.
    """
    REQUIRED = ("urls",)
    OPTIONAL = ("image_key", "caption_key", "label_key", "class_names")
    ALIASES = {"text_key": "caption_key"}
    LABEL_HINTS = {"label": "label_key` (an integer column)",
                   "labels": "source` ('parquet' has no label sets)"}

    def __init__(self, urls, image_key: str = "jpg;png;webp;image", caption_key: str = "txt;caption;text",
                 label_key: str | None = None, class_names=None):
        self.paths = shards.expand(urls)
        with futures.ThreadPoolExecutor(min(_META_THREADS, len(self.paths))) as pool:
            layouts = list(pool.map(_read_layout, self.paths))
        self._shards = [shard for shard, _, _ in layouts]
        self._stats = [stat for _, _, stat in layouts]
        schema = layouts[0][1]
        self.image_key = _first_column(image_key, schema, self.paths[0], "image")
        self.caption_key = _first_column(caption_key, schema, self.paths[0], "caption")
        self.label_key = label_key and _first_column(label_key, schema, self.paths[0], "label")
        self._columns = [self.image_key, self.caption_key] + ([self.label_key] if label_key else [])
        if _KEY_COLUMN in schema.names:
            self._columns.append(_KEY_COLUMN)
        for shard, file_schema, _ in layouts[1:]:
            missing = [c for c in self._columns if c not in file_schema.names]
            if missing:
                raise ValueError(f"parquet file {shard.path} has no column {missing[0]!r} "
                                 f"(the first file, {self.paths[0]}, has it)")
        where = f"parquet source {self.paths[0]}"
        if class_names is not None:
            self.names = base.read_class_names(class_names, where)
        else:
            self.names = _hf_class_names(schema, self.label_key) if label_key else None
        self.shard_sizes = [s.size for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64).tolist()
        if not self._starts[-1]:
            raise ValueError(f"{where}: its {len(self.paths)} files have no records")
        self._local = threading.local()

    # -- pickling (grain worker processes): the per-thread caches stay behind -------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Record `index` -> (file, record within the file)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {self!r}")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def _lru(self, name: str, key, make, size: int, drop=None):
        """This thread's cache `name` (an LRU of `size` entries): the value of `key`, made by
        `make()` when absent; `drop(value)` is called on an evicted one."""
        cache = getattr(self._local, name, None)
        if cache is None:
            cache = collections.OrderedDict()
            setattr(self._local, name, cache)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = make()
        if len(cache) > size:
            _, old = cache.popitem(last=False)
            if drop is not None:
                drop(old)
        return value

    def _open(self, k: int):
        """File k opened (its footer read once a thread while it stays in the LRU)."""
        def make():
            f = epath.Path(self.paths[k]).open("rb")
            return f, pq.ParquetFile(f)
        return self._lru("files", k, make, FILES_OPEN, drop=lambda fp: fp[0].close())[1]

    def _row_group(self, k: int, g: int):
        """File k's row group g as a pyarrow Table (the columns used), or the exception reading it
        raised (cached too: a bad row group is read once)."""
        def make():
            try:
                return self._open(k).read_row_group(g, columns=self._columns)
            except (OSError, pa.ArrowException) as e:
                return e
        return self._lru("groups", (k, g), make, ROW_GROUPS_CACHED)

    def __getitem__(self, index: int) -> dict:
        k, j = self.locate(int(index))
        g, row = self._shards[k].locate(j)
        rid = f"{self.paths[k]}[row {int(self._shards[k].group_starts[g]) + row}]"
        table = self._row_group(k, g)
        if isinstance(table, Exception):
            return base.bad_record(rid, "read_error", f"row group {g}: {table!r}")
        try:
            r = {c: table.column(c)[row].as_py() for c in self._columns}
        except (pa.ArrowException, ValueError) as e:  # a value that cannot be converted
            return base.bad_record(rid, "read_error", repr(e))
        rid = base.text(r[_KEY_COLUMN]) if r.get(_KEY_COLUMN) is not None else rid
        image = r[self.image_key]
        if isinstance(image, dict):  # a Hugging Face Image struct {bytes, path}
            image = image.get("bytes") or image.get("path")
        if not image:
            return base.bad_record(rid, "missing_file", f"null image in column {self.image_key!r}")
        caps = r[self.caption_key]
        caps = [] if caps is None else [caps] if isinstance(caps, (str, bytes)) else caps
        label = r.get(self.label_key) if self.label_key else None
        return {"id": rid, "image": image, "captions": [base.text(c) for c in caps if c is not None],
                "label": -1 if label is None else int(label), "labels": []}

    def cache_key(self) -> str:
        return base.digest("parquet", self.paths, self._stats, self.image_key)

    def gives_label(self) -> bool:
        return bool(self.label_key)

    def _own_key(self, key: str | None) -> None:
        """`key` (an evaluator's `label` / `label_key`) must be the source's `label_key`: one
        integer column is read as labels."""
        if key is not None and key != self.label_key:
            raise ValueError(f"{self!r} reads labels from column {self.label_key!r}, not {key!r}: "
                             f"set the entry's `label_key` to {key!r}")

    def label_of(self, index: int, key: str | None = None) -> int:
        self._own_key(key)
        return int(self[index]["label"])

    def class_names_of(self, key: str | None = None) -> list[str]:
        self._own_key(key)
        if self.names is None:
            raise ValueError(f"{self!r}: its integer labels have no names; give the source "
                             "`class_names` (a list, or a file of one name a line)")
        return list(self.names)

    def __repr__(self):
        return f"ParquetSource({self.paths[0]!r}, files={len(self.paths)}, n={len(self)})"
