"""The Colab notebooks: valid, every cell compiles, and executed top to bottom (papermill, the
repository already set up as in CI) with their printed outputs checked.

`colab/vljax_scale.ipynb` runs at tiny size on 8 simulated CPU devices in the default set;
`colab/vljax_lit_demo.ipynb` trains the LiT demo at its default 500 steps (`slow`) and its
showcase photos must come out right.
"""
import ast
import json
import os
import re

import pytest
from helpers import REPO

LIT = os.path.join(REPO, "colab", "vljax_lit_demo.ipynb")
SCALE = os.path.join(REPO, "colab", "vljax_scale.ipynb")
PHOTOS = {"chelsea": "cat", "coffee": "cup of coffee", "astronaut": "astronaut", "rocket": "rocket"}
# What a quiet run never prints: absl/orbax INFO lines ("I1202 01:52:17.123 ...") and their loggers.


def _rank(entries, label) -> int:
    """Position of `label` among "label pct" entries, best first (len(entries) if absent)."""
    names = [e.strip().rsplit(" ", 1)[0] for e in entries if e.strip()]
    return names.index(label) if label in names else len(names)


NOISE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d|\borbax\b|\bINFO\b|absl", re.M)


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("path", [LIT, SCALE], ids=os.path.basename)
def test_notebook_is_valid_and_compiles(path):
    from IPython.core.inputtransformer2 import TransformerManager
    nb = _load(path)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    # Exactly one `parameters` cell (papermill injects CI's values after it), before any other code.
    tagged = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])]
    assert tagged == [0], tagged
    transform = TransformerManager().transform_cell  # `!cmd` / `%magic` lines as IPython runs them
    for i, cell in enumerate(code):
        ast.parse(transform("".join(cell["source"])), filename=f"{os.path.basename(path)} cell {i}")
        assert not cell["outputs"], f"{os.path.basename(path)} cell {i}: committed with outputs"


def _execute(path, out, parameters, monkeypatch):
    """Runs the notebook in a fresh kernel from the repository root, with this checkout's vljax and
    without the test session's simulated devices (a notebook sets up its own)."""
    import papermill  # the `test` extra; a missing one fails rather than skips
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    papermill.execute_notebook(path, str(out), parameters=parameters, cwd=REPO, kernel_name="python3",
                               progress_bar=False, log_output=False)
    return _load(out)


def _text(cell) -> str:
    """A cell's printed text (stdout and stderr), each line as it was left (a progress bar's last
    state after its carriage returns)."""
    raw = "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")
    lines = raw.replace("\r\n", "\n").split("\n")
    return "\n".join(([s for s in line.split("\r") if s] or [""])[-1] for line in lines)


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _check_quiet(nb, max_lines):
    text = "\n".join(_text(c) for c in _code_cells(nb))
    assert not NOISE.findall(text), NOISE.findall(text)[:5]
    assert len(text.splitlines()) <= max_lines, text


@pytest.mark.slow  # 50 s; test_notebook_is_valid_and_compiles checks it in the fast set
def test_scale_notebook_runs_tiny_siglip_on_an_fsdp_mesh(tmp_path, monkeypatch):
    steps = 3
    nb = _execute(SCALE, tmp_path / "scale.ipynb", dict(STEPS=steps, FSDP=4, WORKDIR=str(tmp_path / "run")),
                  monkeypatch)
    text = "\n".join(_text(c) for c in _code_cells(nb))
    assert "jax " in text and ": 8 cpu devices" in text  # the notebook's own guard simulated them
    assert "{'data': 2, 'fsdp': 4}" in text
    # The B/16 model's size, from shapes alone, and one quarter of it per device.
    m = re.search(r"SigLIP B/16: ([\d.]+) M parameters", text)
    assert m and 150 < float(m.group(1)) < 250, text
    full, per_dev = re.search(r"([\d.]+) GiB in f32.*\n.*?: ([\d.]+) GiB of params", text).groups()
    assert float(per_dev) == pytest.approx(float(full) / 4, abs=0.02)
    assert re.search(r"img/embedding/kernel\s+\(16, 16, 3, 768\).*per device \(16, 16, 3, 192\)", text)
    # The tiny run's state lives in its shards, and it trained the requested steps.
    assert re.search(r"Dense_0/kernel \(128, 512\) P\(None, 'fsdp'\) per device \(128, 128\)", text)
    assert f"{steps} logged steps" in text
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))
    _check_quiet(nb, max_lines=40)


@pytest.mark.slow
def test_lit_demo_notebook_classifies_its_photos(tmp_path, monkeypatch):
    """The whole LiT demo notebook at its default 500 steps (it trains in `WORKDIR`, a fresh
    directory): the photos of its showcase each come out first, in the Python cell and the CLI."""
    nb = _execute(LIT, tmp_path / "lit.ipynb", dict(WORKDIR=str(tmp_path / "lit")), monkeypatch)
    cells = _code_cells(nb)
    shown = {c_i: _text(c) for c_i, c in enumerate(cells)}
    print("\n".join(f"--- cell {i}\n{t}" for i, t in shown.items()))
    by_source = {"".join(c["source"]).split("\n")[0]: _text(c) for c in cells}

    train = next(t for s, t in by_source.items() if s.startswith("!python -m vljax.main"))
    assert re.search(r"train: 100%\|.*\| 500/500", train), train  # the progress bar reached the end
    with open(tmp_path / "lit" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert max(r["step"] for r in rows) == 500

    headline = next(t for s, t in by_source.items() if s.startswith("from vljax import metrics"))
    fmnist = re.search(r"zeroshot/fashion_mnist/top1\s+([\d.]+)", headline)
    # The demo reaches 24% on Fashion-MNIST's 10k test images (chance 10%).
    assert fmnist and float(fmnist.group(1)) > 0.15, headline

    showcase = next(t for c, t in zip(cells, shown.values()) if "predictor.classify(list(photos" in "".join(c["source"]))
    tops = {line.split()[0]: line.split(None, 1)[1] for line in showcase.splitlines() if line.split()[:1] and line.split()[0] in PHOTOS}
    assert set(tops) == set(PHOTOS), showcase
    for name, label in PHOTOS.items():
        assert _rank(tops[name].split("  "), label) == 0, (name, tops[name])

    cli = next(t for s, t in by_source.items() if s.startswith("!python -m vljax.inference"))
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in cli.splitlines() if ".png" in line}
    for name, label in PHOTOS.items():
        assert _rank(lines[f"{name}.png"].split("  |  "), label) == 0, lines
    _check_quiet(nb, max_lines=60)  # about 40 lines seen
