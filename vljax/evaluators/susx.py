"""SuS-X: training-free name-only transfer (Udandarao et al., "SuS-X: Training-Free Name-Only Transfer of
Vision-Language Models", ICCV 2023, arXiv 2211.16198): a support set built from the class names alone
(SuS), then TIP-X inference (official vishaal27/SuS-X `tipx.py`, which points to the paper's Sec. 3.2).

SuS here is retrieved, as the paper's SuS-LC retrieves LAION-5B images by their similarity to the class
prompts: from an image database (a source of any kind, e.g. the demo's training split), the M images
closest to each class's text embedding (the template ensemble of its name) are that class's support
images, with label c (an image retrieved for two classes is in both). Nothing of the test set or its
labels is used. (The paper's other variant generates the support images with Stable Diffusion; no
generator is available here, so it is not reproduced.)

TIP-X (official `tipx.py`): with test images f [N, D], support images F [M, D], their one-hot labels
L [M, C], and the zero-shot text classifier W [C, D],
    signatures  s(x) = softmax(x W^T / T)  (image-text similarity distributions; T = 0.5 official)
    KL          K_ij = KL(s(f_i) || s(F_j)) = sum_c s(f_i)_c (log s(f_i)_c - log s(F_j)_c)
    affinities  A = -rescale(K)   (min-max rescaled to the range of the image-image similarities
                                   f F^T, the official `scale_`, over the whole [N, M] matrix)
    logits      scale * f W^T + gamma * A L + alpha * exp(-beta (1 - f F^T)) L
The last term is Tip-Adapter's cache (vljax/evaluators/tip_adapter.py). The official zero-shot term is
100 f W^T (CLIP's logit scale); here it is the model's, so alpha and gamma are in the model's logit
units (the paper's a_p is a_p * scale / 100). With alpha = gamma = 0 TIP-X is the zero-shot classifier.

Hyperparameters: the official code grid-searches alpha, beta, gamma on the target dataset's labelled
validation split. Name-only transfer has no labelled target images, so here they are config values
(defaults alpha = 1, beta = 5.5, gamma = 0.5: our choice, made before any number, not the paper's,
whose values are searched per dataset); `search=True` instead searches the official grids on a held-out
labelled split (`data.val_split`), as the official code does, and reports the choice.
"""
from collections.abc import Sequence

import numpy as np

from vljax.evaluators import base, prompts, registry, tip_adapter, zeroshot
from vljax.evaluators import data as data_lib

DATA_KEYS = ("name", "split", "label", "label_key", "data_dir", "max_examples", "source",
             "database_split", "max_database", "val_split", "max_val")


def signatures(z: np.ndarray, ztxt: np.ndarray, temperature: float) -> np.ndarray:
    """[N, C] softmax(z W^T / T): each image's distribution over the class texts."""
    s = (z @ ztxt.T) / temperature
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_matrix(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """[N, M] KL(p_i || q_j) of distributions p [N, C], q [M, C]."""
    return (p * np.log(p)).sum(axis=1, keepdims=True) - p @ np.log(q).T


def rescale(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """x min-max mapped onto [target.min(), target.max()] (official `scale_`)."""
    span = x.max() - x.min()
    y = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    return y * (target.max() - target.min()) + target.min()


def tipx_logits(zimg, support, support_labels, ztxt, logit_scale, alpha, beta, gamma,
                temperature: float = 0.5) -> np.ndarray:
    """TIP-X logits [N, C] (module docstring).

    Args:
      zimg: [N, D] test images. support: [M, D] support images. support_labels: [M, C] one-hot.
      ztxt: [C, D] zero-shot classifier. logit_scale: the model's. alpha / beta: the cache term's
      weight and sharpness. gamma: the KL term's weight. temperature: T of the signatures.
    """
    zimg, support, ztxt = (np.asarray(a, np.float64) for a in (zimg, support, ztxt))
    sim = zimg @ support.T
    kl = kl_matrix(signatures(zimg, ztxt, temperature), signatures(support, ztxt, temperature))
    affinity = -rescale(kl, sim)
    cache = np.exp(-beta * (1.0 - sim))
    return logit_scale * zimg @ ztxt.T + (gamma * affinity + alpha * cache) @ support_labels


def retrieve_support(zdb: np.ndarray, ztxt: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """SuS by retrieval: (database rows [C * per_class], labels [C * per_class]): for each class c the
    `per_class` database images most similar to its text embedding ztxt[c], best first (ties to the
    lower row)."""
    top = base.top_k(ztxt @ zdb.T, per_class)  # [C, per_class]
    return top.reshape(-1), np.repeat(np.arange(len(ztxt)), per_class)


# The official search grids (`hparam_search`): alpha, gamma in model logit units (x scale / 100 below).
OFFICIAL_ALPHAS = tuple(i * (50 - 0.1) / 20 + 0.1 for i in range(20))
OFFICIAL_BETAS = tuple(i * (50 - 1) / 200 + 1 for i in range(200))
OFFICIAL_GAMMAS = tuple(i * (30 - 0.1) / 50 + 0.1 for i in range(50))


def search(zval, yval, support, support_labels, ztxt, logit_scale, temperature=0.5,
           betas=OFFICIAL_BETAS[::10]) -> tuple[float, float, float, float]:
    """(alpha, beta, gamma, accuracy) maximising accuracy on held-out labelled images over the official
    grids (alpha and gamma rescaled from CLIP's scale 100 to `logit_scale`; beta thinned to every
    10th value of the official 200 to keep the search cheap). Ties go to the first in grid order."""
    unit = logit_scale / 100.0
    best = (-1.0, 0.0, 0.0, 0.0)
    for beta in betas:
        base_logits = tipx_logits(zval, support, support_labels, ztxt, logit_scale, 0.0, beta, 0.0, temperature)
        cache = tipx_logits(zval, support, support_labels, ztxt, 0.0, 1.0, beta, 0.0, temperature)
        kl = tipx_logits(zval, support, support_labels, ztxt, 0.0, 0.0, beta, 1.0, temperature)
        for a in OFFICIAL_ALPHAS:
            for g in OFFICIAL_GAMMAS:
                acc = float(np.mean(np.argmax(base_logits + a * unit * cache + g * unit * kl, 1) == yval))
                if acc > best[0]:
                    best = (acc, a * unit, float(beta), g * unit)
    return best[1], best[2], best[3], best[0]


@registry.register("susx")
class SuSXEvaluator(base.Evaluator):
    """SuS-X (module docstring). Metrics "susx/<name>/top1", ".../top5", ".../mean_per_class",
    ".../worst_class", ".../zeroshot_top1", ".../support_size", and with `search` the chosen
    ".../alpha", ".../beta", ".../gamma"."""
    DATA_KEYS = DATA_KEYS

    def __init__(self, data, labels: Sequence[int], class_names: Sequence[str] | str, database, *,
                 name: str, templates: str | Sequence[str] = "clip80", per_class: int = 16,
                 alpha: float = 1.0, beta: float = 5.5, gamma: float = 0.5, temperature: float = 0.5,
                 search: bool = False, val_data=None, val_labels: Sequence[int] | None = None,
                 ks: Sequence[int] = (1, 5), canonicalize: bool = True):
        """
        Args:
          data / labels / class_names: the test images (a source), their [N] labels, the C names.
          database: the images SuS retrieves from (a source; its labels are never read).
          per_class: support images per class (M = C * per_class).
          alpha, beta, gamma, temperature: TIP-X's (module docstring); ignored for alpha, beta, gamma
            with `search`, which needs `val_data` / `val_labels` (held-out labelled images).
        """
        if per_class < 1:
            raise ValueError(f"config key `evals.{name}.per_class` must be >= 1, got {per_class}")
        if len(database) < per_class:
            raise ValueError(f"config key `evals.{name}.data`: the SuS database holds {len(database)} "
                             f"records, fewer than per_class={per_class}")
        if search and val_data is None:
            raise ValueError(f"config key `evals.{name}.search` needs `evals.{name}.data.val_split`")
        names = prompts.load_class_names(class_names)
        self.class_names = [prompts.canonicalize_name(n) for n in names] if canonicalize else names
        self.data, self.labels, self.database = data, np.asarray(labels, np.int64), database
        if len(self.data) != len(self.labels):
            raise ValueError(f"{name}: {len(self.data)} records but {len(self.labels)} labels")
        self.texts = prompts.class_texts(self.class_names, templates)
        self.name, self.per_class, self.ks = name, int(per_class), tuple(ks)
        self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
        self.search, self.val_data = search, val_data
        self.val_labels = None if val_labels is None else np.asarray(val_labels, np.int64)

    @classmethod
    def from_config(cls, name: str, spec: dict, *, plot_dir: str | None = None):
        """From `evals.<name>` = dict(type="susx", data=dict(name=..., split="test", label=...,
        database_split="train", max_database=..., val_split=..., max_val=...), per_class=16, alpha=...,
        beta=..., gamma=..., search=False), or a source entry with `database_<key>` / `val_<key>`
        giving those splits' keys (vljax/evaluators/data.py)."""
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, DATA_KEYS)
        splits = {"test": data.get("split", "test"), "database": "train"}
        if "val_split" in data or ("source" in data and any(k.startswith("val_") for k in data)):
            splits["val"] = "val"
        entry = {k: v for k, v in data.items() if k not in ("split", "max_database", "max_val")}
        if "source" not in data:
            entry["test_split"] = splits["test"]
        opened = data_lib.open_splits(name, entry, splits)
        label_key = data.get("label") or data.get("label_key")
        test, labels, names = data_lib.labelled(name, opened["test"], label_key, data.get("max_examples"))
        database = data_lib.first(opened["database"], data.get("max_database"))
        if "val" in opened:
            kwargs["val_data"], kwargs["val_labels"], _ = data_lib.labelled(
                name, opened["val"], label_key, data.get("max_val"))
        return cls(test, labels, names, database, name=name, **kwargs)

    def run(self, embedder: base.Embedder) -> dict[str, float]:
        zimg, index = base.image_embeddings(embedder, self.data)
        labels = self.labels[index]
        zdb, _ = base.image_embeddings(embedder, self.database)
        if len(zdb) < self.per_class:
            raise ValueError(f"evals.{self.name}: only {len(zdb)} readable database images for "
                             f"per_class={self.per_class}")
        ztxt = zeroshot.ensemble(zeroshot.class_text_embeddings(embedder, self.texts))
        rows, support_y = retrieve_support(zdb, ztxt, self.per_class)
        support, onehot = zdb[rows], tip_adapter.one_hot(support_y, len(self.class_names))
        scale = float(embedder.logit_scale)
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        prefix = f"susx/{self.name}"
        out = {}
        if self.search:
            zval, vindex = base.image_embeddings(embedder, self.val_data)
            alpha, beta, gamma, _ = search(zval, self.val_labels[vindex], support, onehot, ztxt, scale,
                                           self.temperature)
            out.update({f"{prefix}/alpha": alpha, f"{prefix}/beta": beta, f"{prefix}/gamma": gamma})
        # One [N, M] matrix: the KL affinities are rescaled by its global min and max (official `scale_`).
        logits = tipx_logits(zimg, support, onehot, ztxt, scale, alpha, beta, gamma, self.temperature)
        metrics = zeroshot.accuracies(base.ranks_of(logits, labels), labels, self.ks)
        metrics["zeroshot_top1"] = float(np.mean(np.argmax(zimg @ ztxt.T, axis=1) == labels))
        metrics["support_size"] = float(len(rows))
        out.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        return out
