r"""Multi-label LiT: the demo's towers trained on the emoji and openclipart TAGS with a multi-label
loss on image-label-prompt logits, instead of the captions with the contrastive loss (issue 11).

    python -m vljax.main --config=configs/lit_multilabel.py --workdir=/tmp/vljax_lit_ml        # ~10 min, 2 cores
    python -m vljax.main --config=configs/lit_multilabel.py:kind=asl --workdir=/tmp/vljax_lit_ml_asl

Everything is configs/lit.py (locked EfficientNet-Lite0 with its stored features, MiniLM with its
top two blocks and head trained, batch 128, the schedule) except:
- the batches carry each image's tag set (`input.labels=True`, the `tags` Sequence(ClassLabel) of
  both datasets, mapped into one label space: the sorted union of their 65 + 128 tag names);
- the loss (`loss.name="multilabel"`, vljax/losses/multilabel.py) scores every image against one prompt per
  tag ("an icon of {}.", embedded by the trained text tower in every step; MiniLM's locked
  embeddings and blocks 0-3 run on the prompts once per run, vljax/train.py `locked_text_blocks`) with the logit scale and
  bias of SigLIP (t init 10, b init -10) and trains with `kind`: "bce" (the default), "asl"
  (Ridnik et al. 2021) or "wan" (weak assume-negative, Cole et al. 2021, the positive-unlabelled
  loss: an absent tag is a negative weighted 1 / (K - 1)). Records with no tag are left out.
Which kind, chosen on the emoji `val` split's tags (mAP, 500 steps, seed 0): bce 56.4, asl 41.2,
wan 18.5 (the caption-trained demo's zero-shot prompts: 38.0). With K = 184 labels, WAN's
negatives weigh 1/183 each and the towers find its near-trivial minimum (every tag scored
positive: train loss 0.007): the embeddings collapse and every image gets the same top tags
(CF1@3 5%). As a trained head on frozen embeddings (configs/adapt.py) WAN did best; training the
towers with it does not work here. Retrieval on captions is lost (emoji val i2t R@1 9% vs 31%): the
text tower sees only the 184 prompts.
Evaluations: multi-label on the held-out test splits' tags and on emoji val's (which selects), with
the trained prompt (mAP, CP/CR/CF1/OP/OR/OF1 of the top-3 sets; configs/lit_eval.py's evaluator),
and held-out emoji retrieval, once, at the last step. `python -m vljax.evaluate --model=/tmp/vljax_lit
--config=configs/lit_multilabel.py` scores the caption-trained demo on the same evaluations.

`:captions=1` keeps the demo's softmax loss on the captions and adds the tags' loss weighted
`tags_weight` (`loss.multilabel_weight`), so one model is trained for retrieval and for tags.

Partial labels and extreme label spaces (issue 26):

    python -m vljax.main --config=configs/lit_multilabel.py:loss=pu_mlc,hide=0.5 --workdir=/tmp/vljax_lit_pu

`loss`: "multilabel" (the default, with `kind`), "pu_mlc" (PU-MLC, positive labels only; the logit
bias starts at 0, as its code's linear classifier, not at this recipe's -10: there its re-balance
factor (mean_i p_ij)^gamma starts at ~e^-10, the unlabeled term is off while the positive term
raises every score, and the runs end far lower: experiments/README.md),
"nnpu" (the non-negative PU risk; its label frequency set to 1 - hide, the logistic surrogate
loss: at this recipe's logit bias init of -10 the sigmoid loss's gradient is ~e^-10), "comic" (COMIC's
label correction and multi-focal modifier for long-tailed partial labels) or "dexml" (DEXML's
decoupled softmax), vljax/losses/partial_labels.py and dexml.py. `hide`: the fraction of positive
tags hidden from training, seeded by `hide_seed` (`input.hide_labels`; the hidden tags are written
to <workdir>/hidden_labels.json). Every evaluation also reports ReaL-style accuracy (real_top1)
and, on the test splits, conformal label sets at `alpha` (coverage and mean size) calibrated on
that dataset's held-out val split (vljax/evaluators/conformal.py).

`label_axis` (with loss=dexml): the label prompts, their embeddings and the tag columns split
over that mesh axis in the step, e.g. `:loss=dexml,label_axis=data` (vljax/label_shards.py; at 184
tags a check of the path: it pays at 100k labels, experiments/bench_dexml_memory.py).

Config arguments: loss, kind, template, hide, hide_seed, alpha, captions, tags_weight,
eval_templates ("train": the trained prompt; or a template set), seed, steps, batch, label_axis.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lit  # noqa: E402

from vljax import config_args  # noqa: E402


def get_config(arg=None):
    a = config_args.parse_arg(arg, "configs/lit_multilabel.py", loss="multilabel", kind="bce", template="an icon of {}.", hide=0.0, hide_seed=0,
                               alpha=0.1, captions=0, tags_weight=1.0,
                               eval_templates="train", seed=0, steps=500, batch=128, label_axis="")
    c = lit.get_config(f"steps={a['steps']},batch={a['batch']}")
    c.seed = a["seed"]
    c.input.labels = True
    for entry in c.input.data:
        entry["labels_key"] = "tags"
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    if a["captions"]:  # the demo's softmax on the captions, plus the tags' loss
        c.loss = dict(name="softmax", multilabel_weight=a["tags_weight"], multilabel_kind=a["kind"],
                      multilabel_template=a["template"])
    elif a["loss"] == "multilabel":
        c.loss = dict(name="multilabel", kind=a["kind"], template=a["template"])
    else:  # pu_mlc, nnpu, comic, dexml: their defaults; nnPU is told how many positives it sees
        c.loss = dict(name=a["loss"], template=a["template"])
        if a["loss"] == "nnpu":  # the logistic surrogate: the sigmoid one's gradient vanishes at bias -10
            c.loss.label_frequency = 1.0 - a["hide"]
            c.loss.surrogate = "logistic"
        if a["loss"] == "pu_mlc":  # PU-MLC's classifier starts near 0 (see the module docstring)
            c.model.bias_init = 0.0
    if a["label_axis"]:  # the label space split over that mesh axis (vljax/label_shards.py)
        c.loss.label_axis = a["label_axis"]
    if a["hide"]:
        c.input.hide_labels = dict(fraction=a["hide"], seed=a["hide_seed"])
    # Scored with the prompt the loss trained (the other templates' embeddings were never trained
    # against images); `:eval_templates=icon` gives configs/lit_eval.py's 5-template ensemble.
    templates = [a["template"]] if a["eval_templates"] == "train" else a["eval_templates"]
    tags = dict(type="multilabel", templates=templates)
    def calibrated(name):  # conformal label sets calibrated on the dataset's val split
        return dict(tags, data=dict(name=name, split="test"), alphas=(a["alpha"],),
                    calibration=dict(name=name, split="val"))
    c.evals = dict(
        openclipart_tags=calibrated("vljax_openclipart"),
        emoji_tags=calibrated("vljax_emoji"),
        emoji_val_tags=dict(tags, data=dict(name="vljax_emoji", split="val")),  # selects
        emoji_retrieval=c.evals.emoji_retrieval,
        val_retrieval=c.evals.val_retrieval,
    )
    c.eval_every = c.total_steps
    c.select_metric = "multilabel/emoji_val_tags/mAP"
    return c
