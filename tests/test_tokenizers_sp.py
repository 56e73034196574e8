"""SentencePiece and tokenizer.json kinds equal transformers' tokenizers on hostile text.

No real SigLIP / SigLIP 2 tokenizer can be downloaded: small SentencePiece models are trained
here (unigram as SigLIP's spiece.model: pad 0, eos 1 "</s>", unk 2; BPE with byte fallback and
Gemma's special pieces and normalisation as SigLIP 2's tokenizer.model), transformers builds
its tokenizers from them (SiglipTokenizer, GemmaTokenizer / Siglip2Tokenizer, T5 unigram),
writes the directories a user downloads, and `tokenizers.from_directory` + `get_tokenizer`
must give exactly transformers' ids with the processors' arguments
(`padding="max_length", truncation=True, max_length=L`).
"""
import json
import pickle
import random
import shutil

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest
import sentencepiece

from siglip_dirs import captions
from vljax import assets, tokenizers
from vljax.tokenizers import from_directory, get_tokenizer

transformers = pytest.importorskip("transformers")

HOSTILE = [
    "", " ", "   \t\n  ", "a photo of a cat", "A PHOTO OF A CAT.", "a photo of a {}.",
    "It's a dog's life, isn't it? We'll see; they'd've LOVED it!", "MiXeD CaSe WoRdS",
    "Crème brûlée, naïve café, Ærøskøbing, São Paulo, Zürich, façade",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0324a\u0352lgo", "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά ΣΑΣ και русский текст", "עברית ועربية \u200f rtl \u202e override \u202c",
    "emoji 🐈🐕‍🦺👩🏽‍🔬 ❤️ 🇫🇷 👍🏿 👨‍👩‍👧‍👦 done",
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &amp;amp; &nbsp;",
    "numbers 1234567890 3.14159 1e-10 -42 #1 @user 0x1F",
    "punctuation!!! ??? ... --- *** ((())) [[x]] {y} <z> ~`^|\\/ ¡¿ «» „“ 、。",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space\u200bzero-width\u3000ideographic",
    "control\x00\x01\x07\x1b\x7f chars and \ufffd replacement \x85 next-line",
    "▁meta▁symbol ▁ ▁▁", "a</s>b", "</s>", "x<unk>y <pad> z",
    "specials in text: </s> <unk> <pad> <eos> <bos> <s> <mask> [CLS] [SEP] <|endoftext|>",
    "x" * 10000, " ".join(["long caption with many words"] * 400),
    "𝔣𝔞𝔫𝔠𝔶 𝒎𝒂𝒕𝒉 ﬁ ligature Ⅻ ½ ²³ ℃ İstanbul ẞ ǅ ＡＢＣ１２３", "!!!", "...", "'", "a    b     c",
]


def _hostile():
    """HOSTILE plus random mixes of its hard pieces."""
    rng = random.Random(1)
    pieces = ["the", "cat", "Dog", "RUNNING", "café", "ß", "東京", "猫", "🐈", "👍🏼", "&amp;", "'s",
              "2024", "3.5", "!", "?!", "...", "-", "(", ")", "\t", "\n", "  ", "ñandú", "Ω", "–",
              "</s>", "<pad>", "<eos>", "▁", "Σ", "İ", "\x00"]
    return HOSTILE + ["".join(rng.choice(pieces) + rng.choice([" ", ""]) for _ in range(rng.randint(0, 30)))
                      for _ in range(150)] + captions(50, seed=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The trained models and the transformers directories written from them (once a module)."""
    root = tmp_path_factory.mktemp("sp")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(captions(800, seed=0)), encoding="utf-8")
    common = dict(input=str(corpus), hard_vocab_limit=False, character_coverage=1.0, minloglevel=2,
                  num_threads=1)
    sentencepiece.SentencePieceTrainer.train(  # SigLIP's spiece.model layout (T5's c4_en)
        model_prefix=str(root / "unigram"), vocab_size=250, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, **common)
    sentencepiece.SentencePieceTrainer.train(  # Gemma's tokenizer.model layout
        model_prefix=str(root / "gemma"), vocab_size=700, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"],
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, **common)
    sentencepiece.SentencePieceTrainer.train(  # keeps spaces: reaches SiglipTokenizer's "▁" rule
        model_prefix=str(root / "unigram_ws"), vocab_size=250, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, remove_extra_whitespaces=False, **common)
    d = {"unigram.model": root / "unigram.model", "gemma.model": root / "gemma.model"}

    d["siglip"] = root / "siglip"  # as google/siglip-*: spiece.model + tokenizer_config.json
    transformers.SiglipTokenizer(vocab_file=str(d["unigram.model"])).save_pretrained(d["siglip"])
    d["siglip_pad"] = root / "siglip_pad"  # pad "<pad>" (0) apart from eos: shows the eos rule
    transformers.SiglipTokenizer(vocab_file=str(d["unigram.model"]), pad_token="<pad>").save_pretrained(
        d["siglip_pad"])
    d["siglip_ws"] = root / "siglip_ws"
    transformers.SiglipTokenizer(vocab_file=str(root / "unigram_ws.model")).save_pretrained(d["siglip_ws"])
    d["siglip_config_only"] = root / "siglip_config_only"  # config.json + spiece.model, no tokenizer config
    d["siglip_config_only"].mkdir()
    shutil.copy(d["unigram.model"], d["siglip_config_only"] / "spiece.model")
    transformers.SiglipConfig().save_pretrained(d["siglip_config_only"])

    d["gemma_model"] = root / "gemma_model"  # tokenizer.model only: transformers converts it
    d["gemma_model"].mkdir()
    shutil.copy(d["gemma.model"], d["gemma_model"] / "tokenizer.model")
    (d["gemma_model"] / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    d["gemma_model_bos_eos"] = root / "gemma_model_bos_eos"  # without tokenizer.json these count
    d["gemma_model_bos_eos"].mkdir()
    shutil.copy(d["gemma.model"], d["gemma_model_bos_eos"] / "tokenizer.model")
    (d["gemma_model_bos_eos"] / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": True}))
    d["gemma_json"] = root / "gemma_json"  # save_pretrained writes tokenizer.json
    transformers.AutoTokenizer.from_pretrained(d["gemma_model"]).save_pretrained(d["gemma_json"])
    for name, side in (("siglip2", None), ("siglip2_right", "right")):
        d[name] = root / name  # as google/siglip2-*: tokenizer.json, tokenizer.model, configs
        shutil.copytree(d["gemma_json"], d[name])
        shutil.copy(d["gemma.model"], d[name] / "tokenizer.model")
        transformers.Siglip2Config().save_pretrained(d[name])
        if side:
            cfg = json.loads((d[name] / "tokenizer_config.json").read_text())
            (d[name] / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": side}))
    d["siglip2_model"] = root / "siglip2_model"  # SigLIP 2 without tokenizer.json
    d["siglip2_model"].mkdir()
    shutil.copy(d["gemma.model"], d["siglip2_model"] / "tokenizer.model")
    shutil.copy(d["siglip2"] / "config.json", d["siglip2_model"])

    d["t5_model"] = root / "t5_model"  # a unigram tokenizer.json converted from spiece.model
    d["t5_model"].mkdir()
    shutil.copy(d["unigram.model"], d["t5_model"] / "spiece.model")
    (d["t5_model"] / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')
    d["unigram_json"] = root / "unigram_json"
    transformers.AutoTokenizer.from_pretrained(d["t5_model"]).save_pretrained(d["unigram_json"])
    assert not (d["unigram_json"] / "spiece.model").exists()
    return d


def _reference(directory, texts, max_len):
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = ref(texts, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
    return ref, np.asarray(ids)


def _assert_same(ours, want, texts):
    assert ours.dtype == np.int32 and ours.shape == want.shape
    bad = np.nonzero((ours != want).any(1))[0]
    assert not len(bad), (f"{len(bad)} of {len(texts)} texts differ, e.g. {texts[bad[0]][:60]!r}: "
                          f"ours {ours[bad[0]][:24]} transformers {want[bad[0]][:24]}")


@pytest.mark.parametrize("name", ["siglip", "siglip_config_only", "siglip_pad", "siglip_ws"])
@pytest.mark.parametrize("max_len", [64, 16, 3])
def test_siglip_spiece_equals_transformers(dirs, name, max_len):
    spec = from_directory(dirs[name], max_len=max_len)
    pad = "<pad>" if name == "siglip_pad" else "</s>"
    assert spec == {"kind": "sentencepiece", "max_len": max_len,
                    "model_file": str(dirs[name] / "spiece.model"), "canonicalize": "siglip",
                    "lower": "str", "eos_token": "</s>", "unk_token": "<unk>",
                    "pad_token": pad, "special_tokens": []}
    assert json.loads(json.dumps(spec)) == spec
    texts = _hostile()
    tok = get_tokenizer(**spec)
    ref, want = _reference(dirs[name], texts, max_len)
    assert type(ref).__name__ == "SiglipTokenizer" and ref.vocab_size == tok.vocab_size
    _assert_same(tok(texts), want, texts)
    assert (tok.pad_id, tok.eot_id, tok.sot_id, tok.max_len) == (0 if pad == "<pad>" else 1, 1, None, max_len)


# Any text: letters, marks, symbols, spaces, controls and the specials' own characters.
_ANY_TEXT = st.lists(st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(
    ["</s>", "<unk>", "<pad>", "<eos>", "<bos>", "▁", " ", "\t", "Σ", "İ", "!", "."])),
    max_size=40).map("".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_ANY_TEXT, min_size=1, max_size=6), max_len=st.sampled_from([3, 8, 64]))
def test_any_text_equals_transformers(dirs, texts, max_len):
    for name in ("siglip_pad", "siglip2", "siglip2_model"):
        ours = get_tokenizer(**from_directory(dirs[name], max_len=max_len))(texts)
        _assert_same(ours, _reference(dirs[name], texts, max_len)[1], texts)


def test_siglip_rules(dirs):
    """Canonicalised (case, ASCII punctuation, whitespace), eos last, truncation keeps eos."""
    tok = get_tokenizer(**from_directory(dirs["siglip"]))  # max_len: SigLIP's 64
    assert tok.max_len == 64
    a, b, c = tok(["a cat.", "  A   CAT!!", "a cat"])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    long = tok(["dog " * 100])[0]
    assert long[-1] == tok.eot_id and (long[:-1] != tok.eot_id).all()
    assert list(tok([""])[0]) == [tok.eot_id] * 64  # eos alone, padded with eos


@pytest.mark.parametrize("name,lowercase,side", [
    ("siglip2", True, "left"),  # Siglip2Tokenizer's class default when the config names none
    ("siglip2_right", True, "right"), ("gemma_json", False, "left")])
@pytest.mark.parametrize("max_len", [64, 8])
def test_tokenizer_json_gemma_equals_transformers(dirs, name, lowercase, side, max_len):
    spec = from_directory(dirs[name], max_len=max_len)
    assert spec == {"kind": "hf", "max_len": max_len, "tokenizer_file": str(dirs[name] / "tokenizer.json"),
                    "lowercase": lowercase, "padding_side": side, "pad_token": "<pad>",
                    "eos_token": "<eos>"}
    texts = _hostile()
    tok = get_tokenizer(**spec)
    ref, want = _reference(dirs[name], texts, max_len)
    assert type(ref).__name__ == ("Siglip2Tokenizer" if lowercase else "GemmaTokenizer")
    assert ref.padding_side == side and len(ref) == tok.vocab_size
    _assert_same(tok(texts), want, texts)
    assert (tok.pad_id, tok.eot_id, tok.sot_id) == (0, 1, None)  # this post-processor adds none


@pytest.mark.parametrize("name,lower,bos_eos", [
    ("gemma_model", "none", False), ("siglip2_model", "rust", False),
    ("gemma_model_bos_eos", "none", True)])
@pytest.mark.parametrize("max_len", [64, 8])
def test_tokenizer_model_gemma_equals_transformers(dirs, name, lower, bos_eos, max_len):
    """A directory with only tokenizer.model: our SentencePiece run of it equals transformers'
    conversion (Gemma's normaliser, specials split out literally, bos / eos as
    tokenizer_config.json's add_bos_token / add_eos_token say: none by default)."""
    spec = from_directory(dirs[name], max_len=max_len)
    assert (spec["kind"], spec["canonicalize"], spec["lower"], spec["add_bos"], spec["add_eos"]) == (
        "sentencepiece", "none", lower, bos_eos, bos_eos)
    texts = _hostile()
    _, want = _reference(dirs[name], texts, max_len)
    _assert_same(get_tokenizer(**spec)(texts), want, texts)


def test_json_and_model_paths_agree(dirs):
    """The same Gemma model through tokenizer.json (Rust) and through tokenizer.model (sentencepiece)."""
    texts = _hostile()
    via_json = get_tokenizer(**from_directory(dirs["siglip2"], max_len=32))
    via_model = get_tokenizer(**from_directory(dirs["siglip2_model"], max_len=32))
    _assert_same(via_model(texts), via_json(texts), texts)


def test_lowercase_is_the_references(dirs):
    """SigLIP lower-cases with Python's str.lower, SigLIP 2 with tokenizers' Lowercase: they differ
    on a word-final capital sigma, and each kind follows its own reference."""
    assert tokenizers.spm.lower_case("ΣΑΣ", "str") == "σας"
    assert tokenizers.spm.lower_case("ΣΑΣ", "rust") == "σασ"
    assert tokenizers.spm.lower_case("ÀB", "ascii") == "Àb"


@pytest.mark.parametrize("max_len", [64, 8])
def test_unigram_tokenizer_json_equals_transformers(dirs, max_len):
    spec = from_directory(dirs["unigram_json"], max_len=max_len)
    assert spec["kind"] == "hf" and not spec["lowercase"]
    texts = _hostile()
    tok = get_tokenizer(**spec)
    _, want = _reference(dirs["unigram_json"], texts, max_len)
    _assert_same(tok(texts), want, texts)
    assert (tok.pad_id, tok.eot_id) == (0, 1)  # T5's post-processor appends </s>


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """transformers' CLIP tokenizer directory (tokenizer.json) from open_clip's merge list."""
    vocab, merges = tokenizers.clip_vocab_from_bpe_gz(assets.clip_bpe_path())
    vocab = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(t, t): i
             for t, i in vocab.items()}
    ref = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
    assert len(ref) == tokenizers.CLIP_VOCAB_SIZE  # a silently empty tokenizer would pass otherwise
    path = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(path)
    return path


def test_clip_tokenizer_json(clip_dir):
    """Equal to transformers' CLIPTokenizer; equal to the "clip" kind (open_clip) where their
    cleaning agrees, up to the padding id (HF pads with eot, open_clip with 0)."""
    spec = from_directory(clip_dir, max_len=77)
    assert (spec["kind"], spec["pad_token"], spec["eos_token"]) == ("hf", "<|endoftext|>", "<|endoftext|>")
    texts = _hostile()
    tok = get_tokenizer(**spec)
    _, want = _reference(clip_dir, texts, 77)
    _assert_same(tok(texts), want, texts)
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 49407, 49408)
    plain = [t.lower() for t in captions(100, seed=3) if t.isascii() and "&" not in t]
    open_clip_ids = get_tokenizer("clip", 77)(plain)
    after_eot = np.cumsum(open_clip_ids == tok.eot_id, axis=1) - (open_clip_ids == tok.eot_id) > 0
    np.testing.assert_array_equal(np.where(after_eot, tok.pad_id, open_clip_ids), tok(plain))


def test_wordpiece_tokenizer_json_equals_bert_kind():
    spec = from_directory(assets.minilm_dir(), max_len=24)
    assert spec["kind"] == "hf" and spec["pad_token"] == "[PAD]"
    texts = _hostile()
    np.testing.assert_array_equal(get_tokenizer(**spec)(texts), get_tokenizer("bert", 24)(texts))


@pytest.mark.parametrize("model,pad", [("unigram.model", 1), ("gemma.model", 0)])
@pytest.mark.parametrize("max_len", [16, 4])
def test_big_vision_model_file(dirs, model, pad, max_len):
    """big_vision's text ops: ASCII lower case, the raw SentencePiece ids, eos; eos="sticky"
    truncation (first max_len - 1 tokens and eos); padded with eos for SigLIP's T5 vocabulary
    (pad_value=1), with the pad piece for SigLIP 2's Gemma vocabulary (`tok` op)."""
    spec = from_directory(dirs[model], max_len=max_len)
    assert spec == {"kind": "sentencepiece", "max_len": max_len, "model_file": str(dirs[model]),
                    "canonicalize": "none", "lower": "ascii",
                    **({"pad_token": "<pad>"} if model == "gemma.model" else {})}
    texts = _hostile()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(dirs[model]))
    want = np.full((len(texts), max_len), pad, np.int32)
    for row, text in zip(want, texts):
        ids = sp.encode("".join(c.lower() if "A" <= c <= "Z" else c for c in text)) + [sp.eos_id()]
        ids = ids[: max_len - 1] + ids[-1:] if len(ids) >= max_len else ids
        row[: len(ids)] = ids
    tok = get_tokenizer(**spec)
    np.testing.assert_array_equal(tok(texts), want)
    assert (tok.pad_id, tok.eot_id) == (pad, 1)


def test_sentencepiece_bos(dirs):
    with_bos = get_tokenizer("sentencepiece", 8, model_file=str(dirs["gemma.model"]),
                             canonicalize="none", lower="none", add_bos=True, pad_id=0)
    row = with_bos(["a cat " * 20])[0]
    assert row[0] == 2 and row[-1] == 1 and with_bos.sot_id == 2
    assert list(with_bos([""])[0]) == [2, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("name", ["siglip", "siglip2", "gemma_model", "unigram.model"])
def test_new_kinds_pickle(dirs, name):
    """grain worker processes receive the tokenizer pickled."""
    tok = get_tokenizer(**from_directory(dirs[name], max_len=24))
    texts = _hostile()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))


def test_errors_name_the_file(dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(ValueError, match=f"{empty}: no tokenizer found .*spiece.model, tokenizer.json"):
        from_directory(empty)
    no_spiece = tmp_path / "no_spiece"
    no_spiece.mkdir()
    (no_spiece / "config.json").write_text('{"model_type": "siglip"}')
    with pytest.raises(ValueError, match="without spiece.model"):
        from_directory(no_spiece)
    with pytest.raises(ValueError, match="no such directory"):
        from_directory(tmp_path / "missing")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(dirs["siglip"], corrupt)
    (corrupt / "spiece.model").write_bytes(b"\x0a\xff not a model" * 8)
    spec = from_directory(corrupt)
    with pytest.raises(ValueError, match=f"{corrupt / 'spiece.model'}: not a SentencePiece model"):
        get_tokenizer(**spec)
    (tmp_path / "bad.model").write_bytes(b"")
    with pytest.raises(ValueError, match="bad.model: .*SentencePiece model"):
        get_tokenizer(**from_directory(tmp_path / "bad.model"))
    bad_json = tmp_path / "bad_json"
    shutil.copytree(dirs["gemma_json"], bad_json)
    (bad_json / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match="tokenizer.json: not a HF tokenizers tokenizer.json"):
        get_tokenizer(**from_directory(bad_json, max_len=8))

    model = str(dirs["unigram.model"])
    with pytest.raises(ValueError, match="pad token '<nope>' is not a piece"):
        get_tokenizer("sentencepiece", 8, model_file=model, pad_token="<nope>")
    with pytest.raises(ValueError, match="no max_len given"):
        from_directory(dirs["gemma_json"])  # GemmaTokenizer alone: no family default
    with pytest.raises(ValueError, match="max_len=1 leaves no room for the 2 special tokens"):
        get_tokenizer(**from_directory(assets.minilm_dir(), max_len=1))
    with pytest.raises(ValueError, match="family='clip'"):
        from_directory(dirs["unigram.model"], family="clip")
    with pytest.raises(ValueError, match="canonicalize='siglip' appends eos"):
        get_tokenizer("sentencepiece", 8, model_file=model, add_eos=False)
