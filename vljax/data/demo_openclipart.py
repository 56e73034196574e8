"""`vljax_openclipart`: the Debian openclipart-png illustrations with captions from the SVG metadata.

PNG <-> SVG are matched by relative path (png/animals/mammals/bat.png <-> svg/animals/mammals/bat.svg).

Features: id (relative path without extension), image (PNG, RGB, longer side <= MAX_SIDE,
transparency composited on white), captions (the title; the description when it says more; the
title followed by the image's tags), category (the folder path, e.g. "animals/mammals"),
top_category (its first folder, e.g. "animals"), tags (multi-label: dc:subject keywords occurring
on >= MIN_TAG_COUNT images, minus bookkeeping tags such as "unsorted" or the author's name).

Readable class names (metadata / class_names.json): the folder path with "/", "_" and "-" as
spaces ("animals/mammals" -> "animals mammals", "signs_and_symbols" -> "signs and symbols"),
so every path keeps a distinct name; tags are stored lowercased with "_" as spaces.
"""
import collections
import multiprocessing
import os
from pathlib import Path
import re
import xml.etree.ElementTree as ET

from PIL import Image
import tensorflow_datasets as tfds

from vljax.data import tfds_writer as W
from vljax.data import transforms as T

NAME = "vljax_openclipart"
MAX_SIDE = 128
# A handful of the PNGs are huge renders (up to 623 megapixels, 2.5 GB as RGBA once decoded);
# they would dominate build time and memory for a 128-pixel thumbnail, so they are left out.
MAX_PIXELS = 40_000_000
MIN_TAG_COUNT = 20
MAX_CAPTION_TAGS = 10
_DC = "{http://purl.org/dc/elements/1.1/}"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_CC = "{http://web.resource.org/cc/}"
# Tags that describe the collection's bookkeeping or the author, not the picture.
_JUNK_TAGS = frozenset({"unsorted", "hash", "magick", "special", "theme", "lemon theme icon",
                        "architetto francesco rollandin", "clip art", "clipart", "image", "media",
                        "public domain", "svg", "png", "mapsym", "appicon", "mime types",
                        "mimetypes"})


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", (text or "").replace("_", " ")).strip()


def readable_path(path: str) -> str:
    return re.sub(r"[/_\-\s]+", " ", path).strip()


def svg_metadata(svg_path: Path) -> tuple[str, str, list[str]]:
    """(title, description, tags) from an SVG's RDF metadata; empty when absent or unparsable."""
    try:
        work = ET.parse(svg_path).getroot().find(f".//{_CC}Work")
    except (ET.ParseError, OSError):
        return "", "", []
    if work is None:
        return "", "", []
    subject = work.find(f"{_DC}subject")
    tags = [] if subject is None else [_clean(li.text).lower() for li in subject.iter(f"{_RDF}li")]
    tags = list(dict.fromkeys(t for t in tags if t and t not in _JUNK_TAGS))  # dedupe, keep order
    return _clean(work.findtext(f"{_DC}title")), _clean(work.findtext(f"{_DC}description")), tags


def _captions(title: str, desc: str, tags: list[str]) -> list[str]:
    caps = [title] if title else []
    if len(desc) >= 3 and desc.lower() != title.lower():
        caps.append(desc[:300])
    if tags:
        caps.append(", ".join(([title] if title else []) + tags[:MAX_CAPTION_TAGS]))
    return caps


def _prepare(path: str) -> bytes | str:
    """PNG bytes of the resized RGB image, or why not (runs in a worker process)."""
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
    except Image.DecompressionBombError as e:  # PIL refuses over twice its own limit at open
        return f"{e} (the build's decode budget is {MAX_PIXELS:,})"
    except (OSError, ValueError, SyntaxError, EOFError):  # decode_image below names the reason
        w = h = 0
    if w * h > MAX_PIXELS:
        return f"{w}x{h} pixels, over the build's decode budget of {MAX_PIXELS:,}"
    try:
        return W.encode_png(T.resize_max_side(T.decode_image(path), MAX_SIDE))
    except (FileNotFoundError, *T.DECODE_ERRORS) as e:
        return f"{type(e).__name__}: {e}"


def make_spec(root, num_proc: int | None = None) -> W.DatasetSpec:
    """root: /usr/share/openclipart (holds png/ and svg/)."""
    root = Path(root)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise FileNotFoundError(f"{png_root} does not exist: install Debian openclipart-png")
    rels = sorted(str(p.relative_to(png_root).with_suffix("")) for p in png_root.rglob("*.png"))
    meta = {r: svg_metadata(svg_root / f"{r}.svg") for r in rels}
    no_svg = sum(not (svg_root / f"{r}.svg").is_file() for r in rels)
    if no_svg:
        print(f"[{NAME}] {no_svg} of {len(rels)} PNGs have no SVG (no captions from metadata)")
    categories = sorted({os.path.dirname(r) or "." for r in rels})
    tops = sorted({c.split("/")[0] for c in categories})
    tag_counts = collections.Counter(t for _, _, tags in meta.values() for t in tags)
    tags = sorted(t for t, c in tag_counts.items() if c >= MIN_TAG_COUNT)
    tag_index = {t: i for i, t in enumerate(tags)}
    num_proc = num_proc or min(4, os.cpu_count() or 1)

    def examples(split: str):
        mine = [r for r in rels if W.split_of(r) == split]
        with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
            prepared = pool.imap(_prepare, [str(png_root / f"{r}.png") for r in mine], chunksize=16)
            for r, png in zip(mine, prepared):
                if isinstance(png, str):
                    print(f"[{NAME}] left out {png_root / r}.png: {png}")
                    continue
                title, desc, image_tags = meta[r]
                category = os.path.dirname(r) or "."
                yield r, {"id": r, "image": png,
                          "captions": _captions(title or _clean(Path(r).name), desc, image_tags),
                          "category": categories.index(category),
                          "top_category": tops.index(category.split("/")[0]),
                          "tags": sorted({tag_index[t] for t in image_tags if t in tag_index})}

    return W.DatasetSpec(
        name=NAME,
        description=__doc__,
        homepage="https://openclipart.org",
        features={
            "id": tfds.features.Text(),
            "image": W.png_bytes_feature(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "category": tfds.features.ClassLabel(names=categories),
            "top_category": tfds.features.ClassLabel(names=tops),
            "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=tags)),
        },
        splits={s: (lambda s=s: examples(s)) for s in ("train", "val", "test")},
        class_names={"category": [readable_path(c) for c in categories],
                     "top_category": [readable_path(c) for c in tops],
                     "tags": tags},
    )
