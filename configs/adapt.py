r"""Adapting the LiT demo's model beyond zero-shot: few-shot adapters and prompt learning,
base-to-new generalisation, label-free adaptation, GZSL calibration (issue 11).

    python -m vljax.evaluate --model=/tmp/adapt_lit --config=configs/adapt.py --out=/tmp/adapt.json
    python experiments/adapt_fewshot.py --model=/tmp/adapt_lit        # the tables, from these evals

The model: `python -m vljax.main --config=configs/lit.py:steps=300 --workdir=/tmp/adapt_lit` (the demo
recipe at the length it had when these tables were made).
Expected runtime on a free 2-core CPU: about 15 minutes (CoOp / CoCoOp train 16-token prompts
through the 6-layer text tower; the image tower is frozen and every image is embedded once).

- fmnist_fewshot / emoji_fewshot: zero-shot, ridge, cross-modal probe, Tip-Adapter(-F), CoOp
  at 1/2/4/8/16 shots, 3 seeds (fmnist_cocoop / emoji_cocoop: CoCoOp at the same shots and seeds,
  Fashion-MNIST on 500 test images: it runs the text tower per image and class); alpha / beta / l2
  chosen on 10 held-out train images per
  class. Fashion-MNIST test: 2,000 images (a fixed pseudo-random subset), 80 CLIP templates;
  emoji categories (10): the held-out test split, the "icon" templates.
- fmnist_base_to_new / emoji_base_to_new: CoCoOp's protocol, 16 shots of the base half
  (Fashion-MNIST 5/5 classes, 3 seeds; the 99 emoji subcategories 49/50, 1 seed).
- fmnist_labelfree: CoOp on class-balanced confident zero-shot pseudo-labels of 2,000
  unlabelled Fashion-MNIST train images (no label of them read), tested on the 2,000 test images.
- openclipart_multilabel / emoji_multilabel: a label head (from the zero-shot label prompts)
  trained on the train split's tags (openclipart: 1,500 images, 128 tags; emoji: 65 tags) with
  BCE, ASL and weak assume-negative losses; mAP and CP/CR/CF1/OP/OR/OF1 on the test split.
- fmnist_gzsl: seen / unseen / H at gamma 0, AUSUC and the best H over the calibration sweep.
- emoji_worst_group: zero-shot emoji subcategories with the worst category's accuracy.

Config arguments (`--config=configs/adapt.py:seeds=1,coop_steps=50`): seeds, coop_steps,
cocoop_steps, tip_f_epochs, tip_views (Tip-Adapter's augmented views per few-shot image; 0: none),
tip_crop_min (their random crops' smallest area fraction; 1.0: flips only) (also lit.py's steps,
batch).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lit  # noqa: E402

from vljax import config_args  # noqa: E402


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/adapt.py", seeds=3, coop_steps=100,
                               cocoop_steps=100, steps=300, batch=128, tip_f_epochs=20,
                               tip_views=10, tip_crop_min=0.5)
    c = lit.get_config(f"steps={a['steps']},batch={a['batch']}")
    coop = dict(n_ctx=4, ctx_init="a photo of a", steps=a["coop_steps"], lr=0.02, batch_size=32,
                cocoop_steps=a["cocoop_steps"], cocoop_lr=0.02, cocoop_batch_size=4)
    methods = ["zeroshot", "ridge", "crossmodal", "tip", "tip_f", "coop"]
    shots = [1, 2, 4, 8, 16]
    # Tip-Adapter-F epochs (lr 1e-3, batch 256); augmented views per cache image (official: 10).
    tip = dict(tip_f_epochs=a["tip_f_epochs"], augment_views=a["tip_views"],
               augment_crop_scale=(a["tip_crop_min"], 1.0))
    fmnist = dict(name="vljax_fashion_mnist", max_examples=2000)
    c.evals = dict(
        fmnist_fewshot=dict(type="fewshot_adapt", data=dict(fmnist, per_class=26),
                            methods=methods, shots=shots, seeds=a["seeds"], templates="clip80",
                            coop=coop, **tip),
        emoji_fewshot=dict(type="fewshot_adapt",
                           data=dict(name="vljax_emoji", label="category", per_class=26),
                           methods=methods, shots=shots, seeds=a["seeds"], templates="icon",
                           coop=coop, **tip),
        # CoCoOp runs the text tower once per (image, class): its own entries, on 500 Fashion-MNIST
        # test images (the shots and seeds draw the train splits of the entries above).
        fmnist_cocoop=dict(type="fewshot_adapt", data=dict(fmnist, per_class=26, max_examples=500),
                           methods=["cocoop"], shots=shots, seeds=a["seeds"], templates="clip80",
                           coop=coop),
        emoji_cocoop=dict(type="fewshot_adapt",
                          data=dict(name="vljax_emoji", label="category", per_class=26),
                          methods=["cocoop"], shots=shots, seeds=a["seeds"], templates="icon",
                          coop=coop),
        fmnist_base_to_new=dict(type="base_to_new", data=dict(fmnist, per_class=16), shots=16,
                                seeds=a["seeds"], templates="clip80", coop=coop),
        emoji_base_to_new=dict(type="base_to_new",
                               data=dict(name="vljax_emoji", label="subcategory", per_class=16,
                                         test_split="test"),
                               shots=16, seeds=1, templates="icon",
                               coop=dict(coop, cocoop_batch_size=1)),
        fmnist_labelfree=dict(type="labelfree", data=dict(name="vljax_fashion_mnist",
                                                          max_target=2000, max_examples=2000),
                              templates="clip80", per_class=64, seeds=a["seeds"],
                              coop=dict(coop, steps=a["coop_steps"])),
        openclipart_multilabel=dict(type="multilabel_train",
                                    data=dict(name="vljax_openclipart", label="tags",
                                              max_train=1500),
                                    templates="icon", losses=["bce", "asl", "wan"]),
        emoji_multilabel=dict(type="multilabel_train", data=dict(name="vljax_emoji", label="tags"),
                              templates="icon", losses=["bce", "asl", "wan"]),
        fmnist_gzsl=dict(type="gzsl", data=dict(name="vljax_fashion_mnist", split="test",
                                                max_examples=2000), templates="clip80",
                         seen_classes=["t-shirt/top", "shirt", "dress", "coat", "sandal"]),
        emoji_worst_group=dict(type="zeroshot", data=dict(name="vljax_emoji", split="test",
                                                          label="subcategory", group="category"),
                               templates="icon"),
    )
    return c
