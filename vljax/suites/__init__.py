"""The standard zero-shot benchmark suite: `imagenet`, `vtab+`, `retrieval`, `datacomp`, `voc2007`.

    python -m vljax.evaluate --model=WORKDIR --suite=imagenet --data_dir=/data --out=/tmp/suite

`datasets.DATASETS` (each dataset's TFDS copy, webdataset copy, class names, templates, metric),
`suites.SUITES` (the lists), `entries.evaluator` (a dataset's vljax evaluator), `runner.run_suite`
(results per dataset, resumable; table, CLIP_benchmark JSON, openclip_results.csv row). Class
names and templates: CLIP_benchmark 1.6.1's (vljax/suites/data/README.md).
"""
from vljax.suites.datasets import DATASETS, Dataset, Tfds
from vljax.suites.entries import NotPrepared
from vljax.suites.runner import SuiteReport, run_suite
from vljax.suites.suites import SUITES, suite

__all__ = ["DATASETS", "SUITES", "Dataset", "NotPrepared", "SuiteReport", "Tfds", "run_suite", "suite"]
