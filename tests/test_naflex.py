"""NaFlex (SigLIP 2): preprocessing equal to transformers' Siglip2ImageProcessor, the per-image
position-embedding resize equal to torch's antialiased bilinear interpolation, padding that
changes nothing, and one compile per patch budget."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.data.naflex import naflex_batch, naflex_image, pad_patches, stack, target_size
from vljax.models import TwoTowers, get_model
from vljax.models.naflex import NaFlexViT, example_input, resize_posemb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (H, W): wide, tall, tiny, huge, square, a one-pixel-high strip.
SIZES = [(37, 200), (300, 41), (5, 7), (1000, 1500), (64, 64), (1, 300)]
TOWER = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4,
             posemb_grid=4)


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def hf_processor(images, patch_size, budget):
    # The PIL backend: what transformers' Siglip2ImageProcessor resolves to without torchvision.
    proc = transformers.Siglip2ImageProcessorPil(patch_size=patch_size, max_num_patches=budget)
    # channels_last: a (1, W, 3) image is otherwise read as channels-first and refused.
    return proc(images=images, return_tensors="np", input_data_format="channels_last")


@pytest.mark.parametrize("patch_size,budget", [(8, 16), (8, 64), (16, 256), (4, 7)])
def test_preprocessing_equals_transformers(patch_size, budget):
    images = random_images(SIZES)
    ours = naflex_batch(images, patch_size, budget)
    ref = hf_processor(images, patch_size, budget)
    np.testing.assert_array_equal(ours["patches"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["mask"], ref["pixel_attention_mask"].astype(bool))
    np.testing.assert_array_equal(ours["shapes"], ref["spatial_shapes"])
    assert ours["patches"].dtype == np.float32 and ours["shapes"].dtype == np.int32
    assert (ours["shapes"].prod(1) <= budget).all()
    assert ours["mask"].sum(1).tolist() == ours["shapes"].prod(1).tolist()


def test_target_size_keeps_aspect_and_budget():
    assert target_size(100, 400, 16, 64) == (64, 256)       # 4 x 16 patches, ratio 1:4 kept
    assert target_size(10, 10, 16, 1) == (16, 16)           # one patch, upsampled
    assert target_size(1, 10_000, 16, 4) == (16, 64)        # one row of patches


def test_bad_inputs_are_refused_naming_the_value():
    image = random_images([(32, 32)])[0]
    with pytest.raises(ValueError, match="max_num_patches=0"):
        naflex_image(image, 16, 0)
    with pytest.raises(ValueError, match=r"30 patches \(5 x 6\).*max_num_patches=16"):
        pad_patches(np.zeros((30, 48), np.float32), (5, 6), 16)
    with pytest.raises(ValueError, match=r"uint8 RGB image.*float32 \(32, 32, 3\)"):
        naflex_image(image.astype(np.float32), 16, 16)
    with pytest.raises(ValueError, match=r"different budgets \[4, 16\]"):
        stack([naflex_image(image, 16, 4), naflex_image(image, 16, 16)])
    tower = NaFlexViT(**TOWER)
    batch = naflex_batch([image], 4, 16)
    with pytest.raises(ValueError, match=r"'patches' must be \[B, N, 48\].*\(1, 16, 12\)"):
        tower.init(jax.random.key(0), dict(batch, patches=batch["patches"][..., :12]))
    with pytest.raises(ValueError, match=r"image 0 has a \(5, 4\) patch grid.*N=16"):
        tower.init(jax.random.key(0), dict(batch, shapes=np.asarray([[5, 4]], np.int32)))
    with pytest.raises(ValueError, match="expects a dict with keys"):
        tower.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize("shape", [(2, 3), (7, 5), (4, 4), (1, 9), (12, 2)])
def test_posemb_resize_equals_torch_antialiased_bilinear(shape):
    """Down- and upsampling, per axis: transformers' F.interpolate(bilinear, align_corners=False,
    antialias=True) and jax.image.resize(linear, antialias=True) on a static shape."""
    grid = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
    n = 40
    ours = np.asarray(resize_posemb(jnp.asarray(grid), np.asarray([shape]), n))[0]
    h, w = shape
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
        align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(h * w, -1).numpy()
    np.testing.assert_allclose(ours[:h * w], ref, atol=1e-5, rtol=0)
    ref_jax = jax.image.resize(grid, (h, w, 8), "linear", antialias=True).reshape(h * w, -1)
    np.testing.assert_allclose(ours[:h * w], ref_jax, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[h * w:], np.broadcast_to(ours[0], (n - h * w, 8)))


def random_params(module, *inputs, seed=0):
    """Random parameters of the module's shapes (numpy: no init compile); LN scales near 1."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return 1.0 + 0.1 * noise if is_scale else 0.2 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(kwargs, params, batch):
    return jax.jit(TwoTowers(**kwargs).apply)({"params": params}, batch, None)[0]


def test_padding_changes_nothing():
    """The same images at two patch budgets, padding filled with noise: the same embeddings."""
    kwargs = dict(image_model="naflex_vit", image=TOWER, temperature_init=10.0)
    images = random_images([(40, 13), (16, 48), (20, 20)])
    small = naflex_batch(images, 4, 24)
    extra = 16   # the same patches with 16 more padding positions, filled with noise
    big = {"patches": np.concatenate([small["patches"], np.zeros((3, extra, 48), np.float32)], 1),
           "mask": np.concatenate([small["mask"], np.zeros((3, extra), bool)], 1),
           "shapes": small["shapes"]}
    pad = ~big["mask"]
    big["patches"][pad] = np.random.default_rng(1).normal(size=(pad.sum(), 48))
    params = random_params(TwoTowers(**kwargs), small, None)
    np.testing.assert_allclose(_apply(kwargs, params, big), _apply(kwargs, params, small),
                               atol=1e-6, rtol=0)


def test_mixed_aspect_ratios_compile_once_per_budget():
    tower = get_model("naflex_vit")(**TOWER)
    traces = []

    def fwd(params, batch):
        traces.append(1)
        return tower.apply({"params": params}, batch)[0]

    params = random_params(tower, example_input(TOWER, num_patches=16))
    run = jax.jit(fwd)
    for seed, sizes in enumerate([[(10, 40), (40, 10)], [(16, 16), (3, 50)], [(9, 31), (60, 2)]]):
        batch = naflex_batch(random_images(sizes, seed), 4, 16)
        run(params, batch).block_until_ready()
    assert len(traces) == 1 and run._cache_size() == 1
    run(params, naflex_batch(random_images([(10, 40), (40, 10)]), 4, 25))
    assert len(traces) == 2   # a new budget, a new compile


def test_example_input_fits_the_tower():
    shapes = jax.eval_shape(NaFlexViT(**TOWER, max_num_patches=20).init, jax.random.key(0),
                            example_input(dict(TOWER, max_num_patches=20), batch=2))
    assert shapes["params"]["pos_embedding"].shape == (4, 4, 32)
    assert shapes["params"]["embedding"]["kernel"].shape == (48, 32)
