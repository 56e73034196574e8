"""Dense probe: how well the image tower's patch tokens say foreground from background.

A linear probe on the image tower's own tokens (out["img/tokens"], after its final norm, before any
head: `Embedder.embed_patch_tokens`) predicts, per patch, whether the patch is foreground, the
target read from the PNG's alpha channel. It is trained on a train split's patches and scored as
mIoU on a test split's: the mean over the two classes (foreground, background) of
IoU_c = |pred = c and true = c| / |pred = c or true = c| over all test patches (the dataset-level IoU
of segmentation benchmarks; a class absent from both prediction and truth is left out of the
mean). SigLIP 2 (Tschannen et al. 2025) measures its dense features by probing the frozen patch
tokens (semantic segmentation mIoU among them); this is that kind of measurement on the data that
exists here: the demo sets' icons carry alpha channels.

The target of a patch (the rule): the alpha channel (uint8, 0..255) is passed through the model's
own eval transform (`Embedder.eval_image`: the same resize / centre crop / NaFlex resize as the
image, so it lands on the same pixels); a pixel of the model's input is foreground when its
resampled alpha is > 0.5 (> 127.5 of 255), and a patch is foreground when MORE than half of its
pixels are.

The probe (the choice): ridge regression of the 0/1 target on the tokens, in closed form
(float64): w = (Xc^T Xc + lam I)^-1 Xc^T (y - mean y) with Xc the centred train tokens, bias
b = mean y - mean x . w, lam = l2 * trace(Xc^T Xc) / W (relative to the tokens' scale, so `l2` means
the same for any width); a patch is predicted foreground when x . w + b > 0.5. Deterministic and
exact: no optimiser, no step count, no seed.

Where the alpha comes from (`alpha`): "image" reads the record's own image (a PNG / WebP with
an alpha channel; JSONL and folder sources keep the file). The demo TFDS sets store RGB with the
transparency composited on white (vljax/data/demo_emoji.py, demo_openclipart.py), so for them the
alpha is read from the original files the build read, by the record's `id`: "emoji" from the npm
package emoji-datasource-google (`<alpha_dir>/img/google/64/<file>`, the file named for the id in
`<alpha_dir>/emoji.json`; default alpha_dir `<assets>/emoji/package`), "openclipart" from Debian's
openclipart-png (`<alpha_dir>/png/<id>.png`, default /usr/share/openclipart); an original's alpha is
first resized (bilinear) to the stored image's size (the build resized openclipart to 128 px on the
longer side), so the eval transform crops it, and NaFlex grids it, exactly as the image. "auto"
(default) picks "emoji" / "openclipart" for vljax_emoji / vljax_openclipart and "image" otherwise.
A record whose alpha cannot be had (no alpha channel, a missing original) is skipped and counted
(metric ".../skipped"), never raised.

Works for any image tower with patch tokens: a ViT (its tokens [N, W], a class token first when
pool_type="cls": N = g*g + 1; the patch grid g x g from N and the image size) and NaFlex (the
patch budget's rows, the real patches by the input's mask). A tower without tokens is refused,
naming it (vljax/towers.py `patch_tokens`).
"""
from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vljax.data import sources as sources_lib
from vljax.data import transforms as T
from vljax.evaluators import base, registry
from vljax.evaluators import data as data_lib

ALPHA_KINDS = ("auto", "image", "emoji", "openclipart")
DEMO_ALPHA = {"vljax_emoji": "emoji", "vljax_openclipart": "openclipart"}
OPENCLIPART_ROOT = "/usr/share/openclipart"


# -- the target ------------------------------------------------------------------------------
def alpha_of(image) -> np.ndarray | None:
    """An image (encoded bytes, a path, a PIL image or a uint8 array [H, W, 4]) -> its alpha
    channel uint8 [H, W] (EXIF orientation applied, as the pipeline's decode does), or None when
    it has none (a palette image's transparency entry counts as alpha)."""
    if isinstance(image, np.ndarray):
        return image[..., 3].astype(np.uint8) if image.ndim == 3 and image.shape[-1] == 4 else None
    if isinstance(image, Image.Image):
        return _alpha_channel(image)
    with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as img:
        return _alpha_channel(img)


def _alpha_channel(img: Image.Image) -> np.ndarray | None:
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if "A" not in img.getbands():
        return None
    return np.asarray(img.getchannel("A"), np.uint8)


def _mid(value_range) -> np.ndarray:
    """The model-input value of alpha 0.5 (raw 127.5), per channel [3]."""
    return T.normalize(np.full((1, 1, 3), 127.5, np.float32), value_range)[0, 0]


def patch_targets(alpha: np.ndarray, eval_image, num_tokens: int | None = None):
    """alpha uint8 [H, W] -> (foreground bool [n], rows int [n]): each patch's target (module
    docstring: pixel alpha > 0.5 after the model's eval transform; a patch when more than half of
    its pixels are) and the row of its token among the tower's `num_tokens` tokens.

    Fixed resolution: the grid g x g with g = isqrt(num_tokens) (one class token first makes
    num_tokens = g*g + 1), patch size S / g; NaFlex: the real patches of the budget, in order."""
    x = eval_image(Image.fromarray(alpha).convert("RGB"))
    mid = _mid(eval_image.value_range)
    if isinstance(x, dict):  # NaFlex: patches [N, P*P*3] in raster order, mask [N]
        frac = (x["patches"].reshape(len(x["patches"]), -1, 3) > mid).mean(axis=(1, 2))
        rows = np.flatnonzero(x["mask"])
        return frac[rows] > 0.5, rows
    s = x.shape[0]
    g = math.isqrt(num_tokens)
    prefix = num_tokens - g * g
    if prefix not in (0, 1) or s % g:
        raise ValueError(f"dense probe: {num_tokens} image tokens are not a square patch grid (plus "
                         f"at most a class token) of a {s} px input")
    p = s // g
    frac = (x > mid).mean(axis=2).reshape(g, p, g, p).mean(axis=(1, 3)).reshape(-1)
    return frac > 0.5, prefix + np.arange(g * g)


# -- the probe and its score -------------------------------------------------------------------
def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """x [n, W], y [n] 0/1 -> (w [W], b): ridge regression in closed form (module docstring)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mu, ym = x.mean(axis=0), y.mean()
    xc = x - mu
    gram = xc.T @ xc
    lam = max(float(l2) * float(np.trace(gram)) / x.shape[1], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - mu @ w)


def predict(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """[n] bool: x . w + b > 0.5 (foreground)."""
    return np.asarray(x, np.float64) @ w + b > 0.5


def iou(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Per-class IoU of boolean foreground arrays over all patches, and their mean ("miou"; a
    class with an empty union is left out of the mean, NaN alone)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    out = {}
    for name, p, t in (("fg", pred, true), ("bg", ~pred, ~true)):
        union = int(np.sum(p | t))
        out[f"iou_{name}"] = float(np.sum(p & t)) / union if union else float("nan")
    present = [v for v in out.values() if not math.isnan(v)]
    out["miou"] = float(np.mean(present)) if present else float("nan")
    return out


# -- where the alpha comes from ------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _emoji_files(package: str) -> dict[str, str]:
    """{record id (code points, "1F600" or "1F44B-1F3FB"): PNG file name} of the npm package."""
    entries = json.loads((Path(package) / "emoji.json").read_text())
    files = {}
    for e in entries:
        files[e["unified"]] = e["image"]
        for v in (e.get("skin_variations") or {}).values():
            files[v["unified"]] = v["image"]
    return files


def _root(source):
    while isinstance(source, (data_lib.Subset, data_lib.AugmentedView)):
        source = source.source
    return source


def resolve_alpha(source, alpha: str, alpha_dir, where: str) -> tuple[str, Path | None]:
    """(kind, its originals' directory) for `source`; a bad kind or a missing directory is an
    error naming `<where>.alpha` / `<where>.alpha_dir`, before any work."""
    if alpha not in ALPHA_KINDS:
        raise ValueError(f"config key `{where}.alpha`: {alpha!r} is not one of {ALPHA_KINDS}")
    if alpha == "auto":
        root = _root(source)
        alpha = DEMO_ALPHA.get(getattr(root, "name", None), "image") if isinstance(
            root, sources_lib.TfdsSource) else "image"
    if alpha == "image":
        return alpha, None
    default = (sources_lib.default_assets_dir() / "emoji" / "package" if alpha == "emoji"
               else Path(OPENCLIPART_ROOT))
    d = Path(alpha_dir).expanduser() if alpha_dir else default
    need = d / ("emoji.json" if alpha == "emoji" else "png")
    if not need.exists():
        raise FileNotFoundError(f"config key `{where}.alpha_dir`: {need} does not exist (the "
                                f"{alpha} originals, whose alpha channel the dense probe reads)")
    return alpha, d


def _at_size_of(alpha: np.ndarray, stored) -> np.ndarray:
    """An original's alpha resized (bilinear) to the stored image's size (its header only is
    read), so the eval transform maps both through the same crop and the same NaFlex grid."""
    if isinstance(stored, np.ndarray):
        h, w = stored.shape[:2]
    else:
        with Image.open(io.BytesIO(stored) if isinstance(stored, (bytes, bytearray)) else stored) as img:
            w, h = img.size
    if (h, w) == alpha.shape:
        return alpha
    return np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.BILINEAR), np.uint8)


def read_alpha(source, i: int, kind: str, directory: Path | None):
    """Record i's alpha uint8 [H, W], or the reason it has none ("no_alpha", "missing_file",
    "decode_error", "read_error")."""
    try:
        if kind == "image":
            record = source[i]
            if "error" in record:
                return "read_error"
            a = alpha_of(record["image"])
        else:
            rid = data_lib.text(data_lib.field(source, i, "id"))
            name = (_emoji_files(str(directory)).get(rid) if kind == "emoji" else f"{rid}.png")
            path = (directory / "img" / "google" / "64" / name if kind == "emoji"
                    else directory / "png" / name) if name else None
            if path is None or not path.is_file():
                return "missing_file"
            a = alpha_of(path)
            if a is not None:
                a = _at_size_of(a, source[i]["image"])
    except FileNotFoundError:
        return "missing_file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "decode_error"
    return "no_alpha" if a is None else a


@registry.register("dense_probe")
class DenseProbeEvaluator(base.Evaluator):
    """Metrics "dense_probe/<name>/miou", ".../iou_fg", ".../iou_bg", ".../fg_fraction" (the test
    patches' foreground share), ".../train_patches", ".../test_patches", ".../skipped" (records of
    both splits without an alpha channel, or unreadable)."""
    DATA_KEYS = ("name", "train_split", "test_split", "data_dir", "max_examples", "source")

    def __init__(self, train, test, /, *, name: str, alpha: str = "auto", alpha_dir=None,
                 l2: float = 1e-3):
        """
        Args:
          train, test: sources (vljax/evaluators/data.py) of images with alpha (see `alpha`).
          alpha: where the alpha channel comes from (module docstring): "auto", "image",
            "emoji", "openclipart". alpha_dir: the originals' directory (emoji / openclipart).
          l2: the ridge penalty relative to the tokens' mean squared norm (module docstring).
        """
        if not float(l2) >= 0:
            raise ValueError(f"config key `evals.{name}.l2`: {l2!r} must be >= 0")
        self.name, self.l2 = name, float(l2)
        self.splits = {s: (src,) + resolve_alpha(src, alpha, alpha_dir, f"evals.{name}")
                       for s, src in (("train", train), ("test", test))}

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From config entry `evals.<name>` = dict(type="dense_probe", data=dict(name="emoji",
        train_split="train", test_split="test", max_examples=...), alpha="auto", alpha_dir=None,
        l2=1e-3), or a source entry of any kind for the two splits (vljax/evaluators/data.py).
        `max_examples` keeps the first records of each split."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        splits = data_lib.open_splits(name, data, {"train": "train", "test": "test"})
        n = data.get("max_examples")
        return cls(data_lib.first(splits["train"], n), data_lib.first(splits["test"], n), name=name, **kwargs)

    def _patches(self, embedder, split: str, skipped: dict):
        """(tokens [n, W] float32, targets [n] bool) of every patch of the split's records."""
        source, kind, directory = self.splits[split]
        emb = embedder.embed_patch_tokens(source)
        feats, targets = [], []
        for row, i in enumerate(np.asarray(emb.index)):
            a = read_alpha(source, int(i), kind, directory)
            if isinstance(a, str):
                skipped[a] = skipped.get(a, 0) + 1
                continue
            fg, rows = patch_targets(a, embedder.eval_image, emb.z.shape[1])
            feats.append(np.asarray(emb.z[row])[rows])
            targets.append(fg)
        if not feats:
            raise ValueError(f"dense probe {self.name}: no {split} record of {source!r} has an alpha "
                             f"channel (skipped: {skipped}); see config key `evals.{self.name}.alpha`")
        return np.concatenate(feats).astype(np.float32), np.concatenate(targets)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        if not callable(getattr(embedder, "embed_patch_tokens", None)) or not hasattr(embedder, "eval_image"):
            raise TypeError(f"dense probe {self.name}: the embedder gives no patch tokens "
                            f"({type(embedder).__name__} needs embed_patch_tokens and eval_image)")
        skipped = {}
        x_train, y_train = self._patches(embedder, "train", skipped)
        x_test, y_test = self._patches(embedder, "test", skipped)
        w, b = fit_ridge(x_train, y_train, self.l2)
        out = iou(predict(x_test, w, b), y_test)
        out.update(fg_fraction=float(y_test.mean()), train_patches=float(len(y_train)),
                   test_patches=float(len(y_test)), skipped=float(sum(skipped.values())))
        return {f"dense_probe/{self.name}/{k}": v for k, v in out.items()}

