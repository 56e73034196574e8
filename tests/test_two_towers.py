"""TwoTowers: the contract (params, outputs, skipped towers), registry, and that it learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vljax.models import MODELS, TextTransformer, TwoTowers, ViT, get_model

SIZES = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64)
KW = dict(image=dict(**SIZES, patch_size=8, pool_type="map", num_classes=16),
          text=dict(**SIZES, vocab_size=40, max_len=8, causal=True, pool_type="eot", eot_id=39,
                    pad_id=0, num_classes=16, head_bias=False))


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    texts = np.zeros((n, 8), np.int32)
    for i in range(n):
        texts[i, :3] = rng.integers(1, 39, size=3)
        texts[i, 3] = 39
    return jnp.asarray(images), jnp.asarray(texts)


def test_contract():
    model = TwoTowers(**KW, temperature_init=10.0, bias_init=-10.0)
    images, texts = batch(4)
    params = jax.jit(model.init)(jax.random.key(0), images, texts)["params"]
    assert set(params) == {"img", "txt", "t", "b"}
    assert params["t"].shape == () and params["b"].shape == ()
    zimg, ztxt, out = jax.jit(model.apply)({"params": params}, images, texts)
    assert zimg.shape == ztxt.shape == (4, 16)
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["t"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["b"], -10.0)
    assert out["img/tokens"].shape == (4, 16, 32) and out["txt/tokens"].shape == (4, 8, 32)
    np.testing.assert_array_equal(out["txt/mask"], texts != 0)

    # One tower at a time gives the same embeddings.
    zimg_only, none, _ = model.apply({"params": params}, images, None)
    assert none is None
    np.testing.assert_allclose(zimg_only, zimg, atol=1e-6)
    none, ztxt_only, out = model.apply({"params": params}, None, texts)
    assert none is None and "img/tokens" not in out
    np.testing.assert_allclose(ztxt_only, ztxt, atol=1e-6)
    # No bias_init: no bias parameter.
    p = jax.eval_shape(TwoTowers(**KW).init, jax.random.key(0), images, texts)["params"]
    assert set(p) == {"img", "txt", "t"}


def test_registry_and_mismatched_towers():
    assert get_model("vit") is ViT and get_model("text_transformer") is TextTransformer
    assert {"vit", "text_transformer", "bert", "efficientnet_lite"} <= set(MODELS)
    with pytest.raises(ValueError, match="Unknown model 'resnet'"):
        get_model("resnet")
    bad = TwoTowers(image=KW["image"], text={**KW["text"], "num_classes": 8})
    with pytest.raises(ValueError, match="differ in width"):
        bad.init(jax.random.key(0), *batch(2))


@pytest.mark.slow  # a training loop to a learned bound (~24 s); test_train.py's recipes keep learning fast
def test_learns_to_match_pairs():
    """Eight image/caption pairs, CLIP loss: retrieval goes from chance to perfect."""
    model = TwoTowers(**KW, temperature_init=10.0)
    images, texts = batch(8, seed=1)
    params = jax.jit(model.init)(jax.random.key(0), images, texts)["params"]
    opt = optax.adam(3e-3)

    def loss_fn(p):
        zimg, ztxt, out = model.apply({"params": p}, images, texts, train=True)
        logits = out["t"] * zimg @ ztxt.T
        labels = jnp.arange(8)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
                optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = opt.init(params)
    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    zimg, ztxt, _ = model.apply({"params": params}, images, texts)
    accuracy = float(np.mean(np.argmax(zimg @ ztxt.T, axis=1) == np.arange(8)))
    assert losses[0] > 1.5 and losses[-1] < 0.1, losses[::10]
    assert accuracy == 1.0
