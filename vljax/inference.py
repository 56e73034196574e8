r"""Use a trained model: classify images against label lists, embed images and texts.

    vljax-infer classify --model=/tmp/vljax_lit --labels="cat,dog,car" photo1.jpg photo2.png
    vljax-infer classify --model=/tmp/vljax_lit --labels-file=classes.txt --templates=best --top-k=3 *.png
    vljax-infer embed --model=/tmp/vljax_lit --texts="a cat,a dog" --out=text.npy
    vljax-infer embed --model=hf_clip_dir/ --out=images.npy *.jpg

`--model` is a vljax workdir (config.json + checkpoints/, the latest checkpoint is used) or a
transformers CLIP / SigLIP directory (config.json + model.safetensors).
In Python: `p = Predictor.load(path); p.classify(images, labels)`; `p.embed_images(images)`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


class Predictor:
    """A model with its tokenizer and image preprocessing; calls are batched and compiled once."""

    def __init__(self, model, params, tokenizer, *, image_size: int, value_range, batch_size: int = 32,
                 loss: str = "softmax"):
        import jax

        from vljax import sharding
        from vljax.embedder import Embedder
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.image_size, self.value_range = image_size, value_range
        self.sigmoid = loss == "sigmoid"
        # A few photos at a time: one local device is enough (vljax.evaluate shards data sets).
        mesh = sharding.make_mesh([("data", 1)], devices=jax.local_devices()[:1])
        self.embedder = Embedder(model, params, tokenizer, mesh=mesh, image_size=image_size,
                                 value_range=value_range, batch_size=batch_size)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, batch_size: int = 32) -> "Predictor":
        path = os.path.expanduser(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a vljax workdir or a transformers directory)")
        with open(cfg_path) as f:
            raw = json.load(f)
        if "model_type" in raw or "architectures" in raw:
            return cls._load_hf(path, raw, batch_size)
        return cls._load_workdir(path, raw, batch_size)

    @classmethod
    def _load_workdir(cls, path, raw, batch_size):
        import ml_collections
        from vljax import train
        config = ml_collections.ConfigDict(raw)
        model = train.build_model(config)
        params = train.restore_params(config, model, path)
        return cls(model, params, train.build_tokenizer(config), image_size=config.input.image_size,
                   value_range=_value_range(config.input.get("value_range", "efficientnet")),
                   batch_size=batch_size, loss=config.loss.name)

    @classmethod
    def _load_hf(cls, path, raw, batch_size):
        from vljax.convert import hf
        from vljax.models.two_towers import TwoTowers
        from vljax.tokenizers import get_tokenizer
        kind = raw.get("model_type", "")
        if kind == "clip":
            kwargs, params = hf.load_hf_clip(path)
            tok = get_tokenizer("clip", max_len=kwargs["text"].get("max_len", 77), **_hf_vocab(path))
            if tok.vocab_size > kwargs["text"]["vocab_size"]:  # ids past the table would be clamped silently
                raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the text tower "
                                 f"only {kwargs['text']['vocab_size']}; save the model's tokenizer beside it "
                                 "(tokenizer.json, or vocab.json + merges.txt)")
            value_range, loss = "clip", "softmax"
        elif kind == "siglip":
            raise ValueError(f"{path}: SigLIP checkpoints use a SentencePiece tokenizer, which no "
                             "package installs offline; load the model with vljax.convert.hf.load_hf_siglip "
                             "and tokenise yourself")
        else:
            raise ValueError(f"{path}: model_type {kind!r} is not a CLIP or SigLIP checkpoint")
        image_size = raw.get("vision_config", {}).get("image_size", 224)
        return cls(TwoTowers(**kwargs), params, tok, image_size=image_size, value_range=value_range,
                   batch_size=batch_size, loss=loss)

    # -- inputs ---------------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Paths, PIL images or uint8 arrays (any mode, any size) -> float32 [N, S, S, 3]."""
        from vljax.data import transforms as T
        if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 4:
            return images  # already preprocessed
        out = []
        for img in images:
            pil = T.decode_image(img)
            out.append(T.normalize(T.resize_small_center_crop(pil, self.image_size), self.value_range))
        return np.stack(out)

    # -- API ------------------------------------------------------------------------------------
    def embed_images(self, images) -> np.ndarray:
        return self.embedder.embed_image_array(self.preprocess(images))

    def embed_texts(self, texts) -> np.ndarray:
        return self.embedder.embed_texts(list(texts))

    def class_embeddings(self, labels, templates="best", descriptions=None) -> np.ndarray:
        """[C, D]: per label, the renormalised mean of its template (and CuPL description) embeddings."""
        from vljax.evaluators import prompts, zeroshot
        texts = prompts.class_texts(list(labels), templates, descriptions)
        return zeroshot.ensemble(zeroshot.class_text_embeddings(self.embedder, texts))

    def classify(self, images, labels, templates="best", top_k: int = 5):
        """-> list (one per image) of [(label, probability), ...], best first.

        Probabilities: softmax over labels of the logits (CLIP-style models); for sigmoid-trained
        models each label's own sigmoid (labels are independent there, so they need not sum to 1).
        """
        zimg = self.embed_images(images)
        zcls = self.class_embeddings(labels, templates)
        logits = self.embedder.logit_scale * zimg @ zcls.T
        if self.sigmoid:
            probs = 1 / (1 + np.exp(-(logits + (self.embedder.logit_bias or 0.0))))
        else:
            logits = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        k = min(top_k, len(labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(labels[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]


def _hf_vocab(path) -> dict:
    """The directory's own CLIP vocabulary if it has one, else {} (OpenAI's, which every CLIP uses)."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return dict(tokenizer_file=os.path.join(path, "tokenizer.json"))
    if all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
        return dict(vocab=os.path.join(path, "vocab.json"), merges=os.path.join(path, "merges.txt"))
    return {}


def format_results(names, results) -> list[str]:
    """One line per image: its file name, then the top-k labels with percentages, best first.

        chelsea.png  cat 97.1%  |  dog 2.0%  |  rocket 0.4%
    """
    width = max(len(n) for n in names)
    return [f"{name:<{width}}  " + "  |  ".join(f"{label} {prob:.1%}" for label, prob in top)
            for name, top in zip(names, results)]


def _value_range(v):
    return tuple(v) if isinstance(v, list) else v


def _labels(args) -> list[str]:
    if args.labels_file:
        from vljax.evaluators.prompts import load_class_names
        return list(load_class_names(args.labels_file))
    if args.labels:
        return [s.strip() for s in args.labels.split(",") if s.strip()]
    raise SystemExit("classify needs --labels=a,b,c or --labels-file=FILE")


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="vljax-infer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classify", help="zero-shot classify images against labels")
    c.add_argument("images", nargs="+")
    c.add_argument("--labels")
    c.add_argument("--labels-file")
    c.add_argument("--templates", default="best", help="template set: name, best, clip80, icon, ...")
    c.add_argument("--top-k", type=int, default=3)
    e = sub.add_parser("embed", help="embed images and/or texts to .npy")
    e.add_argument("images", nargs="*")
    e.add_argument("--texts", help="comma-separated texts")
    e.add_argument("--out", required=True, help="output .npy (images; texts go to OUT with _text suffix "
                                                "when both are given)")
    for p in (c, e):
        p.add_argument("--model", required=True, help="vljax workdir or transformers CLIP directory")
        p.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    for img in getattr(args, "images", []):
        if not os.path.exists(img):
            parser.error(f"image file not found: {img}")
    pred = Predictor.load(args.model, batch_size=args.batch_size)
    if args.cmd == "classify":
        labels = _labels(args)
        results = pred.classify(args.images, labels, templates=args.templates, top_k=args.top_k)
        print("\n".join(format_results([os.path.basename(p) for p in args.images], results)))
        return 0
    if not args.images and not args.texts:
        parser.error("embed needs image files and/or --texts")
    root, ext = os.path.splitext(args.out)
    if args.images:
        np.save(args.out, pred.embed_images(args.images))
        print(f"wrote {args.out}: {len(args.images)} image embeddings")
    if args.texts:
        texts = [t.strip() for t in args.texts.split(",")]
        out = f"{root}_text{ext or '.npy'}" if args.images else args.out
        np.save(out, pred.embed_texts(texts))
        print(f"wrote {out}: {len(texts)} text embeddings")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
