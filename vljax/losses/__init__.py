"""Contrastive losses over language-image embeddings: pure functions of arrays.

Conventions shared by every loss here:
  * `zimg: [B, D]`, `ztxt: [B, D]` are L2-normalised embeddings; row i of both is a pair.
  * `t` is the logit scale (already exponentiated, a scalar), `b` the SigLIP bias (a scalar).
  * The value is the mean over the GLOBAL batch.
  * `axis_name=None` treats the arrays as the whole batch. With an axis name (or a tuple of
    mesh axes when the batch is split over several; checked on a 2 x 4 mesh) the function must
    run inside `jax.shard_map` on per-device shards of the batch
    (`in_specs=P(axis)` for batched arrays, `P()` for `t` / `b`); it returns, replicated on every
    device, the value of the single-device call on the gathered batch, and its gradients equal
    the single-device gradients too. The positive of local row i is global column
    `axis_index * b_local + i`.

Cross-device negatives come from `lax.all_gather`, whose transpose (`psum_scatter`) returns
the gradient of every gathered row to the device that owns it; the per-device partial sums are
combined with `lax.psum`, whose transpose hands every device the cotangent unscaled.
`sigmoid_loss(impl="ring")` and `softmax_contrastive(impl="ring")` instead pass text chunks
around the axis with `lax.ppermute` under a `jax.custom_vjp` whose backward travels the ring too
(`collectives.ring`), keeping per-device memory O(b_local^2) at any device count.

One module per family: `contrastive` (CLIP softmax, DCL, DCLW), `sigmoid` (SigLIP), `soft_targets`
(multi-positive, CWCL), `hard_negatives` (hardness-weighted negatives, false-negative masking and
label smoothing in the softmax and sigmoid losses), `filip`, `multilabel`, `regularisers` (alignment, uniformity),
`captioning` (a caption decoder's cross-entropy, alone or beside SigLIP's), `queue` (a momentum
queue's negatives), `distill` (CLIP-KD), `dcd` (Dynamic Contrastive Distillation), `structure`, `self_distill` (SILC / TIPS), `simclr` (SLIP's
image self-supervision term), `ascl` (adaptive soft targets), `dreamlip` (sub-caption positives),
`partial_labels` (PU-MLC, nnPU, COMIC), `dexml` (decoupled softmax, label-sharded), over the
shared `common` (checks, blocks) and `collectives` (gather, psum, ring). The signatures take arrays
and hyperparameters only.

Each family module declares its losses as plain data next to the functions, a module-level
`LOSSES = {config name: dict(fn=..., inputs=(...), [chosen=, config_keys=, logits=, similarity=])}`
(the keywords of `vljax.objective.register`, which checks them and registers every one; input
names as `vljax.objective.Loss` gives them). Every module of this package is imported here and its
declarations collected in `DECLARED`, so a new family is one file; how each input is computed and
how config.loss is resolved is `vljax.objective`'s.
"""
import importlib
import pkgutil

from vljax.losses.captioning import caption_loss, caption_nll, sigmoid_caption_loss
from vljax.losses.contrastive import dcl_loss, dclw_loss, softmax_contrastive
from vljax.losses.filip import filip_loss, filip_similarity
from vljax.losses.hard_negatives import hard_negative_sigmoid, hard_negative_softmax
from vljax.losses.multilabel import (MULTILABEL, asl_elementwise, bce_elementwise, multilabel_loss,
                                     wan_elementwise)
from vljax.losses.regularisers import alignment_loss, uniformity_loss
from vljax.losses.sigmoid import sigmoid_loss
from vljax.losses.soft_targets import (POSITIVE_INPUTS, POSITIVES, WEIGHTINGS, check_positives,
                                       cwcl_loss, multi_positive_contrastive, positive_weights,
                                       positives_input)

# Every module of this package, imported (a family added as one file is picked up) -> its declared
# losses (`LOSSES`), by module name; `vljax.objective` registers them, refusing a name taken twice.
DECLARED: dict[str, dict[str, dict]] = {}
for _module in pkgutil.iter_modules(__path__):
    _declared = getattr(importlib.import_module(f"{__name__}.{_module.name}"), "LOSSES", None)
    if _declared is not None:
        DECLARED[f"{__name__}.{_module.name}"] = _declared
del _module, _declared

__all__ = ["DECLARED", "MULTILABEL", "POSITIVE_INPUTS", "POSITIVES", "WEIGHTINGS", "alignment_loss",
           "asl_elementwise", "bce_elementwise", "caption_loss", "caption_nll", "check_positives", "cwcl_loss", "dcl_loss",
           "dclw_loss", "filip_loss", "filip_similarity", "hard_negative_sigmoid", "hard_negative_softmax",
           "multi_positive_contrastive",
           "multilabel_loss", "positive_weights", "positives_input", "sigmoid_loss",
           "sigmoid_caption_loss", "softmax_contrastive", "uniformity_loss", "wan_elementwise"]
