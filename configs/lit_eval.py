r"""The LiT demo's model with the heavier evaluations: generalised zero-shot, multi-label, few-shot.

    python -m vljax.evaluate --model=/tmp/vljax_lit --config=configs/lit_eval.py --out=/tmp/lit_eval.json
    python -m vljax.main --mode=eval --config=configs/lit_eval.py --workdir=/tmp/vljax_lit   # logs to the workdir
    python -m vljax.soup --workdirs=A,B --config=configs/lit_eval.py --out=/tmp/soup          # soups scored on these

Expected runtime on a 2-core CPU: about 2-3 minutes (EfficientNet-Lite0 features of ~4.6k images at
112 px; every image array is embedded once, so evals on the same images share the forward pass).
Training with it (`python -m vljax.main --config=configs/lit_eval.py ...`) trains the demo and runs
these at the end instead.

- fashion_mnist / fashion_mnist_gzsl: 2,000 test images (a fixed pseudo-random subset). The GZSL
  "seen" classes are the five with an emoji of that name in the training data ("t-shirt", "shirt",
  "dress", "coat", "sandal"); trouser, pullover, sneaker, bag and ankle boot are "unseen".
- openclipart_tags / emoji_tags: zero-shot multi-label mAP and F1@k against the 128 / 65 tags
  that label the held-out test splits (dc:subject keywords; emoji subcategory-derived tags).
- fashion_mnist_fewshot / emoji_fewshot: ridge probes on frozen image embeddings, 1/5/10/25 shots,
  3 seeds (the locked ImageNet tower's features, projected).
- val_retrieval: the demo's model-selection metric (the val split), for soups.
- fashion_mnist_cupl / *_zpe, emoji_categories*, openclipart_categories*: the zero-shot baselines
  (templates, CuPL descriptions, ZPE) of the training-free methods on the same classes.
- *_perceptionclip, *_fudd, *_cased, *_susx: training-free zero-shot methods (PerceptionCLIP,
  FuDD, CaSED, SuS-X) on the Fashion-MNIST classes and the emoji / openclipart categories; their
  attribute lists and differential descriptions are in configs/descriptions/. SuS-X retrieves its
  support images from the training split (for Fashion-MNIST its first 4,000 images; labels unread),
  CaSED retrieves captions from the training split.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lit  # noqa: E402

DESCRIPTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "descriptions")


def get_config(arg=None):
    c = lit.get_config(arg)
    val_retrieval = c.evals.val_retrieval  # the demo's model-selection metric, unchanged
    fmnist = dict(name="vljax_fashion_mnist", split="test", max_examples=2000)
    emoji_categories = dict(name="vljax_emoji", split="test", label="category")
    openclipart_categories = dict(name="vljax_openclipart", split="test", label="top_category")
    c.evals = dict(
        fashion_mnist=dict(type="zeroshot", data=fmnist, templates="clip80"),
        fashion_mnist_gzsl=dict(type="gzsl", data=fmnist, templates="clip80",
                                seen_classes=["t-shirt/top", "shirt", "dress", "coat", "sandal"]),
        openclipart_tags=dict(type="multilabel", data=dict(name="vljax_openclipart", split="test"),
                              templates="icon"),
        emoji_tags=dict(type="multilabel", data=dict(name="vljax_emoji", split="test"), templates="icon"),
        fashion_mnist_fewshot=dict(type="fewshot", data=dict(name="vljax_fashion_mnist", per_class=40,
                                                             max_examples=2000)),
        emoji_fewshot=dict(type="fewshot", data=dict(name="vljax_emoji", label="category", per_class=40)),
        val_retrieval=val_retrieval,
        # The baselines of the training-free methods below: templates, CuPL descriptions, ZPE weighting.
        fashion_mnist_cupl=dict(type="zeroshot", data=fmnist, templates="clip80",
                                descriptions=f"{DESCRIPTIONS}/fashion_mnist.json"),
        fashion_mnist_zpe=dict(type="zeroshot", data=fmnist, templates="clip80", zpe=True),
        emoji_categories=dict(type="zeroshot", data=emoji_categories, templates="icon"),
        emoji_categories_zpe=dict(type="zeroshot", data=emoji_categories, templates="clip80", zpe=True),
        openclipart_categories=dict(type="zeroshot", data=openclipart_categories, templates="icon"),
        openclipart_categories_cupl=dict(type="zeroshot", data=openclipart_categories, templates="icon",
                                         descriptions=f"{DESCRIPTIONS}/openclipart.json"),
        openclipart_categories_zpe=dict(type="zeroshot", data=openclipart_categories, templates="clip80",
                                        zpe=True),
        # Training-free zero-shot methods (vljax/evaluators/{perceptionclip,fudd,cased,susx}.py).
        fashion_mnist_perceptionclip=dict(type="perceptionclip", data=fmnist,
                                          attributes=f"{DESCRIPTIONS}/perceptionclip_fashion_mnist.json"),
        emoji_perceptionclip=dict(type="perceptionclip", data=emoji_categories,
                                  attributes=f"{DESCRIPTIONS}/perceptionclip_icon.json"),
        openclipart_perceptionclip=dict(type="perceptionclip", data=openclipart_categories,
                                        attributes=f"{DESCRIPTIONS}/perceptionclip_icon.json"),
        fashion_mnist_fudd=dict(type="fudd", data=fmnist, templates="clip80", k=5,
                                descriptions=f"{DESCRIPTIONS}/fudd_fashion_mnist.json"),
        emoji_fudd=dict(type="fudd", data=emoji_categories, templates="icon", k=5,
                        descriptions=f"{DESCRIPTIONS}/fudd_emoji.json"),
        emoji_cased=dict(type="cased", data=dict(emoji_categories, database_split="train")),
        openclipart_cased=dict(type="cased", data=dict(openclipart_categories, database_split="train")),
        fashion_mnist_susx=dict(type="susx", data=dict(fmnist, database_split="train", max_database=4000),
                                templates="clip80"),
        emoji_susx=dict(type="susx", data=dict(emoji_categories, database_split="train"), templates="icon"),
        openclipart_susx=dict(type="susx", data=dict(openclipart_categories, database_split="train"),
                              templates="icon"),
    )
    return c
