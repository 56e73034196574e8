"""Extending vljax from outside: a config file imports one user module (tests/toy_extension.py) that
registers a loss, a data source kind and an evaluator; `python -m vljax.main` checks their config
keys, trains on the toy source with the toy loss and evaluates with the toy evaluator."""
import importlib.util
import os
import subprocess
import sys

import pytest
import toy_extension
from helpers import REPO, losses_of, tiny_config_file

from vljax import config_check, eval_builder, evaluators, factory, metrics

OFFSET = 100.0
LINES = ["import toy_extension", "toy_extension.register()",
         f"c.input.data = [dict(source={toy_extension.SOURCE!r}, n=8)]",
         f"c.loss = dict(name={toy_extension.LOSS!r}, offset={OFFSET})",
         f"c.evals = dict(geo=dict(type={toy_extension.EVALUATOR!r}, data=dict(source={toy_extension.SOURCE!r}, "
         "n=6, seed=1), repeats=3))"]


@pytest.fixture
def config_file(tmp_path):
    yield tiny_config_file(tmp_path / "toy.py", tmp_path / "shapes", steps=4, lines=LINES)
    toy_extension.unregister()  # loading the config file in this process registered them here


def load(path):
    spec = importlib.util.spec_from_file_location("toy_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow  # one end-to-end run of python -m vljax.main (about a minute)
def test_a_registered_loss_source_and_evaluator_train_and_evaluate_through_main(config_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={config_file}",
                           f"--workdir={tmp_path / 'wd'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The toy loss is what was computed: CLIP's loss on 8 pairs (about log 8) plus its offset.
    values = losses_of(tmp_path / "wd")
    assert len(values) == 4 and all(OFFSET < v < OFFSET + 10 for v in values), values
    # The model spec takes the registered loss's scoring (its `logits`).
    assert factory.read_spec(tmp_path / "wd")["logits"] == "sigmoid"
    # The toy evaluator ran on the toy source with the model's embeddings: 32 wide (the tiny
    # model's projection), the same for a record every time, different for different images.
    rows = [r for r in metrics.read_metrics(tmp_path / "wd" / "metrics.jsonl") if "toy_geometry/geo/dim" in r]
    assert len(rows) == 1
    assert rows[0]["toy_geometry/geo/dim"] == 32
    assert rows[0]["toy_geometry/geo/repeat_cos"] == pytest.approx(1.0, abs=1e-4)
    assert 1e-3 < rows[0]["toy_geometry/geo/spread"] < 2

    # The config check reads each toy's keys from its registration.
    config = load(config_file)
    config_check.validate(config)
    typos = [("loss", "offset", "offsett", r"`loss.offsett`: unknown .*did you mean `offset`"),
             ("input.data.0", "n", "nn", r"`input.data\[0\].nn`: unknown .*did you mean `n`"),
             ("evals.geo", "repeats", "repeets", r"`evals.geo.repeets`: unknown .*did you mean `repeats`"),
             ("evals.geo.data", "seed", "sed", r"`evals.geo.data.sed`: unknown .*did you mean `seed`")]
    for where, key, typo, error in typos:
        config = load(config_file)
        entry = config
        for part in where.split("."):
            entry = entry[int(part)] if part.isdigit() else entry[part]
        entry[typo] = entry[key]
        with pytest.raises(ValueError, match=error):
            config_check.validate(config)


def test_evaluator_registry_refuses_a_taken_name_and_names_an_unknown_type():
    @evaluators.register("toy_again")  # the decorator form, as vljax's own evaluator modules use it
    class Again(toy_extension.ToyGeometry):
        pass
    try:
        assert evaluators.EVALUATORS["toy_again"] is Again
        assert evaluators.register("toy_again", Again) is Again  # the same class again (a reload)
        with pytest.raises(ValueError, match="evaluator kind 'zeroshot' is already registered"):
            evaluators.register("zeroshot", Again)
        with pytest.raises(TypeError, match="is not an evaluator class"):
            evaluators.register("toy_bad", object)
        with pytest.raises(ValueError, match=r"config key `evals.x.type`: 'nope' is not one of \[.*'toy_again'"):
            eval_builder.build_one("x", dict(type="nope", data=dict(name="emoji")))
    finally:
        evaluators.EVALUATORS.pop("toy_again")
    assert "toy_bad" not in evaluators.EVALUATORS
