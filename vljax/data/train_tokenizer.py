r"""Learns a byte-level BPE tokenizer from a config's training captions (vljax/tokenizers/caption_bpe.py).

    python -m vljax.data.train_tokenizer --config=configs/siglip2.py --vocab_size=4096 --out=/tmp/bpe4k.json
    python -m vljax.main --config=configs/siglip2.py:tok=/tmp/bpe4k.json --workdir=...

The captions are those of `config.input.data` (every registered source kind, read through its
`captions_of`: no image is decoded), stripped, blank ones left out, in source and record order.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from vljax import caption_labels, cliflags
from vljax.data import sources
from vljax.tokenizers import caption_bpe


# Flags on a module-private FlagValues: vljax.main and vljax.evaluate define --config too (cliflags).
_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config: its input.data are read.",
                                          flag_values=_FLAGS)
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Tokens in the vocabulary (specials and bytes included).",
                              flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Where to write the tokenizer.json.", flag_values=_FLAGS)
flags.mark_flags_as_required(["config", "out"], flag_values=_FLAGS)


def main(argv):
    del argv
    config = _CONFIG.value
    opened = [sources.get_source(entry, data_dir=config.input.get("data_dir")) for entry in config.input.data]
    captions = caption_labels.training_captions(opened)
    tok = caption_bpe.train_bpe(captions, _VOCAB.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    tok.save(_OUT.value)
    print(f"[train_tokenizer] {tok.get_vocab_size()} tokens from {len(captions)} captions of "
          f"{len(opened)} sources -> {_OUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=cliflags.parser(_FLAGS))
