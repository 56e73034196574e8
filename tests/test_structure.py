"""STRUCTURE (vljax/losses/structure.py): a float64 numpy reference written from the authors' code
(`src/loss/clip_loss.py` `structure_reg`, `CLIPLoss.step`), value and gradient; 1 device == 8
(over "data" and over ("data", "fsdp")); the objective's warmup ramp and its refusals."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from helpers import REPO, finite_differences, make_shapes_manifest, tiny_config
from jax.sharding import PartitionSpec as P

from vljax import metrics, objective, sharding, train
from vljax.losses.structure import structure_loss

EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# the reference, float64, line by line from structure_reg (center_first=False, cosine distance)
# ----------------------------------------------------------------------------------------------

def _safe_normalize(x):  # src/utils/utils.py: left alone when every row has norm 1 within 1e-6
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x if np.all(np.abs(n - 1.0) < 1e-6) else x / np.maximum(n, 1e-12)


def _center(x, centering):
    if centering == "none":
        return x
    if centering == "mean":
        return x - x.mean(0, keepdims=True)
    return (x - x.mean(0, keepdims=True)) / x.std(0, ddof=1, keepdims=True)  # torch.std: unbiased


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_div_batchmean(inp, target):  # torch F.kl_div(input, target, reduction="batchmean")
    return np.sum(target * (np.log(target) - inp)) / inp.shape[0]


def ref_levels(z, f, levels, tau, centering):
    """The code's js_div of each level, before margin and weighting."""
    sims = [_center(_safe_normalize(x), centering) for x in (f, z)]
    p, q = (_softmax(x @ x.T / tau) for x in sims)
    out = []
    for level in range(1, levels + 1):
        pl, ql = np.linalg.matrix_power(p, level), np.linalg.matrix_power(q, level)
        m = 0.5 * (pl + ql)
        out.append(0.5 * (_kl_div_batchmean(np.log(ql + EPS), m + EPS)
                          + _kl_div_batchmean(np.log(pl + EPS), m + EPS)))
    return np.array(out)


def ref_structure(z, f, levels=1, tau=0.05, weighting="none", margin=0.0, centering="mean"):
    total = 0.0
    for level, js in enumerate(ref_levels(z, f, levels, tau, centering), start=1):
        js = max(js - margin, 0.0)
        total += js if weighting == "none" else js / level
    return total / levels


def _num_grad(fn, x):
    return finite_differences(fn, [x])[0]


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(8, 10))  # frozen features: any width, any norm
    z = 0.6 * f[:, :6] + rng.normal(size=(8, 6))  # related to f, not the same geometry
    return z, f


CASES = [dict(levels=1, tau=0.05, weighting="none", centering="mean"),  # the code's default config
         dict(levels=3, tau=0.2, weighting="inverse", centering="mean"),
         dict(levels=3, tau=0.2, weighting="none", centering="none"),
         dict(levels=2, tau=0.5, weighting="inverse", centering="standard")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_value_and_gradient_equal_the_codes_reference(pair, case):
    z, f = pair
    kw = dict(levels=case["levels"], temperature=case["tau"], weighting=case["weighting"],
              centering=case["centering"])
    value, g = jax.value_and_grad(lambda x: structure_loss(x, jnp.asarray(f, jnp.float32), **kw))(
        jnp.asarray(z, jnp.float32))
    ref = lambda x: ref_structure(x, f, case["levels"], case["tau"], case["weighting"], 0.0,  # noqa: E731
                                  case["centering"])
    assert ref(z) > 1e-3  # a real divergence, not a vanishing one
    np.testing.assert_allclose(value, ref(z), rtol=1e-4)
    expected = _num_grad(ref, z)
    np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_margin_clips_each_levels_divergence(pair):
    """relu(js_l - margin) per level: with the margin between two levels' divergences, the level
    below it adds neither value nor gradient."""
    z, f = pair
    js = ref_levels(z, f, 3, 0.2, "mean")
    margin = float(np.sort(js)[1] + np.sort(js)[2]) / 2  # one level above it, two below
    kw = dict(levels=3, temperature=0.2, weighting="inverse", margin=margin)
    value, g = jax.value_and_grad(lambda x: structure_loss(x, jnp.asarray(f, jnp.float32), **kw))(
        jnp.asarray(z, jnp.float32))
    ref = lambda x: ref_structure(x, f, 3, 0.2, "inverse", margin, "mean")  # noqa: E731
    level = int(np.argmax(js)) + 1
    np.testing.assert_allclose(value, (js.max() - margin) / level / 3, rtol=1e-4)
    np.testing.assert_allclose(value, ref(z), rtol=1e-4)
    expected = _num_grad(ref, z)
    np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # A margin above every level: nothing left.
    assert float(structure_loss(jnp.asarray(z), jnp.asarray(f), levels=3, temperature=0.2,
                                margin=float(js.max()) + 1e-3)) == 0.0


def test_the_same_geometry_costs_nothing_and_the_frozen_side_gets_no_gradient(pair):
    _, f = pair
    zf = jnp.asarray(f, jnp.float32)
    for centering in ("mean", "none", "standard"):
        assert float(structure_loss(3.0 * zf, zf, levels=3, temperature=0.05, centering=centering)) < 1e-6
    g = jax.grad(lambda a: structure_loss(zf[:, :6], a, levels=2, temperature=0.2))(zf)
    assert not np.any(np.asarray(g))


def test_unit_rows_as_the_code_leaves_them(pair):
    """The code skips normalising rows that already have norm 1 (safe_normalize); vljax always
    normalises: the same value."""
    z, f = pair
    zu, fu = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (z, f))
    np.testing.assert_allclose(structure_loss(jnp.asarray(zu, jnp.float32), jnp.asarray(fu, jnp.float32),
                                              levels=2, temperature=0.2, weighting="inverse"),
                               ref_structure(zu, fu, 2, 0.2, "inverse"), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# the global batch over devices
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axes,shape", [(("data",), (8,)), (("data", "fsdp"), (2, 4))])
def test_eight_devices_equal_one(axes, shape):
    """The batch split over a mesh: centring statistics, P and Q of the gathered batch, the margin
    on the global divergence; value and gradient as on one device."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(16, 10)).astype(np.float32)
    z = (0.6 * f[:, :6] + rng.normal(size=(16, 6))).astype(np.float32)
    js = ref_levels(z.astype(np.float64), f.astype(np.float64), 3, 0.2, "standard")
    kw = dict(levels=3, temperature=0.2, weighting="inverse", centering="standard",
              margin=float(js.min() + js.max()) / 2)  # one level clipped, one not
    mesh = jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Explicit,) * len(axes))
    axis = axes[0] if len(axes) == 1 else axes
    sharded = jax.shard_map(lambda a, b: structure_loss(a, b, axis, **kw), mesh=mesh,
                            in_specs=(P(axes), P(axes)), out_specs=P())
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(axes)))  # noqa: E731
    value, g = jax.jit(jax.value_and_grad(sharded))(put(z), put(f))
    ref_value, ref_g = jax.jit(jax.value_and_grad(lambda a, b: structure_loss(a, b, **kw)))(z, f)
    assert ref_value > 0
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# the objective: inputs, warmup, refusals
# ----------------------------------------------------------------------------------------------

def _softmax_inputs(rng, b=16, d=6, w=10):
    zi, zt = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in rng.normal(size=(2, b, d)))
    return dict(zimg=jnp.asarray(zi, jnp.float32), ztxt=jnp.asarray(zt, jnp.float32), t=jnp.float32(10.0),
                **{"frozen/img_features": jnp.asarray(rng.normal(size=(b, w)), jnp.float32),
                   "frozen/txt_features": jnp.asarray(rng.normal(size=(b, w)), jnp.float32)})


def test_weight_ramps_over_the_warmup_as_the_codes_step():
    """lambda = weight * min(1, step / warmup), step the optimizer step (0 at the first update,
    when the code's CLIPLoss.step() has set lambda to 0), on the 8-device mesh through make_loss."""
    assert len(jax.devices()) == 8
    values = _softmax_inputs(np.random.default_rng(2))
    mesh = sharding.make_mesh([("data", -1)])

    def loss_fn(**structure):
        config = ml_collections.ConfigDict(dict(loss=dict(name="softmax", **structure)))
        fn = jax.jit(objective.make_loss(config, mesh))
        return lambda step=None: float(fn(values if step is None else {**values, "step": jnp.int32(step)}))

    base = loss_fn()()
    r = (float(structure_loss(values["zimg"], values["frozen/img_features"]))
         + float(structure_loss(values["ztxt"], values["frozen/txt_features"]))) / 2
    assert r > 1e-3
    kw = dict(structure_weight=10.0, structure_sides="both", structure_warmup=100)
    ramped = loss_fn(**kw)
    assert ramped(0) == pytest.approx(base, rel=1e-6)
    assert ramped(25) == pytest.approx(base + 10.0 * 0.25 * r, rel=1e-5)
    assert ramped(100) == pytest.approx(base + 10.0 * r, rel=1e-5)
    assert ramped(5000) == pytest.approx(base + 10.0 * r, rel=1e-5)
    # warmup 0: no ramp, and no step taken
    assert objective.spec(dict(name="softmax", structure_weight=1.0, structure_warmup=0)).inputs[-1] != "step"
    assert loss_fn(**{**kw, "structure_warmup": 0})() == pytest.approx(base + 10.0 * r, rel=1e-5)


def test_the_objective_takes_the_codes_defaults_and_logs_the_term():
    loss = objective.spec(dict(name="softmax", structure_weight=0.5, structure_sides="both"))
    assert loss.inputs[3:] == ("zimg", "frozen/img_features", "ztxt", "frozen/txt_features", "step")
    values = {**_softmax_inputs(np.random.default_rng(3)), "step": jnp.int32(500)}
    mesh = sharding.make_mesh([("data", -1)])
    config = ml_collections.ConfigDict(dict(loss=dict(name="softmax", structure_weight=0.5)))
    parts = jax.jit(objective.make_parts(config, mesh))(values)
    # the image side, levels 1, tau 0.05, mean centring: structure_loss's own defaults
    np.testing.assert_allclose(parts["structure"], structure_loss(values["zimg"], values["frozen/img_features"]),
                               rtol=1e-5)
    np.testing.assert_allclose(parts["structure_lambda"], 0.5 * 500 / 1000, rtol=1e-6)


@pytest.mark.parametrize("key,value", [("structure_levels", 0), ("structure_levels", 1.5),
                                       ("structure_temperature", 0.0), ("structure_margin", -0.1),
                                       ("structure_weighting", "linear"), ("structure_centering", "l2"),
                                       ("structure_warmup", -1), ("structure_warmup", 10.0),
                                       ("structure_sides", "audio")])
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"config key `loss.{key}`"):
        objective.spec(dict(name="softmax", structure_weight=1.0, **{key: value}))


def test_a_trained_encoder_is_refused(tmp_path):
    """STRUCTURE keeps a FROZEN encoder's geometry: a side whose trunk trains is refused (the tiny
    LiT recipe trains the whole text tower)."""
    config = tiny_config(make_shapes_manifest(str(tmp_path / "shapes"), n_per=1), "lit", steps=10)
    config.loss = dict(name="softmax", structure_weight=1.0, structure_sides="both")
    with pytest.raises(ValueError, match="loss.structure_sides.*FROZEN text"):
        train.Trainer(config, str(tmp_path / "run"))


def test_option_keys():
    keys = objective.option_keys("softmax")
    assert {"structure_weight", "structure_sides", "structure_levels", "structure_temperature",
            "structure_weighting", "structure_margin", "structure_centering", "structure_warmup"} <= keys


@pytest.mark.slow
def test_lit_with_structure_trains_through_main(tmp_path):
    """configs/lit.py's `structure=` (`with_distillation`) on the tiny LiT recipe through
    `python -m vljax.main`, with gradient accumulation: the loss falls, and the logged weight is
    the ramp at the optimizer step (micro step // 2) that vljax/step.py gives the loss."""
    manifest = make_shapes_manifest(str(tmp_path / "shapes"))
    cfg = tmp_path / "tiny_structure.py"
    cfg.write_text(
        "import sys\n"
        f"sys.path[:0] = [{os.path.join(REPO, 'tests')!r}, {os.path.join(REPO, 'configs')!r}]\n"
        "import helpers, lit\n\n"
        "def get_config(arg=None):\n"
        f"    c = helpers.tiny_config({manifest!r}, 'lit', steps=24, batch=16)\n"
        "    c.grad_accum_steps = 2\n"
        "    return lit.with_distillation(c, structure=2.0, structure_warmup=6)\n")
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics.read_metrics(str(tmp_path / "wd" / "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 25))  # log_every 1: row s is micro step s - 1
    np.testing.assert_allclose([r["train/structure_lambda"] for r in rows],
                               [2.0 * min(1.0, ((s - 1) // 2) / 6) for s in range(1, 25)], rtol=1e-6)
    losses = np.array([r["train/loss"] for r in rows])
    assert np.all(np.isfinite(losses)) and all(r["train/structure"] > 0 for r in rows)
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
