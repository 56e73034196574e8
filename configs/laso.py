r"""LaSO (Alfassy et al., CVPR 2019): label-set operation nets (intersection, union, subtraction)
trained on the LiT demo's stored image features and evaluated as the paper does (issue 26).

    python -m vljax.main --config=configs/laso.py --workdir=/tmp/vljax_laso            # ~22 min, 2 cores
    python -m vljax.evaluate --model=/tmp/vljax_lit --config=configs/laso.py:base=lit \
        --evals=openclipart_laso,emoji_laso                                            # ~12 min: the caption-trained demo

Training is configs/lit_multilabel.py's (the locked EfficientNet-Lite0 trunk's features stored
once, the tags' BCE loss on label prompts; `:base=lit` trains on the captions instead, as
configs/lit.py). At the last step the `laso` evaluators (vljax/evaluators/laso.py) train the three
set-operation nets and the multi-label classifier on the train split's image embeddings (the
stored trunk features through the trained head) and tag sets, with pairs drawn by the seeded
pair pipeline (vljax/data/pairs.py), then score `test_pairs` pairs of test images: mAP of the
operated features' predicted tags against the target tag sets (beside the un-operated feature's
and the label-space operation's), and retrieval by tag set (R@1, R@5).

Evaluations: openclipart_laso (tags, 128 labels) and emoji_laso (tags, 65 labels), held-out
test splits; the training config's own multi-label evaluations stay.

The classifier C is the paper's, trained with the nets (`classifier="trained"`, initialised from
the label prompts). `:classifier=zeroshot` keeps the prompts' label directions (vljax/adapt/laso.py):
on the caption-trained demo (1000 LaSO steps, seed 0) its operated mAP was 19.2 / 30.3 / 20.2
(int / uni / sub) on openclipart against the trained head's 24.7 / 30.8 / 21.8 (3 seeds), and on
openclipart's subtraction below its own un-operated baseline (26.7).

The nets here are one hidden layer of width D = 384 (the joint space's), 1000 steps of batch 64:
about 5.5 min per dataset on the shared 2-core CPU. `:latent=0,layers=3` gives the official
block's depth with width 4 D, about 15x the FLOPs a step.

Config arguments: base ("lit_multilabel" | "lit"), steps, seed, laso_steps, laso_lr, laso_batch,
latent (0: 4 D), layers, shared (pairs sharing a label), test_pairs, classifier ("trained" | "zeroshot").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lit  # noqa: E402
import lit_multilabel  # noqa: E402

from vljax import config_args  # noqa: E402

BASES = {"lit_multilabel": lit_multilabel.get_config, "lit": lit.get_config}


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/laso.py", base="lit_multilabel", steps=500, seed=0,
                              laso_steps=1000, laso_lr=1e-3, laso_batch=64, latent=384, layers=1,
                              shared=0.5, test_pairs=1000, classifier="trained")
    if a["base"] not in BASES:
        raise ValueError(f"configs/laso.py: base={a['base']!r} is not one of {sorted(BASES)}")
    c = BASES[a["base"]](f"steps={a['steps']}")
    c.seed = a["seed"]
    template = c.loss.get("template", "an icon of {}.") if a["base"] == "lit_multilabel" else "icon"
    laso = dict(type="laso", templates=[template] if a["base"] == "lit_multilabel" else template,
                steps=a["laso_steps"], lr=a["laso_lr"], batch_size=a["laso_batch"],
                latent=a["latent"] or None, layers=a["layers"], shared_fraction=a["shared"],
                test_pairs=a["test_pairs"], classifier=a["classifier"], seed=a["seed"])
    evals = dict(c.evals)
    for short, tfds_name in (("openclipart", "vljax_openclipart"), ("emoji", "vljax_emoji")):
        evals[f"{short}_laso"] = dict(laso, data=dict(name=tfds_name, label="tags", train_split="train",
                                                      test_split="test"))
    c.evals = evals
    c.eval_every = c.total_steps
    return c
