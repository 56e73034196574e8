"""A tiny writer of webdataset shards in img2dataset's layout, for tests: shard `{s:05d}.tar` holds,
per sample, `KEY.png` (or another image extension), `KEY.txt` (the caption; one a line with several),
`KEY.json` ({"key", "caption", "status": "success", ...}) and optionally `KEY.cls` (an integer class,
CLIP_benchmark's layout), KEY = f"{shard:05d}{i:04d}" as img2dataset numbers samples
(img2dataset/writer.py). The same records are written as a JSONL manifest, so the webdataset source
can be compared with the JSONL source record by record.
"""
import io
import json
import os
import tarfile

import numpy as np

import helpers


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples, extra: bytes = b"", format=tarfile.PAX_FORMAT) -> str:
    """Writes `samples` ([(key, {ext: bytes}), ...], members in the given order) as a tar at
    `path` (python's default format, as webdataset's TarWriter writes), then `extra` bytes
    (garbage after the archive)."""
    with tarfile.open(path, "w", format=format) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    if extra:
        with open(path, "ab") as f:
            f.write(extra)
    return str(path)


def shapes_records(n_per=2, seed=0):
    """[(png bytes, [captions], label)]: coloured shapes (tests/helpers.py), label = shape index."""
    rng = np.random.default_rng(seed)
    out = []
    for colour in helpers.COLOURS:
        for si, shape in enumerate(helpers.SHAPES):
            for _ in range(n_per):
                out.append((png(helpers._draw(shape, colour, rng)), [f"a {colour} {shape}", f"{shape}, {colour}"], si))
    return out


def sample_members(record, image_ext="png", cls=True) -> dict:
    image, captions, label = record
    members = {image_ext: image, "txt": "\n".join(captions).encode(),
               "json": json.dumps({"caption": captions[0], "status": "success"}).encode()}
    if cls:
        members["cls"] = str(label).encode()
    return members


def write_shards(root, records, per_shard, image_ext="png", cls=True) -> list[str]:
    """`records` in shards of `per_shard` samples under `root` (img2dataset names); the paths."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(records), per_shard)):
        samples = [(f"{s:05d}{i:04d}", sample_members(r, image_ext, cls))
                   for i, r in enumerate(records[start:start + per_shard])]
        paths.append(write_tar(os.path.join(root, f"{s:05d}.tar"), samples))
    return paths


def write_manifest(root, records) -> str:
    """The same records as a JSONL manifest (images as PNG files): the reference source."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        for i, (image, captions, label) in enumerate(records):
            with open(os.path.join(root, f"{i}.png"), "wb") as img:
                img.write(image)
            f.write(json.dumps({"image": f"{i}.png", "captions": captions, "label": label}) + "\n")
    return path
