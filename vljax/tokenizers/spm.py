"""A SentencePiece `.model` run by the `sentencepiece` package: kind "sentencepiece".

SigLIP's `spiece.model` (transformers' SiglipTokenizer) and big_vision's `.model` files
(its `tokenize` pp op). Rows are `[bos]? pieces... eos pad...` padded to `max_len`.

`canonicalize="siglip"` is transformers' `SiglipTokenizer` (tokenization_siglip.py, v5),
step for step, so ids are equal to `tok(texts, padding="max_length", truncation=True,
max_length=max_len)`:
  1. "▁" + text with every "▁" replaced by a space;
  2. the text is split on the literal special tokens (eos, unk, pad and `special_tokens`:
     "a</s>b" holds an eos id in transformers; leftmost, longest match first);
  3. each other chunk is canonicalised (big_vision's `prompt_engineering.canonicalize_text`):
     lower case (`lower="str"`: Python's `str.lower`, what `do_lower_case=True`, the
     default, does; `lower="none"`: kept), ASCII punctuation (`string.punctuation`) removed,
     runs of whitespace to one space, stripped; then encoded as `unk_piece + chunk` and
     the pieces of `unk_piece` alone dropped (transformers' dummy-prefix work-around);
  4. a leading lone "▁" piece before a special token is dropped;
  5. eos appended unless the pieces already end with it.
`canonicalize="none"` is big_vision's `tokenize` op (pp/ops_text.py, `tensorflow_text`'s
SentencepieceTokenizer): the text is encoded as is, after `lower="ascii"` (its default
`lower=True` is `tf.strings.lower`, which lower-cases ASCII letters only), bos if
`add_bos`, eos if `add_eos`. With `special_tokens` (transformers' tokenizer of a directory
holding only a tokenizer.model) those literals are split out first, as HF added tokens.

Truncation (both): SigLIP's rule, big_vision's `eos="sticky"`: a row longer than
`max_len` keeps its first `max_len - 1` tokens and the eos, so the last real token of
every row is eos. transformers' `truncation=True` gives the same rows: it cuts the
pieces to `max_len - 1` (room for the one special token) before appending eos (step 5).
Padding: `pad_id` (None: the eos id, SigLIP's convention: transformers' pad_token "</s>",
big_vision's SigLIP configs `pad_value=1`).
"""
import re
import string

import sentencepiece

from tokenizers import normalizers

from vljax.tokenizers.base import Tokenizer

CANONICALIZE = ("siglip", "none")
LOWER = ("str", "rust", "ascii", "none")
META = "▁"  # SentencePiece's whitespace symbol
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_SPACES = re.compile(r"\s+")
_RUST_LOWER = normalizers.Lowercase()


def lower_case(text, how) -> str:
    """how: "str" (Python's str.lower: SiglipTokenizer), "rust" (HF tokenizers' per-character
    Lowercase normalizer: Siglip2Tokenizer; a final "Σ" stays "σ"), "ascii" (tf.strings.lower,
    big_vision: A-Z only), "none"."""
    if how == "str":
        return text.lower()
    if how == "rust":
        return _RUST_LOWER.normalize_str(text)
    if how == "ascii":
        return text.translate(_ASCII_LOWER)
    return text


def load_model(model_file) -> sentencepiece.SentencePieceProcessor:
    """A `.model` file -> SentencePieceProcessor; missing or corrupt -> ValueError naming it."""
    try:
        with open(model_file, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise ValueError(f"{model_file}: cannot read the SentencePiece model ({e})") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, TypeError) as e:
        raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
    if sp.get_piece_size() == 0:
        raise ValueError(f"{model_file}: SentencePiece model with no pieces")
    return sp


def siglip_canonicalize(text, lower="str") -> str:
    """transformers `SiglipTokenizer.canonicalize_text` (from big_vision's prompt engineering)."""
    return _SPACES.sub(" ", lower_case(text, lower).translate(_PUNCTUATION)).strip()


class SentencePieceTokenizer(Tokenizer):
    """SigLIP / big_vision SentencePiece; see the module docstring for the exact rules.

    model_file: the `.model` path. pad_id (int) or pad_token (piece name); neither: eos.
    eos_token / unk_token: piece names (None: the model's own eos / unk). special_tokens:
    pieces matched literally in the text, as transformers does (SiglipTokenizer: eos, unk,
    pad and these additional ones; a converted tokenizer.model: all its special tokens).
    lower: "str" | "rust" | "ascii" | "none" (`lower_case`). padding_side: "right" | "left".
    """

    def __init__(self, max_len=64, *, model_file, canonicalize="siglip", lower="str",
                 add_eos=True, add_bos=False, pad_id=None, pad_token=None, eos_token=None,
                 unk_token=None, special_tokens=(), padding_side="right", expected_vocab_size=None):
        super().__init__(max_len, min_len=1 + bool(add_bos) + bool(add_eos))
        self._set_padding_side(padding_side)
        if pad_id is not None and pad_token is not None:
            raise ValueError(f"give pad_id ({pad_id}) or pad_token ({pad_token!r}), not both")
        if canonicalize not in CANONICALIZE:
            raise ValueError(f"canonicalize={canonicalize!r}: expected one of {CANONICALIZE}")
        if lower not in LOWER:
            raise ValueError(f"lower={lower!r}: expected one of {LOWER}")
        if canonicalize == "siglip" and (add_bos or not add_eos):
            raise ValueError("canonicalize='siglip' appends eos and no bos (SiglipTokenizer)")
        self.model_file = str(model_file)
        self.canonicalize, self.lower = canonicalize, lower
        self.add_eos, self.add_bos = bool(add_eos), bool(add_bos)
        self._sp = load_model(self.model_file)
        self.vocab_size = self._sp.get_piece_size()
        if expected_vocab_size is not None and self.vocab_size != expected_vocab_size:
            raise ValueError(f"{self.model_file}: vocabulary has {self.vocab_size} pieces, "
                             f"expected {expected_vocab_size}")
        self.eot_id = self._piece_id(eos_token, self._sp.eos_id(), "eos")
        self.sot_id = self._piece_id(None, self._sp.bos_id(), "bos") if add_bos else None
        self.pad_id = (self._piece_id(pad_token, -1, "pad") if pad_token is not None
                       else self.eot_id if pad_id is None else int(pad_id))
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"{self.model_file}: pad_id {self.pad_id} is outside the "
                             f"vocabulary (0..{self.vocab_size - 1})")
        self._unk = self._sp.id_to_piece(self._piece_id(unk_token, self._sp.unk_id(), "unk"))
        specials = list(special_tokens)
        if canonicalize == "siglip":  # SiglipTokenizer's own: eos, unk, pad
            specials += [self._sp.id_to_piece(i) for i in (self.eot_id, self.pad_id)] + [self._unk]
        self._special_ids = {p: self._piece_id(p, -1, "special") for p in specials}
        # Longest first: the regex then takes the longest token at the leftmost position.
        names = sorted(self._special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._unk_len = len(self._sp.encode(self._unk))
        meta = self._sp.piece_to_id(META)
        self._meta_id = meta if self._sp.id_to_piece(meta) == META else None

    def _piece_id(self, piece, default_id, what):
        """A named piece's id (None: the model's default id); refused if not in the vocabulary."""
        if piece is None:
            if default_id < 0:
                raise ValueError(f"{self.model_file}: the model defines no {what} piece: "
                                 f"name one ({what}_token=...)")
            return default_id
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) != piece:
            raise ValueError(f"{self.model_file}: {what} token {piece!r} is not a piece "
                             f"of the vocabulary ({self.vocab_size} pieces)")
        return i

    def __getstate__(self):  # the processor itself does not pickle (grain workers need it)
        return {**self.__dict__, "_sp": self._sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(state["_sp"])

    def encode(self, texts):
        if self.canonicalize == "siglip":
            rows, firsts = self._pieces(
                [META + t.replace(META, " ") for t in texts],
                lambda chunk: self._unk + siglip_canonicalize(chunk, self.lower), self._unk_len)
            rows = [r[1:] if (len(r) > 1 and r[0] == self._meta_id and self._meta_id is not None
                              and first == 1) else r for r, first in zip(rows, firsts)]
        elif self._split is not None:
            rows, _ = self._pieces(texts, lambda chunk: lower_case(chunk, self.lower), 0)
        else:
            rows = self._sp.encode([lower_case(t, self.lower) for t in texts])
        if self.add_bos:
            rows = [[self.sot_id, *r] for r in rows]
        if not self.add_eos:
            return [r[: self.max_len] for r in rows]
        eos, n = self.eot_id, self.max_len - 1
        # SiglipTokenizer appends eos unless the (cut) pieces end with it; big_vision always.
        return [r[:n] if (self.canonicalize == "siglip" and r[:n] and r[:n][-1] == eos)
                else r[:n] + [eos] for r in rows]

    def _pieces(self, texts, prepare, drop):
        """Texts split on the literal special tokens (their ids kept); every other chunk
        `prepare`d, encoded in one batch, its first `drop` ids dropped. -> (rows, the row
        position of each row's first special token or None)."""
        chunks_of, work = [], []  # per text: (is_special, special id or index into work)
        for text in texts:
            parts = self._split.split(text)
            chunks = []
            for k, part in enumerate(parts):
                if k % 2:  # split() puts the matched special tokens at odd positions
                    chunks.append((True, self._special_ids[part]))
                elif part:
                    chunks.append((False, len(work)))
                    work.append(prepare(part))
            chunks_of.append(chunks)
        encoded = self._sp.encode(work) if work else []
        rows, firsts = [], []
        for chunks in chunks_of:
            row, first = [], None
            for special, value in chunks:
                if special:
                    first = len(row) if first is None else first
                    row.append(value)
                else:
                    ids = encoded[value]
                    row.extend(ids[drop:] if len(ids) >= drop else ids)
            rows.append(row)
            firsts.append(first)
        return rows, firsts
