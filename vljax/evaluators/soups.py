"""Model soups (Wortsman et al., ICML 2022): average the weights of models fine-tuned from the
same initialisation instead of their predictions; one model's inference cost.

  uniform soup: the mean of all ingredients.
  greedy soup: sort the ingredients by held-out score (best first), start from the best and
    add each next one if the soup of the kept ingredients plus it scores at least as well as
    the current soup on held-out data.
  WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, Eq. 1): the
    weight-space ensemble theta_alpha = (1 - alpha) theta_zero-shot + alpha theta_fine-tuned,
    a soup of two ingredients with weights (1 - alpha, alpha).
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays


def weighted_soup(params_list: Sequence[Params], weights: Sequence[float]) -> Params:
    """Leaf-wise sum_i weights[i] params_list[i], accumulated in float32 and cast back to each
    leaf's dtype."""
    if len(params_list) != len(weights):
        raise ValueError(f"{len(params_list)} ingredients but {len(weights)} weights")

    def mix(*leaves):
        acc = sum(w * jnp.asarray(x, jnp.float32) for w, x in zip(weights, leaves))
        return acc.astype(jnp.result_type(leaves[0]))
    return jax.tree.map(mix, *params_list)


def _mean(params_list: Sequence[Params]) -> Params:
    return weighted_soup(params_list, [1.0 / len(params_list)] * len(params_list))


def wise_ft(zeroshot: Params, finetuned: Params, alpha: float) -> Params:
    """WiSE-FT's theta_alpha = (1 - alpha) zeroshot + alpha finetuned (Eq. 1)."""
    return weighted_soup([zeroshot, finetuned], [1.0 - alpha, alpha])


def uniform_soup(params_list: Sequence[Params]) -> Params:
    """The leaf-wise mean of parameter pytrees of one structure."""
    if not params_list:
        raise ValueError("a soup needs at least one ingredient")
    return _mean(params_list)


def greedy_soup(params_list: Sequence[Params], score_fn: Callable[[Params], float]
                ) -> tuple[Params, dict[str, list]]:
    """Greedy soup: keep an ingredient only if it does not lower the held-out score.

    Args:
      params_list: the ingredients (pytrees of one structure).
      score_fn: params -> held-out score, higher is better (e.g. validation accuracy).
    Returns:
      (soup params, log) with log = {
        "individual": score of each ingredient, in the given order,
        "order": ingredient indices, best first (ties keep the given order),
        "steps": [(ingredient index, soup score with it, accepted)] for each tried addition,
        "ingredients": indices in the final soup,
        "score": the final soup's score}.
    """
    if not params_list:
        raise ValueError("a soup needs at least one ingredient")
    individual = [float(score_fn(p)) for p in params_list]
    order = [int(i) for i in np.argsort(-np.asarray(individual), kind="stable")]
    kept, soup, score = [order[0]], params_list[order[0]], individual[order[0]]
    steps = []
    for i in order[1:]:
        candidate = _mean([params_list[j] for j in kept + [i]])
        cand_score = float(score_fn(candidate))
        accepted = cand_score >= score
        steps.append((i, cand_score, accepted))
        if accepted:
            kept, soup, score = kept + [i], candidate, cand_score
    return soup, {"individual": individual, "order": order, "steps": steps,
                  "ingredients": kept, "score": score}
