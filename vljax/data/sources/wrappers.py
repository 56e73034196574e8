"""Sources derived from other sources, and the label space several sources share."""
from __future__ import annotations

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
