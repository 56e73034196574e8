"""Builds the demo datasets as TFDS array_record datasets under <assets>/tfds (no TensorFlow).

    python3 -m vljax.data.build_demo --assets=~/.cache/vljax           # all three
    python3 -m vljax.data.build_demo --datasets=vljax_emoji --rebuild  # one, from scratch

Idempotent: a dataset already built is skipped. Sources (see ../../../shared/ASSETS.md):
<assets>/emoji/package (npm emoji-datasource-google), /usr/share/openclipart (Debian
openclipart-png/-svg), /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist).
Read them back with `tfds.data_source(name, split=..., data_dir=<assets>/tfds)` or vljax.data.sources.
"""
from pathlib import Path
import shutil
import time

from absl import app
from absl import flags

from vljax import logs
from vljax.data import demo_emoji
from vljax.data import demo_fashion_mnist
from vljax.data import demo_openclipart
from vljax.data import sources
from vljax.data import tfds_writer

_ASSETS = flags.DEFINE_string("assets", None, "Assets dir; default $VLJAX_ASSETS or ~/.cache/vljax.")
_DATASETS = flags.DEFINE_list(
    "datasets", ["vljax_emoji", "vljax_openclipart", "vljax_fashion_mnist"], "Which to build.")
_OPENCLIPART = flags.DEFINE_string("openclipart", "/usr/share/openclipart", "openclipart root.")
_FASHION_MNIST = flags.DEFINE_string("fashion_mnist", "/usr/share/datasets/fashion-mnist",
                                     "Fashion-MNIST idx files.")
_REBUILD = flags.DEFINE_bool("rebuild", False, "Delete and rebuild datasets already there.")

VERSION = "1.0.0"


def spec_makers(assets):
    """name -> zero-argument callable making its DatasetSpec (lazy: metadata scans cost seconds)."""
    return {
        demo_emoji.NAME: lambda: demo_emoji.make_spec(assets / "emoji" / "package"),
        demo_openclipart.NAME: lambda: demo_openclipart.make_spec(_OPENCLIPART.value),
        demo_fashion_mnist.NAME: lambda: demo_fashion_mnist.make_spec(_FASHION_MNIST.value),
    }


def build(name: str, make_spec, data_dir, rebuild: bool = False) -> dict:
    """Builds one dataset unless present; returns its split sizes."""
    out = tfds_writer.dataset_dir(name, data_dir, VERSION)
    if rebuild and out.exists():
        shutil.rmtree(out)
    if tfds_writer.is_built(name, data_dir, VERSION):
        print(f"[build_demo] {name}: already built in {out}")
    else:
        t0 = time.time()
        tfds_writer.write_tfds(make_spec(), data_dir)
        print(f"[build_demo] {name}: built in {time.time() - t0:.0f} s -> {out}")
    info = sources.TfdsSource(name, "train", data_dir=data_dir).info
    sizes = {s: info.splits[s].num_examples for s in info.splits}
    print(f"[build_demo] {name}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
    return sizes


def main(argv):
    del argv
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    assets = Path(_ASSETS.value).expanduser() if _ASSETS.value else sources.default_assets_dir()
    data_dir = assets / "tfds"
    makers = spec_makers(assets)
    unknown = set(_DATASETS.value) - set(makers)
    if unknown:
        raise app.UsageError(f"--datasets: unknown {sorted(unknown)}; known: {sorted(makers)}")
    for name in _DATASETS.value:
        build(name, makers[name], data_dir, rebuild=_REBUILD.value)


if __name__ == "__main__":
    app.run(main)
