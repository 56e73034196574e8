"""The index of a webdataset tar shard: where each sample's members lie, from one pass over the
tar headers (no payload read), cached on disk. Used by the webdataset source kind (webdataset.py).

Samples are grouped as webdataset groups them (github.com/webdataset/webdataset,
`tariterators.py`): KEY is a member's path up to the first dot of its base name, EXT the rest,
lower-cased (`base_plus_ext`); members that are not regular files, names without an extension and
metadata members (`__*__`) are ignored; a KEY met again after another sample starts a new sample
(`group_by_keys`); a repeated EXT within a sample keeps the first member.

The headers are read by a plain ustar / GNU header reader (~4x faster than `tarfile.next()`), and
by python's tarfile for the header types it leaves (pax, GNU long names); files are opened with
etils.epath (local or `gs://`). An index is cached as `<index_dir>/<sha1(path)>.npz`, valid while
the shard's size and mtime are those recorded.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile

import numpy as np
from absl import logging
from etils import epath

INDEX_VERSION = 1
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def split_name(name: str) -> tuple[str | None, str | None]:
    """(KEY, ext) of a tar member name as webdataset splits it; (None, None) without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


class _NeedTarfile(Exception):
    """A header the fast reader leaves to python's tarfile."""


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES, less GNU sparse files
_NO_DATA = tuple(bytes([c]) for c in b"123456")  # links, devices, directories, fifos


def _ustar_members(f):
    """(name, regular, data offset, size) of each member, from the 512-byte ustar / GNU / v7
    headers (POSIX.1-1988, as python's `tarfile` parses them), skipping the payloads: ~4x faster
    than `tarfile.next()`. Stops where tarfile stops (end-of-archive block, a cut header after
    the first); raises tarfile.ReadError for an empty or cut first header and _NeedTarfile at a
    header it leaves to tarfile (pax, GNU long names, sparse, base-256 sizes, a checksum that
    does not match: damage, which tarfile reads up to, or an old signed checksum)."""
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
        if chksum != sum(buf[:148]) + 256 + sum(buf[156:]):  # damage, or an old signed sum
            raise _NeedTarfile("checksum")
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
