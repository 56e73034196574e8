"""Evaluation sets held in memory for the evaluators: classification, retrieval, multi-label,
few-shot. Each returns a dict whose keys are the evaluator's constructor arguments
(vljax/eval_builder.py passes them as `**data`).

Images are preprocessed like eval batches (shorter side resized to `image_size`, centre crop,
`value_range`) into float32 [N, S, S, 3]: about N * S * S * 12 bytes (Fashion-MNIST test at
112 px: 1.5 GB), so pass `max_examples` for a quick look. Records that cannot be read are left
out (with labels and captions kept aligned). The subset from `max_examples` is the first records
in storage order, which TFDS hashes, so it is a fixed pseudo-random sample.

Dataset names: a TFDS name under data_dir, or the demo aliases "emoji", "openclipart",
"fashion_mnist". Class names are human-readable for prompts, as each demo builder documents:
emoji categories "animals and nature", subcategories "animal mammal"; openclipart categories
"animals mammals", top categories "signs and symbols"; Fashion-MNIST "t-shirt/top", "ankle boot".
"""
import numpy as np

from vljax.data import pipeline
from vljax.data import sources as sources_lib
from vljax.data import tfds_writer

ALIASES = {"emoji": "vljax_emoji", "openclipart": "vljax_openclipart",
           "fashion_mnist": "vljax_fashion_mnist"}


class _Subset:
    """Records `indices` of a source, in that order."""

    def __init__(self, source, indices):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def _open(name, split, data_dir, label_key=None) -> sources_lib.TfdsSource:
    return sources_lib.TfdsSource(ALIASES.get(name, name), split, data_dir=data_dir,
                                  label_key=label_key)


def _load(source, image_size, value_range, max_examples, batch_size=256):
    """(images f32 [M, S, S, 3], labels i32 [M], indices [M] of the readable records)."""
    src = source if max_examples is None else _Subset(source, range(min(max_examples, len(source))))
    batches = pipeline.make_eval_batches(src, batch_size=batch_size, image_size=image_size,
                                         value_range=value_range, process_index=0, process_count=1)
    # Filled in place: a list of batches concatenated at the end would double the peak memory.
    n = len(src)
    images = np.empty((n, image_size, image_size, 3), np.float32)
    labels, mask = np.empty((n,), np.int32), np.empty((n,), bool)
    for j, b in enumerate(batches):
        lo, hi = j * batch_size, min((j + 1) * batch_size, n)
        images[lo:hi], labels[lo:hi], mask[lo:hi] = (b[k][:hi - lo] for k in ("image", "label", "mask"))
    keep = np.flatnonzero(mask)
    if len(keep) < n:  # unreadable records: drop them (a copy, but a rare one)
        images, labels = images[keep], labels[keep]
    return images, labels, keep


def _default_label_key(source) -> str:
    features = source.info.features
    for key in ("label", "category"):
        if key in features:
            return key
    raise ValueError(f"{source!r}: no 'label' or 'category' feature; pass label_key")


def classification_set(name: str, split: str, image_size: int, value_range="efficientnet",
                       label_key: str | None = None, *, label: str | None = None, data_dir=None,
                       max_examples: int | None = None) -> dict:
    """{"images": f32 [N, S, S, 3], "labels": i32 [N], "class_names": list[str]}.

    label_key (or its config alias `label`): an integer ClassLabel feature; default "label",
    else "category" (emoji and openclipart also have "subcategory" / "top_category").
    """
    label_key = label_key or label or _default_label_key(_open(name, split, data_dir))
    source = _open(name, split, data_dir, label_key)
    images, labels, _ = _load(source, image_size, value_range, max_examples)
    return {"images": images, "labels": labels,
            "class_names": tfds_writer.read_class_names(source.info, label_key)}


def retrieval_set(name: str, split: str, image_size: int, value_range="efficientnet", *,
                  data_dir=None, max_examples: int | None = None, exclude: str | None = None) -> dict:
    """{"images": f32 [N, S, S, 3], "captions": N non-empty lists of str}.

    Images without any non-empty caption are left out (they cannot be retrieved by text).
    exclude: a regex; records with a caption that matches it are left out (e.g. "skin tone" keeps
    one image per emoji instead of near-duplicates that differ only in skin tone)."""
    source = _open(name, split, data_dir)
    if exclude:
        import re
        pattern = re.compile(exclude)
        kept = [i for i in range(len(source))
                if not any(pattern.search(c.decode() if isinstance(c, bytes) else str(c))
                           for c in source.raw(i)[source.caption_key])]
        source = _Subset(source, kept)
    images, _, keep = _load(source, image_size, value_range, max_examples)
    captions = [[c.strip() for c in source[int(i)]["captions"] if c.strip()] for i in keep]
    has_text = np.asarray([bool(c) for c in captions], bool)
    return {"images": images[has_text], "captions": [c for c in captions if c]}


def multilabel_set(name: str, split: str, image_size: int, value_range="efficientnet",
                   label_key: str = "tags", *, label: str | None = None, data_dir=None,
                   max_examples: int | None = None) -> dict:
    """{"images": f32 [N, S, S, 3], "labels": bool [N, K] multi-hot, "class_names": K str}.

    label_key (or `label`): a Sequence(ClassLabel) feature ("tags" in emoji and openclipart)."""
    label_key = label or label_key
    source = _open(name, split, data_dir)
    names = tfds_writer.read_class_names(source.info, label_key)
    images, _, keep = _load(source, image_size, value_range, max_examples)
    labels = np.zeros((len(keep), len(names)), bool)
    for row, i in enumerate(keep):
        labels[row, np.asarray(source.raw(int(i))[label_key], np.int64)] = True
    return {"images": images, "labels": labels, "class_names": names}


def fewshot_set(name: str, image_size: int, value_range="efficientnet",
                label_key: str | None = None, *, label: str | None = None,
                train_split: str = "train", test_split: str = "test", per_class: int = 40,
                data_dir=None, max_examples: int | None = None) -> dict:
    """{"train_images", "train_labels", "test_images", "test_labels"} for a few-shot linear probe.

    Only the first `per_class` train records of each class (storage order: a fixed pseudo-random
    sample) are loaded, enough for 25 shots plus a held-out set, instead of the whole train split
    (Fashion-MNIST's 60k images would be 9 GB at 112 px). max_examples caps the test split.
    """
    label_key = label_key or label or _default_label_key(_open(name, train_split, data_dir))
    train = _open(name, train_split, data_dir, label_key)
    chosen, counts = [], {}
    for i in range(len(train)):  # reads labels only; array_record reads are fast
        y = int(train.raw(i)[label_key])
        if counts.get(y, 0) < per_class:
            counts[y] = counts.get(y, 0) + 1
            chosen.append(i)
    train_images, train_labels, _ = _load(_Subset(train, chosen), image_size, value_range, None)
    test = _open(name, test_split, data_dir, label_key)
    test_images, test_labels, _ = _load(test, image_size, value_range, max_examples)
    return {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels}
