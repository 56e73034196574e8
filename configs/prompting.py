r"""The prompting table (issue 9): every way vljax builds a zero-shot classifier, on one model.

    python -m vljax.evaluate --model=/tmp/vljax_lit --config=configs/prompting.py --out=/tmp/prompting.json
    python experiments/prompting.py --model=/tmp/vljax_lit     # the table in experiments/README.md

Datasets: Fashion-MNIST test (10 classes), held-out emoji subcategories (vljax_emoji test), held-out
openclipart top categories (vljax_openclipart test). Methods, evaluator `<dataset>/<method>`:
- name: the class name alone; photo: "a photo of a {}." (CLIP's default single template);
- clip80: CLIP's 80 ImageNet templates, embeddings averaged (Radford et al. 2021);
- best: the 7-template subset CLIP's authors selected on ImageNet (prompts.CLIP_BEST);
- icon: the demo's 5 illustration templates (the demo's own choice for emoji / openclipart);
- cupl / cupl_clip80: CuPL descriptions alone / with the 80 templates (Pratt et al. 2023, CuPL and
  "CuPL + e"), from configs/descriptions/<dataset>.json where such a file exists;
- zpe / zpe_select: ZPE prompt weighting of the 80 templates (Allingham et al. 2023): logits
  averaged with softmax weights of the debiased max-logit scores, debiased by the test images and a
  pretraining-proxy set (2,000 images of the training collection, openclipart train); zpe_select keeps
  only the templates the median/MAD rule selects (threshold 0.5, the paper's ImageNet value).
"""
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = {
    "fashion_mnist": dict(name="vljax_fashion_mnist", split="test"),
    "emoji": dict(name="vljax_emoji", split="test", label="subcategory"),
    "openclipart": dict(name="vljax_openclipart", split="test", label="top_category"),
}
PROXY = dict(name="vljax_openclipart", split="train", max_examples=2000)


def methods(dataset: str) -> dict:
    out = dict(name=dict(templates="name"), photo=dict(templates="photo"), clip80=dict(templates="clip80"),
               best=dict(templates="best"), icon=dict(templates="icon"))
    desc = os.path.join(HERE, "descriptions", f"{dataset}.json")
    if os.path.exists(desc):
        out["cupl"] = dict(templates=None, descriptions=desc)
        out["cupl_clip80"] = dict(templates="clip80", descriptions=desc)
    out["zpe"] = dict(templates="clip80", zpe=True, zpe_reference=PROXY)
    out["zpe_select"] = dict(templates="clip80", zpe=True, zpe_reference=PROXY, zpe_select=0.5)
    return out


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.evals = {f"{ds}/{m}": dict(type="zeroshot", data=data, **kw)
               for ds, data in DATASETS.items() for m, kw in methods(ds).items()}
    return c
