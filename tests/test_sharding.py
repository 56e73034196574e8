"""Mesh from config, regex sharding rules, optimizer-state shardings, batch placement."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import sharding

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")


def toy_params():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "img": {"Dense_0": {"kernel": arr(6, 16), "bias": arr(16)},
                "LayerNorm_0": {"scale": arr(16)},
                "odd": arr(3, 5)},
        "txt": {"Embed_0": {"embedding": arr(10, 4)},
                "Dense_0": {"kernel": arr(4, 8), "bias": arr(8)}},
        "t": arr(),
    }


def specs(shardings):
    return jax.tree.map(lambda s: s.spec, shardings)


RULES = [
    ("img/.*/bias", "replicate"),         # first match wins over the catch-all below
    ("txt/Dense_0/kernel", ("fsdp", "tensor")),
    (".*", "fsdp"),
]


def test_data_only_mesh_replicates_everything():
    mesh = sharding.make_mesh([("data", -1)])
    assert dict(mesh.shape) == {"data": 8}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    rules = [(".*", "fsdp")]  # no fsdp axis: nothing to shard over
    got = specs(sharding.param_shardings(toy_params(), mesh, rules))
    assert all(s == P() for s in jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P)))
    assert sharding.batch_sharding(mesh).spec == P(("data",))


def test_fsdp_shards_largest_divisible_dim():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    got = specs(sharding.param_shardings(toy_params(), mesh, [(".*/bias", "replicate"),
                                                              (".*", "fsdp")]))
    assert got["img"]["Dense_0"]["kernel"] == P(None, "fsdp")   # (6, 16): 16 is largest
    assert got["img"]["Dense_0"]["bias"] == P()                  # rule order: replicate wins
    assert got["img"]["LayerNorm_0"]["scale"] == P("fsdp")
    assert got["img"]["odd"] == P()                              # (3, 5): nothing divides by 2
    assert got["txt"]["Embed_0"]["embedding"] == P("fsdp")       # (10, 4): 10 is largest
    assert got["t"] == P()                                       # scalars stay replicated
    assert sharding.batch_axes(mesh) == ("data", "fsdp")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_tensor_parallel_spec_on_3d_mesh():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    params = toy_params()
    shard = sharding.param_shardings(params, mesh, RULES)
    got = specs(shard)
    assert got["txt"]["Dense_0"]["kernel"] == P("fsdp", "tensor")
    assert got["img"]["Dense_0"]["bias"] == P()
    assert got["img"]["Dense_0"]["kernel"] == P(None, "fsdp")
    placed = jax.device_put(params, shard)
    kernel = placed["txt"]["Dense_0"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (2, 4)  # (4, 8) split 2 x 2
    np.testing.assert_array_equal(kernel, params["txt"]["Dense_0"]["kernel"])
    # Batch split over data x fsdp (4 ways), replicated over tensor.
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_opt_state_follows_params():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    params = toy_params()
    p_specs = specs(sharding.param_shardings(params, mesh, RULES[:1] + RULES[2:]))
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params),
             "step": jnp.int32(0), "rng": jax.random.key(0)}
    got = sharding.state_shardings(state, mesh, RULES[:1] + RULES[2:])
    adam = got["opt_state"][0]
    assert specs(adam.mu) == p_specs and specs(adam.nu) == p_specs
    assert adam.count.spec == P()
    assert got["step"].spec == P() and got["rng"].spec == P()
    placed = jax.device_put(state, got)  # every sharding is valid for its leaf
    assert placed["opt_state"][0].mu["img"]["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")


def test_factored_optimizer_state_gets_valid_shardings():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    params = {"w": jnp.ones((64, 48))}
    opt_state = optax.adafactor(1e-3, min_dim_size_to_factor=32).init(params)
    rules = [(".*", "fsdp")]
    p_shard = sharding.param_shardings(params, mesh, rules)
    got = sharding.opt_state_shardings(opt_state, params, p_shard, mesh, rules)
    placed = jax.device_put(opt_state, got)  # factored rows/cols take the rule on their shape
    specs_1d = {x.shape: x.sharding.spec for x in jax.tree.leaves(placed) if x.ndim == 1}
    assert specs_1d[(64,)] == P("fsdp") and specs_1d[(48,)] == P("fsdp")
    # Without rules, leaves of another shape than their parameter are replicated.
    got = sharding.opt_state_shardings(opt_state, params, p_shard, mesh)
    assert all(s.spec == P() for s in jax.tree.leaves(got) if s.spec != P(None, "fsdp"))


def test_jit_on_mesh_matches_unsharded():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    params = {"Dense_0": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)),
                                                jnp.float32),
                          "bias": jnp.linspace(-1, 1, 8)}}
    rules = [(".*/kernel", ("fsdp", "tensor")), (".*", "replicate")]
    batch = {"x": np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)}

    def loss_and_grad(p, b):
        def loss(p):
            return jnp.mean((b["x"] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)
        return jax.value_and_grad(loss)(p)

    p_shard = sharding.param_shardings(params, mesh, rules)
    b_shard = {"x": sharding.batch_sharding(mesh)}
    f = jax.jit(loss_and_grad, in_shardings=(p_shard, b_shard),
                out_shardings=(NamedSharding(mesh, P()), p_shard))
    with jax.set_mesh(mesh):
        value, grads = f(jax.device_put(params, p_shard), sharding.shard_batch(batch, mesh))
    ref_value, ref_grads = jax.jit(loss_and_grad)(params, batch)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads, ref_grads)
    assert grads["Dense_0"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_shard_batch_places_global_batch():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
             "text": np.arange(8, dtype=np.int32)[:, None]}
    out = sharding.shard_batch(batch, mesh)
    assert out["image"].sharding == sharding.batch_sharding(mesh)
    assert out["image"].addressable_shards[0].data.shape == (1, 3)
    np.testing.assert_array_equal(np.asarray(out["text"]), batch["text"])
    with pytest.raises(ValueError, match="batch_size"):
        sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)


@pytest.mark.parametrize("bad", [
    [("data", 3)],                       # 3 != 8 devices
    [("data", -1), ("fsdp", 3)],         # 3 does not divide 8
    [("data", -1), ("fsdp", -1)],        # two -1
    [("data", 8), ("data", 1)],          # repeated name
    ["data"],                            # not (name, size) pairs
])
def test_bad_mesh_config_names_the_key(bad):
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.make_mesh(bad)


def test_bad_explicit_spec_names_param_and_axis():
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    params = {"w": jnp.ones((3, 4))}
    with pytest.raises(ValueError, match=r"w .*'tensor'.*config.mesh"):
        sharding.param_shardings(params, mesh, [("w", (None, "tensor"))])
    with pytest.raises(ValueError, match=r"w of shape \(3, 4\).*not divisible"):
        sharding.param_shardings(params, mesh, [("w", ("fsdp",))])
    with pytest.raises(ValueError, match="unknown strategy 'shard'"):
        sharding.param_shardings(params, mesh, [("w", "shard")])
