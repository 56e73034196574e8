"""CaSED: vocabulary-free image classification by category search from an external database (Conti et
al., "Vocabulary-free Image Classification", NeurIPS 2023, arXiv 2306.00917; official altndrr/vic
`src/models/cased.py`, `components/nn/classifiers.py`, `data/components/transforms.py`), training-free.

No class names are given. For an image x (official `CaSED.batch_step`):
  1. retrieval: the K captions of the database (here every caption of a source's records, e.g. the
     demo's training split) closest to zimg(x) by cosine;
  2. candidates: the words of those captions after the official `default_vocab_transform` filters
     (drop non-alphabetic words and words under 3 letters, lowercase, singular, drop "image", "photo",
     ..., keep words seen in at least 2 of the retrieved captions, deduplicate; no word left: "object");
  3. scoring, with the candidates' text embeddings w_j (prompt "{}"), the image and the centroid of the
     retrieved captions' normalised embeddings c(x) (renormalised):
        p_img = softmax_j(s <zimg(x), w_j>),   p_txt = softmax_j(s <c(x), w_j>),
        p = alpha p_img + (1 - alpha) p_txt,   prediction argmax_j p,
     s = 1 / 0.07 (the official classifier's fixed logit scale), alpha = 0.5 (the official default).

Evaluation (the official `test/semantic_similarity`, `test/semantic_iou`, `test/semantic_cluster_acc`
metrics; their code was not read, so each is stated here): the predicted word against the true class
name by
  - semantic similarity: the cosine of their Sentence-BERT embeddings (here all-MiniLM-L6-v2, a
    Sentence-BERT model: mean pooling, L2 norm), mean over images;
  - semantic IoU: |words(pred) & words(true)| / |words(pred) | words(true)|, mean over images;
  - cluster accuracy: the predictions as clusters (one per distinct word), matched one-to-one to the
    classes by the Hungarian algorithm on their co-occurrence counts; the matched images' share.
Deviation: the official filter keeps nouns and adjectives by a POS tagger (flair); no tagger is
installed here, so a list of English function words (`STOPWORDS`) is dropped instead.
"""
import collections
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from vljax.convert import bert as bert_convert
from vljax.evaluators import base, prompts, registry
from vljax.evaluators import data as data_lib
from vljax.models import bert as bert_model
from vljax.tokenizers import get_tokenizer

# Official `default_vocab_transform` words_to_drop.
DROP_WORDS = frozenset(("image", "photo", "picture", "thumbnail", "logo", "symbol", "clipart", "portrait",
                        "painting", "illustration", "icon", "profile"))
# In place of the POS filter (module docstring): English function words, which a noun/adjective filter drops.
STOPWORDS = frozenset("""
the and for with from into onto over under this that these those its his her their our your you
are was were has have had not but all any some each few more most other such only own same than too
very can will just don should now one two three also off out who whom which what when where why how
about above after again against below between both down during further here once there then through
until upon while she him them they what been being does did doing would could might must shall
""".split())
SCALE = 1.0 / 0.07  # official NearestNeighboursClassifier logit scale


def singular(word: str) -> str:
    """The official `ToSingular` rule's cases: a final "s" dropped except after "ss", "us", "is" and in
    "ies" / "oes" (which the official code also leaves as they are)."""
    if not word.endswith("s") or word[-2:] in ("ss", "us", "is") or word[-3:] in ("ies", "oes"):
        return word
    return word[:-1]


def caption_words(caption: str) -> list[str]:
    """A caption's candidate words (module docstring, step 2, before the frequency filter)."""
    words = re.sub(r"[^A-Za-z]+", " ", caption).lower().split()
    words = [singular(w) for w in words if len(w) >= 3]
    return [w for w in words if w not in DROP_WORDS and w not in STOPWORDS]


def candidates(captions: Sequence[str], min_count: int = 2) -> list[str]:
    """The candidate names of an image from its retrieved captions: words in at least `min_count` of
    them, most frequent first (ties in order of appearance); ["object"] when none is left."""
    counts = collections.Counter(w for c in captions for w in dict.fromkeys(caption_words(c)))
    kept = [w for w, n in counts.most_common() if n >= min_count]
    return kept or ["object"]


def cased_scores(zimg: np.ndarray, centroid: np.ndarray, zwords: np.ndarray, alpha: float = 0.5,
                 scale: float = SCALE) -> np.ndarray:
    """p = alpha softmax(scale zimg zwords^T) + (1 - alpha) softmax(scale centroid zwords^T).

    Args: zimg [D] image, centroid [D] normalised caption centroid, zwords [J, D] candidates.
    Returns: [J] probabilities.
    """
    def softmax(s):
        e = np.exp(s - s.max())
        return e / e.sum()
    return alpha * softmax(scale * zwords @ zimg) + (1 - alpha) * softmax(scale * zwords @ centroid)


def cluster_accuracy(predicted: Sequence[str], labels: np.ndarray) -> float:
    """Clustering accuracy: distinct predictions matched one-to-one to classes (Hungarian algorithm,
    maximum co-occurrence); the share of images whose prediction is matched to their class."""
    names, cluster = np.unique(np.asarray(predicted, dtype=object).astype(str), return_inverse=True)
    classes, y = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(names), len(classes)), np.int64)
    np.add.at(counts, (cluster, y), 1)
    rows, cols = optimize.linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def semantic_iou(pred: str, true: str) -> float:
    a, b = set(pred.lower().split()), set(true.lower().split())
    return len(a & b) / len(a | b) if a | b else 0.0


@functools.cache
def _minilm():
    kwargs, params = bert_convert.load_minilm(normalize=True)
    model = bert_model.Bert(**kwargs)
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids)[0]), params


def sentence_bert(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """[N, 384] all-MiniLM-L6-v2 sentence embeddings (Sentence-BERT: mean pooling, L2 norm), loaded once
    per process (22.7M parameters)."""
    apply, params = _minilm()
    tok = get_tokenizer("bert", max_len=32)
    out = [np.asarray(apply(params, jnp.asarray(tok(list(texts[s])))))
           for s in base.batch_slices(len(texts), batch_size)]
    return np.concatenate(out).astype(np.float32)


@registry.register("cased")
class CaSEDEvaluator(base.Evaluator):
    """CaSED (module docstring). Metrics "cased/<name>/semantic_similarity", ".../semantic_iou",
    ".../cluster_accuracy", ".../exact" (the predicted word equals the canonical class name),
    ".../candidates" (mean candidates per image) and, beside them, the same metrics of the baseline
    that predicts the nearest caption itself ("nearest_caption_semantic_similarity", ...)."""
    DATA_KEYS = ("name", "split", "label", "label_key", "data_dir", "max_examples", "source",
                 "database_split", "max_database")

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str], database_captions:
                 Sequence[str], *, name: str, k: int = 10, alpha: float = 0.5, min_count: int = 2):
        """
        Args:
          data / labels / class_names: the test images (a source), [N] labels, C class names (read
            for the metrics only, never by the method).
          database_captions: the retrieval database's captions.
          k: captions retrieved per image. alpha: the image score's weight. min_count: the
            frequency filter (official 2).
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"config key `evals.{name}.alpha` must lie in [0, 1], got {alpha}")
        self.captions = list(dict.fromkeys(c for c in database_captions if c and c.strip()))
        if len(self.captions) < k:
            raise ValueError(f"config key `evals.{name}.data`: the caption database holds "
                             f"{len(self.captions)} distinct captions, fewer than k={k}")
        self.data, self.labels = data, np.asarray(labels, np.int64)
        self.class_names = [prompts.canonicalize_name(n) for n in class_names]
        self.name, self.k, self.alpha, self.min_count = name, int(k), float(alpha), int(min_count)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From `evals.<name>` = dict(type="cased", data=dict(name=..., split="test", label=...,
        database_split="train", max_database=...), k=10, alpha=0.5), or a source entry with
        `database_<key>` giving the database split's keys (vljax/evaluators/data.py)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        entry = {k: v for k, v in data.items() if k not in ("split", "max_database")}
        if "source" not in data:
            entry["test_split"] = data.get("split", "test")
        opened = data_lib.open_splits(name, entry, {"test": data.get("split", "test"), "database": "train"})
        label_key = data.get("label") or data.get("label_key")
        test, labels, names = data_lib.labelled(name, opened["test"], label_key, data.get("max_examples"))
        db = data_lib.first(opened["database"], data.get("max_database"))
        captions = [c for i in range(len(db)) for c in db.captions_of(i)]
        return cls(test, labels, names, captions, name=name, **kwargs)

    def predict(self, embedder: base.Embedder) -> tuple[list[str], list[str], np.ndarray, float]:
        """(predicted word, nearest caption, record indices, mean candidates) for each readable image."""
        zimg, index = base.image_embeddings(embedder, self.data)
        zcap = base.text_embeddings(embedder, self.captions)
        retrieved = base.top_k(zimg @ zcap.T, self.k)  # [N, k]
        per_image = [candidates([self.captions[j] for j in row], self.min_count) for row in retrieved]
        vocab = sorted({w for c in per_image for w in c})
        zword = dict(zip(vocab, base.text_embeddings(embedder, vocab)))
        preds = []
        for x, row, cands in zip(zimg, retrieved, per_image):
            centroid = base.l2_normalize(zcap[row].mean(axis=0))
            p = cased_scores(x, centroid, np.stack([zword[w] for w in cands]), self.alpha)
            preds.append(cands[int(np.argmax(p))])
        nearest = [self.captions[row[0]] for row in retrieved]
        return preds, nearest, index, float(np.mean([len(c) for c in per_image]))

    def _metrics(self, preds: Sequence[str], labels: np.ndarray) -> dict[str, float]:
        true = [self.class_names[y] for y in labels]
        zp = sentence_bert(list(preds))
        zt = dict(zip(self.class_names, sentence_bert(self.class_names)))
        sim = np.einsum("nd,nd->n", zp, np.stack([zt[t] for t in true]))
        return {"semantic_similarity": float(sim.mean()),
                "semantic_iou": float(np.mean([semantic_iou(p, t) for p, t in zip(preds, true)])),
                "cluster_accuracy": cluster_accuracy(preds, labels),
                "exact": float(np.mean([p == t for p, t in zip(preds, true)]))}

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        preds, nearest, index, mean_candidates = self.predict(embedder)
        labels = self.labels[index]
        out = self._metrics(preds, labels)
        out.update({f"nearest_caption_{k}": v for k, v in self._metrics(nearest, labels).items()
                    if k != "exact"})
        out["candidates"] = mean_candidates
        return {f"cased/{self.name}/{k}": v for k, v in out.items()}
