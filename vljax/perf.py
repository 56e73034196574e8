"""The cost of a training step: FLOPs and memory from XLA's own analyses, and MFU against the
device's peak.

* `compiled_cost(fn, devices, *args)` reads `cost_analysis()` and `memory_analysis()` of the
  executable that `jax.jit` compiled for these arguments. In JAX 0.10, `fn.lower(*args).compile()`
  after a call with arguments of the same shapes, dtypes and shardings is answered from JAX's
  in-memory caches (no trace, no lowering, no XLA compile: about a millisecond), so the trainer reads
  the analyses of the step it already compiled.
* What XLA reports, checked on JAX 0.10.2 CPU: `cost_analysis()` is a dict (`flops`,
  `transcendentals`, `bytes accessed`, ...) of the PER-DEVICE program of an SPMD step (the
  partitioned module each device runs): a batch sharded 8 ways gives 1/8 of the matmul FLOPs, while
  work replicated on every device is counted once per device. The step's FLOPs on all devices are
  therefore `flops x devices`: the work the devices execute, which counts replicated work (a
  replicated loss, the optimizer on replicated params) once per device. `memory_analysis()` is
  per device too (argument, output, alias, temp and generated code sizes in bytes).
* They are hardware FLOPs of the whole step, forward + backward + optimizer update (+ the
  recomputed forward under `remat`). The usual "model FLOPs" convention (Kaplan et al. 2020;
  PaLM, Chowdhery et al. 2022, appendix B) counts 6 x params x tokens for the matmuls (2 forward,
  4 backward) plus attention and nothing for the optimizer or rematerialization. At SigLIP B/16
  (experiments/bench_step_cost.py) XLA's count is 1.005x that analytic count without remat (the
  rest: elementwise ops, norms, softmax, the optimizer) and 1.23x with per-block remat (less than
  8/6: the recomputed forward skips the MLP's second matmul, whose output the backward does not need).
* Trap: XLA's HloCostAnalysis counts the body of a `while` loop ONCE, not times its trip count, so
  a `lax.scan` over layers (`scan=True` towers) or a `fori_loop` is undercounted (6 scanned
  matmul layers report the FLOPs of one). `StepCost.has_loops` flags such a step.

Peak: `peak_flops(dtype)` looks `jax.devices()[0].device_kind` up in `PEAKS` (dense, per chip, from
the vendors' pages); on CPU and any unknown device it is the measured matmul throughput
(`measured_matmul_flops`). MFU = the step's FLOPs on all devices / step time / (peak per chip x
chips) (`mfu`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp

GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One compiled step's analyses. Bytes are per device; `flops_per_device` is XLA's count for
    the program one device runs; `devices` the number of devices the step runs on."""
    flops_per_device: float
    devices: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse a donated argument's buffer
    temp_bytes: int
    generated_code_bytes: int
    has_loops: bool  # a while loop whose body has a matmul / convolution: counted once, not per trip

    @property
    def flops(self) -> float:
        """The step's FLOPs on all devices (per-device count x devices)."""
        return self.flops_per_device * self.devices

    @property
    def peak_bytes(self) -> int:
        """Peak memory per device as XLA plans it: arguments + outputs (less the outputs aliased to
        donated arguments) + temporaries + generated code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)


def step_cost(compiled, devices: int) -> StepCost:
    """The `StepCost` of a `jax.stages.Compiled` run on `devices` devices. ValueError when the
    backend gives no FLOP count (cost_analysis() None or without "flops") or no memory analysis."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per program
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        raise ValueError(f"XLA's cost_analysis() gives no 'flops' on this backend: {ca!r}")
    ma = compiled.memory_analysis()
    if ma is None:
        raise ValueError("XLA's memory_analysis() gives nothing on this backend")
    text = compiled.as_text() or ""
    return StepCost(
        flops_per_device=float(ca["flops"]), devices=int(devices),
        argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
        generated_code_bytes=int(ma.generated_code_size_in_bytes),
        has_loops=loops_with_matmuls(text))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_WHILE_BODY = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_REFERENCE = re.compile(r"%([\w.\-]+)")


def loops_with_matmuls(hlo_text: str) -> bool:
    """Whether an HLO module (`Compiled.as_text()`) has a while loop whose body, or a computation
    it calls, has a `dot` or `convolution`: a loop XLA's cost analysis undercounts in a way that
    matters (threefry's RNG loop, in every step that splits a key, has none)."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name, lines = m.group(1), []
        elif line.startswith("}") and name is not None:
            bodies[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    seen, todo = set(), [m.group(1) for m in _WHILE_BODY.finditer(hlo_text)]
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in bodies:
            continue
        seen.add(comp)
        if re.search(r"\b(dot|convolution)\(", bodies[comp]):
            return True
        todo.extend(r for r in _REFERENCE.findall(bodies[comp]) if r in bodies)
    return False


def compiled_cost(fn, devices: int, *args) -> StepCost:
    """The `StepCost` of jitted `fn` on `args` (arrays or ShapeDtypeStructs with shardings). After
    `fn(*args)` has run, this reuses its compiled executable (JAX's caches); called first, it
    compiles."""
    return step_cost(fn.lower(*args).compile(), devices)


# ------------------------------------------------------------------------------------------------
# Peaks
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one chip. `tf32` is the tensor-core rate that XLA uses for float32
    matmuls at JAX's default precision on NVIDIA GPUs; None where the vendor publishes no figure."""
    bf16: float
    fp32: float | None
    tf32: float | None
    source: str


_TPU_DOCS = "https://cloud.google.com/tpu/docs/"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (dense; the 2x figures are with sparsity)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, SXM column (dense; the 2x figures are with sparsity)"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, SXM column (dense; the 2x figures are with sparsity)"
# (device_kind regex, Peak): the first match wins. Cloud TPU docs publish bf16 (and int8) only:
# fp32 None, and a float32 run on TPU is measured against the bf16 peak (XLA's default precision
# runs float32 matmuls as bf16 passes on the MXU).
PEAKS: list[tuple[str, Peak]] = [
    (r"TPU v4", Peak(275.0, None, None, _TPU_DOCS + "v4 (275 bf16 TFLOP/s per chip)")),
    (r"TPU v5 ?lite|TPU v5e", Peak(197.0, None, None, _TPU_DOCS + "v5e (197 bf16 TFLOP/s per chip)")),
    (r"TPU v5p?$", Peak(459.0, None, None, _TPU_DOCS + "v5p (459 bf16 TFLOP/s per chip)")),
    (r"TPU v6 ?lite|TPU v6e", Peak(918.0, None, None, _TPU_DOCS + "v6e (918 bf16 TFLOP/s per chip)")),
    (r"A100", Peak(312.0, 19.5, 156.0, _A100)),
    (r"H100(?!.*(PCIe|NVL))", Peak(989.0, 67.0, 494.5, _H100)),
    (r"H200(?!.*NVL)", Peak(989.0, 67.0, 494.5, _H200)),
]


def lookup_peak(device_kind: str) -> Peak | None:
    """The `PEAKS` entry of a `jax.Device.device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_kind):
            return peak
    return None


def _table_tflops(peak: Peak, dtype) -> float:
    if jnp.dtype(dtype) != jnp.float32:
        return peak.bf16
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if peak.fp32 is not None and precision in ("highest", "float32"):
        return peak.fp32
    return peak.tf32 if peak.tf32 is not None else peak.bf16


def measured_matmul_flops(dtype: str = "float32", device=None, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of one [n, n] x [n, n] matmul in `dtype` on `device` (default: the first device; n:
    1024 on CPU, 8192 on an accelerator, where a small matmul measures launch overhead): a
    jitted matmul pinned to that one device (a mesh context would otherwise replicate it on every
    device), run once to compile and warm up, then the fastest of `reps` timed runs (2 n^3 FLOPs
    each, timed to `block_until_ready`). Cached per process, dtype and device. On CPU this is the
    host's matmul throughput with XLA's thread pool (shared by all host devices)."""
    device = device or jax.devices()[0]
    n = n or (1024 if device.platform == "cpu" else 8192)
    return _measured(str(jnp.dtype(dtype)), device, n, reps)


@functools.cache
def _measured(dtype: str, device, n: int, reps: int) -> float:
    # A one-device mesh context: inside the trainer's `jax.set_mesh`, jit refuses (or replicates
    # over every device) an array placed on one device.
    mesh = jax.make_mesh((1,), ("x",), devices=[device], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        a = jax.device_put(jnp.ones((n, n), dtype), one)
        f = jax.jit(lambda x: x @ x, in_shardings=one, out_shardings=one)
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops(dtype="float32", devices=None) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, where it comes from). A device kind in `PEAKS`:
    its dense figure for `dtype` x the number of devices. CPU: the measured matmul throughput,
    not multiplied (the host's devices share its cores). Any other device: measured x devices."""
    devices = jax.devices() if devices is None else list(devices)
    kind, n = devices[0].device_kind, len(devices)
    peak = lookup_peak(kind)
    if peak is not None:
        return _table_tflops(peak, dtype) * 1e12 * n, f"{kind}: {peak.source}"
    measured = measured_matmul_flops(dtype, devices[0])
    if devices[0].platform == "cpu":
        return measured, f"{kind}: measured {jnp.dtype(dtype)} matmul, host total"
    return measured * n, f"{kind}: measured {jnp.dtype(dtype)} matmul x {n} devices"


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: (FLOPs of one step on all devices / seconds per step) / peak FLOP/s
    of all devices together."""
    if step_time_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"mfu: step time {step_time_s} s and peak {peak_flops_per_s} FLOP/s must be > 0")
    return flops_per_step / step_time_s / peak_flops_per_s


def metrics_row(cost: StepCost, step_time_s: float, peak_flops_per_s: float) -> dict[str, float]:
    """The perf/* keys the trainer logs: step TFLOPs on all devices, MFU, the peak TFLOP/s it is
    measured against (all devices), and peak memory per device in GiB."""
    return {"perf/step_tflops": cost.flops / 1e12,
            "perf/mfu": mfu(cost.flops, step_time_s, peak_flops_per_s),
            "perf/peak_tflops": peak_flops_per_s / 1e12,
            "perf/memory_gb": cost.peak_bytes / GIB}
