"""CatLIP's labels extracted from captions (Mehta et al. 2024, "CatLIP: CLIP-level visual recognition
accuracy with 2.7x faster pre-training on web-scale image-text data", arXiv 2404.15653, Sec. 3;
official code apple/corenet, projects/catlip): the captions of the training data give each image a
set of labels from a vocabulary, and the image tower is trained as a multi-label classifier on them.

CatLIP tags each caption's parts of speech, maps its nouns to WordNet synsets (NLTK's `wordnet`
corpus, as corenet's dataset code imports it) and keeps the synsets that occur at least a threshold
number of times in the training captions (its vocabulary `V_tau`). Deviation: WordNet's data (and a
POS tagger's model) cannot be downloaded here, so a TERM is a lower-cased alphabetic word (optionally
also each pair of adjacent kept words, `bigrams`) after a fixed English stop-word list, a light
plural fold ("cats" -> "cat", `_singular`) stands in for WordNet's lemmatiser, and no synonyms are
merged (WordNet maps "puppy" and "dog" to related but different synsets: hypernyms are not used
either in what we could read of CatLIP). The frequency filter is the paper's: a term is kept when
it occurs in at least `min_count` captions; `max_terms` > 0 keeps only that many of the most frequent.

The vocabulary is written once into the workdir (`VOCAB_FILE`, JSON: terms, counts, the sources'
fingerprint and the settings: `vocabulary_for`, `write_vocabulary`, which the trainer calls with its
config.json, after every check); a resumed run reads it back, and a file written for other sources or
settings is refused, naming it. Each training record's multi-hot target over the
vocabulary is made in the input workers (`Targets`, a per-example map of the grain pipeline, from the
caption the example carries: the one drawn for it, after `input.text_aug` when set, as CatLIP takes
each image's own caption): the batch field "caption_labels" bool [B, V].
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re

import numpy as np
from etils import epath

from vljax.data import sources

VOCAB_FILE = "caption_vocab.json"
FIELD = "caption_labels"  # the batch field: bool [B, V]
SETTINGS = ("min_count", "max_terms", "bigrams")

# A common English stop-word list (articles, pronouns, prepositions, auxiliaries, conjunctions,
# quantifiers) plus caption boilerplate ("image", "photo", ...): words that name no visual concept.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves one two three four five many much another every several
near next onto upon via without within along across around behind beside besides among toward
towards isn don
image images photo photos picture pictures illustration icon icons emoji clipart clip art vector
""".split())
_WORD = re.compile(r"[a-z]+")


def _singular(word: str) -> str:
    """A light plural fold standing in for WordNet's noun lemmatiser: "boxes" -> "box",
    "cats" -> "cat", "berries" -> "berry"; words of 3 letters or fewer and "-ss" words stay."""
    if len(word) <= 3 or word.endswith("ss") or word.endswith("us") or word.endswith("is"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def terms_of(caption: str, bigrams: bool = False) -> list[str]:
    """The distinct terms of one caption, in order of first occurrence: lower-cased alphabetic words
    of 2+ letters not in STOP_WORDS, plural-folded; with `bigrams`, also "w1 w2" for each pair of
    words adjacent after the stop words are dropped."""
    words = [_singular(w) for w in _WORD.findall(caption.lower()) if len(w) > 1 and w not in STOP_WORDS]
    words = [w for w in words if w not in STOP_WORDS]
    out = list(words)
    if bigrams:
        out += [f"{a} {b}" for a, b in zip(words, words[1:])]
    return list(dict.fromkeys(out))


def build_vocabulary(captions, min_count: int = 2, max_terms: int = 0,
                     bigrams: bool = False) -> tuple[list[str], list[int]]:
    """(terms, counts): every term (`terms_of`) occurring in at least `min_count` of `captions`
    (CatLIP's frequency filter; a term counts once per caption), most frequent first, ties in
    alphabetical order; with `max_terms` > 0, only the first `max_terms`."""
    counts = collections.Counter(t for c in captions for t in terms_of(c, bigrams))
    kept = sorted(((t, n) for t, n in counts.items() if n >= min_count), key=lambda tn: (-tn[1], tn[0]))
    if max_terms > 0:
        kept = kept[:max_terms]
    return [t for t, _ in kept], [n for _, n in kept]


def training_captions(opened) -> list[str]:
    """Every usable caption of every record of the `opened` training sources (any registered kind,
    read through `captions_of`: metadata, no image decoded), in source and record order."""
    out = []
    for src in opened:
        for i in range(len(src)):
            out += [c.strip() for c in src.captions_of(i) if c and c.strip()]
    return out


def fingerprint(opened) -> str:
    """A stable name of the `opened` sources' records (their `cache_key`s and sizes)."""
    parts = [[sources.cache_key(s), len(s)] for s in opened]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def vocabulary_for(opened, workdir, settings: dict) -> dict:
    """The vocabulary record of the `opened` training sources under `settings` ({min_count, max_terms,
    bigrams}): {"terms", "counts", "sources" (`fingerprint`), "settings"}, read from
    `workdir/VOCAB_FILE` when there (a resumed run), else extracted (nothing is written:
    `write_vocabulary`). A file written for other sources or settings is a ValueError naming it; an
    empty vocabulary (no term reaches `min_count`) is a ValueError naming `catlip.min_count`."""
    settings = {k: settings[k] for k in SETTINGS}
    path = epath.Path(workdir) / VOCAB_FILE
    fp = fingerprint(opened)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("sources") != fp or saved.get("settings") != settings:
            raise ValueError(f"{path}: written for sources {saved.get('sources')} and settings "
                             f"{saved.get('settings')}, but this run has sources {fp} and settings "
                             f"{settings} (config keys `input.data`, `catlip`); use a new workdir or "
                             f"delete the file to extract the vocabulary again")
        return saved
    terms, counts = build_vocabulary(training_captions(opened), int(settings["min_count"]),
                                     int(settings["max_terms"]), bool(settings["bigrams"]))
    if not terms:
        raise ValueError(f"config key `catlip.min_count`: no caption term occurs in {settings['min_count']} "
                         f"or more captions of config.input.data; lower it")
    return dict(terms=terms, counts=counts, sources=fp, settings=settings)


def write_vocabulary(workdir, record: dict) -> None:
    """Writes `record` (`vocabulary_for`) to `workdir/VOCAB_FILE` unless the file is there (atomic:
    a temporary file renamed)."""
    path = epath.Path(workdir) / VOCAB_FILE
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=0))
    tmp.rename(path)


@dataclasses.dataclass(frozen=True)
class Targets:
    """The per-example map of the training pipeline (grain `.map`, run in the input workers):
    example -> example plus FIELD, bool [V], True at the vocabulary's terms in the example's
    caption. A skipped example ({"skip": reason}) passes unchanged. Picklable."""
    terms: tuple[str, ...]
    bigrams: bool = False

    def __post_init__(self):
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.terms)})

    def __call__(self, example: dict) -> dict:
        if "skip" in example:
            return example
        hot = np.zeros(len(self.terms), bool)
        hot[[self._index[t] for t in terms_of(example["caption"], self.bigrams) if t in self._index]] = True
        return {**example, FIELD: hot}
