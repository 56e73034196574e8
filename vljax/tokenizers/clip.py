"""CLIP byte-level BPE run by HF `tokenizers` (Rust): kind "clip".

Every row is `[sot] ids... [eot] pad...`; rows longer than `max_len` are cut and their last
token set back to `eot_id`, so the end-of-text token (pooled by CLIP-style text towers) is
always present.

CLIP ids equal open_clip's `SimpleTokenizer` (clean="lower"): text is cleaned in Python
exactly like open_clip (ftfy.fix_text, html.unescape twice, whitespace collapsed, lower
case), then split with CLIP's regex, byte-level encoded and BPE-merged in Rust. Padding
is 0 (open_clip's convention, HF pads with eot).
"""
import gzip
import html
import json
import pathlib

import ftfy
import tokenizers
from tokenizers import models, pre_tokenizers

from vljax import assets
from vljax.tokenizers.base import Tokenizer

CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_NUM_MERGES = 49152 - 256 - 2  # as open_clip: merges = lines[1:48895]
CLIP_VOCAB_SIZE = 49408
# open_clip names / HF names of the two special tokens.
CLIP_SOT = ("<start_of_text>", "<|startoftext|>")
CLIP_EOT = ("<end_of_text>", "<|endoftext|>")


def _clip_clean(text):
    """open_clip's clean="lower": ftfy, double html unescape, collapse whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode char map (the 256 base symbols of the vocab)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Printable bytes map to themselves, the rest to 256, 257, ... in byte order.
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_vocab_from_bpe_gz(path):
    """OpenAI's merge list (`bpe_simple_vocab_16e6.txt.gz`) -> (vocab {token: id}, merges).

    As open_clip: skip the header line, keep 48,894 merges; the vocab is the 256 byte
    symbols, the same with '</w>', one token per merge, then sot and eot (49,408 in all).
    """
    path = pathlib.Path(path)
    try:
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read a gzipped BPE merge list ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:CLIP_NUM_MERGES + 1]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {CLIP_NUM_MERGES} 'a b' merge lines after the "
                         f"header, got {len(merges)} (wrong or truncated file?)")
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += [CLIP_SOT[0], CLIP_EOT[0]]
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_vocab_merges(vocab, merges):
    """vocab: dict or vocab.json path; merges: list of pairs or merges.txt path."""
    if not isinstance(vocab, dict):
        with open(vocab, encoding="utf-8") as f:
            vocab = json.load(f)
    if not isinstance(merges, (list, tuple)):
        with open(merges, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [line for line in lines if line and not line.startswith("#version")]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    return vocab, merges


def _check_clip_vocab(vocab, merges, source, expected_size):
    """A BPE vocabulary that does not fit its merges tokenizes silently wrong: refuse it."""
    if expected_size is not None and len(vocab) != expected_size:
        raise ValueError(f"{source}: vocabulary has {len(vocab)} tokens, expected {expected_size}")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{source}: vocabulary ids are not 0..{len(vocab) - 1}")
    base = list(_bytes_to_unicode().values())
    missing = [t for t in base + [b + "</w>" for b in base] if t not in vocab]
    if missing:
        raise ValueError(f"{source}: vocabulary lacks {len(missing)} of the 512 byte-level base "
                         f"symbols (e.g. {missing[0]!r}); empty or not a CLIP BPE vocabulary")
    for i, m in enumerate(merges):
        if len(m) != 2 or "".join(m) not in vocab:
            raise ValueError(f"{source}: merge #{i} {m!r} is malformed or its result is not "
                             "in the vocabulary (vocab and merges do not belong together)")
    for names in (CLIP_SOT, CLIP_EOT):
        if not any(n in vocab for n in names):
            raise ValueError(f"{source}: vocabulary has no special token {' / '.join(names)}")


class ClipTokenizer(Tokenizer):
    """CLIP byte-level BPE; ids equal open_clip's SimpleTokenizer, pad 0.

    Vocabulary source (one of): `bpe_path` (OpenAI's .txt.gz merge list; default: the one
    in open_clip_torch), `vocab` + `merges` (dict/vocab.json and list/merges.txt), or
    `tokenizer_file` (an HF tokenizer.json with a BPE model).
    """

    def __init__(self, max_len=77, *, bpe_path=None, vocab=None, merges=None,
                 tokenizer_file=None, expected_vocab_size=None):
        super().__init__(max_len)
        given = [n for n, v in (("bpe_path", bpe_path), ("vocab/merges", vocab or merges),
                                ("tokenizer_file", tokenizer_file)) if v]
        if len(given) > 1:
            raise ValueError(f"give one vocabulary source, got {given}")
        if (vocab is None) != (merges is None):
            raise ValueError("vocab and merges must be given together")
        if tokenizer_file is not None:
            source = str(tokenizer_file)
            with open(tokenizer_file, encoding="utf-8") as f:
                model = json.load(f).get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{source}: model type {model.get('type')!r}, expected 'BPE'")
            vocab, merges = _read_vocab_merges(model["vocab"], model["merges"])
        elif vocab is not None:
            source = f"vocab={vocab if not isinstance(vocab, dict) else '<dict>'}"
            vocab, merges = _read_vocab_merges(vocab, merges)
        else:
            bpe_path = bpe_path or assets.clip_bpe_path()
            source = str(bpe_path)
            vocab, merges = clip_vocab_from_bpe_gz(bpe_path)
            expected_vocab_size = expected_vocab_size or CLIP_VOCAB_SIZE
        _check_clip_vocab(vocab, merges, source, expected_vocab_size)

        sot = next(n for n in CLIP_SOT if n in vocab)
        eot = next(n for n in CLIP_EOT if n in vocab)
        self.sot_id, self.eot_id, self.pad_id = vocab[sot], vocab[eot], 0
        self.vocab_size = len(vocab)
        self._tok = tokenizers.Tokenizer(models.BPE(
            vocab=vocab, merges=merges, end_of_word_suffix="</w>",
            continuing_subword_prefix="", fuse_unk=False))
        # The regex acts on cleaned (lower-case) text, so open_clip's IGNORECASE is moot.
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # open_clip's regex matches the special tokens' text first: so do we.
        self._tok.add_special_tokens([sot, eot])

    def encode(self, texts):
        cleaned = [_clip_clean(t) for t in texts]
        encs = self._tok.encode_batch(cleaned, add_special_tokens=False)
        return [[self.sot_id, *e.ids, self.eot_id] for e in encs]
