r"""SigLIP 2 (Tschannen et al. 2025): the SigLIP recipe plus a LocCa caption decoder.

    python -m vljax.main --config=configs/siglip2.py --workdir=/tmp/vljax_siglip2
    python -m vljax.main --config=configs/siglip2.py:decoder=off,sd=off --workdir=/tmp/vljax_siglip2_off

The start of the recipe: the sigmoid loss and the caption decoder trained together (SigLIP 2,
Sec. 2.2; LocCa, Wan et al. 2024; CapPa's parallel prediction, Tschannen et al. 2023). Every part
is switchable, so the same file is the ablation: `decoder=off,sd=off` is configs/siglip.py exactly,
plus the dense probe (`evals.dense`) that every row of the ablation reports.

The decoder (vljax/models/decoder.py, params `dec/...`) cross-attends to the image tower's patch
tokens and is trained on the batch's captions; it lives in the train state (checkpointed, sharded
by `sharding_rules` like the towers) and is left out of the exported encoder (`factory.export`).
Its shape is the text encoder's with half the layers; its output projection is untied (CapPa).
The loss is `sigmoid + caption_weight * caption` (`loss.name="sigmoid_caption"`), the caption
term the mean over captions of each caption's mean token cross-entropy (big_vision's CapPa
normalisation); a fraction `parallel_fraction` of the examples, drawn per example, is read by
parallel prediction (all inputs mask tokens, no causal mask), the rest autoregressively.

The paper's ViT-B/16 setting (SigLIP 2, Sec. 2; as we read it): WebLI, 40B examples seen, batch
32k, Adam (lr 1e-3, decoupled weight decay 1e-4), gradient clipping at norm 1, 256 px (256 patch
tokens), Gemma tokenizer (256k vocabulary), text length 64, on 2048 TPUv5e chips with fully
sharded data parallelism; the LocCa decoder has the text encoder's shape with half its layers,
parallel prediction for 50% of its examples, the decoder loss weighed equally with the sigmoid
loss (caption_weight 1). At that vocabulary the decoder's output projection is [768, 256k]
(197M parameters), larger than the B/16 image tower. In vljax terms:
`--config=configs/siglip2.py:img=B/16,txt=B,size=256,batch=32768` with `tokenizer` the Gemma
sentencepiece model (`kind="sentencepiece"`, max_len 64, `model.text.vocab_size` and
`model.decoder.vocab_size` / `pad_id` to match), TFDS data, `mesh=[("data", -1), ("fsdp", 16)]`,
`sharding_rules=[(".*", "fsdp")]`, `dtype="bfloat16"`, `remat=True`.
What each part costs at that setting (XLA's FLOPs and memory per device of the compiled step, for
the baseline, the decoder at 256k and 32k vocabularies, each self-distillation term, the full
recipe and the NaFlex stage): the SigLIP 2 table of experiments/README.md, "Cost of a training
step" (experiments/bench_step_cost.py, parts `siglip2:*`).
Self-distillation (`sd=on`, vljax/teacher.py): SILC's local-to-global consistency and TIPS'
masked prediction (`sd=consistency` or `sd=masked`: that term alone) with an EMA teacher, switched on by `config.stages` for the last 20% of the
steps (SigLIP 2, Sec. 2.3), the teacher copied from the student there; loss weights 1 (consistency)
and 0.25 (masked prediction) times `sdw` (SigLIP 2: 0.25 for B, 0.5 for L, 1 for So400m, 0.5 for
g); two global and `local` local crops (SILC: 8); at B/16 the DINO / iBOT head sizes
(teacher.DEFAULTS), in the demo heads of 1024 / 256 prototypes at width 256.
NaFlex (`naflex=on`, default off: the CPU demo's cost; needs `sd=off`, as the EMA teacher's
views are fixed-size): the image tower is a NaFlex ViT (vljax/models/naflex.py, `naflex_vit`)
from the start; for the first 90% of the steps it is fed the fixed-resolution stage's square
images as its full patch grid, where it computes exactly the fixed-resolution ViT (same learned
16 x 16 position grid at B/16, 256 px), then `config.stages` switches to native aspect ratio
with a patch budget drawn per batch (vljax/data/naflex_train.py), the position grid resized to
each image's patch grid (antialiased bilinear) and padding patches masked in attention and in
the MAP head. The paper's setting (SigLIP 2, Sec. 2.4.2, as we read it through the issue and
secondary sources; the paper text itself was not reachable here): NaFlex training continues a
fixed-resolution run, the sequence length sampled uniformly per batch from
{128, 256, 576, 784, 1024}; the 90% switch point is our choice. Here the budgets are that set
scaled to the model's grid G = size / patch (G^2 / 256 times each): exactly the paper's at
`img=B/16,size=256`; {32, 64, 144, 196, 256} in the demo (G = 8). Every budget compiles its
own step (five compiles after the switch). Evaluation runs at the fixed budget G^2.
Distillation for small models (`acid=<teacher path>`, vljax/acid.py; SigLIP 2, Sec. 2.5): ACID
(Udandarao et al. 2024) with JEST's joint selection (Evans et al. 2024): every step the input
delivers a super-batch of batch / (1 - `acid_ratio`) examples and a sub-batch of `batch`, the most
learnable (student loss minus teacher loss), is trained on. The teacher is any checkpoint
`vljax.factory.load` reads (a vljax workdir, a transformers SigLIP directory) at the run's image
size and tokenizer. The paper's setting as far as we could read it (its abstract and secondary
summaries; Sec. 2.5 itself we could not read, so unverified): ACID for the B-sized models only,
the teacher a large SigLIP 2 model (So400m) fine-tuned on curated data, filter ratio 0.5 (our
default, ACID's default as we recall it); ACED's explicit KD term is not implemented here.
LocCa's location-aware tasks (`locca=on`, default off; vljax/data/locca.py): where the records
carry regions (a jsonl source's `"regions": [{"box": [ymin, xmin, ymax, xmax], "caption": ...}]`),
each example's decoder row is drawn among Cap (the caption), ARef (region caption -> its box) and
GCap (box -> region caption), equal thirds; boxes follow the random crop and are `bins` (default
1024, PaliGemma's) location tokens after the text vocabulary (the decoder's vocabulary grows by
bins + 2); the loss is the same cross-entropy on each row's target tokens (`loss.name =
"sigmoid_locca"`, which logs train/locca_cap, train/locca_aref, train/locca_gcap). The demo data
has no boxes: with `locca=on` on it every row is Cap (nothing changes but the vocabulary).

Demo (2-core CPU): the tiny towers of configs/clip.py (width 128, 4 layers), a 2-layer decoder at
width 128, the CLIP tokenizer (vocabulary 49408, pad id 0), 300 steps at batch 64 on the emoji +
openclipart captions. The decoder's output projection over the 49408-word vocabulary at every one
of the 32 caption positions dominates the step: measured on 2 shared cores, 60 steps took 412 s
with the decoder and 99 s without (`:steps=60`, compile and one evaluation included), so the
300-step demo runs about 30 minutes with the decoder (`:steps=60` for a first look). With
`tok=PATH`, a 4,096-token BPE learned from the demo's captions (`python -m
vljax.data.train_tokenizer --config=configs/siglip2.py --out=PATH`; configs/clip.py), the
projection is 12x smaller: the ablation (experiments/siglip2_ablation.py) runs every row with it.

Config arguments: decoder (on | off), cw (caption_weight, default 1.0), pp (parallel_fraction,
default 0.5), sd (on | off | consistency | masked: self-distillation and masked prediction, or one
of the two alone; default on), sdw (their weight, default 1.0), local (local crops, default 8),
naflex (on | off, default off; on needs sd=off), acid (the ACID teacher's path, default off),
acid_ratio (its filter ratio, default 0.5), locca (on | off, default off: LocCa's ARef / GCap
on the data's regions), bins (its box bins, default 1024), and configs/clip.py's (img, txt, size, batch, steps,
pd, tune, seed, tok, ...).
"""
import importlib.util
import os

from vljax import config_args, stages

# Config files are loaded by path (ml_collections), so the sibling is loaded the same way.
_spec = importlib.util.spec_from_file_location("vljax_configs_siglip",
                                               os.path.join(os.path.dirname(__file__), "siglip.py"))
siglip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(siglip)

_OWN = dict(decoder="on", cw=1.0, pp=0.5, sd="on", sdw=1.0, local=8, naflex="off", acid="",
            acid_ratio=0.5, locca="off", bins=1024)
# SigLIP 2 (Sec. 2.4.2): the NaFlex stage's sequence lengths, for a 16 x 16 position grid.
PAPER_BUDGETS = (128, 256, 576, 784, 1024)
# NaFlexViT's keys among the fixed-resolution ViT's (ln_pre, patch_bias, posemb have none).
_NAFLEX_KEYS = ("variant", "width", "depth", "mlp_dim", "num_heads", "patch_size", "pool_type",
                "num_classes", "head_bias", "act", "ln_eps", "dropout", "remat", "scan")


def get_config(arg=None):
    items = [item for item in (arg or "").split(",") if item]
    own = [item for item in items if item.partition("=")[0] in _OWN]
    a = config_args.parse_arg(",".join(own), "configs/siglip2.py", **_OWN)
    if a["decoder"] not in ("on", "off"):
        raise ValueError(f"configs/siglip2.py: decoder={a['decoder']!r}; use decoder=on or decoder=off")
    if a["sd"] not in ("on", "off", "consistency", "masked"):
        raise ValueError(f"configs/siglip2.py: sd={a['sd']!r}; use sd=on, off, consistency or masked")
    if a["naflex"] not in ("on", "off"):
        raise ValueError(f"configs/siglip2.py: naflex={a['naflex']!r}; use naflex=on or naflex=off")
    if a["locca"] not in ("on", "off"):
        raise ValueError(f"configs/siglip2.py: locca={a['locca']!r}; use locca=on or locca=off")
    if a["locca"] == "on" and a["decoder"] != "on":
        raise ValueError("configs/siglip2.py: locca=on trains the caption decoder: needs decoder=on")
    if a["naflex"] == "on" and a["sd"] != "off":
        raise ValueError("configs/siglip2.py: naflex=on needs sd=off (the self-distillation "
                         "views are fixed-size crops; vljax/teacher.py refuses a NaFlex tower)")
    c = siglip.get_config(",".join(item for item in items if item not in own))
    if a["sd"] != "off":
        _self_distill(c, a)
    if a["naflex"] == "on":
        _naflex(c)
    if a["acid"]:  # distillation through data selection (vljax/acid.py)
        c.acid = dict(teacher=a["acid"], filter_ratio=a["acid_ratio"])
    # What the parts are for (issue 24), beside zero-shot and retrieval: dense features (a linear
    # probe on patch tokens, foreground from the icons' alpha: vljax/evaluators/dense_probe.py),
    # in every row of the ablation; the decoder's caption log-likelihood and CapPa's scoring
    # classifier (vljax/evaluators/captioning.py) where there is a decoder.
    c.evals.dense = dict(type="dense_probe", data=dict(name="emoji", train_split="train",
                                                       test_split="test", max_examples=1000))
    if a["decoder"] == "off":
        return c
    c.evals.caption_nll = dict(type="caption_nll", captions_per_image=1,
                               data=dict(name="emoji", split="val", max_examples=256))
    c.evals.cappa = dict(type="cappa_zeroshot", data=dict(name="emoji", split="test", label="category",
                                                          max_examples=128))
    text = c.model.text
    sizes = {}
    if text.get("variant"):
        # Imported only for a variant: vljax.models imports jax, which loading a config file
        # must not start (tests/test_imports.py).
        from vljax.models.vit import decode_variant  # noqa: PLC0415
        sizes = decode_variant(text.variant)  # the variant's sizes, overridden by those set
    sizes.update({k: text[k] for k in ("width", "depth", "mlp_dim", "num_heads") if text.get(k)})
    c.model.decoder = dict(
        # SigLIP 2: the text encoder's shape, half its layers.
        width=sizes["width"], depth=max(1, sizes["depth"] // 2), mlp_dim=sizes["mlp_dim"],
        num_heads=sizes["num_heads"], vocab_size=text.vocab_size, max_len=c.tokenizer.max_len,
        pad_id=text.pad_id, parallel_fraction=a["pp"], act=text.act, ln_eps=text.ln_eps)
    c.loss = dict(name="sigmoid_caption", impl="ring", caption_weight=a["cw"])
    if a["locca"] == "on":  # LocCa's ARef / GCap rows where the records have regions
        c.input.locca = dict(vocab_offset=text.vocab_size, bins=a["bins"], tasks=(1 / 3, 1 / 3, 1 / 3),
                             pad_id=text.pad_id)
        c.model.decoder.vocab_size = text.vocab_size + a["bins"] + 2  # box bins, <aref>, <gcap>
        c.loss.name = "sigmoid_locca"
    return c


def _self_distill(c, a) -> None:
    """SILC + TIPS for the last 20% of the steps (SigLIP 2, Sec. 2.3; vljax/teacher.py)."""
    c.self_distill = dict(weight=a["sdw"], local_views=a["local"])
    if a["sd"] == "consistency":  # the ablation's rows: one of the two terms alone (SILC:
        c.self_distill.masked_weight = 0.0  # unmasked global views; vljax/teacher.py skips the term)
    elif a["sd"] == "masked":  # TIPS: no local crops to cut, the consistency term is skipped
        c.self_distill.update(consistency_weight=0.0, local_views=0)
    if c.model.image.get("variant") is None:  # the demo's tiny tower: heads to match
        c.self_distill.update(out_dim=1024, patch_out_dim=256, hidden_dim=256, bottleneck_dim=64)
    c.stages = stages.switch_on_at(c.get("stages"), c.total_steps, int(round(0.8 * c.total_steps)),
                                   self_distill=True)


def _naflex(c) -> None:
    """The fixed-resolution ViT as a NaFlex tower, native aspect ratio for the last 10% of the
    steps with a budget per batch from PAPER_BUDGETS scaled to its grid (module docstring)."""
    image = c.model.image
    p = image.get("patch_size")
    if p is None:
        # Imported only here: vljax.models imports jax, which loading a config file must not
        # start (tests/test_imports.py).
        from vljax.models.vit import decode_variant  # noqa: PLC0415
        p = decode_variant(image.variant)["patch_size"]
    p = p if isinstance(p, int) else p[0]
    g = c.input.image_size // p
    c.model.image_model = "naflex_vit"
    c.model.image = {**{k: image[k] for k in _NAFLEX_KEYS if k in image},
                     "posemb_grid": g, "max_num_patches": g * g}
    budgets = sorted({max(1, round(b * g * g / 256)) for b in PAPER_BUDGETS})
    # Rebuilt, not assigned: ConfigDict keeps a key's type, and value_range was a name ("clip").
    c.input = {**c.input.to_dict(), "value_range": (-1.0, 1.0),  # NaFlex preprocessing's range
               "naflex": dict(patch_size=p, max_num_patches=g * g, budgets=tuple(budgets))}
    fixed = [dict(s, naflex=False) for s in (c.get("stages") or [dict(until=c.total_steps)])]
    c.stages = stages.switch_on_at(fixed, c.total_steps, int(round(0.9 * c.total_steps)), naflex=True)
