"""Texts per second: vljax's tokenizers vs transformers' own, side by side on the same batch.

    python3 experiments/tokenizer_speed.py [--n=10000] [--repeats=3]

For each family the same batch of `n` caption-like texts (deterministic, mixed scripts,
punctuation, emoji) is tokenised to `int32 [n, max_len]` by `vljax.tokenizers` (built with
`from_directory` on a transformers directory, as a user loads one) and by transformers'
`AutoTokenizer` on that directory (`padding="max_length", truncation=True,
max_length=max_len`, `return_tensors="np"`). No real SigLIP tokenizer is downloadable, so
the SentencePiece models are trained here (a few seconds) on 20k generated captions; their
vocabularies are small (a few thousand pieces), which flatters neither side. Exact families
are checked for equal ids before timing. Median of `repeats` runs after one warm-up run.
Prints a table and writes experiments/results/tokenizer_speed.json.
"""
import json
from pathlib import Path
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings

from absl import app
from absl import flags
import numpy as np
import sentencepiece
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from vljax import assets, tokenizers  # noqa: E402

_N = flags.DEFINE_integer("n", 10000, "Texts in the batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per tokenizer (median reported).")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "tokenizer_speed.json"),
                           "Where the JSON results go ('' for none).")

WORDS = ("a an the photo picture image close-up of my our two three several small large old young "
         "red blue green white black brown cat cats dog dogs bird car bus train bicycle tree house "
         "street city beach mountain lake river field kitchen table plate pizza cake coffee man "
         "woman child children people player team sitting standing running jumping playing eating "
         "holding riding on in at with near under next to during sunset night snow rain "
         "café naïve Zürich São Paulo 東京 の 猫 写真 狗 кошка на улице قطة 고양이 γάτα 🐈 😀 ❤️ 👍🏽").split()


def captions(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 22))]
        text = " ".join(words) + rng.choice([".", "", "!", " #travel", ", 2024."])
        out.append(text.capitalize() if i % 2 else text)
    return out


def build_dirs(root: Path):
    """Trained SentencePiece models -> the directories transformers writes for each family."""
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(captions(20000, seed=1)), encoding="utf-8")
    common = dict(input=str(corpus), hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(
        model_prefix=str(root / "unigram"), vocab_size=4000, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, **common)
    sentencepiece.SentencePieceTrainer.train(
        model_prefix=str(root / "gemma"), vocab_size=4000, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"],
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, **common)
    dirs = {"siglip": root / "siglip", "siglip2": root / "siglip2", "clip": root / "clip"}
    transformers.SiglipTokenizer(vocab_file=str(root / "unigram.model")).save_pretrained(dirs["siglip"])
    gemma = root / "gemma_model"
    gemma.mkdir()
    shutil.copy(root / "gemma.model", gemma / "tokenizer.model")
    (gemma / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    transformers.AutoTokenizer.from_pretrained(gemma).save_pretrained(dirs["siglip2"])
    transformers.Siglip2Config().save_pretrained(dirs["siglip2"])
    dirs["siglip2 (tokenizer.model)"] = root / "siglip2_model"
    dirs["siglip2 (tokenizer.model)"].mkdir()
    shutil.copy(root / "gemma.model", dirs["siglip2 (tokenizer.model)"] / "tokenizer.model")
    shutil.copy(dirs["siglip2"] / "config.json", dirs["siglip2 (tokenizer.model)"])
    vocab, merges = tokenizers.clip_vocab_from_bpe_gz(assets.clip_bpe_path())
    vocab = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(t, t): i
             for t, i in vocab.items()}
    transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges]).save_pretrained(dirs["clip"])
    dirs["bert (MiniLM)"] = assets.minilm_dir()
    return dirs


def timed(fn, texts, repeats):
    fn(texts[:100])  # warm-up: lazy state, caches
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(texts)
        runs.append(time.perf_counter() - start)
    return len(texts) / statistics.median(runs)


def main(argv):
    del argv
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    texts = captions(_N.value, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_dirs(Path(tmp))
        cases = [(name, path, "hf" if name.startswith("bert") else None) for name, path in dirs.items()]
        cases.append(("clip (open_clip rules, kind 'clip')", dirs["clip"], "clip"))
        for name, path, force in cases:
            spec = tokenizers.from_directory(path, max_len=64)
            if force == "clip":
                spec = {"kind": "clip", "max_len": 64}
            ours = tokenizers.get_tokenizer(**spec)
            ref = transformers.AutoTokenizer.from_pretrained(str(path))

            def theirs(batch, ref=ref):
                return ref(batch, padding="max_length", truncation=True, max_length=64,
                           return_tensors="np")["input_ids"]

            exact = force != "clip"
            if exact:
                np.testing.assert_array_equal(ours(texts), theirs(texts), err_msg=name)
            ours_s, theirs_s = timed(ours, texts, _REPEATS.value), timed(theirs, texts, _REPEATS.value)
            rows.append({"family": name, "kind": spec["kind"], "reference": type(ref).__name__,
                         "ids_equal": exact, "ours_texts_per_s": round(ours_s),
                         "transformers_texts_per_s": round(theirs_s), "ratio": round(ours_s / theirs_s, 2)})
    header = f"{'family':38s} {'kind':14s} {'transformers class':20s} {'ours/s':>9s} {'hf/s':>9s} {'ratio':>6s}"
    print(f"{_N.value} captions, max_len 64, {platform.processor() or platform.machine()}, "
          f"transformers {transformers.__version__}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['family']:38s} {r['kind']:14s} {r['reference']:20s} {r['ours_texts_per_s']:9d} "
              f"{r['transformers_texts_per_s']:9d} {r['ratio']:6.2f}")
    if _OUT.value:
        Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_OUT.value).write_text(json.dumps({"n": _N.value, "max_len": 64, "rows": rows}, indent=1))


if __name__ == "__main__":
    app.run(main)
