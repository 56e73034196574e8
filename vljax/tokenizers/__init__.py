"""Text tokenizers: `get_tokenizer(kind, max_len, **kw)` -> `tok(texts) -> int32 [N, max_len]`.

Every kind exposes `max_len`, `vocab_size`, `pad_id`, `eot_id` (eos), `sot_id` (or None) and
`padding_side`, pickles (grain workers), and keeps the end-of-text token when it truncates a
row that has one. Kinds (one module each; kwargs are JSON-able, as the model spec stores them):
  "clip"          clip.py  CLIP byte-level BPE, ids equal open_clip's SimpleTokenizer, pad 0
  "bert"          bert.py  BERT WordPiece, ids equal transformers' BertTokenizerFast
  "sentencepiece" spm.py   a SentencePiece .model: SigLIP's spiece.model (transformers'
                           SiglipTokenizer, canonicalised) or big_vision's .model files
  "hf"            hf.py    a tokenizer.json of any model (Gemma BPE for SigLIP 2, unigram,
                           WordPiece, CLIP BPE), ids equal transformers' tokenizer
`from_directory(path, max_len=None, *, family=None)` (directory.py) gives the spec kwargs of the
tokenizer a transformers directory or a big_vision .model file ships.
"""
from vljax.tokenizers.base import Tokenizer, check_texts
from vljax.tokenizers.bert import BERT_SPECIALS, BertTokenizer
from vljax.tokenizers.clip import (CLIP_EOT, CLIP_NUM_MERGES, CLIP_SOT, CLIP_SPLIT, CLIP_VOCAB_SIZE,
                                   ClipTokenizer, clip_vocab_from_bpe_gz)
from vljax.tokenizers.directory import from_directory
from vljax.tokenizers.hf import HFTokenizer
from vljax.tokenizers.spm import SentencePieceTokenizer

TOKENIZERS = {"clip": ClipTokenizer, "bert": BertTokenizer,
              "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}

__all__ = ["BERT_SPECIALS", "CLIP_EOT", "CLIP_NUM_MERGES", "CLIP_SOT", "CLIP_SPLIT",
           "CLIP_VOCAB_SIZE", "TOKENIZERS", "BertTokenizer", "ClipTokenizer", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "check_texts", "clip_vocab_from_bpe_gz",
           "from_directory", "get_tokenizer"]


def get_tokenizer(kind, max_len, **kw):
    """kind: one of TOKENIZERS; max_len: row length; kw: the kind's options (JSON-able)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}, expected one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind](max_len, **kw)
