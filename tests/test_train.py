"""The one trainer: every recipe learns, meshes agree, a resumed run equals an uninterrupted one,
bad records are counted, bad configs are refused."""
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import REPO, fit_counting_step_compiles, losses_of, make_shapes_manifest, tiny_config

from vljax import checkpoints, config_check, metrics, perf, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")))


@pytest.mark.parametrize("recipe", ["clip", "siglip", "lit"])
def test_recipe_learns(recipe, manifest, tmp_path, caplog):
    config = tiny_config(manifest, recipe, steps=40)
    config_check.validate(config)
    trainer = train.Trainer(config, str(tmp_path))
    # The step compiles once: the state it returns has the shardings and types it was given
    # (a second compilation is what makes early steps of plain JAX loops slow).
    assert fit_counting_step_compiles(trainer, caplog) == 1
    losses = losses_of(tmp_path)
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (recipe, first, last)
    if recipe == "lit":  # trained on the locked trunk's stored features
        assert list((tmp_path / "features").glob("*/index.json"))
    # Every log row has the step's cost (vljax/perf.py), read from that one compilation.
    rows = [r for r in metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "train/loss" in r]
    assert len(rows) == 40 and all("perf/mfu" in r for r in rows)
    peak = perf.measured_matmul_flops("float32") / 1e12
    for r in rows:
        assert r["perf/step_tflops"] == rows[0]["perf/step_tflops"] > 0
        assert r["perf/peak_tflops"] == pytest.approx(peak)
        assert 0 < r["perf/memory_gb"] < 1 and 0 < r["perf/mfu"] < 1
    # the first row's step time holds the compile; later ones are steady steps
    assert max(r["perf/mfu"] for r in rows[1:]) > rows[0]["perf/mfu"]


def test_lit_cache_equals_recomputing(manifest, tmp_path):
    """A locked tower's stored features give the same training as recomputing them."""
    config = tiny_config(manifest, "lit", steps=6)
    train.train_and_evaluate(config, str(tmp_path / "cached"))
    config.lit_cache = False
    train.train_and_evaluate(config, str(tmp_path / "recomputed"))
    np.testing.assert_allclose(losses_of(tmp_path / "cached"), losses_of(tmp_path / "recomputed"),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.slow  # two runs on two meshes (about 65 s); resume and sharded init stay in the fast set
def test_same_losses_across_mesh_shapes(manifest, tmp_path):
    # A pure data mesh of 8 is the 1 x 8 run of test_two_processes_equal_one (and data x fsdp has
    # a data axis of 4 here), so two runs show what three did.
    runs = {
        "1 device": (dict(mesh=[("data", 1)]), jax.devices()[:1]),
        "data 4 x fsdp 2": (dict(mesh=[("data", 4), ("fsdp", 2)], sharding_rules=[(".*", "fsdp")]), None),
    }
    results = {}
    for name, (over, devices) in runs.items():
        config = tiny_config(manifest, "siglip", steps=5)
        config.update(over)
        workdir = str(tmp_path / name.replace(" ", "_"))
        train.train_and_evaluate(config, workdir, devices=devices)
        results[name] = losses_of(workdir)
    for name, losses in results.items():
        np.testing.assert_allclose(losses, results["1 device"], rtol=1e-4, err_msg=name)


def test_resume_equals_uninterrupted(manifest, tmp_path, monkeypatch):
    config = tiny_config(manifest, "clip", steps=8)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

    # Preempted at step 3 (as SIGTERM would): a checkpoint is saved and the run exits...
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 3)
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config, workdir)
    assert len(losses_of(workdir)) == 3
    # ... and the next run resumes from it.
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, workdir)

    np.testing.assert_allclose(losses_of(workdir), losses_of(tmp_path / "straight"), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # 50 s; test_resume_equals_uninterrupted keeps plain resumption in the fast set
def test_resume_with_stored_features_equals_uninterrupted(manifest, tmp_path, monkeypatch):
    """LiT on stored features (two views): the resumed run reuses the store and the data iterator."""
    config = tiny_config(manifest, "lit", steps=6)
    config.input.augment = dict(random_resized_crop=None, greyscale=0.5)
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 3)
    workdir = tmp_path / "resumed"
    train.train_and_evaluate(config, str(workdir))
    assert len(losses_of(workdir)) == 3
    stores = sorted(workdir.glob("features/*/*.array_record"))
    mtimes = [f.stat().st_mtime_ns for f in stores]
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    train.train_and_evaluate(config, str(workdir))
    assert [f.stat().st_mtime_ns for f in stores] == mtimes  # written once
    np.testing.assert_allclose(losses_of(workdir), losses_of(tmp_path / "straight"), rtol=1e-6, atol=1e-7)


def test_bad_records_are_counted(tmp_path):
    manifest = make_shapes_manifest(str(tmp_path / "data"), n_per=2, bad=True)
    config = tiny_config(manifest, "clip", steps=6, batch=8)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    last = metrics.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[-1]
    assert last["data/skipped/decode_error"] >= 1
    assert last["data/skipped/empty_caption"] >= 1
    assert last["data/skipped/missing_file"] >= 1


def test_config_errors_name_the_key(manifest):
    config = tiny_config(manifest)
    config.totl_steps = 3
    with pytest.raises(ValueError, match="totl_steps"):
        config_check.validate(config)
    raw = tiny_config(manifest).to_dict()
    raw["input"]["batch_size"] = "64"  # a config file's mistake (ml_collections refuses it on the command line)
    with pytest.raises(ValueError, match="input.batch_size"):
        config_check.validate(ml_collections.ConfigDict(raw))


def test_main_refuses_unknown_override_before_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vljax.main", "--config=configs/clip.py", f"--workdir={tmp_path}",
         "--config.totl_steps=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "totl_steps" in proc.stderr
    assert not os.listdir(tmp_path)  # nothing was written


def _run_main(config_py, workdir, env_devices, extra=(), timeout=600):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "vljax.main", f"--config={config_py}", f"--workdir={workdir}",
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["siglip", "lit"])
def test_two_processes_equal_one(recipe, manifest, tmp_path):
    """2 JAX processes x 4 CPU devices (jax.distributed on localhost) train exactly as 1 x 8. The
    LiT run covers three multi-process paths in one: each process writes its rows of the feature
    store (colour and greyscale views) and reads its rows of each batch; the softmax loss gathers
    across processes; and the multi-label term on label sets (the text tower's embeddings and
    block 0 locked) runs the label prompts' locked block once, on the global mesh, for every step."""
    import portpicker
    config_py = tmp_path / "tiny.py"
    config_py.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "from helpers import tiny_config\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = tiny_config({manifest!r}, {recipe!r}, steps=5)\n"
        f"    if {recipe!r} == 'lit':\n"
        "        c.input.augment = dict(random_resized_crop=None, greyscale=0.5)\n"
        "        c.loss = dict(name='softmax', multilabel_weight=1.0, multilabel_kind='bce')\n"
        "        c.input.labels = True\n"
        "        c.input.data[0]['num_labels'] = 3\n"
        "        c.model.bias_init = -10.0  # the multi-label term's b\n"
        "        c.schedule = [('img/head/.*', dict(decay_type='cosine')), ('img/.*', None),\n"
        "                      ('txt/(Embed_0|pos_embedding|Encoder_0/encoderblock_0/).*', None),\n"
        "                      ('.*', dict(decay_type='cosine'))]\n"
        "    return c\n")
    one = _run_main(config_py, tmp_path / "one", 8)
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out[-3000:]
    port = portpicker.pick_unused_port()
    procs = [_run_main(config_py, tmp_path / "two", 4,
                       (f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"))
             for i in range(2)]
    outs = []
    for p in procs:
        outs.append(p.communicate(timeout=600)[0])
        assert p.returncode == 0, outs[-1][-3000:]
    np.testing.assert_allclose(losses_of(tmp_path / "two"), losses_of(tmp_path / "one"), rtol=1e-5)
    assert len(losses_of(tmp_path / "one")) == 5
    if recipe == "lit":
        msg = "label prompts: 1 locked text blocks run once"
        assert msg in out and msg in outs[0]  # 1 x 8 devices, and process 0 of 2 x 4
        assert len(list((tmp_path / "one").glob("features/*/*.array_record"))) == 1
        assert len(list((tmp_path / "two").glob("features/*/*.array_record"))) == 2  # one per process
