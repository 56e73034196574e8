"""`vljax_emoji`: Google's emoji images (npm emoji-datasource-google) with names, categories, tags.

One record per image, skin-tone variants included (3786 images of 1911 emoji). Variants of one
emoji share its split (the split hashes the base emoji's code point), so no emoji is both seen
in training and evaluated on.

Features: id (code points), image (PNG, 64x64 RGB, transparency composited on white), captions
("cat face", "emoji of cat face", short names with '_' and '-' as spaces, plus the skin tone for
variants), category (10 classes, e.g. "Animals & Nature"), subcategory (99, e.g. "animal-mammal"),
tags (multi-label: words of the names that occur in >= MIN_TAG_COUNT emoji, e.g. "face", "cat").

Readable class names (metadata / class_names.json): categories lowercased with "&" -> "and"
("animals and nature"); subcategories with "-" -> " " ("animal mammal"), which keeps them distinct.
"""
import collections
import json
from pathlib import Path
import re

import tensorflow_datasets as tfds

from vljax.data import tfds_writer as W
from vljax.data import transforms as T

NAME = "vljax_emoji"
MIN_TAG_COUNT = 8
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
              "1F3FE": "medium-dark", "1F3FF": "dark"}
# Function words, and name fragments that carry no visual meaning ("st", "cjk unified ideograph").
_STOPWORDS = frozenset("a an and of the with without in on at for to by as st cjk unified".split())


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w and w not in _STOPWORDS]


def _spaced(name: str) -> str:
    return re.sub(r"[_\-]+", " ", name).strip()


def _tone_text(key: str) -> str:
    tones = [SKIN_TONES[k] for k in key.split("-")]
    if len(set(tones)) == 1:
        return f"{tones[0]} skin tone"
    return " and ".join(tones) + " skin tones"


def _captions(entry: dict, tone_key: str | None) -> list[str]:
    name = entry["name"].lower()
    caps = [name, f"emoji of {name}"]
    caps += [s for s in (_spaced(n) for n in entry["short_names"]) if s and s != name]
    if tone_key:
        tone = _tone_text(tone_key)
        caps = [f"{c}, {tone}" for c in caps]
    return caps


def readable_category(name: str) -> str:
    return name.lower().replace("&", "and")


def readable_subcategory(name: str) -> str:
    return _spaced(name)


def make_spec(emoji_dir) -> W.DatasetSpec:
    """emoji_dir: the unpacked npm package (holds emoji.json and img/google/64/)."""
    emoji_dir = Path(emoji_dir)
    meta_path, img_dir = emoji_dir / "emoji.json", emoji_dir / "img" / "google" / "64"
    if not meta_path.is_file() or not img_dir.is_dir():
        raise FileNotFoundError(f"{emoji_dir} is not the emoji-datasource-google package "
                                f"(needs emoji.json and img/google/64/); see scripts/setup.sh")
    entries = [e for e in json.loads(meta_path.read_text()) if e.get("has_img_google")]
    categories = sorted({e["category"] for e in entries})
    subcategories = sorted({e["subcategory"] for e in entries})
    word_counts = collections.Counter(
        w for e in entries for w in set(_words(" ".join([e["name"]] + e["short_names"]))))
    tags = sorted(w for w, c in word_counts.items() if c >= MIN_TAG_COUNT)
    tag_index = {t: i for i, t in enumerate(tags)}

    def examples(split: str):
        for e in entries:
            if W.split_of(e["unified"]) != split:
                continue
            words = set(_words(" ".join([e["name"]] + e["short_names"])))
            common = {"category": categories.index(e["category"]),
                      "subcategory": subcategories.index(e["subcategory"]),
                      "tags": sorted(tag_index[w] for w in words if w in tag_index)}
            variants = [(e["unified"], e["image"], None)] + [
                (v["unified"], v["image"], k) for k, v in (e.get("skin_variations") or {}).items()
                if v.get("has_img_google", True)]
            for uid, image, tone in variants:
                path = img_dir / image
                if not path.is_file():
                    print(f"[{NAME}] missing image {path} for {e['name']!r}: left out")
                    continue
                yield uid, {"id": uid, "image": W.encode_png(T.decode_image(path)),
                            "captions": _captions(e, tone), **common}

    return W.DatasetSpec(
        name=NAME,
        description=__doc__,
        homepage="https://github.com/iamcal/emoji-data",
        features={
            "id": tfds.features.Text(),
            "image": W.png_bytes_feature(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "category": tfds.features.ClassLabel(names=categories),
            "subcategory": tfds.features.ClassLabel(names=subcategories),
            "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=tags)),
        },
        splits={s: (lambda s=s: examples(s)) for s in ("train", "val", "test")},
        class_names={"category": [readable_category(c) for c in categories],
                     "subcategory": [readable_subcategory(c) for c in subcategories],
                     "tags": tags},
    )
