r"""CLIP from scratch: ViT image tower + causal text transformer, softmax contrastive loss.

    python -m vljax.main --config=configs/clip.py --workdir=/tmp/vljax_clip

Expected runtime on a 2-core CPU with the default (tiny) towers: about 3-4 minutes for 300 steps at
batch 64, 64 px. Both towers train from random init on the demo's emoji + openclipart captions; the
point is the recipe, not the accuracy (a few thousand captioned icons are far too little for CLIP).

At scale (TPU pod / GPUs): `--config=configs/clip.py:img=B/16,txt=B,size=224,batch=32768` and point
`input.data` at a TFDS image-text dataset, e.g.
`[dict(source="tfds", name="coco_captions", split="train", image_key="image", text_key="captions/text")]`;
use `mesh=[("data", -1)]` or `[("data", -1), ("fsdp", 8)]` with `sharding_rules=[(".*", "fsdp")]`,
`dtype="bfloat16"`, `remat=True`.

FLIP-style masked training: `:pd=0.5,tune=30` drops half of the image patches for all but the last 30
steps, which train unmasked (`config.stages`, vljax/stages.py); `seed=` picks the run's seed. FLIP's
equal-memory budget (2x batch, same epochs): `:pd=0.5,tune=15,batch=128,steps=150`; its equal wall-clock
one: `:pd=0.5,tune=42,steps=420` (experiments/flip_recipe.py compares them).

Momentum queue of negatives (MoCo v2 / BriVL, vljax/momentum.py): `:queue=1024` trains with
`loss.name="queue_contrastive"` against queues of the momentum towers' last 1024 embeddings (a
multiple of batch), `qm=` their momentum (default 0.99: MoCo's 0.999 averages over ~1000 steps,
longer than this demo's run); `qb=1` (default) adds the batch's other momentum embeddings to the
negatives (ALBEF's form, `loss.batch_negatives`), `qb=0` is BriVL's queue-only form (it did not
learn from random towers in the tiny tests: tests/test_queue.py).

SLIP (Mu et al. 2022, vljax/slip.py): `:slip=on` adds SimCLR's NT-Xent between two augmented views
of each image (cut in the input workers) through a 3-layer MLP head on the image tower's pooled
features, `ssl_scale` (default 1.0, SLIP's) times it, temperature 0.1; the head is `ssl_width`
wide (default 512 here; SLIP's 4096) with `ssl_out` outputs (default 128; SLIP's 256). Logged as
`train/ssl`. Text augmentation (Fini et al. 2023, vljax/data/text_aug.py): `:text_aug=on` (stop
words dropped with p 0.5, then EDA's swap or deletion; their synonym replacement needs a synonym
table, `input.text_aug.synonyms`, and is off here).

Mixing augmentation with soft targets (vljax/mixing.py, vljax/losses/mixing.py): `:mix=timix`
(TiMix's square patch regions, without its text-aware placement), `mix=mixup`, `mix=cutmix` (at patch
granularity) or `mix=m3col` (M3CoL's per-example mixup) trains with `loss.name="mix_softmax"` on the
step's mixed images; `ma=` the Beta(alpha, alpha) of lam (default 1.0; m3col: 0.15, its code's), `mp=`
the probability that a step (m3col: an example) is mixed (default 1.0; m3col: 0.5).

Prefix Conditioning (Saito et al. 2023, vljax/data/prefix.py, vljax/models/text.py): `:prefix=on`
trains on the emoji and openclipart captions (prefix "caption") and on the emoji categories turned
into prompts (a third source, emoji with `label_prompts` = LABEL_PROMPTS below, prefix "label"),
with one softmax loss; the text tower learns one prefix embedding per kind (`txt/prefix_embedding`
[2, width], one more text position: max_len 33) and embeds every evaluation / inference text with
`prefix_eval` (default "caption", the paper's zero-shot mode). A transformers export is refused
(no slot for the prefix): use the workdir with `python -m vljax.inference`. `:prefix=union` is the
paper's baseline: the same three sources, one softmax loss, no prefix (the text tower as `off`).

`tok=PATH` replaces CLIP's 49,408-token BPE with a tokenizer.json that `python -m
vljax.data.train_tokenizer` learned from the training captions (vljax/tokenizers/caption_bpe.py):
the text tower's vocabulary (and a caption decoder's, configs/siglip2.py) is its size.

LLM2CLIP (Huang et al. 2024, arXiv 2411.04997; vljax/models/text_adapter.py): `:llm2clip=on` trains the
image tower against a FROZEN text encoder through a trainable adapter, as the official code
(microsoft/LLM2CLIP llm2clip/eva_clip/model.py, `TextProj` with `use_embedding=True`) does: the text
tower is MiniLM (`model_init txt="minilm"`, its BERT tokenizer, max_len 16 as configs/lit.py) with
every trunk parameter locked, and `adapters=` (default 4, the code's `num_layers_text`) residual MLP
blocks of expansion `adapter_expansion=` (default 2) + LayerNorm + the tower's head (the projection,
with bias: `proj_bias=True`) are the only trained text parameters; softmax contrastive loss, the
logit scale from 1/0.07 (the code's). The whole locked trunk runs once per distinct caption
(`text_cache`, vljax/text_memo.py): each step runs the mean pooling, the adapter and the head on
stored states, LLM2CLIP's "caption embeddings are data". This file, not lit.py, because LLM2CLIP's
point is a TRAINED vision encoder: lit.py locks its EfficientNet (whose depthwise convolutions are
slow to train on CPU, docs/TOOLCHAIN.md), this file trains its ViT at demo speed. The exported
workdir carries the adapter (`txt/adapter_*`); a transformers export is refused. Runtime at the
defaults: 3-5 minutes on the 2-core CPU (190-196 s of CPU, plain clip.py 203-217 s; MiniLM is read
and run once per caption, not per step); metrics in experiments/README.md ("LLM2CLIP").
Deviations: (1) MiniLM (all-MiniLM-L6-v2, a BERT sentence encoder contrastively fine-tuned on
sentence pairs) stands in for LLM2CLIP's stage-1 LLM (Llama-3 8B made a caption-contrastive encoder
by LLM2Vec MNTP + SimCSE-style training on captions): no LLM exists here, and MiniLM's 384-wide
mean-pooled state takes the place of the LLM's 4096-wide one (the adapter works at the text width,
384 -> 768 -> 384). (2) The vision tower trains from random init (this file's tiny ViT, lr 1e-3);
LLM2CLIP fine-tunes a pretrained EVA02-CLIP at lr 1e-5 (run.sh). (3) Data: the demo's emoji and
openclipart captions, not CC3M / CC12M with ShareCaptioner dense captions.

DreamLIP (Zheng et al., ECCV 2024; vljax/losses/dreamlip.py): `:dreamlip=N` trains on each image's
caption and N sub-captions drawn from its captions' sentences in the input workers
(`input.subcaptions`, vljax/data/subcaptions.py; the official code's N = 6) with loss `dreamlip`: CLIP's
loss per text, averaged, + 1/10 Circle loss over each image's texts, + `sgl=` (default 1.0, the code's
sgl_lossweight; 0: off) times the subcaption-specific grouping loss: each text's similarity-weighted
grouping of its image's patch tokens (the ViT's patches through its head) against the batch's texts,
logged as `train/sgl`; `sgl_delta=` (default 0.0, the code's: no patch dropped) and `sgl_norm=`
(minmax | softmax) are its threshold and normalisation. This file, not lit.py, because the grouping
needs the patch tokens of a TRAINED tower: lit.py's locked trunk would only move its head.

Config arguments: img (ViT variant, default "Ti/8" at reduced width), txt (text variant), size, batch,
steps, pd (patch dropout), tune (unmasked steps at the end, with pd), seed, queue (0: none), qm, qb,
slip (on | off), ssl_scale, ssl_width, ssl_out, text_aug (on | off), mix ("": none), ma, mp, tok,
prefix (on | union | off), prefix_eval (caption | label), llm2clip (on | off), adapters, adapter_expansion,
dreamlip (0: off), sgl, sgl_delta, sgl_norm (minmax | softmax).
"""
import ml_collections

from vljax import config_args
from vljax.tokenizers import caption_bpe

# The label source's prompts (prefix "label"); written here, not taken from vljax/evaluators/prompts.py,
# because a config file must not import jax (tests/test_imports.py) and the evaluators do.
LABEL_PROMPTS = ("an emoji of {}.", "an icon of {}.", "{}, an emoji.")


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/clip.py", img="tiny", txt="tiny", size=64, batch=64, steps=300,
                               pd=0.0, tune=0, seed=0, queue=0, qm=0.99, qb=1, slip="off", ssl_scale=1.0,
                               ssl_width=512, ssl_out=128, text_aug="off", mix="", ma=-1.0, mp=-1.0, tok="",
                               prefix="off", prefix_eval="caption", llm2clip="off", adapters=4,
                               adapter_expansion=2, dreamlip=0, sgl=1.0, sgl_delta=0.0, sgl_norm="minmax")
    for key in ("slip", "text_aug", "prefix", "llm2clip"):
        if a[key] not in ("on", "off") and (key, a[key]) != ("prefix", "union"):
            raise ValueError(f"configs/clip.py: {key}={a[key]!r} is not 'on' or 'off'"
                             + (" or 'union'" if key == "prefix" else ""))
    for key, off in (("tok", ""), ("prefix", "off"), ("txt", "tiny")):
        if a["llm2clip"] == "on" and a[key] != off:  # the frozen MiniLM brings its own tokenizer and sizes
            raise ValueError(f"configs/clip.py: llm2clip=on takes MiniLM as the text tower: "
                             f"{key}={a[key]!r} cannot be combined with it")
    chosen = [k for k, off in (("queue", 0), ("mix", ""), ("dreamlip", 0)) if a[k] != off]
    if len(chosen) > 1:
        raise ValueError(f"configs/clip.py: `{'=`, `'.join(chosen)}=` each choose the loss; give one of them")
    c = ml_collections.ConfigDict()
    c.seed = a["seed"]
    c.total_steps = a["steps"]
    c.log_every = 25
    c.eval_every = 150
    c.ckpt_every = 150
    c.keep_ckpts = 2
    c.mesh = [("data", -1)]
    c.sharding_rules = [(".*", "replicate")]

    embed_dim = 128 if a["img"] == "tiny" else 512
    c.input = dict(
        data=[dict(source="tfds", name="vljax_emoji", split="train", weight=1.0),
              dict(source="tfds", name="vljax_openclipart", split="train", weight=1.0)],
        batch_size=a["batch"], image_size=a["size"], value_range="clip",
        augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.1), num_workers=0,
    )
    c.tokenizer = dict(kind="clip", max_len=32)
    if a["img"] == "tiny":
        image = dict(variant=None, width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8)
    else:
        image = dict(variant=a["img"])
    image.update(pool_type="cls", ln_pre=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5,
                 num_classes=embed_dim, head_bias=False)
    if a["txt"] == "tiny":
        text = dict(variant=None, width=128, depth=4, mlp_dim=512, num_heads=4)
    else:
        text = dict(variant=a["txt"])
    text.update(vocab_size=49408, max_len=32, causal=True, pool_type="eot", eot_id=49407, pad_id=0,
                act="quick_gelu", ln_eps=1e-5, num_classes=embed_dim, head_bias=False)
    if a["tok"]:  # a BPE learned from the captions: <pad> 0, <sot> 1, <eot> 2
        c.tokenizer = caption_bpe.tokenizer_spec(a["tok"], max_len=32)
        text.update(vocab_size=c.tokenizer.expected_vocab_size, eot_id=2, pad_id=0)
    if a["prefix"] == "on":  # Prefix Conditioning: a caption prefix and a label-prompt prefix
        text.update(prefix_conditioning=True, prefix_at_eval=a["prefix_eval"], max_len=33)
        for entry in c.input.data:
            entry["prefix"] = "caption"
    if a["prefix"] != "off":  # the label source (prefix "label" with prefix=on; union: none)
        labels = dict(source="tfds", name="vljax_emoji", split="train", weight=1.0,
                      label_key="category", label_prompts=list(LABEL_PROMPTS))
        c.input.data.append(dict(labels, prefix="label") if a["prefix"] == "on" else labels)
    c.model = dict(image_model="vit", image=image, text_model="text_transformer", text=text,
                   temperature_init=1 / 0.07, bias_init=None)
    c.model_init = None
    if a["llm2clip"] == "on":
        with_llm2clip(c, a, embed_dim)

    c.loss = dict(name="softmax")
    if a["queue"]:  # vljax/momentum.py: momentum towers, queues of negatives
        c.loss = dict(name="queue_contrastive", batch_negatives=bool(a["qb"]))
        c.queue = dict(size=a["queue"], momentum=a["qm"])
    if a["dreamlip"]:  # vljax/losses/dreamlip.py: sub-captions as positives, the patches grouped per text
        c.loss = dict(name="dreamlip", sgl_weight=float(a["sgl"]), sgl_delta=float(a["sgl_delta"]),
                      sgl_norm=a["sgl_norm"])
        c.input.subcaptions = dict(num=a["dreamlip"])
    if a["slip"] == "on":  # vljax/slip.py: SimCLR's NT-Xent on two views, beside the CLIP loss
        c.ssl = dict(scale=a["ssl_scale"], temperature=0.1, head_width=a["ssl_width"], out=a["ssl_out"])
    if a["text_aug"] == "on":  # vljax/data/text_aug.py: Fini et al.'s caption augmentation, without
        c.input.text_aug = dict(synonym=0.0)  # synonym replacement (it needs a synonym table)
    if a["mix"]:  # vljax/mixing.py: the step mixes the batch's images, the loss takes soft targets
        m3col = a["mix"] == "m3col"
        c.loss = dict(name="mix_softmax")
        c.mixing = dict(kind=a["mix"], alpha=a["ma"] if a["ma"] > 0 else (0.15 if m3col else 1.0),
                        prob=a["mp"] if a["mp"] >= 0 else (0.5 if m3col else 1.0))
    c.optax = dict(name="adamw", b1=0.9, b2=0.98)
    c.lr = 1e-3
    c.wd = 0.1
    c.grad_clip_norm = 1.0
    c.schedule = [(".*", dict(decay_type="cosine", warmup_steps=30))]
    if a["llm2clip"] == "on":  # the frozen text encoder: only the adapter and the head train
        c.schedule = [("txt/(adapter_[0-9]+|adapter_norm|head)/.*", c.schedule[0][1]),
                      ("txt/.*", None)] + c.schedule

    if a["pd"] > 0:  # FLIP: masked for most of the run, then an unmasked tune
        c.stages = [dict(until=a["steps"] - a["tune"], patch_dropout=a["pd"])]
        if a["tune"]:
            c.stages.append(dict(until=a["steps"], patch_dropout=0.0))
    c.evals = dict(
        emoji=dict(type="zeroshot", data=dict(name="vljax_emoji", split="test", label="category"),
                   templates="icon"),
        val_retrieval=dict(type="retrieval", data=dict(name="vljax_emoji", split="val")),
    )
    c.select_metric = "retrieval/val_retrieval/i2t_r1"
    return c


def with_llm2clip(c, a: dict, embed_dim: int):
    """`llm2clip=on` (module docstring): the text tower becomes MiniLM, locked (the schedule in
    get_config), with LLM2CLIP's adapter before its head, and its trunk run once per caption."""
    c.tokenizer = dict(kind="bert", max_len=16)
    c.model.text_model = "bert"
    c.model.text = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                        pool_type="mean", num_classes=embed_dim, head_bias=True,
                        adapter_layers=a["adapters"], adapter_expansion=a["adapter_expansion"])
    c.model_init = dict(txt="minilm")
    c.text_cache = True
    return c
