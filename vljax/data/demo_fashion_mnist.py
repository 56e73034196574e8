"""`vljax_fashion_mnist`: Fashion-MNIST (Debian dataset-fashion-mnist) as a TFDS array_record set.

Splits train (60,000) and test (10,000), as published. Features: id ("train/123"), image (PNG,
28x28 greyscale; decoders give RGB), captions (the class name, e.g. "ankle boot"), label (10
classes). Class names are the official ones (from the dataset's README); the readable names
used for prompts are lowercased ("t-shirt/top", "ankle boot").
"""
import gzip
from pathlib import Path

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vljax.data import tfds_writer as W

NAME = "vljax_fashion_mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian ubyte tensor, optionally gzipped) -> uint8 array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path}: not an IDX ubyte file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {arr.size} bytes of data for shape {shape} (truncated?)")
    return arr.reshape(shape)


def make_spec(root) -> W.DatasetSpec:
    """root: /usr/share/datasets/fashion-mnist."""
    root = Path(root)
    for images, labels in _FILES.values():
        for f in (images, labels):
            if not (root / f).is_file():
                raise FileNotFoundError(f"{root / f} missing: install Debian dataset-fashion-mnist")

    def examples(split: str):
        images, labels = (read_idx(root / f) for f in _FILES[split])
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
        for i, (img, label) in enumerate(zip(images, labels)):
            key = f"{split}/{i}"
            yield key, {"id": key, "image": W.encode_png(Image.fromarray(img)),
                        "captions": [CLASS_NAMES[label].lower()], "label": int(label)}

    return W.DatasetSpec(
        name=NAME,
        description=__doc__,
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        features={
            "id": tfds.features.Text(),
            "image": W.png_bytes_feature(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        },
        splits={s: (lambda s=s: examples(s)) for s in _FILES},
        class_names={"label": [c.lower() for c in CLASS_NAMES]},
    )
