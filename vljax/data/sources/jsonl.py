"""`source="jsonl"`: a JSONL manifest of image paths, captions and labels."""
from __future__ import annotations

import json
import os
from pathlib import Path

from vljax.data.sources import base


def _parse_labels(obj: dict, where: str, num_labels: int | None) -> list[int]:
    """A record's label set: 'labels' (a list of class indices in [0, num_labels)), [] if absent."""
    labels = obj.get("labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in labels)):
        raise ValueError(f"{where}: 'labels' must be a list of integers (a label set), got {labels!r}")
    if num_labels is not None:
        bad = [x for x in labels if not 0 <= x < num_labels]
        if bad:
            raise ValueError(f"{where}: label {bad[0]} in 'labels' is outside [0, {num_labels}) "
                             f"(the source's `num_labels`={num_labels})")
    return labels


def _parse_manifest_line(line: str, where: str, base_dir: Path, num_labels: int | None = None) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise ValueError(f"{where}: expected an object with an 'image' path string")
    if "captions" in obj:
        caps = obj["captions"]
        if not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
            raise ValueError(f"{where}: 'captions' must be a list of strings")
    elif isinstance(obj.get("caption"), str):
        caps = [obj["caption"]]
    else:
        raise ValueError(f"{where}: needs 'captions' (list of strings) or 'caption' (string)")
    label = obj.get("label", -1)
    if not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be an integer")
    image = Path(os.path.expanduser(obj["image"]))  # "~nobody/x" stays as it is (Path raises)
    record = {"id": where, "image": str(image if image.is_absolute() else base_dir / image),
              "captions": caps, "label": label, "labels": _parse_labels(obj, where, num_labels)}
    if "regions" in obj:  # LocCa's regions (vljax/data/locca.py)
        record["regions"] = _parse_regions(obj["regions"], where)
    return record


def _parse_regions(regions, where: str) -> list:
    """[{"box": [ymin, xmin, ymax, xmax] in [0, 1], "caption": str}, ...] -> [(box, caption)]."""
    out = []
    for r in regions if isinstance(regions, list) else [None]:
        box = r.get("box") if isinstance(r, dict) else None
        ok = (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
              and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 and isinstance(r.get("caption"), str))
        if not ok:
            raise ValueError(f"{where}: 'regions' must be a list of {{'box': [ymin, xmin, ymax, xmax] "
                             f"in [0, 1] with min < max, 'caption': str}}, got {r!r}")
        out.append((tuple(float(v) for v in box), r["caption"]))
    return out


@base.register("jsonl")
class JsonlSource(base.Source):
    """A JSONL manifest, one object a line:
    `{"image": path, "captions": [...] | "caption": str, "label": int?, "labels": [int, ...]?,
    "regions": [{"box": [ymin, xmin, ymax, xmax], "caption": str}, ...]?}` (regions: LocCa);
    relative image paths are relative to the manifest's folder. Blank lines are ignored.
    `labels` is a label set (class indices); `num_labels` (K) declares the label space, and then
    every index must be in [0, K) (named by `file:line` when not). A record without `labels` has
    an empty set (unlabeled). `class_names` (a list, or a file of one name a line) names the
    integer `label`s (for evaluators), and then every label must be one of them.

    The manifest is parsed at construction: a malformed line raises ValueError naming
    `file:line`. Image files are only opened at read time (a missing one is counted, not fatal).
    Config key `path` is the manifest.
    """
    REQUIRED = ("path",)
    OPTIONAL = ("num_labels", "class_names")
    LABEL_HINTS = {"label": "path` (its records have no integer 'label')",
                   "labels": "num_labels` (and 'labels' lists in its records)"}

    def __init__(self, path, num_labels: int | None = None, class_names=None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL manifest {self.path} does not exist")
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                       or num_labels <= 0):
            raise ValueError(f"JSONL manifest {self.path}: num_labels must be a positive integer, got {num_labels!r}")
        base_dir = self.path.parent
        with open(self.path, encoding="utf-8") as f:
            self.records = [_parse_manifest_line(line, f"{self.path}:{i}", base_dir, num_labels)
                            for i, line in enumerate(f, 1) if line.strip()]
        if not self.records:
            raise ValueError(f"JSONL manifest {self.path} has no records")
        if num_labels is not None:
            if not any(r["labels"] for r in self.records):
                raise ValueError(f"num_labels={num_labels}: no record of JSONL manifest {self.path} has "
                                 "'labels' (a label set); every record would be unlabeled")
        self.num_labels = num_labels
        self.label_names = None if num_labels is None else [str(i) for i in range(num_labels)]
        self.has_label = any(r["label"] >= 0 for r in self.records)
        self.names = None if class_names is None else base.read_class_names(class_names, f"JSONL manifest {self.path}")
        if self.names is not None:
            for r in self.records:
                if not 0 <= r["label"] < len(self.names):
                    raise ValueError(f"{r['id']}: 'label' {r['label']} is not one of the "
                                     f"{len(self.names)} class_names")

    def gives_label(self) -> bool:
        return self.has_label

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[index])

    def cache_key(self) -> str:
        return base.digest("jsonl", str(self.path))

    def class_names_of(self, key: str | None = None) -> list[str]:
        self._no_key(key, "label")
        if self.names is None:
            raise ValueError(f"{self!r}: its integer labels have no names; give the source "
                             "`class_names` (a list, or a file of one name a line)")
        return list(self.names)

    def __repr__(self):
        return f"JsonlSource({str(self.path)!r}, n={len(self)})"
