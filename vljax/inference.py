r"""Use a trained model: classify images against label lists, embed images and texts.

    vljax-infer classify --model=/tmp/vljax_lit --labels="cat,dog,car" photo1.jpg photo2.png
    vljax-infer classify --model=/tmp/vljax_lit --labels-file=classes.txt --templates=best --top-k=3 *.png
    vljax-infer embed --model=/tmp/vljax_lit --texts="a cat,a dog" --out=text.npy
    vljax-infer embed --model=hf_clip_dir/ --out=images.npy *.jpg

`--model` is a vljax workdir (model_spec.json + checkpoints/, the latest checkpoint's params are used), a
transformers CLIP / SigLIP / SigLIP 2 (NaFlex too) directory (config.json + model.safetensors + its
tokenizer) or a big_vision SigLIP .npz (its SentencePiece .model beside it, or --tokenizer);
--max-num-patches sets a NaFlex model's patch budget.
In Python: `p = Predictor.load(path); p.classify(images, labels)`; `p.embed_images(images)`.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from absl import logging as absl_logging

from vljax import factory, logs, sharding
from vljax.data import transforms as T
from vljax.data.eval_transform import EvalImage
from vljax.embedder import Embedder
from vljax.evaluators import prompts, zeroshot


class Predictor:
    """A model with its tokenizer and image preprocessing; calls are batched and compiled once."""

    def __init__(self, model, params, tokenizer, *, image_size: int | None = None,
                 value_range="efficientnet", batch_size: int = 32, loss: str = "softmax",
                 similarity: str = "global", eval_image: EvalImage | None = None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.eval_image = eval_image or EvalImage(image_size, value_range)
        self.image_size, self.value_range = self.eval_image.image_size, self.eval_image.value_range
        self.sigmoid, self.similarity = loss == "sigmoid", similarity
        # A few photos at a time: one local device is enough (vljax.evaluate shards data sets).
        mesh = sharding.make_mesh([("data", 1)], devices=jax.local_devices()[:1])
        self.embedder = Embedder.from_bundle(self, mesh=mesh, batch_size=batch_size)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, batch_size: int = 32, **load_kwargs) -> "Predictor":
        """Anything `vljax.factory.load` takes (a workdir, a transformers CLIP / SigLIP / SigLIP 2
        directory, a big_vision npz); load_kwargs: its `tokenizer=`, `max_num_patches=`."""
        return cls.from_bundle(factory.load(path, **load_kwargs), batch_size=batch_size)

    @classmethod
    def from_bundle(cls, bundle, batch_size: int = 32) -> "Predictor":
        return cls(bundle.model, bundle.params, bundle.tokenizer, eval_image=bundle.eval_image,
                   batch_size=batch_size, loss="sigmoid" if bundle.sigmoid else "softmax",
                   similarity=bundle.similarity)

    # -- inputs ---------------------------------------------------------------------------------
    def preprocess(self, images):
        """Paths, PIL images or uint8 arrays (any mode, any size) -> float32 [N, S, S, 3], each
        as the model's `eval_image` makes it (the same as `factory.Bundle.preprocess`); for a
        NaFlex model the dict of [N, ...] patch arrays. A ready batch passes through (a NaFlex
        one over the patch budget is refused, naming it).

        An image that cannot be read raises `transforms.UnreadableImage` whose message is one line
        naming it and why: "photo.png: cannot read image (truncated or corrupt data (...))".
        """
        if isinstance(images, dict) or (isinstance(images, np.ndarray) and images.ndim == 4
                                        and images.dtype == np.float32):
            self.eval_image.check_batch(images)
            return images  # already preprocessed
        return self.eval_image.stack([
            self.eval_image(img, name=None if isinstance(img, (str, os.PathLike)) else f"image {i}")
            for i, img in enumerate(images)])

    # -- API ------------------------------------------------------------------------------------
    def embed_images(self, images) -> np.ndarray:
        return self.embedder.embed_image_array(self.preprocess(images))

    def embed_texts(self, texts) -> np.ndarray:
        return self.embedder.embed_texts(list(texts))

    def class_embeddings(self, labels, templates="best", descriptions=None) -> np.ndarray:
        """[C, D]: per label, the renormalised mean of its template (and CuPL description) embeddings."""
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


def format_results(names, results) -> list[str]:
    """One line per image: its file name, then the top-k labels with percentages, best first.

        chelsea.png  cat 97.1%  |  dog 2.0%  |  rocket 0.4%
    """
    width = max(len(n) for n in names)
    return [f"{name:<{width}}  " + "  |  ".join(f"{label} {prob:.1%}" for label, prob in top)
            for name, top in zip(names, results)]


def _labels(args, parser) -> list[str]:
    if args.labels_file:
        try:
            return list(prompts.load_class_names(args.labels_file))
        except (OSError, ValueError) as e:
            parser.error(f"--labels-file: {e}")
    labels = [s.strip() for s in (args.labels or "").split(",") if s.strip()]
    if not labels:
        parser.error("classify needs --labels=a,b,c or --labels-file=FILE")
    return labels


def _read_images(pred, paths):
    """(the model's inputs of the readable files: float32 [M, S, S, 3] or a NaFlex dict, their
    paths); one stderr line per other file."""
    examples, good = [], []
    for path in paths:
        try:
            examples.append(pred.eval_image(path))
            good.append(path)
        except T.UnreadableImage as e:
            print(e, file=sys.stderr)
    return (pred.eval_image.stack(examples) if examples else pred.eval_image.zeros(0)), good


def cli(argv=None):
    """vljax-infer. Exit status: 0 when every image was read; 1 when some were not (each gets one
    line on stderr: `FILE: cannot read image (reason)`; the others are still classified/embedded);
    2 for a usage error or a model that cannot be loaded."""
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
        p.add_argument("--model", required=True, help="vljax workdir, transformers CLIP / SigLIP / "
                       "SigLIP 2 directory or big_vision SigLIP .npz")
        p.add_argument("--tokenizer", help="the SentencePiece .model of a big_vision .npz (default: "
                       "the one beside it) or a directory overriding the model's tokenizer")
        p.add_argument("--max-num-patches", type=int, help="NaFlex models: the patch budget "
                       "(default: the checkpoint's)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--verbosity", type=int, default=None,
                       help="absl verbosity of the libraries' logs (0: INFO); default: warnings only")
    args = parser.parse_args(argv)
    if args.cmd == "embed" and not args.images and not args.texts:
        parser.error("embed needs image files and/or --texts")
    labels = _labels(args, parser) if args.cmd == "classify" else None

    logs.setup(verbose=args.verbosity is not None)
    if args.verbosity is not None:
        absl_logging.set_verbosity(args.verbosity)
    try:
        pred = Predictor.load(args.model, batch_size=args.batch_size, tokenizer=args.tokenizer,
                              max_num_patches=args.max_num_patches)
    except (OSError, ValueError) as err:
        where = "" if args.model in str(err) else f"{args.model}: "
        print(f"vljax-infer: cannot load the model: {where}{err}", file=sys.stderr)
        return 2
    images, good = _read_images(pred, args.images)
    status = 0 if len(good) == len(args.images) else 1
    if args.cmd == "classify":
        if good:
            results = pred.classify(images, labels, templates=args.templates, top_k=args.top_k)
            print("\n".join(format_results([os.path.basename(p) for p in good], results)))
        return status
    root, ext = os.path.splitext(args.out)
    if good:
        np.save(args.out, pred.embed_images(images))
        print(f"wrote {args.out}: {len(good)} image embeddings"
              + (f" (rows: the {len(good)} readable files, in order)" if status else ""))
    if args.texts:
        texts = [t.strip() for t in args.texts.split(",")]
        out = f"{root}_text{ext or '.npy'}" if args.images else args.out
        np.save(out, pred.embed_texts(texts))
        print(f"wrote {out}: {len(texts)} text embeddings")
    return status


if __name__ == "__main__":
    sys.exit(cli())
