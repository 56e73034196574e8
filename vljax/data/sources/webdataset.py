"""`source="webdataset"`: webdataset tar shards read in place, by random access.

The layout is webdataset's (github.com/webdataset/webdataset), as img2dataset, DataComp, LAION and
CLIP_benchmark write it: a tar of members `KEY.EXT`, the members of one sample consecutive and
sharing KEY (grouped as webdataset groups them: tar_index.py). Record ids are the sample keys.

Each shard is indexed once (tar_index.py: one pass over its tar headers, no payload read, local or
`gs://` through etils.epath), giving per sample the byte offset and size of each member, cached in
`index_dir` so a restart does not rescan; shards are indexed in a thread pool at construction.
A record read is ONE range read: the span of the members it needs (adjacent in the tar), through
files each reading thread keeps open (its last 64 shards).

Config entry keys:
  urls: the shards (vljax/data/sources/shards.py: brace patterns, globs, lists; a missing shard
    is named).
  image_key: ";"-separated member extensions, the first the sample has is the image
    (default "jpg;png;webp;jpeg").
  caption_key: ";"-separated alternatives: a member extension ("txt"), or "json:<field>", a
    field of the sample's .json member (a string or a list of strings); default
    "txt;json:caption" (img2dataset writes both).
  caption_lines: a caption member holds one caption per line (CLIP_benchmark's retrieval
    shards, e.g. wds_mscoco_captions); default False (the member is one caption).
  label_key: alternatives as caption_key, holding an integer class (CLIP_benchmark's "cls");
    None (default): record["label"] = -1.
  class_names: the names of the labels, a list or a text file of one name a line
    (CLIP_benchmark's classnames.txt).
  index_dir: where shard indices are cached; default <assets>/wds_index (~/.cache/vljax).

Hostile shards never raise at read time (records with "error", counted by the pipeline): a tar
truncated inside a member keeps every complete sample and marks the cut one "read_error"; a tar
whose headers are damaged keeps the samples before the damage (a warning names the shard); a
sample without an image member is "missing_file"; without a caption its captions are [] (counted
"empty_caption" by training); a member of random bytes or of zero bytes is "decode_error" when
decoded. Problems with the source itself raise at construction: no shard, a missing shard, a
label_key / class_names that cannot be read.
"""
from __future__ import annotations

import collections
import json
import threading
from concurrent import futures

import numpy as np
from etils import epath

from vljax.data.sources import base, shards
from vljax.data.sources.tar_index import open_index

DEFAULT_IMAGE_KEY = "jpg;png;webp;jpeg"
DEFAULT_CAPTION_KEY = "txt;json:caption"
_INDEX_THREADS = 32
_OPEN_FILES = 64  # per reading thread; the shard order reads a few shards at a time


def parse_spec(spec: str, what: str) -> list[tuple[str, str]]:
    """"txt;json:caption" -> [("member", "txt"), ("json", "caption")]; ValueError naming `what`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"config key `{what}`: give member extensions separated by ';', got {spec!r}")
    out = []
    for alt in (a.strip() for a in spec.split(";")):
        if alt.startswith("json:") and alt[5:]:
            out.append(("json", alt[5:]))
        elif alt and ":" not in alt:
            out.append(("member", alt.lower()))
        else:
            raise ValueError(f"config key `{what}`: {alt!r} is neither a member extension nor json:<field>")
    return out


@base.register("webdataset")
class WebDatasetSource(base.Source):
    """Webdataset tar shards read in place (module docstring: keys, index, hostile shards).
    Record ids are the sample keys; `shard_sizes` are the samples per shard."""
    REQUIRED = ("urls",)
    OPTIONAL = ("image_key", "caption_key", "caption_lines", "label_key", "class_names", "index_dir")
    LABEL_HINTS = {"label": "label_key` (a member holding an integer class, e.g. 'cls')",
                   "labels": "source` ('webdataset' has no label sets)"}

    def __init__(self, urls, image_key: str = DEFAULT_IMAGE_KEY, caption_key: str = DEFAULT_CAPTION_KEY,
                 caption_lines: bool = False, label_key: str | None = None, class_names=None,
                 index_dir=None, where: str = "input.data"):
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        self._image = parse_spec(image_key, f"{where}.image_key")
        if any(kind != "member" for kind, _ in self._image):
            raise ValueError(f"config key `{where}.image_key`: member extensions only, got {image_key!r}")
        self._caption = parse_spec(caption_key, f"{where}.caption_key")
        self._label = parse_spec(label_key, f"{where}.label_key") if label_key is not None else []
        self.caption_lines = bool(caption_lines)
        self.names = None if class_names is None else base.read_class_names(
            class_names, f"config key `{where}.class_names`")
        self.paths = shards.expand(urls, where)
        self.index_dir = epath.Path(index_dir or base.default_assets_dir() / "wds_index").expanduser()
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with futures.ThreadPoolExecutor(min(_INDEX_THREADS, len(self.paths))) as pool:
            opened = list(pool.map(lambda p: open_index(p, self.index_dir), self.paths))
        self.indices = [index for index, _ in opened]
        self.stats = [stat for _, stat in opened]
        self.shard_sizes = [len(index) for index in self.indices]
        self._threads = threading.local()
        self._starts = np.cumsum([0] + self.shard_sizes)
        if not self._starts[-1]:
            raise ValueError(f"config key `{where}.urls`: the {len(self.paths)} shards hold no sample "
                             f"(first: {self.paths[0]})")

    @classmethod
    def from_config(cls, entry, data_dir=None, where: str = "input.data") -> "WebDatasetSource":
        """As `Source.from_config`, with errors naming `<where>.<key>`."""
        cls.check_keys(entry, where)
        return cls(**{k: entry[k] for k in (*cls.REQUIRED, *cls.OPTIONAL) if k in entry}, where=where)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within it) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {self!r}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _range(self, shard: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the shard, through this thread's open files (the last
        _OPEN_FILES shards it read: an open of a `gs://` object costs a request of its own)."""
        files = self._threads.__dict__.setdefault("files", collections.OrderedDict())
        f = files.pop(shard, None) or epath.Path(self.paths[shard]).open("rb")
        try:
            f.seek(offset)
            data = f.read(size)
        except OSError:
            f.close()
            raise
        files[shard] = f  # the most recently read last
        if len(files) > _OPEN_FILES:
            files.popitem(last=False)[1].close()
        return data

    def __getstate__(self):  # open files stay in their process (grain workers unpickle a copy)
        return {k: v for k, v in self.__dict__.items() if k != "_threads"}

    def __setstate__(self, state):
        self.__dict__.update(state, _threads=threading.local())

    def _read(self, index: int, want: list[list[tuple[str, str]]]):
        """(shard, row, key, {ext: bytes} of the members that `want`'s alternatives name)."""
        shard, row = self.locate(index)
        ix = self.indices[shard]
        exts = {"json" if kind == "json" else name for alts in want for kind, name in alts}
        cols = [ix.column[e] for e in exts if e in ix.column and ix.offsets[row, ix.column[e]] >= 0]
        data = {}
        if cols:
            lo = min(ix.offsets[row, c] for c in cols)
            hi = max(ix.offsets[row, c] + ix.sizes[row, c] for c in cols)
            span = self._range(shard, int(lo), int(hi - lo))
            data = {ix.exts[c]: span[ix.offsets[row, c] - lo:ix.offsets[row, c] + ix.sizes[row, c] - lo]
                    for c in cols}
        return shard, row, ix.keys[row].decode(), data

    @staticmethod
    def _pick(alts, data: dict, what: str):
        """The first alternative the sample has: (bytes of a member | a json field's value), or None."""
        for kind, name in alts:
            if kind == "member" and name in data:
                return data[name]
            if kind == "json" and "json" in data:
                try:
                    value = json.loads(data["json"])
                except (ValueError, UnicodeDecodeError) as e:
                    raise ValueError(f"{what}: its .json member is not JSON ({e})") from e
                if isinstance(value, dict) and value.get(name) is not None:
                    return value[name]
        return None

    def _captions(self, value) -> list[str]:
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            return [base.text(v) for v in value]
        value = base.text(value)
        return [c for c in value.splitlines() if c.strip()] if self.caption_lines else [value.strip()]

    def _label_value(self, value, what: str) -> int:
        if value is None:
            return -1
        label = int(base.text(value).strip()) if isinstance(value, (bytes, str)) else value
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            raise ValueError(f"{what}: label {value!r} is not an integer")
        if self.names is not None and not 0 <= label < len(self.names):
            raise ValueError(f"{what}: label {label} is not one of the {len(self.names)} class_names")
        return int(label)

    def __getitem__(self, index: int) -> dict:
        try:
            shard, row, key, data = self._read(index, [self._image, self._caption, self._label])
        except (OSError, ValueError) as e:
            return base.bad_record(f"record {index}", "read_error", f"{self!r}: {e!r}")
        what = f"{self.paths[shard]}: sample {key}"
        if self.indices[shard].truncated[row]:
            return base.bad_record(key, "read_error", f"{what}: truncated tar")
        image = self._pick(self._image, data, what)
        if image is None:
            return base.bad_record(key, "missing_file", f"{what}: no {self.image_key} member")
        try:
            captions = self._captions(self._pick(self._caption, data, what))
            label = self._label_value(self._pick(self._label, data, what), what)
        except ValueError as e:
            return base.bad_record(key, "read_error", str(e))
        return {"id": key, "image": image, "captions": captions, "label": label, "labels": []}

    def cache_key(self) -> str:
        return base.digest("webdataset", [list(s) for s in self.stats], self.image_key)

    def gives_label(self) -> bool:
        return bool(self._label)

    # -- metadata: only the caption / label members are read -------------------------------------
    def captions_of(self, index: int) -> list[str]:
        shard, _, key, data = self._read(index, [self._caption])
        return self._captions(self._pick(self._caption, data, f"{self.paths[shard]}: sample {key}"))

    def label_of(self, index: int, key: str | None = None) -> int:
        """Record `index`'s class from `key` (a label_key spec: "cls", "json:<field>"; default the
        source's label_key), reading only that member."""
        spec = self._label if key is None or key == self.label_key else parse_spec(key, "label")
        if not spec:
            raise ValueError(f"{self!r} has no label_key (a member holding an integer class, e.g. 'cls')")
        shard, _, sample, data = self._read(index, [spec])
        what = f"{self.paths[shard]}: sample {sample}"
        label = self._label_value(self._pick(spec, data, what), what)
        if label < 0:
            raise ValueError(f"{what} has no {key or self.label_key} member (its label)")
        return label

    def class_names_of(self, key: str | None = None) -> list[str]:
        """`class_names` (they name the classes of any label key the evaluators give)."""
        if self.names is None:
            raise ValueError(f"{self!r}: its labels have no names; give the source `class_names` "
                             "(a list, or a file of one name a line, e.g. CLIP_benchmark's classnames.txt)")
        return list(self.names)

    def __repr__(self):
        return f"WebDatasetSource({self.paths[0]!r}, shards={len(self.paths)}, n={len(self)})"
