"""BERT WordPiece run by HF `tokenizers` (Rust): kind "bert" ([CLS] ... [SEP], pad 0)."""
import pathlib

import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from vljax import assets
from vljax.tokenizers.base import Tokenizer

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


class BertTokenizer(Tokenizer):
    """BERT WordPiece ([CLS] ... [SEP], pad 0), from a tokenizer.json or a vocab.txt.

    Default: all-MiniLM-L6-v2's tokenizer.json (its 128-token padding/truncation are
    switched off; `max_len` rules here). `vocab_file` builds an uncased (by default)
    BERT WordPiece from a vocab.txt instead.
    """

    def __init__(self, max_len=64, *, tokenizer_file=None, vocab_file=None, lowercase=True,
                 expected_vocab_size=None):
        super().__init__(max_len)
        if tokenizer_file is not None and vocab_file is not None:
            raise ValueError("give tokenizer_file or vocab_file, not both")
        if vocab_file is not None:
            source = str(vocab_file)
            words = pathlib.Path(vocab_file).read_text(encoding="utf-8").split("\n")
            missing = [t for t in BERT_SPECIALS if t not in words]
            if missing:  # tokenizers would raise a bare TypeError on the first one
                raise ValueError(f"{source}: vocabulary ({len(words)} lines) lacks {missing}; "
                                 "empty or not a BERT WordPiece vocabulary")
            self._tok = BertWordPieceTokenizer(source, lowercase=lowercase)._tokenizer
        else:
            tokenizer_file = tokenizer_file or assets.minilm_dir() / "tokenizer.json"
            source = str(tokenizer_file)
            self._tok = tokenizers.Tokenizer.from_file(source)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size()
        if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
            raise ValueError(f"{source}: vocabulary has {self.vocab_size} tokens, "
                             f"expected {expected_vocab_size}")
        ids = {t: self._tok.token_to_id(t) for t in BERT_SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: vocabulary ({self.vocab_size} tokens) lacks {missing}; "
                             "empty or not a BERT WordPiece vocabulary")
        self.pad_id, self.sot_id, self.eot_id = ids["[PAD]"], ids["[CLS]"], ids["[SEP]"]
        probe = self._tok.encode("a").ids
        if probe[0] != self.sot_id or probe[-1] != self.eot_id:
            raise ValueError(f"{source}: tokenizer does not add [CLS] ... [SEP] (got {probe})")

    def encode(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]
