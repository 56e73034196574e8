"""Suite results on disk: one CLIP_benchmark JSON per dataset, a markdown table, and a CSV row
whose columns are those of open_clip's docs/openclip_results.csv (so rows compare).

CLIP_benchmark's layout (clip_benchmark/cli.py, 1.6.1): {"dataset", "model", "pretrained",
"task", "metrics": {...}, "language"}.
"""
from __future__ import annotations

import csv
import json
import math
import os

from vljax.suites import datasets as ds_lib

# The header of mlfoundations/open_clip docs/openclip_results.csv.
CSV_AVERAGE = "Average perf. on 38 datasets"
CSV_TITLES = ("ImageNet 1k", "Caltech-101", "CIFAR-10", "CIFAR-100", "CLEVR Counts", "CLEVR Distance",
              "Country211", "Describable Textures", "EuroSAT", "FGVC Aircraft", "Food-101", "GTSRB",
              "ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R",
              "KITTI Vehicle Distance", "MNIST", "ObjectNet", "Oxford Flowers-102", "Oxford-IIIT Pet",
              "Pascal VOC 2007", "PatchCamelyon", "Rendered SST2", "RESISC45", "Stanford Cars", "STL-10",
              "SUN397", "SVHN", "Flickr", "MSCOCO", "WinoGAViL", "iWildCam", "Camelyon17", "FMoW",
              "Dollar Street", "GeoDE")
CSV_HEADER = ("name", "pretrained", CSV_AVERAGE) + CSV_TITLES


def result_path(out_dir: str, dataset: ds_lib.Dataset) -> str:
    """`<out_dir>/<name, / -> ->_<task>.json`."""
    return os.path.join(out_dir, f"{dataset.wds_name[4:]}_{dataset.task}.json")


def result_record(dataset: ds_lib.Dataset, model: str, pretrained: str, metrics: dict) -> dict:
    return {"dataset": dataset.name, "model": model, "pretrained": pretrained, "task": dataset.task,
            "metrics": metrics, "language": "en"}


def write_result(out_dir: str, dataset: ds_lib.Dataset, record: dict) -> str:
    """Writes `record` atomically (a stopped run never leaves a half-written result)."""
    os.makedirs(out_dir, exist_ok=True)
    path = result_path(out_dir, dataset)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)  # NaN written as CLIP_benchmark's json.dump writes it
    os.replace(path + ".tmp", path)
    return path


def read_result(out_dir: str, dataset: ds_lib.Dataset, model: str) -> dict | None:
    """The stored result of `dataset`, or None; one of another model is an error."""
    path = result_path(out_dir, dataset)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("model") != model:
        raise ValueError(f"{path} holds results of model {record.get('model')!r}, not {model!r}: "
                         "give another --out")
    return record


def main_value(dataset: ds_lib.Dataset, metrics: dict) -> float | None:
    v = metrics.get(dataset.main_metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def table(rows: list[tuple[ds_lib.Dataset, dict | None, str]]) -> str:
    """A markdown table: one line per dataset (main metric, acc1 / R@1 / mAP, or why it is missing)."""
    lines = ["| dataset | task | main metric | value | status |", "|---|---|---|---|---|"]
    for dataset, metrics, status in rows:
        value = None if metrics is None else main_value(dataset, metrics)
        shown = "" if value is None else f"{value:.4f}"
        lines.append(f"| {dataset.name} | {dataset.task} | {dataset.main_metric} | {shown} | {status} |")
    return "\n".join(lines) + "\n"


def csv_row(name: str, pretrained: str, rows) -> dict:
    """The openclip_results.csv row: each column's main metric; the average only when all 38 are there."""
    row = dict.fromkeys(CSV_HEADER, "")
    row.update(name=name, pretrained=pretrained)
    for dataset, metrics, _ in rows:
        value = None if metrics is None else main_value(dataset, metrics)
        if dataset.title in CSV_TITLES and value is not None:
            row[dataset.title] = f"{value:.4f}"
    values = [row[t] for t in CSV_TITLES]
    if all(values):
        row[CSV_AVERAGE] = repr(sum(float(v) for v in values) / len(values))
    return row


def write_csv(path: str, row: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_HEADER)
        w.writeheader()
        w.writerow(row)
