"""open_clip ViT CLIP checkpoints load into vljax with identical outputs.

The reference is open_clip's own `CLIP` module. open_clip's package __init__ imports torchvision
(not installed: its PyPI build breaks CPU torch), so the test imports only `open_clip.model`,
with a stand-in for the one torchvision symbol that module chain touches (FrozenBatchNorm2d, used
by ResNet towers only).
"""
import importlib
import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip_torch is not installed", allow_module_level=True)

from vljax.convert.open_clip import load_open_clip, open_clip_model_kwargs  # noqa: E402
from vljax.models import TwoTowers  # noqa: E402

VOCAB, MAX_LEN, IMAGE = 100, 12, 32


def import_open_clip_model():
    """open_clip.model without running open_clip/__init__.py (which needs torchvision)."""
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    import transformers  # noqa: F401  (imported first so it never sees the stand-in)

    spec = importlib.util.find_spec("open_clip")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    stubs = {name: types.ModuleType(name)
             for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    sys.modules["open_clip"] = package
    sys.modules.update(stubs)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in stubs:
            del sys.modules[name]


def tiny_config(quick_gelu):
    return dict(embed_dim=16, quick_gelu=quick_gelu,
                vision_cfg=dict(image_size=IMAGE, layers=2, width=32, head_width=16,
                                patch_size=8, mlp_ratio=2.0),
                text_cfg=dict(context_length=MAX_LEN, vocab_size=VOCAB, width=32, heads=2,
                              layers=2))


def build_open_clip(cfg, seed=0):
    oc = import_open_clip_model()
    torch.manual_seed(seed)
    model = oc.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                    text_cfg=cfg["text_cfg"], quick_gelu=cfg["quick_gelu"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():   # LN params are trivial at init
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(1 / 0.07) + 0.2)
    return model


def example_inputs(batch=4, seed=0):
    """open_clip tokenisation: SOT, words, EOT (the largest id), zero padding."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32)
    ids = np.zeros((batch, MAX_LEN), np.int32)
    for i, n in enumerate(rng.integers(2, MAX_LEN - 1, size=batch)):
        ids[i, 0] = VOCAB - 2
        ids[i, 1:n] = rng.integers(1, VOCAB - 2, size=n - 1)
        ids[i, n] = VOCAB - 1
    return images, ids


def reference(model, images, ids):
    with torch.no_grad():
        zimg = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
        ztxt = model.encode_text(torch.from_numpy(ids).long(), normalize=True)
        logits = model.logit_scale.exp() * zimg @ ztxt.T
    return zimg.numpy(), ztxt.numpy(), logits.numpy()


def ours(kwargs, params, images, ids):
    zimg, ztxt, out = TwoTowers(**kwargs).apply({"params": params}, jnp.asarray(images),
                                               jnp.asarray(ids))
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(out["t"] * zimg @ ztxt.T)


def save_safetensors(model, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_safetensors_parity(tmp_path, quick_gelu):
    cfg = tiny_config(quick_gelu)
    model = build_open_clip(cfg)
    save_safetensors(model, tmp_path / "model.safetensors")
    kwargs, params = load_open_clip(str(tmp_path / "model.safetensors"), cfg)
    assert kwargs["image"]["act"] == ("quick_gelu" if quick_gelu else "gelu")
    images, ids = example_inputs()
    ref = reference(model, images, ids)
    for name, a, b in zip(("zimg", "ztxt", "logits"), ours(kwargs, params, images, ids), ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
    assert abs(ref[2]).max() > 1.0


def test_open_clip_legacy_pickle_checkpoint(tmp_path):
    """A training checkpoint ({"epoch", "state_dict"} with DDP "module." keys) saved by torch."""
    pytest.importorskip("vljax.convert.torch_pickle")
    cfg = tiny_config(False)
    model = build_open_clip(cfg, seed=1)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "epoch_3.pt")
    kwargs, params = load_open_clip(str(tmp_path / "epoch_3.pt"), cfg)
    images, ids = example_inputs(seed=1)
    for a, b in zip(ours(kwargs, params, images, ids), reference(model, images, ids)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_open_clip_config_by_name_and_unsupported_options(tmp_path):
    kwargs = open_clip_model_kwargs("ViT-B-16-quickgelu")
    assert kwargs["image"]["width"] == 768 and kwargs["image"]["num_heads"] == 12
    assert kwargs["image"]["act"] == "quick_gelu" and kwargs["text"]["pool_type"] == "argmax"
    with pytest.raises(ValueError, match="ls_init_value"):
        open_clip_model_kwargs({**tiny_config(False),
                                "vision_cfg": {**tiny_config(False)["vision_cfg"],
                                               "ls_init_value": 1e-5}})
    with pytest.raises(ValueError, match="no such file or config name"):
        open_clip_model_kwargs("ViT-Q-99")

    cfg = tiny_config(False)
    model = build_open_clip(cfg)
    save_safetensors(model, tmp_path / "m.safetensors")
    deeper = {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 3}}
    with pytest.raises(ValueError, match=r"missing key 'transformer\.resblocks\.2\.attn"):
        load_open_clip(str(tmp_path / "m.safetensors"), deeper)
