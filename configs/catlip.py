r"""CatLIP (Mehta et al. 2024, vljax/catlip.py): the image tower pre-trained as a multi-label classifier
over labels extracted from its captions, with no text tower in the loss.

    python -m vljax.main --config=configs/catlip.py --workdir=/tmp/vljax_catlip

The demo's emoji + openclipart captions give the vocabulary (terms in at least `min_count` captions,
written once to WORKDIR/caption_vocab.json: vljax/caption_labels.py); each batch carries the drawn
caption's multi-hot labels, made in the input workers; a linear head [D, V] on the image embedding
(params["catlip"], left out of the exported encoder) is trained with binary cross-entropy
(`loss.kind="bce"`, CatLIP's; `kind=asl` the asymmetric loss). The text tower and the logit scale
are locked (`schedule`): CatLIP trains only the image side. Towers as configs/clip.py's (the tiny
ViT by default). Expected runtime on a 2-core CPU: about 2-3 minutes for 300 steps at batch 64, 64 px.

At scale: `:img=B/16,size=224,batch=65536,min_count=500` with `input.data` pointed at a web-scale set;
shard the head over the vocabulary with `mesh=[("data", -1), ("fsdp", 8)]` (the rule
`("catlip/.*", "fsdp")` below splits the kernel's V columns and the bias over `fsdp`;
experiments/bench_catlip_memory.py measures what that saves at V = 100k).

Config arguments: img, size, batch, steps, seed (as configs/clip.py), min_count (2), max_terms (0: all),
bigrams (on | off), kind (bce | asl | wan).
"""
import importlib.util
import os

from vljax import config_args

# Config files are loaded by path (ml_collections), so the sibling is loaded the same way.
_spec = importlib.util.spec_from_file_location("vljax_configs_clip", os.path.join(os.path.dirname(__file__), "clip.py"))
clip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip)


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/catlip.py", img="tiny", size=64, batch=64, steps=300, seed=0,
                              min_count=2, max_terms=0, bigrams="off", kind="bce")
    if a["bigrams"] not in ("on", "off"):
        raise ValueError(f"configs/catlip.py: bigrams={a['bigrams']!r} is not 'on' or 'off'")
    c = clip.get_config(f"img={a['img']},size={a['size']},batch={a['batch']},steps={a['steps']},seed={a['seed']}")
    c.catlip = dict(min_count=a["min_count"], max_terms=a["max_terms"], bigrams=a["bigrams"] == "on")
    c.loss = dict(name="catlip", kind=a["kind"])
    c.sharding_rules = [("catlip/.*", "fsdp"), (".*", "replicate")]
    # CatLIP trains the image side only: the text tower and the logit scale stay as initialised.
    c.schedule = [("txt/.*", None), ("t", None), (".*", dict(decay_type="cosine", warmup_steps=30))]
    c.evals = {}  # no text side to score zero-shot with; the loss is the signal (train/loss)
    c.select_metric = None
    return c
