"""Partial labels on constructed data: label embeddings trained from images' observed labels with a
fraction of the positives hidden (`vljax.data.sources.hidden_of`, seed 0), scored by mAP on the FULL
label sets, per loss: assume-negative BCE and WAN (vljax/losses/multilabel.py), PU-MLC and nnPU
(vljax/losses/partial_labels.py), DEXML's decoupled softmax (vljax/losses/dexml.py).

    python experiments/partial_labels_toy.py            # ~1 min on 2 cores

256 images hold 1-3 of 6 labels; an image's embedding is the normalised sum of its labels'
directions plus noise (0.3); the 6 label embeddings start random and take 150 Adam steps (lr 0.05)
on the whole set, logit scale 10, bias 0. "oracle" ranks by the true directions. The same
construction as tests/test_partial_labels.py's learning test; not a result on the demo data.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vljax.data import sources  # noqa: E402
from vljax.evaluators.multilabel import mean_average_precision  # noqa: E402
from vljax.losses import dexml, multilabel, partial_labels  # noqa: E402

LOSSES = ("bce", "wan", "pu_mlc", "nnpu", "dexml")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def train(zimg, seen, z0, name, fraction, steps=150):
    """The label embeddings after `steps` Adam steps of loss `name` on the observed labels."""
    fn = {"pu_mlc": lambda z: partial_labels.pu_mlc_loss(zimg, z, 10.0, 0.0, seen),
          "nnpu": lambda z: partial_labels.nnpu_loss(zimg, z, 10.0, 0.0, seen, label_frequency=1 - fraction),
          "dexml": lambda z: dexml.dexml_loss(zimg, z, 10.0, seen),
          "bce": lambda z: multilabel.multilabel_loss(zimg, z, 10.0, 0.0, seen, kind="bce"),
          "wan": lambda z: multilabel.multilabel_loss(zimg, z, 10.0, 0.0, seen, kind="wan")}[name]
    tx = optax.adam(0.05)

    @jax.jit
    def step(z, opt):
        g = jax.grad(lambda z: fn(z / jax.numpy.linalg.norm(z, axis=-1, keepdims=True)))(z)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(z, updates), opt

    z, opt = z0, tx.init(z0)
    for _ in range(steps):
        z, opt = step(z, opt)
    return np.asarray(z)


def main():
    rng = np.random.default_rng(0)
    dirs = _unit(rng.normal(size=(6, 16))).astype(np.float32)
    full = np.zeros((256, 6), np.float32)
    for row in full:
        row[rng.choice(6, rng.integers(1, 4), replace=False)] = 1
    zimg = _unit(full @ dirs + 0.3 * rng.normal(size=(256, 16))).astype(np.float32)
    z0 = rng.normal(size=(6, 16)).astype(np.float32)
    truth = full.astype(bool)
    print(f"untrained mAP {mean_average_precision(zimg @ _unit(z0).T, truth):.3f}, "
          f"oracle {mean_average_precision(zimg @ dirs.T, truth):.3f}")
    print(f"{'hidden':>6} " + " ".join(f"{n:>7}" for n in LOSSES))
    for fraction in (0.0, 0.5, 0.8):
        seen = full.copy()
        for i, row in enumerate(full):
            seen[i, sources.hidden_of(np.flatnonzero(row), fraction, 0, 0, i)] = 0
        maps = [mean_average_precision(zimg @ _unit(train(zimg, seen, z0, n, fraction)).T, truth) for n in LOSSES]
        print(f"{fraction:>6} " + " ".join(f"{m:>7.3f}" for m in maps))


if __name__ == "__main__":
    main()
