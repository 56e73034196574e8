"""A byte-level BPE tokenizer learned from captions, for demo-scale text towers and caption decoders.

Why: a caption decoder's output projection is [width, vocabulary] at every caption position. At the
SigLIP 2 demo's sizes (width 128, 32 positions, batch 64) CLIP's 49,408-word vocabulary makes that
projection most of the step (configs/siglip2.py: 60 steps took 412 s with the decoder, 99 s
without), although the demo's captions use a few thousand distinct words. A vocabulary fitted to the
captions is the demo-scale counterpart of the paper's (SigLIP 2 trains with Gemma's 256k-token
vocabulary on WebLI), as the demo's tiny towers are of B/16.

The tokenizer (HF `tokenizers`): NFC and lower case (as CLIP's), byte-level pre-tokenisation (every
string encodes: no unknown token, as in CLIP's BPE), merges learned by `tokenizers`' `BpeTrainer`
from the captions in the order given. Special tokens `<pad>` = 0, `<sot>` = 1, `<eot>` = 2; a
post-processor wraps each text as `<sot> text <eot>` (CLIP's layout). Saved, it is a tokenizer.json
for kind "hf" (hf.py), whose truncation keeps the trailing `<eot>`; `python -m
vljax.data.train_tokenizer` writes one from a config's training captions. Learning is
deterministic: the same captions and vocab_size give the same file (tests/test_caption_bpe.py).
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
SPECIALS = (PAD, SOT, EOT)  # ids 0, 1, 2


def train_bpe(captions, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (specials and the 256 bytes included) learned
    from `captions` (module docstring); fewer when the captions do not give that many merges."""
    if vocab_size < len(SPECIALS) + 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} must exceed the {len(SPECIALS)} special tokens and the "
                         "256 byte tokens of a byte-level BPE")
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to learn a tokenizer from")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tok.token_to_id(SOT)), (EOT, tok.token_to_id(EOT))])
    return tok


def tokenizer_spec(path: str, max_len: int) -> dict:
    """config.tokenizer for the tokenizer.json at `path` that `train_bpe` made (kind "hf"); a file that
    is missing or lacks the special tokens is a ValueError naming it."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer.json (write one with `python -m vljax.data.train_tokenizer`)")
    tok = Tokenizer.from_file(path)
    ids = [tok.token_to_id(t) for t in SPECIALS]
    if ids != [0, 1, 2]:
        raise ValueError(f"{path}: special tokens {dict(zip(SPECIALS, ids))}, expected <pad>=0, <sot>=1, "
                         "<eot>=2 (a tokenizer from vljax.tokenizers.caption_bpe.train_bpe)")
    return dict(kind="hf", max_len=int(max_len), tokenizer_file=path, pad_token=PAD, eos_token=EOT,
                expected_vocab_size=tok.get_vocab_size(with_added_tokens=True))
