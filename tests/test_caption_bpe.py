"""vljax/tokenizers/caption_bpe.py: a BPE learned from captions (the demo-scale tokenizer)."""
import importlib.util
import os

import pytest
from helpers import REPO
from tokenizers import Tokenizer, models

from vljax.tokenizers import caption_bpe, get_tokenizer

CAPTIONS = ["a red circle on white", "two blue squares", "a green triangle", "red and blue circles",
            "the white square", "a small green circle"] * 3


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    caption_bpe.train_bpe(CAPTIONS, 300).save(str(path))
    return str(path)


def test_learning_is_deterministic_and_rows_are_clip_shaped(bpe_file, tmp_path):
    again = tmp_path / "again.json"
    caption_bpe.train_bpe(CAPTIONS, 300).save(str(again))
    assert again.read_bytes() == open(bpe_file, "rb").read()
    spec = caption_bpe.tokenizer_spec(bpe_file, max_len=6)
    tok = get_tokenizer(**spec)
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert tok.vocab_size == spec["expected_vocab_size"] and 259 < tok.vocab_size <= 300
    short, long_ = tok(["Red Circle", "a red circle on white and a green triangle"])
    n = list(short).index(2) + 1
    assert short[0] == 1 and all(t == 0 for t in short[n:])         # <sot> ... <eot>, then <pad>
    assert long_[0] == 1 and long_[-1] == 2 and 0 not in list(long_)  # truncated: <eot> kept
    # Lower-cased: "Red Circle" is "red circle"; a word learned whole is one token.
    assert list(tok(["red circle"])[0]) == list(short)
    # Byte-level: text the captions never had still encodes, without an unknown token.
    assert 0 not in list(tok(["ünïcode ✓"])[0][:3])


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100"):
        caption_bpe.train_bpe(CAPTIONS, 100)
    with pytest.raises(ValueError, match="no captions"):
        caption_bpe.train_bpe([], 300)
    with pytest.raises(ValueError, match="no such tokenizer.json"):
        caption_bpe.tokenizer_spec(str(tmp_path / "missing.json"), 8)
    other = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))  # another layout
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="other.json: special tokens"):
        caption_bpe.tokenizer_spec(str(tmp_path / "other.json"), 8)


def test_clip_config_takes_the_tokenizer(bpe_file):
    spec = importlib.util.spec_from_file_location("siglip2", os.path.join(REPO, "configs", "siglip2.py"))
    siglip2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(siglip2)
    c = siglip2.get_config(f"tok={bpe_file},sd=off")
    v = c.tokenizer.expected_vocab_size
    assert c.tokenizer.kind == "hf" and c.tokenizer.tokenizer_file == bpe_file
    assert (c.model.text.vocab_size, c.model.text.eot_id, c.model.text.pad_id) == (v, 2, 0)
    assert (c.model.decoder.vocab_size, c.model.decoder.pad_id) == (v, 0)
