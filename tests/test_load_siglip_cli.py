"""The command lines on a SigLIP directory and a SigLIP 2 NaFlex directory: `vljax.inference
classify` and `vljax.evaluate`'s function in process (test_cli.py runs their plumbing as
subprocesses), zero-shot and retrieval on a folder; `python -m vljax.evaluate --model=DIR
--config=...` itself as a subprocess in the slow set."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import REPO  # noqa: E402
from siglip_dirs import siglip2_dir, siglip_dir  # noqa: E402
from test_naflex import random_images  # noqa: E402

from vljax import evaluate as evaluate_lib  # noqa: E402
from vljax import factory  # noqa: E402
from vljax.data import transforms as T  # noqa: E402
from vljax.inference import Predictor, cli  # noqa: E402

LABELS = ["cat", "dog"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip_cli")
    photos = root / "photos"
    for label, seed in zip(LABELS, (1, 2)):
        (photos / label).mkdir(parents=True)
        for i, im in enumerate(random_images([(20, 40), (30, 18)], seed=seed)):
            T.Image.fromarray(im).save(photos / label / f"{i}.png")
            (photos / label / f"{i}.txt").write_text(f"a photo of a {label} number {i}")
    return {"siglip": siglip_dir(root)[0], "siglip2": siglip2_dir(root)[0], "photos": photos}


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_classify_command(setup, name, capsys):
    files = [str(setup["photos"] / "cat" / "0.png"), str(setup["photos"] / "dog" / "1.png")]
    extra = ["--max-num-patches=9"] if name == "siglip2" else []
    assert cli(["classify", f"--model={setup[name]}", "--labels=cat,dog", "--templates=name",
                "--top-k=2", *extra, *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pred = Predictor.load(str(setup[name]), **({"max_num_patches": 9} if extra else {}))
    top = pred.classify(files, LABELS, templates="name", top_k=2)
    assert len(lines) == 2
    for line, row in zip(lines, top):  # the printed percentages are the Predictor's
        assert line.split()[1:3] == [row[0][0], f"{row[0][1]:.1%}"]


EVALS = ("    data = dict(source='folder', path=%r, label_from_folder=True)\n"
         "    return ml_collections.ConfigDict(dict(eval_batch_size=4, evals=dict(\n"
         "        zs=dict(type='zeroshot', data=data, templates='name'),\n"
         "        ret=dict(type='retrieval', data=dict(source='folder', path=%r)))))\n")
KEYS = ["zeroshot/zs/top1", "retrieval/ret/i2t_r1", "retrieval/ret/t2i_r1"]


def _config_file(setup, tmp_path):
    cfg = tmp_path / "evals.py"
    photos = str(setup["photos"])
    cfg.write_text("import ml_collections\n\ndef get_config():\n" + EVALS % (photos, photos))
    return cfg


def _check(metrics):
    assert set(KEYS) <= set(metrics), sorted(metrics)
    for k in KEYS:  # 4 images of 2 classes: accuracies are multiples of 1/4
        assert np.isfinite(metrics[k]) and 0 <= metrics[k] <= 1, (k, metrics[k])
        assert metrics[k] * 4 == pytest.approx(round(metrics[k] * 4)), (k, metrics[k])


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_evaluate_runs_zero_shot_and_retrieval(setup, name, tmp_path):
    """`vljax.evaluate`'s function on the loaded directory (the command's path, in process)."""
    spec = importlib.util.spec_from_file_location("evals_cfg", _config_file(setup, tmp_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _check(evaluate_lib.evaluate(factory.load(setup[name]), module.get_config()))


@pytest.mark.slow  # a subprocess: JAX's import and the compiles take ~20-35 s on 2 shared cores;
def test_evaluate_command_on_a_naflex_directory(setup, tmp_path):  # the test above runs in-process
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--model={setup['siglip2']}",
                           f"--config={_config_file(setup, tmp_path)}", "--max_num_patches=16",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(out.read_text()))
