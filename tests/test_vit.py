"""ViT: variants, pooling, registers, posembs, remat / scan equivalence, posemb resampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.convert.posemb import resample_posemb
from vljax.models import ViT
from vljax.models.common import posemb_sincos_2d
from vljax.models.vit import decode_variant, keep_random_patches

TINY = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)


def images(b=2, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


def init_apply(model, x, **kw):
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return params, jax.jit(model.apply)({"params": params}, x, **kw)


def test_variants_decode_like_big_vision():
    assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                          patch_size=(16, 16))
    assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16,
                                               patch_size=(14, 14))
    assert decode_variant("L") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16)
    assert ViT(variant="S/32", depth=3).config()["depth"] == 3   # explicit sizes override
    with pytest.raises(ValueError, match="Unknown ViT variant 'X/16'"):
        decode_variant("X/16")
    # The whole So400m/14 parameter count, abstractly (nothing is allocated).
    shapes = jax.eval_shape(ViT(variant="So400m/14", pool_type="map").init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert 420e6 < n < 430e6   # SigLIP So400m/14 vision tower: ~428M parameters


@pytest.mark.parametrize("pool_type", ["cls", "gap", "map", "none"])
def test_pool_types_shapes(pool_type):
    model = ViT(**TINY, pool_type=pool_type, num_classes=10)
    params, (feats, out) = init_apply(model, images())
    n_tokens = 16 + (pool_type == "cls")
    assert out["tokens"].shape == (2, n_tokens, 32)
    if pool_type == "none":
        assert feats.shape == (2, n_tokens, 10)
    else:
        assert out["pre_logits"].shape == (2, 32) and feats.shape == (2, 10)
        assert np.allclose(out["logits"], feats)
    assert ("MAPHead_0" in params) == (pool_type == "map")
    assert ("cls" in params) == (pool_type == "cls")


def test_registers_are_dropped_before_pooling():
    model = ViT(**TINY, pool_type="gap", num_registers=4)
    params, (feats, out) = init_apply(model, images())
    assert params["registers"].shape == (1, 4, 32)
    assert out["tokens"].shape == (2, 16, 32)
    np.testing.assert_allclose(feats, out["tokens"].mean(axis=1), atol=1e-6)
    # The registers still take part in attention: changing them changes the patch tokens.
    noise = np.random.default_rng(1).normal(size=params["registers"].shape)
    moved = {**params, "registers": params["registers"] + noise}
    feats2, _ = model.apply({"params": moved}, images())
    assert np.abs(feats2 - feats).max() > 1e-3


def test_sincos_posemb():
    pe = np.asarray(posemb_sincos_2d(4, 4, 32))
    assert pe.shape == (1, 16, 32)
    np.testing.assert_allclose(pe[0, 0], np.r_[np.zeros(8), np.ones(8), np.zeros(8), np.ones(8)])
    # Along x only the first half of the channels changes, along y only the second half.
    np.testing.assert_allclose(pe[0, 1, 16:], pe[0, 0, 16:])
    np.testing.assert_allclose(pe[0, 4, :16], pe[0, 0, :16])
    params, (feats, _) = init_apply(ViT(**TINY, posemb="sincos2d", pool_type="gap"), images())
    assert "pos_embedding" not in params and np.isfinite(feats).all()


def test_remat_same_outputs_and_grads():
    x = images()
    plain = ViT(**TINY, pool_type="map", num_classes=8)
    remat = ViT(**TINY, pool_type="map", num_classes=8, remat=True)
    params = jax.jit(plain.init)(jax.random.key(1), x)["params"]

    def loss(model):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(model.apply({"params": p}, x, train=True)[0] ** 2)))

    (l1, g1), (l2, g2) = loss(plain)(params), loss(remat)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g1, g2)


def test_scan_equals_loop_with_stacked_params():
    x = images()
    loop = ViT(**TINY, pool_type="cls")
    params, (feats, _) = init_apply(loop, x)
    t = dict(params["Transformer"])
    blocks = [t.pop(f"encoderblock_{i}") for i in range(2)]
    t["encoderblock"] = jax.tree.map(lambda *b: jnp.stack(b), *blocks)
    scanned = ViT(**TINY, pool_type="cls", scan=True, remat=True)
    feats2, _ = jax.jit(scanned.apply)({"params": {**params, "Transformer": t}}, x)
    np.testing.assert_allclose(feats, feats2, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    x = images()
    params, (f32, _) = init_apply(ViT(**TINY, pool_type="gap"), x)
    bf16, _ = ViT(**TINY, pool_type="gap", dtype=jnp.bfloat16).apply({"params": params}, x)
    assert bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16, np.float32) - f32).max() < 0.1 * np.abs(f32).max()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of patch"):
        ViT(**TINY).init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match="Unknown pool_type 'tok'"):
        ViT(**TINY, pool_type="tok").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# --- position-embedding resampling (vljax.convert.posemb) ---

def test_resample_preserves_constant_and_linear_fields():
    const = np.full((1, 49, 6), 0.37, np.float32)
    np.testing.assert_allclose(resample_posemb(const, (11, 5)), np.full((1, 55, 6), 0.37),
                               atol=1e-7)
    # f(y, x) = a*y + b*x + c on the corner-aligned grid is reproduced exactly.
    def field(h, w):
        y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        return np.stack([2 * y - 3 * x + 1, x, y], -1).reshape(1, h * w, 3)
    np.testing.assert_allclose(resample_posemb(field(7, 7), (12, 9)), field(12, 9), atol=1e-12)
    np.testing.assert_allclose(resample_posemb(field(8, 8), (3, 3)), field(3, 3), atol=1e-12)


def test_resample_keeps_prefix_and_matches_scipy_zoom():
    pe = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)   # 1 cls + 7x7
    out = resample_posemb(pe, (10, 10), num_prefix_tokens=1)
    assert out.shape == (101, 8)
    np.testing.assert_array_equal(out[0], pe[0])
    ndimage = pytest.importorskip("scipy.ndimage")   # big_vision's resample_posemb uses zoom
    ref = ndimage.zoom(pe[1:].reshape(7, 7, 8), (10 / 7, 10 / 7, 1), order=1).reshape(100, 8)
    np.testing.assert_allclose(out[1:], ref, atol=1e-6)
    with pytest.raises(ValueError, match="not a square"):
        resample_posemb(pe, (4, 4))


def test_resampled_checkpoint_runs_at_a_new_resolution():
    model = ViT(**TINY, pool_type="gap")
    params, _ = init_apply(model, images(size=32))
    params = {**params, "pos_embedding": resample_posemb(params["pos_embedding"], (6, 6))}
    feats, out = jax.jit(model.apply)({"params": params}, images(size=48))
    assert out["tokens"].shape == (2, 36, 32) and np.isfinite(feats).all()


# ----------------------------------------------------------------------------- patch dropout


def test_keep_random_patches_is_a_uniform_subset_per_example():
    """FLIP masking: K = round((1 - p) N) distinct patches per example, each kept with
    probability 1 - p, different subsets for different examples."""
    b, n, draws = 4, 16, 400
    x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[None, :, None], (b, n, 3))
    kept = jax.vmap(lambda k: keep_random_patches(x, 0.75, k))(
        jax.random.split(jax.random.key(0), draws))  # [draws, b, 4, 3]
    assert kept.shape == (draws, b, 4, 3)
    ids = np.asarray(kept[..., 0]).astype(int)
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4))  # no patch twice
    assert np.any(ids[:, 0] != ids[:, 1])  # examples draw independently
    freq = np.bincount(ids.reshape(-1), minlength=n) / (draws * b)
    np.testing.assert_allclose(freq, 0.25, atol=0.04)


def test_patch_dropout_trains_on_kept_patches_and_evaluates_on_all():
    model = ViT(**TINY, pool_type="gap", num_registers=2, patch_dropout=0.5)
    x = images(b=3)
    params, (feats_eval, _) = init_apply(model, x)
    apply = jax.jit(model.apply, static_argnames=("train", "patch_dropout"))
    rngs = {"dropout": jax.random.key(1)}

    def sq_norm(im):  # training forward with patch dropout, and its gradient w.r.t. the pixels
        feats, out = apply({"params": params}, im, train=True, rngs=rngs)
        return jnp.sum(feats ** 2), (feats, out)

    grad, (feats, out) = jax.jit(jax.grad(sq_norm, has_aux=True))(x)
    # Training keeps 8 of the 16 patches; registers are dropped as usual; GAP pools the kept.
    assert out["tokens"].shape == (3, 8, 32)
    np.testing.assert_allclose(feats, out["tokens"].mean(axis=1), atol=1e-6)
    assert not np.allclose(feats, feats_eval, atol=1e-3)
    # Dropped patches get no gradient: exactly 8 of the 16 8x8 pixel patches of each image do.
    per_patch = jnp.abs(grad).reshape(3, 4, 8, 4, 8, 3).sum(axis=(2, 4, 5))
    assert np.all(np.sum(np.asarray(per_patch) > 0, axis=(1, 2)) == 8)
    # The call-time override (FLIP's unmasked tuning) trains on every patch, which is also what
    # evaluation does whatever the rate.
    full, _ = apply({"params": params}, x, train=True, patch_dropout=0.0, rngs=rngs)
    np.testing.assert_allclose(full, feats_eval, atol=1e-6)
    with pytest.raises(ValueError, match="patch_dropout"):
        apply({"params": params}, x, train=True, patch_dropout=1.0, rngs=rngs)


@pytest.mark.parametrize("pool_type", ["cls", "map"])
def test_patch_dropout_keeps_the_class_token_and_feeds_map(pool_type):
    model = ViT(**TINY, pool_type=pool_type, num_classes=10, patch_dropout=0.75)
    x = jnp.zeros((2, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    feats, out = jax.eval_shape(lambda p: model.apply(p, x, train=True,
                                                      rngs={"dropout": jax.random.key(1)}), params)
    assert out["tokens"].shape == (2, 4 + (pool_type == "cls"), 32) and feats.shape == (2, 10)
