"""Caption augmentation of "Improved baselines for vision-language pre-training" (Fini, Astolfi,
Romero-Soriano, Verbeek, Drozdzal; TMLR 2023, arXiv 2305.08675), as its official code makes it
(facebookresearch/clip-rocket `tokenizer.py`, SimpleTokenizer.strong_augment):

  1. with probability `stopwords` (0.5), English stop words are removed (NLTK's list; the text is
     kept if nothing would remain);
  2. then ONE of: the caption unchanged (weight `identity`, 0), EDA's synonym replacement
     (`synonym`, 0.2), random swap (`swap`, 0.2), random deletion (`delete`, 0.1) (Wei & Zou 2019,
     "EDA", as the `textaugment` package's EDA that clip-rocket calls), drawn by these weights.

    config.input.text_aug = dict(stopwords=0.5, identity=0.0, synonym=0.2, swap=0.2, delete=0.1,
                                 delete_p=0.1, swaps=1, synonyms="<a JSON file {word: [synonyms]}>")

EDA's operations on the whitespace-split words: swap exchanges two distinct random positions
`swaps` times (one word: unchanged); deletion drops each word with probability `delete_p` (one
word: unchanged; all dropped: one random word kept); synonym replacement replaces one random word
that has synonyms by a random one of them. Our deviations: the synonyms come from a JSON table
(`synonyms`), not WordNet (NLTK's WordNet corpus is a download this library does not make), so
`synonym` > 0 needs that table; NLTK's word_tokenize before stop-word removal is a regular
expression here (words, optionally with an apostrophe suffix, and single punctuation marks).

Seeded per record: the draws come from the example's generator (grain's random_map seeds it from
the run's seed and the record's index), after every image draw, so the captions are the same on
resume and for any number of processes, and switching the augmentation on leaves the images as
they were. Training only: evaluation captions are never augmented.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

DEFAULTS = dict(stopwords=0.5, identity=0.0, synonym=0.2, swap=0.2, delete=0.1, delete_p=0.1, swaps=1,
                synonyms=None)
OPS = ("identity", "synonym", "swap", "delete")

# NLTK's English stop-word list (nltk.corpus.stopwords.words("english"), 179 words).
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over
under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn
hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def options(section) -> dict | None:
    """`input.text_aug` over DEFAULTS (None when unset); a bad key or value is a ValueError naming
    `input.text_aug.<key>`."""
    if section is None:
        return None
    unknown = sorted(set(dict(section)) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config key `input.text_aug`: unknown keys {unknown} (known: {', '.join(DEFAULTS)})")
    o = {**DEFAULTS, **dict(section)}
    for key in ("stopwords", "delete_p"):
        if not 0.0 <= float(o[key]) <= 1.0:
            raise ValueError(f"config key `input.text_aug.{key}`: a probability in [0, 1], got {o[key]!r}")
    weights = [float(o[k]) for k in OPS]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"config key `input.text_aug`: the weights {dict(zip(OPS, weights))} must be >= 0 "
                         "with a positive sum")
    if int(o["swaps"]) < 1:
        raise ValueError(f"config key `input.text_aug.swaps`: >= 1, got {o['swaps']!r}")
    if float(o["synonym"]) > 0 and not o["synonyms"]:
        raise ValueError("config key `input.text_aug.synonyms`: synonym replacement (`synonym` > 0) needs "
                         "a JSON file {word: [synonyms]} (WordNet is not read here); give one or set synonym=0")
    return o


def read_synonyms(path) -> dict[str, tuple[str, ...]]:
    """A JSON object {word: [synonym, ...]} -> {lower-case word: synonyms}; a bad file is a
    ValueError naming it."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"config key `input.text_aug.synonyms`: cannot read {path!r}: {e}") from e
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise ValueError(f"config key `input.text_aug.synonyms`: {path!r} must hold a JSON object "
                         "{word: [synonyms]}")
    return {str(k).lower(): tuple(str(s) for s in v if s) for k, v in table.items() if v}


def remove_stopwords(text: str) -> str:
    """The text's tokens less NLTK's English stop words (case-insensitive), joined by spaces."""
    return " ".join(w for w in _TOKEN.findall(text) if w.lower() not in STOPWORDS)


def random_swap(words: list[str], rng: np.random.Generator, n: int = 1) -> list[str]:
    """EDA's random swap: n times, two distinct random positions exchanged."""
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], rng: np.random.Generator, p: float = 0.1) -> list[str]:
    """EDA's random deletion: each word dropped with probability p; one word is never dropped, and
    when every word would be, one random word is kept."""
    if len(words) <= 1:
        return list(words)
    keep = rng.uniform(size=len(words)) > p
    if not keep.any():
        return [words[int(rng.integers(len(words)))]]
    return [w for w, k in zip(words, keep) if k]


def synonym_replacement(words: list[str], rng: np.random.Generator, synonyms: dict) -> list[str]:
    """EDA's synonym replacement of one word: a random word (not a stop word) that has synonyms
    in the table, replaced by a random one of them; unchanged when none has."""
    candidates = [i for i, w in enumerate(words) if w.lower() in synonyms and w.lower() not in STOPWORDS]
    if not candidates:
        return list(words)
    i = candidates[int(rng.integers(len(candidates)))]
    choices = synonyms[words[i].lower()]
    out = list(words)
    out[i] = choices[int(rng.integers(len(choices)))]
    return out


@dataclasses.dataclass(frozen=True)
class TextAug:
    """caption, rng -> augmented caption (module docstring); `from_options(options(section))`."""
    stopwords: float = 0.5
    weights: tuple = (0.0, 0.2, 0.2, 0.1)  # OPS order
    delete_p: float = 0.1
    swaps: int = 1
    synonyms: tuple = ()  # ((word, (synonym, ...)), ...): hashable, for a frozen dataclass

    @functools.cached_property
    def table(self) -> dict:
        return dict(self.synonyms)

    @classmethod
    def from_options(cls, o: dict) -> TextAug:
        table = read_synonyms(o["synonyms"]) if o["synonyms"] else {}
        return cls(float(o["stopwords"]), tuple(float(o[k]) for k in OPS), float(o["delete_p"]),
                   int(o["swaps"]), tuple(sorted(table.items())))

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        if not text:
            return text
        if self.stopwords > 0 and rng.uniform() < self.stopwords:
            text = remove_stopwords(text) or text
        w = np.asarray(self.weights) / np.sum(self.weights)
        op = OPS[int(rng.choice(len(OPS), p=w))]
        if op == "identity":
            return text
        words = text.split()
        if op == "synonym":
            words = synonym_replacement(words, rng, self.table)
        elif op == "swap":
            words = random_swap(words, rng, self.swaps)
        elif op == "delete":
            words = random_deletion(words, rng, self.delete_p)
        return " ".join(words) or text
