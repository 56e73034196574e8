"""vljax.objective, the one place a loss name is resolved: a loss registered from outside vljax (one
`register` call) is what the step computes, its options are the config keys it accepts, and an
unknown name or key is refused with an error naming it. A registered loss trains through
`python -m vljax.main`: tests/test_extensions.py. An in-tree loss is one entry of its family
module's `LOSSES`: every declared loss is registered as declared, and a family module added to
vljax/losses is picked up with no other edit."""
import importlib
import importlib.util
import pkgutil
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import tiny_config

from vljax import config_check, factory, losses, objective, sharding

TOY = "toy_scaled_softmax"


def scaled_softmax(zimg, ztxt, t, axis_name=None, scale=2.0):
    """A loss from a user's module: CLIP's softmax loss times `scale` (config `loss.scale`)."""
    return scale * losses.softmax_contrastive(zimg, ztxt, t, axis_name=axis_name)


def register_toy():
    """The one call that adds the loss."""
    return objective.register(TOY, scaled_softmax, ("zimg", "ztxt", "t"), logits="sigmoid", replace=True)


@pytest.fixture
def toy():
    yield register_toy()
    del objective.LOSSES[TOY]  # the registry of the built-in losses stays as test_losses states it


def _values(n=16, d=8):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, n, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return {"zimg": z[0], "ztxt": z[1], "t": np.float32(5.0), "b": np.float32(-1.0)}


def test_registered_loss_is_what_make_loss_computes(toy):
    config = ml_collections.ConfigDict({"loss": {"name": TOY, "scale": 3.0}})
    mesh = sharding.make_mesh([("data", -1)])
    v = _values()
    value = objective.make_loss(config, mesh)(v)  # under shard_map over all devices
    expected = 3.0 * losses.softmax_contrastive(v["zimg"], v["ztxt"], v["t"])
    assert len(jax.devices()) > 1
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    assert objective.option_keys(TOY) >= {"name", "scale"}
    assert objective.inference_spec(config.loss) == {"logits": "sigmoid", "similarity": "global"}
    assert not objective.needs_tokens(config.loss)


def test_registered_loss_options_are_checked(toy, tmp_path):
    config = tiny_config(str(tmp_path / "manifest.jsonl"))
    config.loss = dict(name=TOY, scale=0.5)
    config_check.validate(config)
    assert factory.spec_from_config(config)["logits"] == "sigmoid"
    config.loss = dict(name=TOY, scal=0.5)
    with pytest.raises(ValueError, match=r"config key `loss.scal`: unknown .*did you mean `scale`"):
        config_check.validate(config)


def test_unknown_names_are_refused(toy):
    with pytest.raises(ValueError, match=r"config key `loss.name`: unknown loss 'nope' \(known: [^)]*softmax, "):
        objective.resolve("nope")
    config = ml_collections.ConfigDict({"loss": {"name": "nope"}})
    with pytest.raises(ValueError, match=r"`loss.name`: unknown loss 'nope'"):
        objective.make_loss(config, sharding.make_mesh([("data", -1)]))
    with pytest.raises(ValueError, match=f"loss {TOY!r} is already registered"):
        objective.register(TOY, scaled_softmax, ("zimg", "ztxt", "t"))
    with pytest.raises(ValueError, match="logits must be 'softmax' or 'sigmoid'"):
        objective.register("toy_bad", scaled_softmax, ("zimg",), logits="probit")
    assert "toy_bad" not in objective.LOSSES
    # A missing input names the loss and what the step offers.
    config = ml_collections.ConfigDict({"loss": {"name": TOY}})
    values = {k: v for k, v in _values().items() if k != "t"}
    with pytest.raises(ValueError, match=f"loss {TOY!r} takes t, which this model and batch do not provide"):
        objective.make_loss(config, sharding.make_mesh([("data", -1)]))(values)


def test_declared_losses_are_the_registered_builtins():
    modules = {f"vljax.losses.{m.name}": importlib.import_module(f"vljax.losses.{m.name}")
               for m in pkgutil.iter_modules(losses.__path__)}
    declaring = {name: module.LOSSES for name, module in modules.items() if hasattr(module, "LOSSES")}
    # No module that declares losses is left out of the collection.
    assert losses.DECLARED == declaring and len(declaring) >= 5
    names = [name for entries in declaring.values() for name in entries]
    assert len(names) == len(set(names)) and set(names) <= set(objective.LOSSES)
    for entries in declaring.values():
        for name, entry in entries.items():
            loss = objective.LOSSES[name]
            assert loss.fn is entry["fn"] and loss.inputs == tuple(entry["inputs"]), name
            assert loss.chosen is entry.get("chosen") and loss.config_keys == tuple(entry.get("config_keys", ()))
            assert (loss.logits, loss.similarity) == (entry.get("logits", "softmax"),
                                                      entry.get("similarity", "global")), name
    # multi_positive's options choose its input (and are checked, naming the key).
    options = ml_collections.ConfigDict({"name": "multi_positive", "positives": "captions"})
    assert objective.spec(options).inputs == ("zimg", "ztxt", "t", "batch/text")
    with pytest.raises(ValueError, match="config key `loss.positives`"):
        objective.spec(ml_collections.ConfigDict({"name": "multi_positive", "positives": "tags"}))


TOY_FAMILY = """from vljax.losses.contrastive import softmax_contrastive


def toy_family_loss(zimg, ztxt, t, axis_name=None, scale=2.0):
    return scale * softmax_contrastive(zimg, ztxt, t, axis_name=axis_name)


LOSSES = {"toy_family": dict(fn=toy_family_loss, inputs=("zimg", "ztxt", "t"), logits="sigmoid")}
"""


@pytest.fixture
def package_with_toy_family(tmp_path):
    """vljax/losses/__init__.py run as package `toy_losses` over vljax/losses plus a folder holding
    one more family module, `toy_family.py` (the tree itself is left untouched)."""
    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    spec = importlib.util.spec_from_file_location(
        "toy_losses", losses.__file__, submodule_search_locations=[*losses.__path__, str(tmp_path)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["toy_losses"] = package
    try:
        spec.loader.exec_module(package)
        yield package
    finally:
        for name in [k for k in sys.modules if k == "toy_losses" or k.startswith("toy_losses.")]:
            del sys.modules[name]
        objective.LOSSES.pop("toy_family", None)


def test_a_family_module_is_one_file(package_with_toy_family):
    declared = package_with_toy_family.DECLARED
    assert "toy_losses.toy_family" in declared
    assert {m.rsplit(".", 1)[1] for m in declared} == {m.rsplit(".", 1)[1] for m in losses.DECLARED} | {"toy_family"}
    objective._register_builtins({"toy_losses.toy_family": declared["toy_losses.toy_family"]})
    assert objective.option_keys("toy_family") >= {"name", "scale"}
    assert objective.inference_spec({"name": "toy_family"}) == {"logits": "sigmoid", "similarity": "global"}
    # A name that another family declares is refused, naming the declaring module.
    with pytest.raises(ValueError, match=r"toy_losses.contrastive.LOSSES\['softmax'\]: loss 'softmax' is already"):
        objective._register_builtins({"toy_losses.contrastive": declared["toy_losses.contrastive"]})

