"""Prompt templates, text canonicalisation, class names and CuPL descriptions.

A zero-shot classifier turns every class name into one or more sentences: the class name put
into templates ("a photo of a {}.") and/or free-form descriptions of the class (CuPL, Pratt et
al. 2023: sentences written per class, stored as JSON ``{class name: [sentence, ...]}``).
`class_texts` builds those sentences; the evaluators embed them once per evaluation.
"""
import json
import os
import re
import string
from collections.abc import Mapping, Sequence

from vljax.text import canonicalize_name  # noqa: F401  (re-exported: prompts.canonicalize_name)

# The 80 templates of OpenAI's CLIP ImageNet evaluation (facts, as listed in the CLIP
# repository's notebook and in open_clip's zero_shot_metadata.py).
CLIP80 = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template subset the CLIP notebook recommends (chosen there by a sequential forward
# selection on ImageNet); nearly the accuracy of all 80 at a tenth of the text cost.
CLIP_BEST = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATES = {
    "name": ("{}",),
    "photo": ("a photo of a {}.",),
    "clip80": CLIP80,
    "best": CLIP_BEST,
    # Domain sets for the illustration data shipped with the project (emoji, openclipart).
    "icon": (
        "an emoji of {}.",
        "a clipart of {}.",
        "an icon of {}.",
        "an illustration of {}.",
        "a cartoon {}.",
    ),
    # Small grey product photos (Fashion-MNIST).
    "clothing": (
        "a photo of a {}, a type of clothing.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
        "a grayscale photo of the {}.",
    ),
}


def get_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Returns a template tuple from a set name in `TEMPLATES` or an explicit list.

    Every template must hold exactly one "{}" slot for the class name.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise KeyError(f"unknown template set {templates!r}; known: {sorted(TEMPLATES)}")
        templates = TEMPLATES[templates]
    templates = tuple(templates)
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return templates


def canonicalize(text: str, *, keep: str | None = None) -> str:
    """big_vision-style canonical text: '_' -> ' ', punctuation removed, lowercase, single spaces.

    Args:
      text: the string to clean.
      keep: an exact substring kept intact (e.g. "{}" for templates, "," for class names with
        synonyms); its characters are still removed where they appear elsewhere.
    """
    text = text.replace("_", " ")
    strip = str.maketrans("", "", string.punctuation)
    parts = text.split(keep) if keep else [text]
    text = (keep or "").join(p.translate(strip) for p in parts)
    return re.sub(r"\s+", " ", text.lower()).strip()


def load_class_names(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, a JSON file (a list, or {dataset: list} with one entry), or a
    text file with one name a line (blank lines skipped)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                data = json.load(f)
                if isinstance(data, Mapping):
                    if len(data) != 1:
                        raise ValueError(f"{path}: a dict of class-name lists needs one key, "
                                         f"got {sorted(data)}; pass the list itself")
                    data = next(iter(data.values()))
                return [str(n) for n in data]
            return [line.strip() for line in f if line.strip()]
    return [str(n) for n in source]


def load_descriptions(source: str | os.PathLike | Mapping[str, Sequence[str]]
                      ) -> dict[str, list[str]]:
    """CuPL descriptions: a JSON file or dict mapping class name -> list of sentences; keys that
    start with "_" (e.g. "_about": where the sentences come from) are notes, not classes."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    out = {}
    for name, sentences in source.items():
        if str(name).startswith("_"):
            continue
        if isinstance(sentences, str):
            sentences = [sentences]
        out[str(name)] = [str(s) for s in sentences]
    return out


def class_texts(class_names: Sequence[str],
                templates: str | Sequence[str] | None = "clip80",
                descriptions: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
                ) -> list[list[str]]:
    """The sentences that describe each class: templates filled with the name, then its
    descriptions (CuPL). Mixing both is CuPL's "+e" setting; `templates=None` uses only the
    descriptions. Descriptions are found by exact class name, else by canonical name.

    Returns:
      one non-empty list of sentences per class, in class order.
    """
    templates = get_templates(templates) if templates is not None else ()
    desc = load_descriptions(descriptions) if descriptions is not None else {}
    by_canonical = {canonicalize(k): v for k, v in desc.items()}
    texts = []
    for name in class_names:
        sentences = [t.format(name) for t in templates]
        sentences += desc.get(name, by_canonical.get(canonicalize(name), []))
        if not sentences:
            raise ValueError(f"class {name!r} has no template and no description")
        texts.append(sentences)
    return texts
