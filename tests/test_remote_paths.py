"""Workdirs on object stores (gs:// on pods): every file vljax writes itself goes through
etils.epath. Tested with epath's gs backend patched to serve a local folder (tests/fake_gcs.py)."""
import numpy as np
from fake_gcs import fake_gcs
from helpers import tiny_config

from vljax import factory, metrics
from vljax.evaluators import plots


def test_metrics_curves_plots_and_spec_go_to_a_gs_workdir(tmp_path):
    bucket = tmp_path / "bucket"
    workdir = "gs://bucket/runs/a"
    config = tiny_config("unused.jsonl", "clip")
    with fake_gcs(tmp_path) as touched:
        writer = metrics.MetricWriter(workdir, tensorboard=False)
        for step in (1, 2, 3):
            writer.write(step, {"train/loss": 3.0 - step})
        writer.close()
        # A resumed run drops the lines after its step (object stores cannot append: rewritten).
        resumed = metrics.MetricWriter(workdir, resume_step=2, tensorboard=False)
        resumed.write(3, {"train/loss": 0.5})
        assert [r["train/loss"] for r in metrics.read_metrics(workdir + "/metrics.jsonl")] == [2.0, 1.0, 0.5]
        assert metrics.plot_curves(workdir) == workdir + "/curves.png"
        plots.plot_confusion_matrix(np.eye(3), ["a", "b", "c"], workdir + "/plots/confusion_x.png")
        spec = factory.spec_from_config(config)
        factory.write_spec(workdir, spec)
        assert factory.read_spec(workdir) == spec
    assert touched, "nothing went through the gs:// backend"
    run = bucket / "runs" / "a"
    assert (run / "metrics.jsonl").read_text().count("\n") == 3
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "plots" / "confusion_x.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / factory.SPEC_FILE).exists()
