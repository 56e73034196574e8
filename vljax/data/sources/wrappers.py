"""Sources derived from other sources (stored features, hidden labels), and the label space several
sources share."""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from vljax.data.sources import base


class WithFeatures:
    """A source whose records carry a locked trunk's stored features instead of the image, so no
    image is decoded: `"features": f32 [V, F]` (views, vljax/features.py; and `"tokens"` [V, N, W]
    from a store with tokens), or `"features_skip": reason`
    when the store could not read the image (counted as that reason, after the caption check, as
    the image pipeline counts it)."""

    def __init__(self, source, features, where: str = "config.input.data"):
        if len(source) != len(features):
            raise ValueError(f"{where}: {source!r} has {len(source)} records but its feature store "
                             f"{features!r} has {len(features)}")
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        record.pop("image", None)
        if "error" not in record:
            f = self.features[index]
            record.update({k: f[k] for k in ("features", "tokens") if k in f} if "features" in f
                          else {"features_skip": f["error"]})
        return record

    def cache_key(self) -> str:
        return base.digest("with_features", base.cache_key(self.source))

    def missing_labels(self, field: str) -> str | None:
        return base.missing_labels(self.source, field)

    def __repr__(self):
        return f"WithFeatures({self.source!r}, {self.features!r})"


def label_space(sources_: list) -> list[str]:
    """The label names of one label space shared by `sources_` (the sorted union of their label
    sets' names, so the tag "cat" of two datasets is one class); raises naming the config entry
    of a source without label sets."""
    names = set()
    for i, src in enumerate(sources_):
        why = base.missing_labels(src, "labels")
        if why:
            raise ValueError(f"config key `input.data[{i}].{why}: `input.labels` takes label sets, "
                             f"but {src!r} has none")
        names.update(src.label_names)
    return sorted(names)


class LabelsIn:
    """record -> record with its label set's indices mapped into a shared label space
    (`label_space`). Picklable (grain workers)."""

    def __init__(self, source_names: list[str], space: list[str]):
        index = {n: i for i, n in enumerate(space)}
        self.table = [index[n] for n in source_names]

    def __call__(self, record: dict) -> dict:
        return {**record, "labels": [self.table[x] for x in record.get("labels", [])]}


def check_hide_labels(hide, where: str = "input.hide_labels") -> tuple[float, int]:
    """(fraction, seed) of a `config.input.hide_labels = dict(fraction=f, seed=s)` entry; raises
    naming the key for anything else (fraction in [0, 1), an integer seed)."""
    if hasattr(hide, "keys") and not isinstance(hide, Mapping):  # a ConfigDict
        hide = {k: hide[k] for k in hide.keys()}
    if not isinstance(hide, Mapping) or set(hide) != {"fraction", "seed"}:
        raise ValueError(f"config key `{where}`: takes dict(fraction=f, seed=s), got {hide!r}")
    fraction, seed = hide["fraction"], hide["seed"]
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"config key `{where}.fraction`: {fraction!r} is not a fraction in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"config key `{where}.seed`: {seed!r} is not a non-negative integer")
    return float(fraction), int(seed)


def hidden_of(labels, fraction: float, seed: int, source_index: int, index: int) -> list[int]:
    """The labels of record `index` of source `source_index` that are hidden: each distinct label
    independently with probability `fraction`, drawn from a generator seeded by (seed, source,
    record), so the hidden set depends on nothing else (order of reading, workers, processes).
    Sorted label indices (the source's own)."""
    distinct = sorted({int(x) for x in labels})
    if not distinct or fraction <= 0.0:
        return []
    draws = np.random.default_rng([seed, source_index, index]).random(len(distinct))
    return [x for x, u in zip(distinct, draws) if u < fraction]


class HideLabels:
    """A source whose records' label sets lose their hidden labels (`hidden_of`): partial labels
    for training (`config.input.hide_labels`); everything else of the record unchanged. Picklable
    (grain workers)."""

    def __init__(self, source, fraction: float, seed: int, source_index: int = 0):
        self.source, self.fraction, self.seed, self.source_index = source, fraction, seed, source_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        if record.get("labels"):
            hidden = set(hidden_of(record["labels"], self.fraction, self.seed, self.source_index, index))
            record["labels"] = [x for x in record["labels"] if x not in hidden]
        return record

    def cache_key(self) -> str:
        return base.cache_key(self.source)  # the same images

    def missing_labels(self, field: str) -> str | None:
        return base.missing_labels(self.source, field)

    def __repr__(self):
        return f"HideLabels({self.source!r}, fraction={self.fraction}, seed={self.seed})"


def hidden_labels_record(opened: list, fraction: float, seed: int) -> dict:
    """What `HideLabels` hides from each of the `opened` sources (config.input.data, in order), as
    written to `<workdir>/hidden_labels.json`: {"fraction", "seed", "sources": [{"source": repr,
    "records", "positives", "hidden" (counts), "hidden_by_record": {index: [label names]}}]}.
    Reads each record's label set without decoding its image (`label_set_of`)."""
    out = {"fraction": fraction, "seed": seed, "sources": []}
    for i, src in enumerate(opened):
        names = list(src.label_names)
        by_record, positives = {}, 0
        for index in range(len(src)):
            labels = src.label_set_of(index)
            positives += len(set(labels))
            hidden = hidden_of(labels, fraction, seed, i, index)
            if hidden:
                by_record[str(index)] = [names[x] for x in hidden]
        out["sources"].append(dict(source=repr(src), records=len(src), positives=positives,
                                   hidden=sum(len(v) for v in by_record.values()),
                                   hidden_by_record=by_record))
    return out
