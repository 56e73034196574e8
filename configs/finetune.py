r"""Fine-tune or LiT-tune a checkpoint you bring: SigLIP, SigLIP 2 (fixed resolution or NaFlex), CLIP.

    python -m vljax.main --config=configs/finetune.py:init_from=/path/to/siglip2-base-patch16-naflex \
        --workdir=/tmp/vljax_ft
    python -m vljax.main --config=configs/finetune.py:init_from=DIR,lock=image --workdir=/tmp/vljax_lit_ft
    python -m vljax.main --config=configs/finetune.py:init_from=siglip2.npz,tokenizer=gemma.model,patches=256 \
        --workdir=/tmp/vljax_ft_bv
    python -m vljax.main --config=configs/finetune.py:init_from=DIR,data=/data/captions.jsonl --workdir=...

`init_from` is a transformers directory (config.json, model.safetensors and its tokenizer:
spiece.model / tokenizer.json / tokenizer.model) or a big_vision `.npz` with its SentencePiece
`.model` (beside it, or `tokenizer=`). The checkpoint decides the model, the tokenizer (and its
padding / truncation rule), the image preprocessing (SigLIP's squash resize, or NaFlex's aspect-
preserving patch packing) and the initial logit scale and bias (vljax/init_from.py): this config
names none of them. Every parameter, projection heads and `t` / `b` included, starts from the
checkpoint, written into its shards; a resumed run restores its own checkpoint instead.

Config arguments: init_from (required), tokenizer (overrides the checkpoint's), lock ("none": both
towers train; "image": LiT, the image tower locked, the text tower trains), patches (the NaFlex
patch budget; 0 = the checkpoint's), data ("demo": the emoji + openclipart TFDS sets that
scripts/setup.sh builds; else a JSONL manifest), batch, steps, lr, seed.
Loss: SigLIP's sigmoid loss (ring form), its bias and temperature continuing from the checkpoint.
Augmentation: greyscale 0.1 only: no crop (NaFlex keeps each image's aspect ratio; fixed-resolution
SigLIP squashes the whole image as its processor does; vljax/data/checkpoint_preprocess.py).
Evaluation: zero-shot categories of the held-out emoji test split with SigLIP's prompt ("This is a
photo of {}."; the tokenizer pads as the checkpoint does) and held-out emoji retrieval.
Expected runtime: minutes for a ViT-B on one accelerator; on a 2-core CPU only tiny checkpoints.
"""
import ml_collections

from vljax import config_args


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/finetune.py", init_from="", tokenizer="", lock="none",
                               patches=0, data="demo", batch=64, steps=300, lr=1e-5, seed=0)
    if not a["init_from"]:
        raise ValueError("configs/finetune.py: give the checkpoint: "
                         "--config=configs/finetune.py:init_from=DIR_OR_NPZ")
    if a["lock"] not in ("none", "image"):
        raise ValueError(f"configs/finetune.py: lock={a['lock']!r} is not 'none' or 'image'")
    c = ml_collections.ConfigDict()
    c.seed = a["seed"]
    c.total_steps = a["steps"]
    c.log_every = 25
    c.eval_every = 150
    c.ckpt_every = 150
    c.keep_ckpts = 2
    c.mesh = [("data", -1)]
    c.sharding_rules = [(".*", "replicate")]
    c.init_from = a["init_from"]
    if a["tokenizer"]:
        c.init_from_tokenizer = a["tokenizer"]

    if a["data"] == "demo":
        data = [dict(source="tfds", name="vljax_emoji", split="train", weight=1.0),
                dict(source="tfds", name="vljax_openclipart", split="train", weight=1.0)]
    else:
        data = [dict(source="jsonl", path=a["data"])]
    c.input = dict(data=data, batch_size=a["batch"], num_workers=0,
                   augment=dict(random_resized_crop=None, greyscale=0.1))
    if a["patches"]:
        c.input.max_num_patches = a["patches"]

    c.loss = dict(name="sigmoid", impl="ring")
    c.optax = dict(name="adamw", b1=0.9, b2=0.95)
    c.lr = a["lr"]
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    warm = max(1, a["steps"] // 10)
    if a["lock"] == "image":  # LiT: the whole image tower locked, its head included
        c.schedule = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=warm))]
    else:
        c.schedule = [(".*", dict(decay_type="cosine", warmup_steps=warm))]

    siglip_prompt = ["This is a photo of {}."]  # SigLIP's zero-shot prompt (its model cards)
    if a["data"] == "demo":
        c.evals = dict(
            emoji=dict(type="zeroshot", data=dict(name="vljax_emoji", split="test", label="category"),
                       templates=siglip_prompt),
            val_retrieval=dict(type="retrieval", data=dict(name="vljax_emoji", split="val")),
        )
        c.select_metric = "retrieval/val_retrieval/i2t_r1"
    else:
        c.evals = {}
    return c
