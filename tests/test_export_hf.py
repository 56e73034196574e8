"""vljax CLIP, SigLIP and SigLIP 2 (NaFlex) models export to transformers directories."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_hf import (  # noqa: E402
    MAX_LEN, VOCAB, assert_parity, example_inputs, hf_outputs, vljax_outputs)
from test_convert_siglip2 import hf_outputs as siglip2_hf_outputs  # noqa: E402
from test_convert_siglip2 import vljax_outputs as siglip2_outputs  # noqa: E402
from test_naflex import random_images  # noqa: E402
from test_naflex import random_params as naflex_params  # noqa: E402

from vljax.convert import flatten  # noqa: E402
from vljax.convert.hf import load_hf_clip  # noqa: E402
from vljax.convert.hf_siglip2 import load_hf_siglip2  # noqa: E402
from vljax.convert.to_hf import export_hf  # noqa: E402
from vljax.data.naflex import naflex_batch  # noqa: E402
from vljax.models import TwoTowers  # noqa: E402
from vljax.models.naflex import example_input  # noqa: E402

SIZES = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64)
CLIP_KW = dict(
    image=dict(**SIZES, patch_size=8, pool_type="cls", ln_pre=True, patch_bias=False,
               num_classes=16, head_bias=False, act="quick_gelu", ln_eps=1e-5),
    text=dict(**SIZES, vocab_size=VOCAB, max_len=MAX_LEN, causal=True, pool_type="eot",
              eot_id=VOCAB - 1, pad_id=0, num_classes=16, head_bias=False, act="quick_gelu",
              ln_eps=1e-5),
    temperature_init=1 / 0.07)
SIGLIP_KW = dict(
    image=dict(**SIZES, patch_size=8, pool_type="map", act="gelu_tanh"),
    text=dict(**SIZES, vocab_size=VOCAB, max_len=MAX_LEN, causal=False, pool_type="last",
              eot_id=1, pad_id=1, num_classes=32, head_bias=True, act="gelu_tanh", ln_eps=1e-6),
    temperature_init=10.0, bias_init=-5.0)


def random_params(kwargs, seed=0):
    """Random params of the model's shapes (numpy, no init compile); LN scales near 1."""
    images, ids = example_inputs(batch=1)
    shapes = jax.eval_shape(TwoTowers(**kwargs).init, jax.random.key(0), images, ids)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1.0 + 0.1 * noise
        return 0.2 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("arch,kwargs,model_cls", [
    ("clip", CLIP_KW, "CLIPModel"), ("siglip", SIGLIP_KW, "SiglipModel")])
def test_export_round_trip(tmp_path, arch, kwargs, model_cls):
    params = random_params(kwargs)
    export_hf(kwargs, params, str(tmp_path), arch=arch)
    model = getattr(transformers, model_cls).from_pretrained(str(tmp_path)).eval()
    images, ids = example_inputs()
    if arch == "siglip":
        ids[ids == 0] = 1
    assert_parity(vljax_outputs(kwargs, params, images, ids), hf_outputs(model, images, ids))


def test_export_then_import_gives_the_same_model(tmp_path):
    params = random_params(CLIP_KW, seed=2)
    export_hf(CLIP_KW, params, str(tmp_path), arch="clip")
    kwargs, back = load_hf_clip(str(tmp_path))
    images, ids = example_inputs(seed=2)
    assert_parity(vljax_outputs(kwargs, back, images, ids),
                  vljax_outputs(CLIP_KW, params, images, ids), atol=1e-6)


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="Unknown export arch 'bert'"):
        export_hf(CLIP_KW, {}, str(tmp_path), arch="bert")
    sincos = {**CLIP_KW, "image": {**CLIP_KW["image"], "posemb": "sincos2d"}}
    with pytest.raises(ValueError, match="posemb='sincos2d'"):
        export_hf(sincos, random_params(CLIP_KW), str(tmp_path), arch="clip")
    biased = {**CLIP_KW, "bias_init": -10.0}
    with pytest.raises(ValueError, match="CLIP has no logit bias"):
        export_hf(biased, random_params(biased), str(tmp_path), arch="clip")
    with pytest.raises(ValueError, match="pool_type='map'"):
        export_hf(CLIP_KW, random_params(CLIP_KW), str(tmp_path), arch="siglip")
    bert = {**CLIP_KW, "text_model": "bert"}
    with pytest.raises(ValueError, match="only the 'vit' \\+ 'text_transformer' towers"):
        export_hf(bert, {}, str(tmp_path), arch="clip")


SIGLIP2_KW = dict(
    image_model="naflex_vit",
    image=dict(**SIZES, patch_size=4, posemb_grid=4, max_num_patches=20, pool_type="map",
               act="gelu_tanh"),
    text=SIGLIP_KW["text"], temperature_init=10.0, bias_init=-5.0)


def test_export_siglip2_round_trip(tmp_path):
    """A NaFlex model exports to a Siglip2Model directory that transformers loads with the same
    outputs (a mixed batch at the exported budget), and loads back with the same parameters."""
    params = naflex_params(TwoTowers(**SIGLIP2_KW), example_input(SIGLIP2_KW["image"]),
                           np.ones((1, MAX_LEN), np.int32), seed=3)
    export_hf(SIGLIP2_KW, params, str(tmp_path), arch="siglip2")
    model = transformers.Siglip2Model.from_pretrained(str(tmp_path)).eval()
    batch = naflex_batch(random_images([(30, 9), (12, 40), (16, 16)]), 4, 20)
    _, ids = example_inputs(batch=3)
    ids[ids == 0] = 1
    apply = jax.jit(TwoTowers(**SIGLIP2_KW).apply)
    assert_parity(siglip2_outputs(apply, params, batch, ids)[:3],
                  siglip2_hf_outputs(model, batch, ids)[:3])

    kwargs, back = load_hf_siglip2(str(tmp_path))
    assert kwargs["image"]["max_num_patches"] == 20 and kwargs["image"]["patch_size"] == 4
    want, got = flatten(params), flatten(back)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    with pytest.raises(ValueError, match="only the 'naflex_vit' \\+ 'text_transformer' towers"):
        export_hf(SIGLIP_KW, random_params(SIGLIP_KW), str(tmp_path), arch="siglip2")
