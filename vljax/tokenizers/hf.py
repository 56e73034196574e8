"""A directory's `tokenizer.json`, whatever its model, run by HF `tokenizers`: kind "hf".

Gemma BPE with byte fallback (SigLIP 2), SentencePiece unigram converted to tokenizer.json,
WordPiece (BERT), CLIP BPE. The file's normalizer, pre-tokenizer, model, added (special)
tokens and post-processor are used as written: transformers >= 5 does the same (it ignores
tokenizer_config.json's `add_bos_token` / `add_eos_token` when a tokenizer.json is there:
tokenization_utils_base.py pops them), so the special tokens a row starts / ends with are
the post-processor's. The padding and truncation stored in the file (a `save_pretrained`
after a padded call writes them there) are ignored; this kind's are transformers'
`padding="max_length", truncation=True, max_length=max_len`: the Rust truncation cuts the
text's tokens to `max_len` minus the post-processor's special tokens (so a trailing eos
stays, as in SigLIP's rule), then rows are padded with `pad_token` on `padding_side`.
`lowercase=True` prepends a `Lowercase` normalizer, as transformers' `Siglip2Tokenizer`
does (Rust's per-character lower case: a final "Σ" becomes "σ", not Python's "ς"), and, as
it, only when the file has a normalizer (Gemma's always has: " " -> "▁").
"""
import json

import tokenizers
from tokenizers import normalizers

from vljax.tokenizers.base import Tokenizer


def load_tokenizer_json(path) -> tokenizers.Tokenizer:
    """tokenizer.json -> tokenizers.Tokenizer; a missing or corrupt file -> ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the tokenizer file ({e})") from None
    try:
        json.loads(text)
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on a bad field
        raise ValueError(f"{path}: not a HF tokenizers tokenizer.json ({e})") from None


class HFTokenizer(Tokenizer):
    """tokenizer.json -> int32 [N, max_len]; see the module docstring for the rules.

    pad_token / eos_token: token names (from the directory's tokenizer_config.json or
    special_tokens_map.json; `tokenizers.from_directory` finds them). pad_token None: the
    file's own padding token. eos_token None: the last special token the post-processor
    appends. Either missing from the vocabulary is refused.
    """

    def __init__(self, max_len=64, *, tokenizer_file, pad_token=None, eos_token=None,
                 lowercase=False, padding_side="right", expected_vocab_size=None):
        super().__init__(max_len, min_len=1)
        self._set_padding_side(padding_side)
        self.tokenizer_file = str(tokenizer_file)
        tok = load_tokenizer_json(self.tokenizer_file)
        stored_pad = (tok.padding or {}).get("pad_token")
        tok.no_padding()
        tok.no_truncation()
        if lowercase and tok.normalizer is not None:  # Siglip2Tokenizer: only onto a normalizer
            tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), tok.normalizer])
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
            raise ValueError(f"{self.tokenizer_file}: vocabulary has {self.vocab_size} tokens, "
                             f"expected {expected_vocab_size}")
        lead, trail = self._specials_around(tok)
        self.eot_id = (self._token_id(tok, eos_token, "eos_token") if eos_token is not None
                       else trail[-1] if trail else None)
        if self.eot_id is None:
            raise ValueError(f"{self.tokenizer_file}: the post-processor appends no special "
                             "token: name the eos token (eos_token=...)")
        if pad_token is None and stored_pad is None:
            raise ValueError(f"{self.tokenizer_file}: no padding token stored: name it "
                             "(pad_token=...)")
        self.pad_id = self._token_id(tok, stored_pad if pad_token is None else pad_token,
                                     "pad_token")
        self.sot_id = lead[0] if lead else None
        if max_len < len(lead) + len(trail):
            raise ValueError(f"{self.tokenizer_file}: max_len={max_len} leaves no room for the "
                             f"{len(lead) + len(trail)} special tokens of every row")
        tok.enable_truncation(max_len)  # Rust leaves room for the post-processor's tokens
        self._tok = tok

    def _token_id(self, tok, token, what):
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.tokenizer_file}: {what} {token!r} is not in the vocabulary")
        return i

    @staticmethod
    def _specials_around(tok):
        """(ids the post-processor puts before the text, ids it puts after), probed on "a"."""
        enc = tok.encode("a", add_special_tokens=True)
        mask = enc.special_tokens_mask
        text_at = [k for k, m in enumerate(mask) if not m]
        if not text_at:
            return [], []
        return enc.ids[: text_at[0]], enc.ids[text_at[-1] + 1:]

    def encode(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]
