"""The published class names and prompt templates of the zero-shot suite (vljax/suites/data/).

Source: LAION-AI/CLIP_benchmark 1.6.1, `clip_benchmark/datasets/en_classnames.json`,
`en_zeroshot_classification_templates.json` and the WordNet-id lists of `datasets/builder.py`
(vljax/suites/data/README.md). Keys are CLIP_benchmark's (`imagenet1k`, `caltech101_vtab`, ...).
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources


@functools.cache
def _load(filename: str) -> dict:
    return json.loads(resources.files("vljax.suites").joinpath("data", filename).read_text("utf-8"))


def class_name_keys() -> tuple[str, ...]:
    return tuple(_load("en_classnames.json"))


def template_keys() -> tuple[str, ...]:
    return tuple(_load("en_zeroshot_classification_templates.json"))


def class_names(key: str) -> list[str]:
    """CLIP_benchmark's class names of `key`, in class-index order; an unknown key is an error
    naming the known ones."""
    table = _load("en_classnames.json")
    if key not in table:
        raise KeyError(f"no class names for {key!r} in vljax/suites/data/en_classnames.json "
                       f"(it has {sorted(table)})")
    return list(table[key])


def templates(key: str) -> list[str]:
    """CLIP_benchmark's prompt templates of `key`, with its class-name slot `{c}` written as vljax's
    `{}` (vljax/evaluators/prompts.py): "a photo of a {c}." -> "a photo of a {}."."""
    table = _load("en_zeroshot_classification_templates.json")
    if key not in table:
        raise KeyError(f"no templates for {key!r} in vljax/suites/data/"
                       f"en_zeroshot_classification_templates.json (it has {sorted(table)})")
    return [t.replace("{c}", "{}") for t in table[key]]


def imagenet_subset(key: str) -> list[int]:
    """The ImageNet-1k class indices (ascending) of a 200-class subset: "imagenet-a", "imagenet-r"
    or "imagenet-o"; CLIP_benchmark's class order for these sets is the ImageNet order restricted
    to them."""
    wnids = _load("imagenet_wnids.json")
    if key not in wnids or key == "imagenet1k":
        raise KeyError(f"no ImageNet subset {key!r} (known: imagenet-a, imagenet-r, imagenet-o)")
    keep = set(wnids[key])
    return [i for i, w in enumerate(wnids["imagenet1k"]) if w in keep]


def clean_names(kind: str | None, names: list[str]) -> list[str]:
    """CLIP_benchmark's clean-up of a dataset's own class names (datasets/builder.py): None keeps
    them as they are (its vtab/ and tfds/ sets); "underscores": `_` -> space (Food-101);
    "sun397": `_` and `/` -> space after TFDS's "/<letter>/" prefix ("/a/apartment_building/outdoor"
    -> "apartment building outdoor", torchvision's SUN397 names as CLIP_benchmark cleans them)."""
    if kind is None:
        return list(names)
    if kind == "underscores":
        return [n.replace("_", " ") for n in names]
    if kind == "sun397":
        return [re.sub(r"^/[a-z]/", "", n).replace("_", " ").replace("/", " ") for n in names]
    raise ValueError(f"unknown class-name clean-up {kind!r} (known: None, 'underscores', 'sun397')")
