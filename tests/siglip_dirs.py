"""The directories a SigLIP / SigLIP 2 user downloads, made here: tiny transformers models with random
weights and SentencePiece tokenizers trained on shipped text (no real checkpoint can be downloaded).

- `siglip_dir(root)`: as google/siglip-*: SiglipModel (config.json, model.safetensors) + spiece.model
  (unigram; pad 0, eos 1 "</s>", unk 2) + its tokenizer_config.json + preprocessor_config.json.
- `siglip2_dir(root)`: as google/siglip2-*-naflex: Siglip2Model + Gemma-style BPE with byte fallback
  (tokenizer.model and the tokenizer.json transformers writes) + preprocessor_config.json (patch
  size, max_num_patches).
Both return `(path, model)`, the torch model in eval mode (the reference).
"""
import json
import random
import shutil

import numpy as np
import sentencepiece
import torch
import transformers

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SIGLIP_VOCAB, SIGLIP2_VOCAB, MAX_LEN = 250, 700, 16
PATCH, IMAGE_SIZE, GRID = 4, 16, 4  # fixed-resolution SigLIP: 16 px, 4 x 4 patches; NaFlex grid 4 x 4


def captions(n, seed):
    """Deterministic caption-like lines over a mixed-script vocabulary (training corpus / extras)."""
    rng = random.Random(seed)
    words = ("a photo of the cat dog bird car tree house red blue green small large old young "
             "running jumping sitting on in with near under sky water city street person people "
             "man woman child playing ball food plate table beach mountain snow night sunset "
             "café naïve über straße Ærø São 東京 猫 犬 写真 狗 照片 привет мир кошка собака "
             "שלום עולם مرحبا قطة 한국 고양이 Ελλάδα γάτα 🐈 😀 ❤️ 👍🏽 1 2 3 42 2024 3.14").split()
    punct = ["", "", ",", ".", "!", "?", "'s", " -", ":", ";", " &", " (x)"]
    lines = []
    for i in range(n):
        line = " ".join(rng.choice(words) + rng.choice(punct) for _ in range(rng.randint(2, 16)))
        lines.append(line.capitalize() if i % 3 == 0 else line.upper() if i % 11 == 0 else line)
    return lines


def _train(root, prefix, **kw):
    corpus = root / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(captions(800, seed=0)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / prefix),
                                             hard_vocab_limit=False, character_coverage=1.0,
                                             minloglevel=2, num_threads=1, **kw)
    return root / f"{prefix}.model"


def jitter(model, seed):
    """Random init leaves norms at 1, biases and the logit scale / bias at 0: move them."""
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-3.0)
        for name, p in model.named_parameters():
            if not name.startswith("logit") and ("norm" in name or name.endswith("bias")
                                                 or "probe" in name or "position" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model


def siglip_dir(root, seed=0):
    """A google/siglip-* style directory under root/"siglip" -> (path, torch SiglipModel)."""
    spm = _train(root, "siglip_unigram", vocab_size=SIGLIP_VOCAB, model_type="unigram",
                 pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    path = root / "siglip"
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        text_config=dict(**TOWER, vocab_size=SIGLIP_VOCAB, max_position_embeddings=MAX_LEN,
                         pad_token_id=1, eos_token_id=1, bos_token_id=1),
        vision_config=dict(**TOWER, patch_size=PATCH, image_size=IMAGE_SIZE))
    model = jitter(transformers.SiglipModel(config).eval(), seed)
    model.save_pretrained(path)
    transformers.SiglipTokenizer(vocab_file=str(spm), model_max_length=MAX_LEN).save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path, model


def siglip2_dir(root, seed=0, max_num_patches=25):
    """A google/siglip2-*-naflex style directory under root/"siglip2" -> (path, torch Siglip2Model)."""
    spm = _train(root, "gemma_bpe", vocab_size=SIGLIP2_VOCAB, model_type="bpe", byte_fallback=True,
                 pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                 bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"],
                 normalization_rule_name="identity", add_dummy_prefix=False,
                 remove_extra_whitespaces=False, split_digits=True)
    path = root / "siglip2"
    torch.manual_seed(seed)
    config = transformers.Siglip2Config(
        text_config=dict(**TOWER, vocab_size=SIGLIP2_VOCAB, max_position_embeddings=MAX_LEN,
                         eos_token_id=1, pad_token_id=0, bos_token_id=2, projection_size=32),
        vision_config=dict(**TOWER, patch_size=PATCH, num_patches=GRID * GRID))
    model = jitter(transformers.Siglip2Model(config).eval(), seed)
    model.save_pretrained(path)
    tok_src = root / "gemma_src"  # transformers converts tokenizer.model and writes tokenizer.json
    tok_src.mkdir(exist_ok=True)
    shutil.copy(spm, tok_src / "tokenizer.model")
    (tok_src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    transformers.AutoTokenizer.from_pretrained(tok_src).save_pretrained(path)
    shutil.copy(spm, path / "tokenizer.model")
    transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=max_num_patches).save_pretrained(path)
    return path, model
