"""Tokenizers equal their references: open_clip's SimpleTokenizer (CLIP BPE) and
transformers' BertTokenizerFast (MiniLM WordPiece); bad vocabularies fail loudly."""
import gzip
import importlib.util
import json
import pickle
import random

import numpy as np
import pytest

from vljax import assets
from vljax.tokenizers import CLIP_VOCAB_SIZE, clip_vocab_from_bpe_gz, get_tokenizer

FIXED = [
    "", " ", "   \t\n  ", "a photo of a cat", "A PHOTO OF A CAT.", "a photo of a {}.",
    "It's a dog's life, isn't it? We'll see; they'd've LOVED it!",
    "Crème brûlée, naïve café, Ærøskøbing, São Paulo, Zürich, façade",
    "日本語のテキスト、中文文本，한국어 텍스트", "Ελληνικά και русский текст",
    "עברית ועربية", "emoji 🐈🐕‍🦺👩🏽‍🔬 ❤️ 🇫🇷 done",
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp;",
    "mojibake: â€œquotedâ€\x9d and cafÃ©", "numbers 1234567890 3.14159 1e-10 -42 #1 @user",
    "url https://example.com/a_b-c?d=e&f=g#h and email someone@example.org",
    "punctuation!!! ??? ... --- *** ((())) [[x]] {y} <z> ~`^|\\/",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space\u200bzero-width",
    "<start_of_text> special <end_of_text> tokens in text",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " ".join(["long caption with many words"] * 30),
    "𝔣𝔞𝔫𝔠𝔶 𝒎𝒂𝒕𝒉 ﬁ ligature Ⅻ ½ ²³ ℃",
    "control\x00\x01\x7f chars and \ufffd replacement",
]


def _corpus(n_random=300, seed=0):
    """FIXED plus random strings mixing ASCII words, accents, CJK, emoji and entities."""
    rng = random.Random(seed)
    pieces = ["the", "cat", "Dog", "photo", "of", "a", "in", "RUNNING", "jumped", "café",
              "naïve", "ß", "İstanbul", "東京", "猫", "🐈", "👍🏼", "&amp;", "&lt;",
              "&#x27;", "'s", "'ll", "n't", "2024", "3.5", "!", "?!", "...", "-", "_", "(",
              ")", "\"", "\t", "\n", "  ", "x" * 40, "ñandú", "Ǆ", "ﬀ", "é", "ø", "Ω", "ℵ",
              "–", "—"]
    out = list(FIXED)
    for _ in range(n_random):
        k = rng.randint(0, 60)
        out.append("".join(rng.choice(pieces) + rng.choice([" ", "", " "]) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip/tokenizer.py loaded by path (importing open_clip needs torchvision)."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "open_clip_tokenizer_ref", assets.open_clip_file("tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.mark.parametrize("max_len", [77, 16])
def test_clip_equals_open_clip(open_clip_tokenizer, max_len):
    texts = _corpus()
    tok = get_tokenizer("clip", max_len=max_len)
    ours = tok(texts)
    ref = open_clip_tokenizer(texts, context_length=max_len).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(texts), max_len)
    mismatch = [texts[i] for i in np.nonzero((ours != ref).any(1))[0]]
    assert not mismatch, f"{len(mismatch)} strings differ, e.g. {mismatch[:3]!r}"
    assert (tok.pad_id, tok.sot_id, tok.eot_id, tok.vocab_size) == (0, 49406, 49407, 49408)


def test_clip_truncation_keeps_eot():
    tok = get_tokenizer("clip", max_len=8)
    ids = tok(["one two three four five six seven eight nine ten", "hi"])
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert (ids[0] != tok.pad_id).all()
    np.testing.assert_array_equal(ids[1], [49406, 1883, 49407, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_tokenizer_pickles(kind):
    """grain worker processes receive the tokenizer pickled."""
    tok = get_tokenizer(kind, max_len=24)
    texts = _corpus(n_random=20, seed=4)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))


def test_clip_vocab_merges_files_equal_default(tmp_path):
    vocab, merges = clip_vocab_from_bpe_gz(assets.clip_bpe_path())
    assert len(vocab) == CLIP_VOCAB_SIZE and len(merges) == 48894
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    texts = _corpus(n_random=50, seed=1)
    default = get_tokenizer("clip", 77)(texts)
    from_files = get_tokenizer("clip", 77, vocab=tmp_path / "vocab.json",
                               merges=tmp_path / "merges.txt")(texts)
    np.testing.assert_array_equal(default, from_files)


def test_clip_bad_vocabularies_raise(tmp_path):
    vocab, merges = clip_vocab_from_bpe_gz(assets.clip_bpe_path())
    with pytest.raises(ValueError, match="byte-level base symbols"):
        get_tokenizer("clip", 77, vocab={"<start_of_text>": 0, "<end_of_text>": 1}, merges=[])
    small = {t: i for t, i in vocab.items() if i < 1000}  # cut vocab, full merges
    with pytest.raises(ValueError, match="merge #"):
        get_tokenizer("clip", 77, vocab=small, merges=merges)
    with pytest.raises(ValueError, match="expected 49408"):
        get_tokenizer("clip", 77, vocab=small, merges=merges[:10], expected_vocab_size=49408)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version\n" + "\n".join(" ".join(m) for m in merges[:100]))
    with pytest.raises(ValueError, match="short.txt.gz.*48894"):
        get_tokenizer("clip", 77, bpe_path=short)
    with pytest.raises(ValueError, match="max_len"):
        get_tokenizer("clip", 1)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sp'"):
        get_tokenizer("sp", 16)


def test_bert_equals_transformers():
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast.from_pretrained(str(assets.minilm_dir()))
    assert ref.vocab_size == 30522  # a silently empty tokenizer would pass otherwise
    texts = _corpus(n_random=100, seed=2)
    for max_len in (64, 12):
        tok = get_tokenizer("bert", max_len=max_len)
        ours = tok(texts)
        want = ref(texts, padding="max_length", truncation=True, max_length=max_len,
                   return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(ours, want)
    assert (tok.pad_id, tok.sot_id, tok.eot_id, tok.vocab_size) == (0, 101, 102, 30522)
    assert (ours[:, 0] == 101).all() and ((ours == 102).sum(1) == 1).all()


def test_bert_vocab_txt_and_bad_vocab(tmp_path):
    texts = _corpus(n_random=30, seed=3)
    np.testing.assert_array_equal(
        get_tokenizer("bert", 32)(texts),
        get_tokenizer("bert", 32, vocab_file=assets.minilm_dir() / "vocab.txt")(texts))
    empty = tmp_path / "vocab.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"lacks \['\[PAD\]'"):
        get_tokenizer("bert", 32, vocab_file=empty)
    with pytest.raises(ValueError, match="expected 30000"):
        get_tokenizer("bert", 32, expected_vocab_size=30000)
