"""EfficientNet-Lite image tower (Tan & Le 2019; the "lite" edge variants of tensorflow/tpu).

Lite = EfficientNet without squeeze-excitation, with ReLU6, and with the stem (32 ch),
the head conv (1280 ch) and the first/last stage depth kept fixed across variants.
Convolutions use TF "SAME" padding (asymmetric on stride 2, as the checkpoints expect).

Batch norm is inference-only and folded into the convolution before it: every conv has
a kernel and a bias (vljax.convert.efficientnet folds BN with eps 1e-3). The tower is
meant to be used locked; fine-tuning trains the folded affine, without batch statistics.
Without normalisation it does not train from random initialisation (measured on the tests' tiny
set: the loss stays at chance in float32 and bfloat16 alike); start from the ImageNet weights.

Depthwise convolutions run as a sum of k*k strided slices times per-channel weights
(`depthwise="slices"`, default): XLA's CPU grouped convolution
(`feature_group_count=C`, `depthwise="conv"`) is an order of magnitude slower there.
On accelerators "conv" is the natural choice. Both give the same numbers.

Input: [B, H, W, 3] float, already `preprocess`ed: (pixel - 127) / 128 on a 0..255
scale, at the variant's resolution (lite0..lite4: 224, 240, 260, 280, 300).
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# variant -> (width multiplier, depth multiplier, resolution)
VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
# EfficientNet-B0 stages: (kernel, repeats, stride, expand ratio, output channels).
BASE_STAGES = (
    (3, 1, 1, 1, 16), (3, 2, 2, 6, 24), (5, 2, 2, 6, 40), (3, 3, 2, 6, 80),
    (5, 3, 1, 6, 112), (5, 4, 2, 6, 192), (3, 1, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0


def round_filters(channels, width):
    """tensorflow/tpu's rounding: scale, round to a multiple of 8, never lose > 10%."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def block_specs(variant):
    """List of dicts (kernel, stride, expand, cin, cout) for every MBConv block of `variant`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}, expected one of "
                         f"{sorted(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    specs, cin = [], STEM_CHANNELS
    for i, (kernel, repeats, stride, expand, cout) in enumerate(BASE_STAGES):
        fixed = i in (0, len(BASE_STAGES) - 1)  # lite: first and last stage keep depth
        repeats = repeats if fixed else int(math.ceil(depth * repeats))
        cout = round_filters(cout, width)
        for r in range(repeats):
            specs.append(dict(kernel=kernel, stride=stride if r == 0 else 1,
                              expand=expand, cin=cin, cout=cout))
            cin = cout
    return specs


def preprocess(images):
    """images: [..., H, W, 3] on a 0..255 scale (uint8 or float) -> float32 (x - 127) / 128."""
    return (jnp.asarray(images, jnp.float32) - PIXEL_MEAN) / PIXEL_STD


def same_padding(size, kernel, stride):
    """TF "SAME" (low, high) padding of one spatial dim: the extra pixel goes at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution with bias, TF "SAME" padding.

    Params: kernel [k, k, 1, C] (flax's grouped-conv layout), bias [C].
    impl "slices": sum over the k*k taps of strided slices of the padded input times the
    tap's per-channel weight (fast on CPU); "conv": lax conv with feature_group_count=C.
    """

    kernel_size: int
    stride: int = 1
    impl: str = "slices"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [B, H, W, C] -> [B, ceil(H / s), ceil(W / s), C]."""
        k, s, c = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if self.impl == "conv":
            y = lax.conv_general_dilated(
                x, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c)
            return y + bias
        if self.impl != "slices":
            raise ValueError(f"depthwise impl {self.impl!r}, expected 'slices' or 'conv'")
        _, h, w, _ = x.shape
        pad_h, pad_w = same_padding(h, k, s), same_padding(w, k, s)
        xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
        ho, wo = -(-h // s), -(-w // s)
        y = bias
        for i in range(k):
            for j in range(k):
                tap = lax.slice(xp, (0, i, j, 0),
                                (xp.shape[0], i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c),
                                (1, s, s, 1))
                y = y + tap * kernel[i, j, 0]
        return y


class MBConv(nn.Module):
    """Inverted bottleneck (lite: no squeeze-excitation): 1x1 expand, kxk depthwise,
    1x1 project; identity skip when the shape is kept."""

    kernel: int
    stride: int
    expand: int
    cout: int
    depthwise: str = "slices"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cin = x.shape[-1]
        y = x
        if self.expand != 1:
            y = nn.relu6(nn.Conv(cin * self.expand, (1, 1), name="expand", **kw)(y))
        y = DepthwiseConv(self.kernel, self.stride, self.depthwise, name="depthwise", **kw)(y)
        y = nn.relu6(y)
        y = nn.Conv(self.cout, (1, 1), name="project", **kw)(y)
        if self.stride == 1 and cin == self.cout:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; `__call__(images [B, H, W, 3]) -> (features, out)`.

    features: [B, 1280] pooled features, or [B, num_classes] after the Dense "head" when
    num_classes > 0 (1000 = the ImageNet classifier; in a two-tower model, the projection).
    out: "tokens" [B, h*w, 1280] final feature map (after the 1280-ch conv, ReLU6),
    "pre_logits" [B, 1280], "logits" when there is a head. With `feature_block = i` the trunk
    stops after MBConv block i: "tokens" [B, h*w, C_i] its map, "pre_logits" [B, C_i] their mean.
    With `mutable=["intermediates"]`, `apply` also returns each MBConv block's output map
    [B, h, w, C] as intermediates `blocks_<i>_out` (vljax/layer_selection.py reads them).
    """

    variant: str = "lite0"
    num_classes: int = 0
    head_bias: bool = True
    dropout_rate: float = 0.0
    depthwise: str = "slices"
    # The trunk ends after MBConv block `feature_block` (its map averaged over space is pre_logits;
    # no top_conv): STRUCTURE's chosen image layer (vljax/layer_selection.py). None: the whole trunk.
    feature_block: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images=None, train=False, features=None):
        """features: [B, 1280] pre_logits computed before (a locked trunk's stored features,
        vljax/features.py): only the head (dropout, Dense `head/...`) is applied."""
        if features is None:
            features, out = self._trunk(images)
        else:
            out = {"pre_logits": features}
        x = features
        if self.num_classes:
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
            x = out["logits"] = nn.Dense(
                self.num_classes, use_bias=self.head_bias, name="head",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x, out

    def _trunk(self, images):
        """Everything before the head: (pre_logits [B, 1280], out)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"EfficientNetLite expects images [B, H, W, 3], got {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"EfficientNetLite expects float images, got {images.dtype}: "
                             "apply vljax.models.efficientnet.preprocess to 0..255 pixels")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = {}
        x = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding="SAME", name="stem_conv", **kw)(
            jnp.asarray(images, self.dtype))
        x = nn.relu6(x)
        specs = block_specs(self.variant)
        last = len(specs) - 1 if self.feature_block is None else self.feature_block
        if not 0 <= last < len(specs):
            raise ValueError(f"config key `model.image.feature_block`: {self.feature_block} is not a block "
                             f"of EfficientNet-{self.variant} (0..{len(specs) - 1}; None: the whole trunk)")
        for i, spec in enumerate(specs[:last + 1]):
            x = MBConv(spec["kernel"], spec["stride"], spec["expand"], spec["cout"],
                       self.depthwise, name=f"blocks_{i}", **kw)(x)
            # Each block's output map [B, h, w, C], kept only when the caller makes "intermediates"
            # mutable (STRUCTURE's layer selection, vljax/layer_selection.py); a no-op otherwise.
            self.sow("intermediates", f"blocks_{i}_out", x)
        if self.feature_block is None:
            x = nn.relu6(nn.Conv(HEAD_CHANNELS, (1, 1), name="top_conv", **kw)(x))
        b, h, w, c = x.shape
        out["tokens"] = x.reshape(b, h * w, c)
        x = out["pre_logits"] = x.mean(axis=(1, 2))
        return x, out
