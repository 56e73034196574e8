"""LaSO's training losses (Alfassy et al., CVPR 2019; official code IBM/LaSO): pure functions of arrays.

For a pair of images a, b with multi-hot label sets y_a, y_b [B, L] and features F_a, F_b [B, D],
the set-operation nets' outputs (vljax/models/laso.py `SetOps`: Z_int = M_int(F_a, F_b), ...) and
the multi-label classifier C (logits [B, L]):

  classification  BCE(C(F_a), y_a) + BCE(C(F_b), y_b)                       (C trained on real features)
  set ops         BCE(C(Z_int), y_a ∧ y_b) + BCE(C(Z_uni), y_a ∨ y_b) + BCE(C(Z_sub), y_a ∧ ¬y_b)
  symmetry        MSE(Z_int, M_int(F_b, F_a)) + MSE(Z_uni, M_uni(F_b, F_a))   (∩ and ∪ commute)
  reconstruction  MSE(F_a, M_uni(Z_sub, Z_int)) + MSE(F_b, M_uni(M_sub(F_b, F_a), M_int(F_b, F_a)))
                  (a = (a \\ b) ∪ (a ∩ b): the paper's term against mode collapse)

BCE is the mean over pairs and labels of the sigmoid cross-entropy, MSE the mean over pairs and
feature dimensions of the squared difference (the mean reductions of torch's
`BCEWithLogitsLoss` / `MSELoss`). The total is the sum of the four groups, the last two weighted
by `sym_weight` and `rec_weight` (default 1: an unweighted sum). What we could read: the official
`SetOpsModule.forward`, which computes exactly the symmetry pairs and the reconstructions above.
What we could not: the paper's method section (its equation numbers) and the official training
script (its loss weights); the four groups are the paper's as we recall its Sec. 3 (not re-read
here: a classification loss on the operated features, MSE terms for symmetry and against mode
collapse), and the unit weights are our choice.
"""
from __future__ import annotations

import jax.numpy as jnp

from vljax.losses.multilabel import bce_elementwise


def set_targets(y_a, y_b) -> dict:
    """Multi-hot targets of the operations: {"int", "uni", "sub"} [B, L] float32 from y_a, y_b [B, L]."""
    y_a, y_b = jnp.asarray(y_a, jnp.float32), jnp.asarray(y_b, jnp.float32)
    return {"int": y_a * y_b, "uni": jnp.maximum(y_a, y_b), "sub": y_a * (1.0 - y_b)}


def _bce(logits, targets):
    return bce_elementwise(logits, targets).mean()


def _mse(x, y):
    return jnp.mean(jnp.square(x - y))


def laso_loss(logits_a, logits_b, logits_int, logits_uni, logits_sub, y_a, y_b, f_a, f_b, outs: dict,
              *, sym_weight: float = 1.0, rec_weight: float = 1.0) -> tuple:
    """(total scalar, parts dict of scalars "cls", "ops", "sym", "rec") of the module docstring.

    logits_*: [B, L] classifier logits of F_a, F_b, Z_int, Z_uni, Z_sub; y_a, y_b: [B, L] in {0, 1};
    f_a, f_b: [B, D] the input features; outs: `SetOps` outputs ("int", "int_rev", "uni",
    "uni_rev", "rec_a", "rec_b": [B, D]).
    """
    t = set_targets(y_a, y_b)
    parts = {
        "cls": _bce(logits_a, y_a) + _bce(logits_b, y_b),
        "ops": _bce(logits_int, t["int"]) + _bce(logits_uni, t["uni"]) + _bce(logits_sub, t["sub"]),
        "sym": _mse(outs["int"], outs["int_rev"]) + _mse(outs["uni"], outs["uni_rev"]),
        "rec": _mse(f_a, outs["rec_a"]) + _mse(f_b, outs["rec_b"]),
    }
    total = parts["cls"] + parts["ops"] + sym_weight * parts["sym"] + rec_weight * parts["rec"]
    return total, parts
