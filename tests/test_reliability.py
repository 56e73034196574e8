"""Runs that cannot silently go bad: non-finite steps stop the run (or are skipped) without ever
reaching the state or a checkpoint; a damaged checkpoint falls back to the previous one; a bad
data source is refused before the workdir is written."""
import json
import os

import jax
import numpy as np
import pytest
from helpers import losses_of, make_shapes_manifest, tiny_config

from vljax import checkpoints, metrics, nonfinite, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2)


def _diverging(manifest, steps=12, **over):
    config = tiny_config(manifest, "clip", steps=steps, batch=8)
    config.lr = 1e8
    config.grad_clip_norm = None
    config.ckpt_every = 2
    config.keep_ckpts = 2
    config.update(over)
    return config


def test_nonfinite_step_stops_the_run_and_keeps_the_good_checkpoints(manifest, tmp_path):
    config = _diverging(manifest)
    workdir = str(tmp_path / "run")
    trainer = train.Trainer(config, workdir)
    with pytest.raises(nonfinite.NonFiniteError, match=r"non-finite training at step (\d+)") as info:
        trainer.fit()
    bad = info.value.step
    assert 1 <= bad < config.total_steps
    assert "last finite step" in str(info.value) or bad == 1
    # The dropped update never reached the state, and no checkpoint at or after the bad step exists.
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state["params"]))
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        steps = ckpt.all_steps()
    assert all(s < bad for s in steps)
    rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert rows[-1]["step"] == bad and rows[-1]["train/nonfinite"] == 1.0
    # The run resumes from the last good checkpoint (e.g. after the lr is fixed).
    if steps:
        config.lr = 1e-3
        resumed = train.Trainer(config, workdir)
        assert resumed.start_step == max(steps)


@pytest.mark.slow  # a trainer run (~17 s); the "stop" mode's run stays in the default set
def test_nonfinite_skip_mode_drops_updates_and_counts_them(manifest, tmp_path):
    config = _diverging(manifest, steps=6, nonfinite="skip", ckpt_every=0)
    state = train.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in metrics.read_metrics(str(tmp_path / "metrics.jsonl")) if "train/nonfinite" in r]
    assert sum(r["train/nonfinite"] for r in rows) >= 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_damaged_latest_checkpoint_resumes_from_the_previous(manifest, tmp_path):
    config = tiny_config(manifest, "clip", steps=6, batch=8)
    config.ckpt_every = 3
    config.keep_ckpts = 3
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    step6 = workdir / "checkpoints" / "6" / "params"
    for root, _, files in os.walk(step6):
        for f in files:
            if "/d/" in os.path.join(root, f):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(root, f)) // 2)
    config.total_steps = 6
    trainer = train.Trainer(config, str(workdir))
    assert trainer.start_step == 3
    assert "6.damaged-0" in os.listdir(workdir / "checkpoints")
    trainer.fit()  # trains steps 4-6 again and saves a good step 6
    assert len(losses_of(workdir)) == 6


def test_bad_manifest_is_refused_before_the_workdir_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n{not json\n")
    config = tiny_config(str(bad), "clip")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train.Trainer(config, str(workdir))
    assert not workdir.exists()
