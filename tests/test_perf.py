"""vljax/perf.py: XLA's FLOP count of a step equals the analytic count, MFU and peaks (that the
trainer logs perf/* from the step it compiled once: tests/test_train.py::test_recipe_learns)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import perf

B, D, L = 64, 128, 3  # batch, width, Dense layers


class DenseStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(L):
            x = nn.Dense(D, use_bias=False)(x)
        return x


@pytest.fixture(scope="module")
def dense():
    model = DenseStack()
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, D)))

    def loss_and_grad(p, x):
        return jax.value_and_grad(lambda q: jnp.sum(model.apply(q, x)))(p)

    return params, loss_and_grad


def _abstract(tree, sh):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)


def test_dense_stack_flops_equal_analytic(dense):
    """value_and_grad of sum(x W1 W2 W3): L forward matmuls, L weight-gradient matmuls and L-1
    input-gradient matmuls of 2 B D^2 FLOPs each, plus the sum over B D values (XLA counts a
    reduce of n values as n FLOPs)."""
    params, fn = dense
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
    rep = NamedSharding(mesh, P())
    cost = perf.compiled_cost(jax.jit(fn), 1, _abstract(params, rep), jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=rep))
    analytic = 2 * B * D * D * (3 * L - 1)
    assert cost.flops == analytic + B * D
    assert not cost.has_loops
    assert cost.argument_bytes == 4 * (L * D * D + B * D)
    assert cost.output_bytes >= 4 * (L * D * D + 1)


def test_sharded_flops_are_per_device(dense):
    """8 devices, batch sharded: each device's program does 1/8 of the matmuls plus its part of the
    gradients' all-reduce (L D^2 adds) and of the sum; `flops` is that x 8."""
    params, fn = dense
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    cost = perf.compiled_cost(jax.jit(fn), 8, _abstract(params, NamedSharding(mesh, P())),
                              jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=NamedSharding(mesh, P("data"))))
    matmuls = 2 * B * D * D * (3 * L - 1)
    assert cost.flops_per_device == pytest.approx(matmuls / 8 + L * D * D, rel=1e-3)
    assert cost.flops == pytest.approx(cost.flops_per_device * 8)


def test_scan_body_counted_once_and_flagged():
    """The XLA trap: a scanned stack of 6 matmul layers reports the FLOPs of one layer."""
    def f(ws, x):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    cost = perf.compiled_cost(jax.jit(f), 1, jax.ShapeDtypeStruct((6, D, D), jnp.float32),
                              jax.ShapeDtypeStruct((B, D), jnp.float32))
    assert cost.has_loops
    assert cost.flops == pytest.approx(2 * B * D * D, rel=0.01)


def test_rng_loop_is_not_flagged():
    """threefry's key split is a while loop in every step; it has no matmul, so it is not flagged."""
    def f(key, w, x):
        return jax.random.split(key)[0], jax.random.normal(key, x.shape) @ w

    args = (jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((D, D), jnp.float32),
            jax.ShapeDtypeStruct((B, D), jnp.float32))
    compiled = jax.jit(f).lower(*args).compile()
    assert " while(" in compiled.as_text()
    assert not perf.step_cost(compiled, 1).has_loops


def test_reading_cost_after_a_call_does_not_compile(dense):
    params, fn = dense
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(lambda p, x: (jax.tree.map(lambda a, g: a - g, p, fn(p, x)[1]), fn(p, x)[0]),
                   in_shardings=(rep, data), out_shardings=(rep, None), donate_argnums=(0,))
    p = jax.device_put(jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params), rep)
    x = jax.device_put(jnp.ones((B, D)), data)
    p, _ = step(p, x)
    events = []
    listener = lambda name, secs, **kw: events.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        cost = perf.compiled_cost(step, 8, p, x)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert cost.flops == pytest.approx(2 * B * D * D * (3 * L - 1), rel=0.05)  # the step's analyses
    assert not [e for e in events if "backend_compile" in e or "jaxpr_trace" in e]


def test_mfu_and_memory_from_given_numbers():
    cost = perf.StepCost(flops_per_device=2.5e11, devices=8, argument_bytes=3 << 30, output_bytes=3 << 30,
                         alias_bytes=2 << 30, temp_bytes=1 << 30, generated_code_bytes=0, has_loops=False)
    assert cost.flops == 2e12
    assert cost.peak_bytes == 5 << 30
    # 2 TFLOPs a step in 0.5 s = 4 TFLOP/s achieved, against 8 chips x 1 TFLOP/s
    assert perf.mfu(2e12, 0.5, 8e12) == 0.5
    row = perf.metrics_row(cost, 0.5, 8e12)
    assert row == {"perf/step_tflops": 2.0, "perf/mfu": 0.5, "perf/peak_tflops": 8.0, "perf/memory_gb": 5.0}
    with pytest.raises(ValueError, match="step time"):
        perf.mfu(1.0, 0.0, 1.0)


@pytest.mark.parametrize("kind,bf16", [("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
                                       ("TPU v6 lite", 918), ("NVIDIA A100-SXM4-80GB", 312),
                                       ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989)])
def test_peak_table(kind, bf16):
    assert perf.lookup_peak(kind).bf16 == bf16


def test_unknown_and_cpu_peaks():
    assert perf.lookup_peak("NVIDIA H100 PCIe") is None
    assert perf.lookup_peak("cpu") is None
    peak, source = perf.peak_flops("float32")
    assert "measured" in source
    assert peak == perf.measured_matmul_flops("float32") > 1e8  # cached: the same figure
    # CPU devices share the host: the peak of 8 of them is the host's, not 8x.
    assert perf.peak_flops("float32", jax.devices()[:1])[0] == peak


def test_table_peak_by_dtype_and_precision():
    """8 H100s: bf16 989 TFLOP/s a chip; float32 at the default matmul precision runs as TF32
    (494.5), at "highest" as FP32 (67); TPUs publish bf16 only, used for float32 too."""
    class Dev:
        def __init__(self, kind, platform):
            self.device_kind, self.platform = kind, platform

    h100 = [Dev("NVIDIA H100 80GB HBM3", "gpu")] * 8
    assert perf.peak_flops("bfloat16", h100)[0] == 8 * 989e12
    with jax.default_matmul_precision("default"):
        assert perf.peak_flops("float32", h100)[0] == 8 * 494.5e12
    with jax.default_matmul_precision("highest"):
        assert perf.peak_flops("float32", h100)[0] == 8 * 67e12
    assert perf.peak_flops("float32", [Dev("TPU v5 lite", "tpu")] * 4)[0] == 4 * 197e12


def test_a_backend_without_analyses_is_a_clear_error():
    """The trainer logs no perf/* (and a warning) on this ValueError."""
    class Compiled:
        def __init__(self, ca, ma):
            self.cost_analysis, self.memory_analysis, self.as_text = (lambda: ca), (lambda: ma), (lambda: "")

    with pytest.raises(ValueError, match="no 'flops'"):
        perf.step_cost(Compiled(None, None), 1)
    with pytest.raises(ValueError, match="memory_analysis"):
        perf.step_cost(Compiled({"flops": 1.0}, None), 1)
