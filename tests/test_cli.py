"""The command-line tools: on bad input (an unreadable image, a missing model) one line naming the
file and the reason, no traceback, the other images still processed, an exit status that says so;
a training run's output is a few lines and progress bars, not the libraries' INFO logs."""
import os
import re
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from helpers import REPO, make_shapes_manifest, tiny_config, tiny_config_file

from vljax import evaluate, soup, train, wise_ft
from vljax.inference import cli

LABELS = "red circle,green square,blue triangle"


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (and a tiny IDAT) for a width x height RGB image: a decompression bomb
    when large, a few hundred bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    manifest = make_shapes_manifest(str(root / "shapes"), n_per=1)
    config = tiny_config(manifest, "clip", steps=4, batch=8)
    train.Trainer(config, str(root / "wd"), devices=jax.devices()[:1]).fit()
    good = str(root / "shapes" / "red_circle_0.png")
    with open(good, "rb") as f:
        png = f.read()
    bad = {"random.png": np.random.default_rng(0).bytes(2048), "empty.png": b"",
           "truncated.png": png[: len(png) // 2], "bomb.png": png_claiming(30000, 30000)}
    reasons = {"random.png": "unknown image format", "empty.png": "empty file",
               "truncated.png": "truncated or corrupt data", "bomb.png": "decompression bomb",
               "missing.png": "file not found"}
    paths = {}
    for name, data in bad.items():
        paths[name] = str(root / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    paths["missing.png"] = str(root / "missing.png")
    return str(root / "wd"), good, paths, reasons


def _run(module, args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _assert_one_line_each(stderr, paths, reasons):
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    for name, path in paths.items():
        mine = [ln for ln in lines if path in ln]
        assert len(mine) == 1, (name, stderr[-3000:])
        assert mine[0].startswith(f"{path}: cannot read image ({reasons[name]}"), mine[0]
        assert mine[0].endswith(")")


def test_classify_reports_each_unreadable_image_and_classifies_the_others(model_and_images, capsys):
    workdir, good, bad, reasons = model_and_images
    files = [bad["random.png"], good, bad["empty.png"], bad["truncated.png"], bad["bomb.png"],
             bad["missing.png"]]
    # In process (a subprocess costs 20 s here): an exception would fail the test, and stderr is captured.
    assert cli(["classify", f"--model={workdir}", f"--labels={LABELS}", "--top-k=2", *files]) == 1
    captured = capsys.readouterr()
    _assert_one_line_each(captured.err, bad, reasons)
    out = captured.out.strip().splitlines()
    assert len(out) == 1 and out[0].split()[0] == "red_circle_0.png", captured.out
    assert out[0].count("%") == 2


def test_embed_writes_the_readable_images_and_fails_softly(model_and_images, tmp_path, capsys):
    workdir, good, bad, reasons = model_and_images
    out = str(tmp_path / "z.npy")
    assert cli(["embed", f"--model={workdir}", f"--out={out}", good, bad["bomb.png"], good, bad["empty.png"]]) == 1
    _assert_one_line_each(capsys.readouterr().err, {k: bad[k] for k in ("bomb.png", "empty.png")}, reasons)
    z = np.load(out)
    assert z.shape[0] == 2
    np.testing.assert_allclose(z[0], z[1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_a_missing_model_is_one_line(tmp_path, model_and_images):
    _, good, _, _ = model_and_images
    missing = str(tmp_path / "no_model")
    for module, args, code in [
            ("vljax.inference", ["classify", f"--model={missing}", f"--labels={LABELS}", good], 2),
            ("vljax.evaluate", [f"--model={missing}"], 1),
            ("vljax.evaluate", [f"--model={missing}", f"--config={REPO}/configs/lit.py"], 1)]:
        proc = _run(module, args)
        assert proc.returncode == code, (module, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if missing in ln]
        assert len(lines) == 1 and "config.json" in lines[0], proc.stderr[-3000:]


# Each entry point's own flags, defined on import on a module-private FlagValues (vljax/cliflags.py).
ENTRY_FLAGS = {evaluate: ("model", "config", "evals", "out", "plot_dir"),
               soup: ("workdirs", "all_steps", "config", "select_metric", "out", "save"),
               wise_ft: ("zeroshot", "finetuned", "alphas", "config", "id_metric", "ood_metric", "out")}


def test_entry_points_that_share_flag_names_import_together_and_list_them_in_help():
    # All three are imported in this process, each with its own --config: no DuplicateFlagError.
    for module, names in ENTRY_FLAGS.items():
        assert set(names) <= set(module._FLAGS), module.__name__
    proc = _run("vljax.evaluate", ["--help"])
    for name in ENTRY_FLAGS[evaluate]:
        assert f"--{name}:" in proc.stdout, proc.stdout[-3000:]
    proc = _run("vljax.soup", ["--out=/tmp/x"])  # a required flag missing: absl's one-line error
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Flag --workdirs must have a value other than None" in proc.stderr, proc.stderr[-3000:]


def _screen_lines(stderr):
    """stderr without progress-bar redraws (tqdm rewrites its line with carriage returns)."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not re.search(r"\d+%\|", p)]


@pytest.mark.slow
def test_main_prints_a_few_lines_unless_verbosity_asks(tmp_path):
    cfg = tiny_config_file(tmp_path / "tiny.py", tmp_path / "shapes", lines=["c.ckpt_every, c.progress = 2, True"])
    runs = {}
    for name, extra in (("quiet", []), ("verbose", ["--verbosity=0"])):
        proc = _run("vljax.main", [f"--config={cfg}", f"--workdir={tmp_path / name}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _screen_lines(proc.stderr)
    absl_info = re.compile(r"^I\d{4} ")
    quiet = runs["quiet"]
    assert not [ln for ln in quiet if absl_info.match(ln)], quiet
    assert len(quiet) <= 5, quiet  # the JAX line and the final line naming the outputs
    assert quiet[-1].split("] ", 1)[1].startswith("train: ") and str(tmp_path / "quiet") in quiet[-1]
    # A CPU run through the CLI keeps freed host memory (vljax/hostmem.py) and says so.
    from vljax import hostmem
    if not hostmem.accelerator_possible() and hostmem.setting() is None:
        assert any("host memory: freed blocks kept" in ln for ln in quiet), quiet
    # --verbosity brings the libraries' INFO logs back (orbax logs every checkpoint save).
    assert len([ln for ln in runs["verbose"] if absl_info.match(ln)]) > 10
