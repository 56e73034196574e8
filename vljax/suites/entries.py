"""Where a suite dataset is read from (a webdataset directory or TFDS) and its evaluator.

Under `data_dir`, a CLIP_benchmark-style directory `<data_dir>/wds_<name>/` (test/*.tar,
classnames.txt, zeroshot_classification_templates.txt) wins; else the dataset's TFDS copy under
`data_dir` (TFDS's default directory without one). A dataset found in neither, a TFDS copy that is
not array_record, or a webdataset directory that cannot be read raises `NotPrepared` naming the
commands that prepare it. The evaluators are vljax's own (zeroshot, retrieval,
multilabel), built from the source, labels and class names read here.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from vljax import logs
from vljax.evaluators import data as data_lib
from vljax.evaluators.multilabel import MultilabelEvaluator
from vljax.evaluators.retrieval import RetrievalEvaluator
from vljax.evaluators.zeroshot import ZeroShotEvaluator
from vljax.suites import datasets as ds_lib
from vljax.suites import labels as labels_lib
from vljax.suites import tables, views

IMAGE_KEYS = "webp;png;jpg;jpeg"


class NotPrepared(Exception):
    """A dataset with no data under --data_dir; the message says how to prepare it."""


def wds_dir(dataset: ds_lib.Dataset, data_dir) -> str | None:
    return None if not data_dir else os.path.join(os.fspath(data_dir), dataset.wds_name)


def wds_entry(dataset: ds_lib.Dataset, data_dir) -> dict:
    """The "webdataset" source entry of `dataset`'s CLIP_benchmark directory under `data_dir`."""
    d = wds_dir(dataset, data_dir)
    entry = dict(source="webdataset", urls=f"{d}/test/*.tar", image_key=IMAGE_KEYS)
    if dataset.task == ds_lib.RETRIEVAL:
        return {**entry, "caption_key": "txt", "caption_lines": True}
    return {**entry, "label_key": "cls", "class_names": f"{d}/classnames.txt"}


def tfds_entry(dataset: ds_lib.Dataset, data_dir) -> dict:
    t = dataset.tfds
    entry = dict(source="tfds", name=t.name, split=t.split, label_key=t.label_key,
                 labels_key=t.labels_key, caption_key=t.caption_key)
    return {**entry, **({"data_dir": os.fspath(data_dir)} if data_dir else {})}


def prepare_hint(dataset: ds_lib.Dataset, data_dir) -> str:
    """How to prepare `dataset`: its webdataset copy, and its TFDS build where TFDS has it."""
    where = wds_dir(dataset, data_dir) or f"<data_dir>/{dataset.wds_name}"
    ways = [f"huggingface-cli download --repo-type dataset {dataset.repo} --local-dir {where}"]
    if dataset.tfds is not None:
        tfds_dir = f" --data_dir={os.fspath(data_dir)}" if data_dir else ""
        manual = f" (first put {dataset.tfds.manual})" if dataset.tfds.manual else ""
        manual = manual.replace("<data_dir>", os.fspath(data_dir)) if data_dir else manual
        ways.append(f"tfds build {dataset.tfds.name}{tfds_dir} --file_format=array_record{manual} "
                    "(building image sets needs TensorFlow: pip install tensorflow-cpu)")
    return " or ".join(ways)


def entry(dataset: ds_lib.Dataset, data_dir) -> dict:
    """The source entry `dataset` is read from (see the module docstring); NotPrepared when
    there is none."""
    d = wds_dir(dataset, data_dir)
    if d is not None and os.path.isdir(d):
        return wds_entry(dataset, data_dir)
    if dataset.tfds is None:
        raise NotPrepared(f"{dataset.name}: no {d or dataset.wds_name}; prepare it with "
                          f"{prepare_hint(dataset, data_dir)}")
    return tfds_entry(dataset, data_dir)


def _tfds_prepared(dataset, spec) -> None:
    """NotPrepared unless TFDS has `dataset`'s split as array_record under its data_dir. Probed with
    download=False: `tfds.data_source` otherwise downloads and prepares a registered dataset that
    is not there (offline, it retries for minutes; online, it fetches ImageNet-scale archives)."""
    try:
        tfds.data_source(spec["name"], split=spec["split"], data_dir=spec.get("data_dir"), download=False)
    except Exception as e:  # tfds raises several types (NotImplementedError for a missing copy, ...)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" Possible root causes")[0]
        where = spec.get("data_dir") or "TFDS's default data_dir"
        raise NotPrepared(f"{dataset.name}: no array_record copy of TFDS {spec['name']!r} split "
                          f"{spec['split']!r} under {where} (tfds: {why}); prepare it with "
                          f"{prepare_hint(dataset, spec.get('data_dir'))}") from None


def _open(dataset, data_dir):
    spec = entry(dataset, data_dir)
    if spec["source"] == "tfds":
        _tfds_prepared(dataset, spec)
    try:
        source = data_lib.open_entry(dataset.name, spec)
    except (OSError, ValueError) as e:
        if spec["source"] != "webdataset":
            raise
        # A webdataset directory without its shards or classnames.txt is not prepared either.
        raise NotPrepared(f"{dataset.name}: {wds_dir(dataset, data_dir)} cannot be read ({e}); prepare it "
                          f"with {prepare_hint(dataset, data_dir)}") from None
    if spec["source"] == "tfds" and dataset.tfds.image_scale != 1:
        source = views.ScaledImages(source, dataset.tfds.image_scale)
    return spec, source


def _templates(dataset, spec) -> list[str]:
    """A webdataset copy's own zeroshot_classification_templates.txt where it has one (as
    CLIP_benchmark reads a wds/ set), else the table's templates of the dataset."""
    if spec["source"] == "webdataset":
        path = os.path.join(os.path.dirname(os.path.dirname(spec["urls"])), "zeroshot_classification_templates.txt")
        if os.path.isfile(path):
            with open(path) as f:
                return [t.strip().replace("{c}", "{}") for t in f if t.strip()]
    if dataset.templates is None:
        raise NotPrepared(f"{dataset.name}: no zeroshot_classification_templates.txt in its webdataset "
                          f"directory (DataComp's copies ship their templates there)")
    return tables.templates(dataset.templates)


def _classification(dataset, spec, source, max_examples):
    t = dataset.tfds if spec["source"] == "tfds" else None
    key = t.label_key if t else None
    if dataset.class_names is not None and t is not None:  # a webdataset copy has its classnames.txt
        names = tables.class_names(dataset.class_names)
    else:
        names = tables.clean_names(t.names if t else None, source.class_names_of(key))
    if t is not None and t.derive:
        labels = [labels_lib.derived(t.derive, data_lib.raw_record(source, i)) for i in range(len(source))]
    else:
        labels = [source.label_of(i, key) for i in range(len(source))]
    if t is not None and t.subset:  # ImageNet-1k labels -> the subset's classes
        keep = tables.imagenet_subset(t.subset)
        position = {c: j for j, c in enumerate(keep)}
        labels, names = [position.get(y, -1) for y in labels], [names[c] for c in keep]
    elif t is not None and not t.derive and len(source.class_names_of(key)) != len(names):
        raise ValueError(f"{dataset.name}: {len(names)} class names ({dataset.class_names!r}) but TFDS "
                         f"{t.name!r} feature {key!r} has {len(source.class_names_of(key))} classes")
    rows = [i for i, y in enumerate(labels) if 0 <= y < len(names)]
    if len(rows) < len(labels):  # a label outside the task's classes (an ImageNet subset, VTAB's
        # bins) or none (a record whose features disagree): the record is left out and counted
        logs.info("%s: %d of %d records have a label outside its %d classes: left out",
                  dataset.name, len(labels) - len(rows), len(labels), len(names))
        source, labels = data_lib.Subset(source, rows), [labels[i] for i in rows]
    if max_examples is not None:
        source, labels = data_lib.first(source, max_examples), labels[:max_examples]
    if not labels:
        raise NotPrepared(f"{dataset.name}: no record with a label among its {len(names)} classes")
    return ZeroShotEvaluator(source, labels, names, name=dataset.name, templates=_templates(dataset, spec),
                             canonicalize=False, ks=(1, 5) if len(names) >= 5 else (1,))


def _retrieval(dataset, source, max_examples):
    rows = [(i, [c.strip() for c in source.captions_of(i) if c.strip()]) for i in range(len(source))]
    rows = [(i, caps) for i, caps in rows[:max_examples] if caps]
    return RetrievalEvaluator(data_lib.Subset(source, [i for i, _ in rows]), [c for _, c in rows],
                              name=dataset.name, ks=(1, 5, 10))


def _multilabel(dataset, spec, source, max_examples):
    key = dataset.tfds.labels_key if spec["source"] == "tfds" else None
    names = source.label_set_names(key)
    source = data_lib.first(source, max_examples)
    labels = [np.asarray(source.label_set_of(i, key), np.int64) for i in range(len(source))]
    return MultilabelEvaluator(source, labels, names, name=dataset.name, canonicalize=False,
                               templates=_templates(dataset, spec), ks=(1,))


def evaluator(dataset: ds_lib.Dataset, data_dir=None, max_examples: int | None = None):
    """The vljax evaluator of `dataset` read from `data_dir` (module docstring), over its first
    `max_examples` records (all for None). NotPrepared when its data is not there or vljax cannot
    score it (`dataset.unsupported`)."""
    if dataset.unsupported:
        raise NotPrepared(f"{dataset.name}: {dataset.unsupported}")
    spec, source = _open(dataset, data_dir)
    if dataset.task == ds_lib.RETRIEVAL:
        return _retrieval(dataset, source, max_examples)
    if dataset.task == ds_lib.MULTILABEL:
        return _multilabel(dataset, spec, source, max_examples)
    return _classification(dataset, spec, source, max_examples)
