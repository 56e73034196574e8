"""Builds the demo datasets as TFDS array_record datasets under <assets>/tfds (no TensorFlow).

    python3 -m vljax.data.build_demo --assets=~/.cache/vljax           # all three
    python3 -m vljax.data.build_demo --datasets=vljax_emoji --rebuild  # one, from scratch

Idempotent: a dataset already built is skipped. The datasets are built at once, one process each
(`--jobs`; openclipart's decoding has its own pool): on 2 cores the three take about as long as
openclipart alone. Sources (see ../../../shared/ASSETS.md):
<assets>/emoji/package (npm emoji-datasource-google), /usr/share/openclipart (Debian
openclipart-png/-svg), /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist).
Read them back with `tfds.data_source(name, split=..., data_dir=<assets>/tfds)` or vljax.data.sources.
"""
import concurrent.futures
import multiprocessing
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
_JOBS = flags.DEFINE_integer("jobs", 3, "Datasets built at once, one process each (1: in this process).")

VERSION = "1.0.0"


def spec_makers(assets, openclipart="/usr/share/openclipart",
                fashion_mnist="/usr/share/datasets/fashion-mnist"):
    """name -> zero-argument callable making its DatasetSpec (lazy: metadata scans cost seconds)."""
    return {
        demo_emoji.NAME: lambda: demo_emoji.make_spec(Path(assets) / "emoji" / "package"),
        demo_openclipart.NAME: lambda: demo_openclipart.make_spec(openclipart),
        demo_fashion_mnist.NAME: lambda: demo_fashion_mnist.make_spec(fashion_mnist),
    }


def build(name: str, make_spec, data_dir, rebuild: bool = False, progress: bool = True) -> dict:
    """Builds one dataset unless present; returns its split sizes. `progress`: per-split bars."""
    out = tfds_writer.dataset_dir(name, data_dir, VERSION)
    if rebuild and out.exists():
        shutil.rmtree(out)
    if tfds_writer.is_built(name, data_dir, VERSION):
        print(f"[build_demo] {name}: already built in {out}")
    else:
        t0 = time.time()
        tfds_writer.write_tfds(make_spec(), data_dir, progress=progress)
        print(f"[build_demo] {name}: built in {time.time() - t0:.0f} s -> {out}")
    info = sources.TfdsSource(name, "train", data_dir=data_dir).info
    sizes = {s: info.splits[s].num_examples for s in info.splits}
    print(f"[build_demo] {name}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
    return sizes


def _build_named(name, assets, openclipart, fashion_mnist, rebuild, progress=True):
    """`build` of one dataset by name (a worker process's entry: everything it needs is picklable)."""
    maker = spec_makers(assets, openclipart, fashion_mnist)[name]
    return build(name, maker, Path(assets) / "tfds", rebuild=rebuild, progress=progress)


def build_all(names, assets, openclipart, fashion_mnist, rebuild=False, jobs=3) -> dict:
    """Builds `names` (each unless present), `jobs` at once in spawned processes; name -> split
    sizes. A failed build raises here after the others finished (their datasets are kept)."""
    args = (assets, openclipart, fashion_mnist, rebuild)
    if jobs <= 1 or len(names) <= 1:
        return {name: _build_named(name, *args) for name in names}
    with concurrent.futures.ProcessPoolExecutor(
            min(jobs, len(names)), mp_context=multiprocessing.get_context("spawn")) as pool:
        # One line per dataset when it is done; per-split bars of parallel builds would interleave.
        futures = {name: pool.submit(_build_named, name, *args, progress=False) for name in names}
        concurrent.futures.wait(futures.values())
    return {name: f.result() for name, f in futures.items()}


def main(argv):
    del argv
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    assets = Path(_ASSETS.value).expanduser() if _ASSETS.value else sources.default_assets_dir()
    unknown = set(_DATASETS.value) - set(spec_makers(assets))
    if unknown:
        raise app.UsageError(f"--datasets: unknown {sorted(unknown)}; known: {sorted(spec_makers(assets))}")
    build_all(list(dict.fromkeys(_DATASETS.value)), assets, _OPENCLIPART.value, _FASHION_MNIST.value,
              rebuild=_REBUILD.value, jobs=_JOBS.value)


if __name__ == "__main__":
    app.run(main)
