"""Sharded initialisation: the state is created in its shards, pretrained towers are written into
them leaf by leaf, and a resumed run reads no pretrained tower."""
import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import make_shapes_manifest, tiny_config

from vljax import pretrained, train

FSDP = dict(mesh=[("data", 1), ("fsdp", 8)], sharding_rules=[(".*", "fsdp")])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2)


def _shard_bytes(tree):
    """Bytes one device holds of a pytree of sharded arrays / ShapeDtypeStructs (device 0's shards)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # threefry: 2 x uint32
            total += int(np.prod(shape)) * 8
        else:
            total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def test_init_creates_every_leaf_in_its_shards(manifest, tmp_path):
    config = tiny_config(manifest, "clip", steps=4)
    config.update(FSDP)
    trainer = train.Trainer(config, str(tmp_path))
    state = trainer.state
    # Every leaf has the sharding its rule gives; FSDP-sharded leaves hold 1/8 per device.
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_sh)):
        assert leaf.sharding == want
    kernel = state["params"]["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec[-1] == "fsdp" or kernel.sharding.spec[0] == "fsdp"
    assert all(s.data.size == kernel.size // 8 for s in kernel.addressable_shards)
    # The compiled inits write per device exactly the shards: no device ever holds a whole
    # sharded parameter (their output buffers are the shards, and their scratch space is smaller
    # than the largest parameter).
    sh = trainer.state_sh
    compiled = jax.jit(trainer._init_params, out_shardings=sh["params"]).lower(jax.random.key(0)).compile()
    compiled_opt = jax.jit(trainer._init_opt, out_shardings=sh["opt_state"]).lower(
        trainer.abstract_state["params"]).compile()
    mem, mem_opt = compiled.memory_analysis(), compiled_opt.memory_analysis()
    per_device = _shard_bytes({k: trainer.abstract_state[k] for k in ("params", "opt_state")})
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state)
               if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
    n_leaves = len(jax.tree.leaves(trainer.abstract_state))
    out = mem.output_size_in_bytes + mem_opt.output_size_in_bytes
    assert abs(out - per_device) <= 64 * n_leaves  # XLA pads small buffers
    assert per_device < full / 4
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state["params"]))
    assert mem.temp_size_in_bytes < largest, (mem.temp_size_in_bytes, largest)
    assert mem_opt.temp_size_in_bytes < largest, (mem_opt.temp_size_in_bytes, largest)


def _fake_tower(trainer, scale):
    """A 'pretrained' text tower: the model's own structure, filled with known values."""
    flat = traverse_util.flatten_dict(jax.device_get(trainer.state["params"]["txt"]), sep="/")
    return traverse_util.unflatten_dict({k: np.full(v.shape, scale, v.dtype) for k, v in flat.items()}, sep="/")


def test_pretrained_tower_is_written_into_shards_and_not_read_on_resume(manifest, tmp_path, monkeypatch):
    config = tiny_config(manifest, "clip", steps=4)
    config.update(FSDP)
    probe = train.Trainer(config, str(tmp_path / "probe"))
    loads = []

    def load_tower(spec):
        loads.append(spec)
        return _fake_tower(probe, 0.5)

    monkeypatch.setattr(pretrained, "load_tower", load_tower)
    config.model_init = {"txt": "fake_tower"}
    workdir = str(tmp_path / "run")
    trainer = train.Trainer(config, workdir)
    assert loads == ["fake_tower"]
    txt = trainer.state["params"]["txt"]
    for name, leaf in traverse_util.flatten_dict(txt, sep="/").items():
        if not name.startswith("head/"):  # the checkpoint's own head is skipped
            np.testing.assert_array_equal(np.asarray(leaf), 0.5, err_msg=name)
    kernel = txt["Encoder_0"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert all(s.data.size == kernel.size // 8 for s in kernel.addressable_shards)
    trainer.fit()

    # Resuming restores the checkpoint: the pretrained tower is not read again.
    resumed = train.Trainer(config, workdir)
    assert loads == ["fake_tower"] and resumed.start_step == 4
    for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pretrained_shape_mismatch_names_the_leaf(manifest, tmp_path, monkeypatch):
    config = tiny_config(manifest, "clip", steps=4)
    probe = train.Trainer(config, str(tmp_path / "probe"))
    tower = _fake_tower(probe, 1.0)
    tower["Encoder_0"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"] = np.zeros((3, 3), np.float32)
    monkeypatch.setattr(pretrained, "load_tower", lambda spec: tower)
    config.model_init = {"txt": "fake_tower"}
    with pytest.raises(ValueError, match="encoderblock_0/MlpBlock_0/Dense_0/kernel"):
        train.Trainer(config, str(tmp_path / "run"))
