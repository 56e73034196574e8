"""`source="webdataset"`: webdataset tar shards read in place, by random access.

The layout is webdataset's (github.com/webdataset/webdataset, `tariterators.py`), as img2dataset,
DataComp, LAION and CLIP_benchmark write it: a tar of members `KEY.EXT`, the members of one sample
consecutive and sharing KEY. KEY is a member's path up to the first dot of its base name, EXT the
rest, lower-cased (webdataset's `base_plus_ext`); members that are not regular files, names without
an extension and webdataset's metadata members (`__*__`) are ignored; a KEY met again after another
sample starts a new sample (webdataset's `group_by_keys`), a repeated EXT within a sample keeps the
first member.

Each shard is indexed once: one pass over its tar headers (python `tarfile` on an etils.epath file
object, so `gs://` works; no payload is read), giving per sample the byte offset and size of each
member. The index is cached in `index_dir` as `<sha1(path)>.npz`, valid while the shard's size and
mtime are those recorded, so a restart does not rescan; shards are indexed in a thread pool at
construction. A record read is ONE range read: the span of the members it needs (they are
adjacent in the tar).

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

import hashlib
import json
import re
import tarfile
from concurrent import futures

import numpy as np
from absl import logging
from etils import epath

from vljax.data.sources import base, shards

DEFAULT_IMAGE_KEY = "jpg;png;webp;jpeg"
DEFAULT_CAPTION_KEY = "txt;json:caption"
INDEX_VERSION = 1
_INDEX_THREADS = 32
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def split_name(name: str) -> tuple[str | None, str | None]:
    """(KEY, ext) of a tar member name as webdataset splits it; (None, None) without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


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


class _NeedTarfile(Exception):
    """A header the fast reader leaves to python's tarfile."""


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES, less GNU sparse files
_NO_DATA = tuple(bytes([c]) for c in b"123456")  # links, devices, directories, fifos


def _ustar_members(f):
    """(name, regular, data offset, size) of each member, from the 512-byte ustar / GNU / v7
    headers (POSIX.1-1988, as python's `tarfile` parses them), skipping the payloads: ~4x faster
    than `tarfile.next()`. Stops where tarfile stops (end-of-archive block, a cut or invalid
    header after the first); raises tarfile.ReadError for an unreadable first header and
    _NeedTarfile at a header type it does not read (pax, GNU long names, sparse, base-256 sizes)."""
    offset = 0
    while True:
        f.seek(offset)
        buf = f.read(512)
        if len(buf) < 512 or buf == bytes(512):
            if offset == 0:
                raise tarfile.ReadError("empty file" if not buf.strip(b"\0") else "truncated header")
            return
        try:
            chksum = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            chksum = -1
        if chksum not in (sum(buf[:148]) + 256 + sum(buf[156:]),):
            if offset == 0:
                raise tarfile.ReadError("bad checksum")
            return
        kind = buf[156:157]
        if kind not in _REGULAR + _NO_DATA or buf[124] & 0x80:
            raise _NeedTarfile(kind)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = buf[:100].split(b"\0", 1)[0]
        if buf[257:265] == b"ustar\x0000" and buf[345] != 0:
            name = buf[345:500].split(b"\0", 1)[0] + b"/" + name
        name = name.decode("utf-8", "surrogateescape")
        regular = kind in _REGULAR and not (kind == b"\0" and name.endswith("/"))
        yield name, regular, offset + 512, size
        if kind not in _NO_DATA:
            offset += (size + 511) // 512 * 512
        offset += 512


def _tarfile_members(f):
    """`_ustar_members` by python's tarfile (every header format; slower)."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        while (info := tar.next()) is not None:
            tar.members = []  # the headers are not kept (a shard holds thousands)
            yield info.name, info.isreg(), info.offset_data, info.size


class ShardIndex:
    """Where each sample's members lie in one tar: keys [n] (bytes), exts [E] (the extensions
    seen), offsets / sizes int64 [n, E] (-1: the sample has no such member), truncated bool [n]
    (a member cut by the end of the file)."""

    def __init__(self, keys, exts, offsets, sizes, truncated):
        self.keys, self.exts = keys, list(exts)
        self.offsets, self.sizes, self.truncated = offsets, sizes, truncated
        self.column = {e: i for i, e in enumerate(self.exts)}

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def scan(cls, path: str, file_size: int) -> "ShardIndex":
        """One pass over the tar headers of `path` (module docstring: keys, ignored members)."""
        samples, exts, members = [], {}, []
        try:
            with epath.Path(path).open("rb") as f:
                try:
                    for member in _ustar_members(f):
                        members.append(member)
                except _NeedTarfile:  # pax / GNU long-name headers: python's tarfile reads them
                    members = []
                    f.seek(0)
                    for member in _tarfile_members(f):
                        members.append(member)
        except (tarfile.TarError, EOFError, OSError) as e:  # a damaged tar: keep what was read
            logging.warning("webdataset shard %s: tar unreadable after %d members (%s); indexing those",
                            path, len(members), e)
        for name, regular, offset, size in members:
            key, ext = split_name(name)
            if not regular or key is None or _META.match(name):
                continue
            if not samples or samples[-1][0] != key:
                samples.append((key, {}, [False]))
            if ext not in samples[-1][1]:
                exts.setdefault(ext, len(exts))
                samples[-1][1][ext] = (offset, size)
                if offset + size > file_size:
                    samples[-1][2][0] = True
        n, e = len(samples), len(exts)
        offsets, sizes = np.full((n, e), -1, np.int64), np.full((n, e), -1, np.int64)
        for row, (_, members, _) in enumerate(samples):
            for ext, (off, size) in members.items():
                offsets[row, exts[ext]], sizes[row, exts[ext]] = off, size
        keys = np.array([s[0].encode() for s in samples], dtype=bytes) if n else np.zeros(0, "S1")
        return cls(keys, list(exts), offsets, sizes, np.array([s[2][0] for s in samples], bool))

    def save(self, file: epath.Path, stat: tuple) -> None:
        tmp = file.parent / f"{file.name}.tmp{np.random.randint(1 << 30)}"
        with tmp.open("wb") as f:
            np.savez(f, keys=self.keys, exts=np.array(self.exts, dtype=str), offsets=self.offsets,
                     sizes=self.sizes, truncated=self.truncated,
                     stat=np.array(json.dumps([INDEX_VERSION, *stat])))
        tmp.replace(file)  # epath's rename refuses an existing target; another process may write it too

    @classmethod
    def load(cls, file: epath.Path, stat: tuple) -> "ShardIndex | None":
        """The cached index in `file` when it was made from a shard of this `stat`, else None."""
        try:
            with file.open("rb") as f, np.load(f) as z:
                if json.loads(str(z["stat"])) != [INDEX_VERSION, *stat]:
                    return None
                return cls(z["keys"], [str(e) for e in z["exts"]], z["offsets"], z["sizes"], z["truncated"])
        except (OSError, ValueError, KeyError, EOFError):
            return None


def shard_stat(path: str) -> tuple:
    """(path, size, mtime): what a cached index and the cache key are valid for."""
    st = epath.Path(path).stat()
    return (str(path), int(st.length), float(st.mtime))


def open_index(path: str, index_dir: epath.Path) -> tuple[ShardIndex, tuple]:
    """The shard's index from the cache, or scanned (and cached)."""
    stat = shard_stat(path)
    file = index_dir / f"{hashlib.sha1(str(path).encode()).hexdigest()}.npz"
    index = ShardIndex.load(file, stat) if file.exists() else None
    if index is None:
        index = ShardIndex.scan(path, stat[1])
        index.save(file, stat)
    return index, stat


def _class_names(names, where: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        file = epath.Path(names).expanduser()
        if not file.exists():
            raise FileNotFoundError(f"config key `{where}.class_names`: file {file} does not exist")
        names = [n.strip() for n in file.read_text(encoding="utf-8").splitlines() if n.strip()]
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"config key `{where}.class_names`: a non-empty list of strings or a file "
                         f"of one name a line, got {names!r}")
    return list(names)


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
        self.names = _class_names(class_names, where)
        self.paths = shards.expand(urls, where)
        self.index_dir = epath.Path(index_dir or base.default_assets_dir() / "wds_index").expanduser()
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with futures.ThreadPoolExecutor(min(_INDEX_THREADS, len(self.paths))) as pool:
            opened = list(pool.map(lambda p: open_index(p, self.index_dir), self.paths))
        self.indices = [index for index, _ in opened]
        self.stats = [stat for _, stat in opened]
        self.shard_sizes = [len(index) for index in self.indices]
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
            with epath.Path(self.paths[shard]).open("rb") as f:
                f.seek(int(lo))
                span = f.read(int(hi - lo))
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
