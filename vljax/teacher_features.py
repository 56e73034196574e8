"""A teacher CLIP's embeddings as data: written once per training source, read by the pipeline.

Distillation from a teacher CLIP (vljax/losses/distill.py, CLIP-KD) needs the teacher's image and
text embeddings of every training pair. The teacher is locked, so they are the same in every epoch:
like LiT's trunk features (vljax/features.py), they are computed once per record and stored, and
the batch carries them, with no teacher in the step (`config.distill = dict(teacher=PATH)`, PATH any
checkpoint `vljax.factory.load` reads: a vljax workdir or export, a transformers CLIP / SigLIP
directory, a big_vision npz).

Store, `<workdir>/teacher/<fingerprint>/`:

    teacher-00000-of-00001.array_record   record i: the float32 bytes of [1 + C_i, D]: row 0 the
                                          teacher's image embedding, rows 1.. its embeddings of the
                                          record's C_i usable captions (non-empty after strip, in
                                          order: `preprocess.usable_captions`, which training
                                          draws from); b"" when the teacher could not read the image
    teacher.json                          {"fingerprint", "num_records", "dim", "logit_scale",
                                           "teacher", "source", "unreadable": {i: reason}}

The image embedding is the teacher's own evaluation transform of the record (`Embedder.from_bundle`:
its image size, crop or squash resize, value range), i.e. of the un-augmented image: with the
student's random crops or greyscale views, the teacher saw the centre view (CLIP-KD runs the teacher
on the student's augmented view; features as data trade that for never running the teacher again).
The fingerprint covers the source's cache key and length, the teacher's path and spec and a digest
of its parameter values; a complete store (its index written last) is reused.
Every process embeds (the towers run on the mesh); process 0 writes the store.
"""
from __future__ import annotations

import hashlib
import json

import grain
import jax
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from jax.experimental import multihost_utils

from vljax import embedder as embedder_lib, factory, features, logs
from vljax.data import sources
from vljax.data.preprocess import usable_captions

INDEX = "teacher.json"
FILE = "teacher-00000-of-00001.array_record"
FIELDS = ("teacher_zimg", "teacher_ztxt", "teacher_t")
CONFIG_KEYS = ("teacher", "batch_size")


def fingerprint(bundle, teacher_path, source, mesh) -> str:
    parts = dict(source=sources.cache_key(source), n=len(source), teacher=str(teacher_path),
                 spec=bundle.spec, params=features.params_digest(bundle.params, mesh))
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_teacher_store(bundle, teacher_path, source, root, *, mesh, batch_size: int = 64,
                        progress: bool = True) -> "TeacherSource":
    """The teacher store of `source` under `root/<fingerprint>/` (module docstring), written unless
    complete; returns it. Called by every process."""
    fp = fingerprint(bundle, teacher_path, source, mesh)
    path = epath.Path(root) / fp
    index_file = path / INDEX
    if index_file.exists() and json.loads(index_file.read_text())["fingerprint"] == fp:
        logging.debug("teacher embeddings: reusing %s", path)
        return TeacherSource(path)
    emb = embedder_lib.Embedder.from_bundle(bundle, mesh=mesh, batch_size=batch_size, progress=progress)
    images = emb.embed_images(source)  # z [M, D] of the readable records, index [M]
    captions = [usable_captions(source.captions_of(i)) for i in range(len(source))]
    distinct = sorted({c for caps in captions for c in caps})
    ztxt = emb.embed_texts(tuple(distinct)) if distinct else np.zeros((0, images.z.shape[1]), np.float32)
    row = {c: k for k, c in enumerate(distinct)}
    zimg = dict(zip(images.index.tolist(), images.z))
    dim = int(images.z.shape[1]) if len(images.z) else int(ztxt.shape[1])
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        unreadable = {}

        def write(local_file):
            writer = ArrayRecordWriter(local_file, "group_size:1")
            for i, caps in enumerate(captions):
                if i not in zimg:
                    unreadable[i] = "decode_error"
                    writer.write(b"")
                    continue
                rows = [zimg[i]] + [ztxt[row[c]] for c in caps]
                writer.write(np.stack(rows).astype(np.float32).tobytes())
            writer.close()

        features.write_atomic(path / FILE, write)
        index = dict(fingerprint=fp, num_records=len(source), dim=dim, logit_scale=emb.logit_scale,
                     teacher=str(teacher_path), source=repr(source), unreadable=unreadable)
        features.write_atomic(index_file, lambda f: epath.Path(f).write_text(json.dumps(index, indent=1)))
    multihost_utils.sync_global_devices(f"teacher embeddings written {fp}")
    logs.info("teacher embeddings: %s, %d records x %d dims, %d distinct captions", path, len(source),
              dim, len(distinct))
    return TeacherSource(path)


class TeacherSource:
    """A complete teacher store: `len`, `[i] -> {"teacher_zimg": f32 [D], "teacher_ztxt": f32 [C, D]
    (one row per usable caption), "teacher_t": f32 (the teacher's logit scale)}` or
    `{"error": reason}`. Picklable (grain workers)."""

    def __init__(self, path):
        self.path = epath.Path(path)
        if not (self.path / INDEX).exists():
            raise FileNotFoundError(f"teacher embeddings: {self.path / INDEX} does not exist (an incomplete "
                                    "or missing store; `write_teacher_store` writes it)")
        self.index = json.loads((self.path / INDEX).read_text())
        self.num_records, self.dim = self.index["num_records"], self.index["dim"]
        self.logit_scale = np.float32(self.index["logit_scale"])
        self._unreadable = {int(k): v for k, v in self.index["unreadable"].items()}
        self._records = grain.sources.ArrayRecordDataSource([str(self.path / FILE)])
        if len(self._records) != self.num_records:
            raise ValueError(f"teacher embeddings: {self.path} holds {len(self._records)} records, its "
                             f"{INDEX} says {self.num_records}")

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, i: int) -> dict:
        if int(i) in self._unreadable:
            return {"error": self._unreadable[int(i)]}
        rows = np.frombuffer(self._records[int(i)], np.float32).reshape(-1, self.dim)
        return {"teacher_zimg": rows[0], "teacher_ztxt": rows[1:], "teacher_t": self.logit_scale}

    def wrap(self, source, where: str = "config.input.data") -> "WithTeacher":
        """`source` with this store's fields in its records (the training pipeline's hook)."""
        return WithTeacher(source, self, where)

    def __repr__(self):
        return f"TeacherSource({str(self.path)!r}, n={self.num_records}, dim={self.dim})"


class WithTeacher:
    """A source whose records also carry the teacher store's fields (`TeacherSource`); a record the
    teacher could not read is unreadable here too (its reason, skipped and counted)."""

    def __init__(self, source, store: TeacherSource, where: str = "config.input.data"):
        if len(source) != len(store):
            raise ValueError(f"{where}: {source!r} has {len(source)} records but its teacher store "
                             f"{store!r} has {len(store)}")
        self.source, self.store = source, store

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        if "error" not in record:
            t = self.store[index]
            if "error" in t:
                record["error"] = t["error"]
            else:
                record.update(t)
        return record

    def cache_key(self) -> str:
        return sources.base.digest("with_teacher", sources.cache_key(self.source), str(self.store.path))

    def missing_labels(self, field: str) -> str | None:
        return sources.base.missing_labels(self.source, field)

    def __repr__(self):
        return f"WithTeacher({self.source!r}, {self.store!r})"


def teacher_stores(config, mesh, workdir) -> list[TeacherSource] | None:
    """With `config.distill` (dict(teacher=PATH, batch_size=64)): one teacher store per entry of
    `config.input.data`, in order, under `<workdir>/teacher/`; None without it. Raises naming the
    key for a missing teacher or an unknown key."""
    cfg = config.get("distill")
    if not cfg:
        return None
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config key `distill.{unknown[0]}`: unknown (known: {', '.join(CONFIG_KEYS)})")
    path = cfg.get("teacher")
    if not path or not epath.Path(path).exists():
        raise ValueError(f"config key `distill.teacher`: {path!r} is not a checkpoint directory "
                         "(a vljax workdir or export, a transformers CLIP / SigLIP directory)")
    bundle = factory.load(path)
    data_dir = config.input.get("data_dir")
    return [write_teacher_store(bundle, path, sources.get_source(entry, data_dir=data_dir),
                                epath.Path(workdir) / "teacher", mesh=mesh,
                                batch_size=int(cfg.get("batch_size", 64)))
            for entry in config.input.data]
