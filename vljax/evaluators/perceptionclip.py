"""PerceptionCLIP: zero-shot classification by inferring contextual attributes and conditioning on them
(An et al., "PerceptionCLIP: Visual Classification by Inferring and Conditioning on Contexts", ICLR 2024,
arXiv 2308.01313), training-free, on L2-normalised embeddings.

Contextual attributes (orientation, background, illustration style, ...) each take one of a few values;
z is one combination of values, one per attribute (the official `compose_template`: the Cartesian product
of the attributes' values). Each value has descriptions ("" for the default: nothing added); class y
under z is the sentence main_template(y) + ", " + the value descriptions + ".", and its embedding is the
renormalised mean over the product of the values' descriptions (the official
`get_zeroshot_classifier_flat_advance`). With the logits f(y, z; x) = logit_scale * <zimg(x), t(y, z)>,
the two-step inference, as the official `perceptionclip_two_step.py` computes it (its comments give
the equations; the paper's own equation numbers were not readable here):

  step 1, infer the context with intervention temperature tau:
    with the class ("w/ y", official infer_mode 0):
      p(z|x) = sum_y exp(f(y, z; x) / tau) / sum_{y', z'} exp(f(y', z'; x) / tau)
    without ("w/o y", infer_mode 1), from attribute-only sentences t(z) = main_template("object") + ...:
      p(z|x) = softmax_z(f(z; x) / tau)
  step 2, classify conditioned on it:
      p(y|x, z) = softmax_y f(y, z; x),     p(y|x) = sum_z p(z|x) p(y|x, z),   prediction argmax_y p(y|x).

tau = 1 is the official default; tau -> infinity makes p(z|x) uniform (no context inferred: the average
over contexts), tau -> 0 conditions on the single most likely context.
Deviations: the separator ", " between the class sentence and the value descriptions is ours (the
official code concatenates its template strings as given); the attribute lists are subsets of the
paper's ImageNet lists (configs/descriptions/perceptionclip_*.json say which). The paper's
logit scale is CLIP's 100; here it is the model's own.
"""
import itertools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from vljax.evaluators import base, prompts, registry, zeroshot
from vljax.evaluators import data as data_lib

INFER_MODES = ("with_class", "without_class")
MAX_SENTENCES = 200_000  # classes x contexts x descriptions: a guard against an exploding product


def load_attributes(source: str | os.PathLike | Mapping) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """(main_template, {attribute: {value: [descriptions]}}) from a JSON file or dict
    {"main_template": "a photo of a {}", "attributes": {...}} (keys starting with "_" are notes).
    A malformed file is an error naming it and the key."""
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "attributes dict"
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    main = source.get("main_template")
    if not isinstance(main, str) or main.count("{}") != 1:
        raise ValueError(f"{where}: `main_template` must be a string with one '{{}}', got {main!r}")
    attributes = source.get("attributes")
    if not isinstance(attributes, Mapping) or not attributes:
        raise ValueError(f"{where}: `attributes` must be a non-empty {{attribute: {{value: [descriptions]}}}}")
    out = {}
    for attr, values in attributes.items():
        if not isinstance(values, Mapping) or not values:
            raise ValueError(f"{where}: attribute {attr!r} needs a non-empty {{value: [descriptions]}}")
        out[str(attr)] = {}
        for value, descs in values.items():
            descs = [descs] if isinstance(descs, str) else list(descs)
            if not descs:
                raise ValueError(f"{where}: value {value!r} of attribute {attr!r} has no description")
            out[str(attr)][str(value)] = [str(d) for d in descs]
    return main, out


def contexts(attributes: Mapping[str, Mapping[str, Sequence[str]]]) -> list[tuple[str, ...]]:
    """Every combination z of attribute values (one value per attribute, attributes in order)."""
    return list(itertools.product(*[list(v) for v in attributes.values()]))


def context_sentences(main: str, name: str, attributes, z: Sequence[str]) -> list[str]:
    """The sentences of class `name` under context z: one per combination of the values' descriptions."""
    per_value = [attributes[a][v] for a, v in zip(attributes, z)]
    return [main.format(name) + "".join(f", {d}" for d in combo if d) + "."
            for combo in itertools.product(*per_value)]


def perceptionclip_probs(logits_yz: np.ndarray, temperature: float = 1.0,
                         logits_z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two-step inference (module docstring).

    Args:
      logits_yz: [N, C, Z] f(y, z; x) (logit_scale * cosine).
      temperature: tau of step 1.
      logits_z: [N, Z] f(z; x) of attribute-only sentences ("w/o y"), or None ("w/ y").
    Returns:
      (p(y|x) [N, C], p(z|x) [N, Z]).
    """
    logits_yz = np.asarray(logits_yz, np.float64)
    if logits_z is None:
        flat = logits_yz.reshape(len(logits_yz), -1) / temperature
        joint = np.exp(flat - flat.max(axis=1, keepdims=True)).reshape(logits_yz.shape)
        p_z = joint.sum(axis=1)
    else:
        s = np.asarray(logits_z, np.float64) / temperature
        p_z = np.exp(s - s.max(axis=1, keepdims=True))
    p_z = p_z / p_z.sum(axis=1, keepdims=True)
    e = np.exp(logits_yz - logits_yz.max(axis=1, keepdims=True))
    p_y_given_z = e / e.sum(axis=1, keepdims=True)
    return np.einsum("ncz,nz->nc", p_y_given_z, p_z), p_z


@registry.register("perceptionclip")
class PerceptionCLIPEvaluator(base.Evaluator):
    """PerceptionCLIP zero-shot classification (module docstring).

    Metrics "perceptionclip/<name>/top1", ".../top5" (each k of `ks`), ".../mean_per_class",
    ".../worst_class", and ".../zeroshot_top1": the same sentences without context (the main
    template alone), the baseline it improves on.
    """
    DATA_KEYS = data_lib.CLASSIFICATION_KEYS

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str, *, name: str,
                 attributes: str | os.PathLike | Mapping, temperature: float = 1.0,
                 infer: str = "with_class", ks: Sequence[int] = (1, 5), canonicalize: bool = True):
        """
        Args:
          data / labels / class_names: the images (a source), their [N] labels, the C class names.
          attributes: a configs/descriptions/perceptionclip_*.json path or its dict (`load_attributes`).
          temperature: tau of step 1 (> 0).
          infer: "with_class" (official infer_mode 0) or "without_class" (infer_mode 1).
        """
        if infer not in INFER_MODES:
            raise ValueError(f"config key `evals.{name}.infer`: {infer!r} is not one of {INFER_MODES}")
        if not temperature > 0:
            raise ValueError(f"config key `evals.{name}.temperature` must be > 0, got {temperature}")
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize else names
        self.data, self.labels = data, np.asarray(labels, np.int64)
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        self.main, self.attributes = load_attributes(attributes)
        self.contexts = contexts(self.attributes)
        per_context = [len(context_sentences(self.main, "", self.attributes, z)) for z in self.contexts]
        if sum(per_context) * (len(self.class_names) + 1) > MAX_SENTENCES:
            raise ValueError(f"config key `evals.{name}.attributes`: {len(self.contexts)} contexts x "
                             f"{len(self.class_names)} classes make over {MAX_SENTENCES} sentences; use fewer")
        self.name, self.temperature, self.infer, self.ks = name, float(temperature), infer, tuple(ks)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From `evals.<name>` = dict(type="perceptionclip", data=dict(name=..., split=..., label=...,
        max_examples=...) or a source entry, attributes="configs/descriptions/perceptionclip_icon.json",
        temperature=1.0, infer="with_class")."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        source, labels, class_names = data_lib.classification(name, data)
        return cls(source, labels, class_names, name=name, **kwargs)

    def class_context_embeddings(self, embedder: base.Embedder) -> np.ndarray:
        """[C, Z, D]: t(y, z), the renormalised mean of the sentences of class y under context z."""
        texts = [context_sentences(self.main, c, self.attributes, z)
                 for c in self.class_names for z in self.contexts]
        z = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, texts))
        return z.reshape(len(self.class_names), len(self.contexts), -1)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        labels = self.labels[index]
        scale = float(embedder.logit_scale)
        tyz = self.class_context_embeddings(embedder)
        logits_z = None
        if self.infer == "without_class":
            texts = [context_sentences(self.main, "object", self.attributes, z) for z in self.contexts]
            tz = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, texts))
            logits_z = scale * zimg @ tz.T
        p_y = np.concatenate([
            perceptionclip_probs(scale * np.einsum("nd,czd->ncz", zimg[s], tyz), self.temperature,
                                 None if logits_z is None else logits_z[s])[0]
            for s in base.batch_slices(len(zimg), 256)])
        metrics = zeroshot.accuracies(base.ranks_of(p_y, labels), labels, self.ks)
        plain = zeroshot.ensemble(zeroshot.class_text_embeddings(
            embedder, [[self.main.format(c) + "."] for c in self.class_names]))
        metrics["zeroshot_top1"] = float(np.mean(np.argmax(zimg @ plain.T, axis=1) == labels))
        return {f"perceptionclip/{self.name}/{k}": v for k, v in metrics.items()}
