"""vljax.metrics: TensorBoard scalars are written without importing torch (vljax/metrics.py)."""
import subprocess
import sys
import textwrap


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from vljax.metrics import MetricWriter, read_metrics
        w = MetricWriter({str(tmp_path)!r}, tensorboard=True)
        w.write(3, {{"train/loss": 1.5}})
        w.close()
        assert "torch" not in sys.modules, "tensorboardX pulled in torch"
        assert read_metrics({str(tmp_path / "metrics.jsonl")!r}) == [{{"step": 3, "train/loss": 1.5}}]
        import torch  # still importable afterwards: nothing of the hiding is left
        print("ok", torch.__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "torch"]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
