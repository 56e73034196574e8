r"""The LiT demo (configs/lit.py) trained from the demo data as web shards in img2dataset's layout.

    python -m vljax.data.web_export --format=webdataset --out=$HOME/.cache/vljax/web/webdataset
    python -m vljax.main --config=configs/lit_web.py --workdir=/tmp/vljax_lit_web

    python -m vljax.data.web_export --format=parquet --out=$HOME/.cache/vljax/web/parquet
    python -m vljax.main --config=configs/lit_web.py:format=parquet --workdir=/tmp/vljax_lit_web_pq

The export writes the training splits of vljax_emoji and vljax_openclipart (vljax/data/web_export.py:
image bytes as stored, 1000 samples a shard, all of a record's captions in `captions`) to
DIR/<format>/<dataset>/train/; this recipe reads them with the `webdataset` or `parquet` source
kind and is configs/lit.py otherwise (model, schedule, evaluations on the TFDS test and val
splits), so it trains on the same records, mixed 1:1, each draw taking a random caption of its
record as the TFDS recipe does. Expected runtime: as configs/lit.py.

Config arguments (`--config=configs/lit_web.py:format=parquet,dir=/data/web,steps=200`):
  format: "webdataset" (tars, `KEY.png` + `KEY.json`) or "parquet" (a `png` column);
  dir: the folder holding <format>/ (default $VLJAX_ASSETS/web, else ~/.cache/vljax/web);
  captions: "all" (the `captions` list: a random caption a draw, as configs/lit.py) or "first"
    (img2dataset's own caption field: `.txt` / `caption`);
  steps, batch: as configs/lit.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/lit.py, as lit_eval.py does
import lit  # noqa: E402

from vljax import config_args  # noqa: E402

DATASETS = ("vljax_emoji", "vljax_openclipart")
# format -> (shard file extension, image members / columns, caption fields for captions=all / first)
KEYS = {
    "webdataset": ("tar", "png;jpg;webp", {"all": "json:captions;txt", "first": "txt;json:caption"}),
    "parquet": ("parquet", "png;jpg;webp", {"all": "captions;caption", "first": "caption;txt"}),
}


def web_data(fmt: str, root: str, captions: str = "all") -> list[dict]:
    """config.input.data reading the web_export shards of DATASETS under `root`/`fmt`."""
    if fmt not in KEYS:
        raise ValueError(f"configs/lit_web.py: format={fmt!r} is not one of {sorted(KEYS)}")
    ext, image_key, caption_keys = KEYS[fmt]
    if captions not in caption_keys:
        raise ValueError(f"configs/lit_web.py: captions={captions!r} is not 'all' or 'first'")
    return [dict(source=fmt, urls=os.path.join(root, fmt, name, "train", f"*.{ext}"),
                 image_key=image_key, caption_key=caption_keys[captions], weight=1.0)
            for name in DATASETS]


def get_config(arg=None):
    default_dir = os.path.join(os.environ.get("VLJAX_ASSETS", "~/.cache/vljax"), "web")
    a = config_args.parse_arg(arg, "configs/lit_web.py", format="webdataset", dir=default_dir,
                              captions="all", steps=500, batch=128)
    c = lit.get_config(f"steps={a['steps']},batch={a['batch']}")
    c.input.data = web_data(a["format"], os.path.expanduser(a["dir"]), a["captions"])
    return c
