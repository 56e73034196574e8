"""Runs a suite on a model: dataset by dataset, each result written as it finishes and skipped
when already there (a stopped suite resumes where it stopped), a dataset that is not prepared
reported with the command that prepares it while the others run.

Writes, under `out_dir`: `<name>_<task>.json` per dataset (CLIP_benchmark's layout,
vljax/suites/writers.py), `<suite>.md` (the table, also printed) and `<suite>.csv` (one row with
the columns of open_clip's openclip_results.csv).
"""
from __future__ import annotations

import dataclasses
import os
import time

from vljax import logs
from vljax.suites import entries, scores, suites, writers


@dataclasses.dataclass
class SuiteReport:
    rows: list            # (Dataset, metrics or None, status) in suite order
    missing: dict         # dataset name -> why and how to prepare it
    computed: list        # names run in this call (not read back from out_dir)
    table: str            # markdown
    csv_row: dict


def run_suite(embedder, suite_name: str, *, out_dir: str, model: str, pretrained: str = "",
              data_dir=None, max_examples: int | None = None) -> SuiteReport:
    """Runs suite `suite_name` (vljax/suites/suites.py) with `embedder` (evaluators.base.Embedder).

    Args:
      out_dir: where results go; a result already there for `model` is read, not recomputed.
      model / pretrained: the JSON's "model" / "pretrained" fields and the CSV's name columns.
      data_dir: webdataset directories and / or TFDS data (vljax/suites/entries.py).
      max_examples: the first records of each dataset only (quick checks; results then differ
        from the published ones).
    """
    rows, missing, computed = [], {}, []
    for dataset in suites.suite(suite_name):
        record = writers.read_result(out_dir, dataset, model)
        if record is not None:
            rows.append((dataset, record["metrics"], "read back"))
            continue
        try:
            evaluator = entries.evaluator(dataset, data_dir, max_examples)
        except entries.NotPrepared as e:
            missing[dataset.name] = str(e)
            logs.info("suite %s: skipped %s", suite_name, e)
            rows.append((dataset, None, f"missing: {e}"))
            continue
        start = time.perf_counter()
        metrics = scores.compute(dataset.name, evaluator, embedder)
        writers.write_result(out_dir, dataset, writers.result_record(dataset, model, pretrained, metrics))
        computed.append(dataset.name)
        rows.append((dataset, metrics, f"computed in {time.perf_counter() - start:.1f} s"))
    table = writers.table(rows)
    row = writers.csv_row(model, pretrained, rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{suite_name}.md"), "w") as f:
        f.write(table)
    writers.write_csv(os.path.join(out_dir, f"{suite_name}.csv"), row)
    return SuiteReport(rows, missing, computed, table, row)
