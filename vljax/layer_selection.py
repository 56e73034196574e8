r"""STRUCTURE's layer selection: which layer of each frozen tower to align.

    python -m vljax.layer_selection --config=configs/lit.py --workdir=/tmp/lit_layers --samples=2000

writes WORKDIR/layer_selection.json (the [image layer x text layer] scores, the layers' names, the
chosen pair, the config keys that train on it, N and the metric's settings) and prints the matrix.
About 1.5 min for the LiT demo's towers and 2000 pairs on a 2-core CPU (most of it the towers).

STRUCTURE (Groger, Wen, Le & Brbic, NeurIPS 2025, arXiv 2506.16895) aligns, instead of the last
layers of two frozen unimodal encoders, the pair of layers whose representations are most alike
across the modalities, measured by mutual k-nearest-neighbour alignment on a random sample of paired
training data. This module follows the authors' code (github.com/hhxk233/STRUCTURE at e1b454b;
line numbers below are that commit's):

- `mutual_knn`, `knn_indices`: `src/utils/metrics.py` `AlignmentMetrics.mutual_knn` (l. 82-112) and
  `compute_nearest_neighbors` (l. 316-329): per sample, the `topk` nearest others by inner product
  (the diagonal filled with -1e8), then the mean over samples of |kNN_A(i) & kNN_B(i)| / topk.
- `resolve_topk`: `src/measure_alignment.py` `compute_score` (l. 53-61): "sqrt" ceil(sqrt(N)),
  "sturges" ceil(log2(N) + 1), "rice" ceil(2 N^(1/3)), or a number.
- `score_matrix`: `compute_score` (l. 73-92): each [image layer, text layer] pair, both L2-normalised
  first (`normalize: true`, F.normalize).
- `choose` (best_only): `src/trainers/alignment_trainer.py` `compute_layer_alignment` (l. 425-567):
  the pairs' scores without the concatenated-layers entries (index -1, l. 469-472), the highest
  always kept among the sampled pairs (l. 512-519); with `best_only: true` (l. 535-541) that
  highest pair is the one trained.
- The sample (`sample_indices`): `type: random` (l. 446-453), `n_samples: 5000` of the training
  pairs, without replacement (`configs/default.yaml` `layer_selection`).
- Layer features: text, `get_text_features` with `pool_txt: avg` (l. 324-331): every hidden state
  (transformers' `hidden_states`: the embeddings' output, then each block's) averaged over the
  attention mask; here the states after the embeddings and the first k blocks of the config's text
  tower (`Bert(stop_after=k)`, k = 0..depth), averaged over tokens != pad_id. Image,
  `get_image_features` (l. 396-421) and `get_lvm` (l. 219-247): each transformer block's output
  (timm `blocks.<i>.add_1`, transformers `hidden_states[1:]`), the embeddings left out; here each
  MBConv block's output map of EfficientNet-Lite (`blocks_<i>`), then the trunk's pooled features
  (`top_conv`, the stored LiT features).

Deviations from the code, named:
- Image pooling: the code takes a ViT's class token (`pool_img: cls`); a CNN has none, so each
  block's map is averaged over space (as the tower's own pooling does).
- The concatenation of all layers (index -1 in `compute_score`) is not scored: the code drops
  those scores before choosing. `n_score_bins` only picks which extra pairs the code trains when
  `best_only` is false; with best_only (the default) the choice is the highest score, computed here.
- Ties: the neighbours are sorted stably (the lower index first among equal similarities; torch's
  argsort leaves ties unordered); among equal scores the first pair in (image, text) order wins.
- The data: the first caption of each record (the code's datasets give one caption per pair),
  tokenised with the config's tokenizer (truncated at `tokenizer.max_len`); images through the
  config's eval transform (shorter side to `input.image_size`, centre crop), no augmentation.
  Records that cannot be read are skipped and the draw continues. The sample is drawn with
  numpy's `default_rng(seed)` over the records of all `input.data` sources concatenated
  (the code: `np.random.choice` over its training set), source weights not applied.
- Features in float32 on whatever device JAX has (the code: bfloat16 text towers on a GPU).

Training on the chosen layers: text, `model.text.num_layers = k` (the chosen text index: the
embeddings and the first k blocks; vljax/pretrained.py loads the checkpoint's lowest k blocks);
image, `model.image.feature_block = i` for EfficientNet-Lite (the trunk ends after MBConv block i;
the LiT store's fingerprint includes it). `DIR/layer_selection.json` records both as `config_keys`.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vljax import cliflags, hostmem, logs

# As vljax.evaluate: only jax-free modules above; the rest is imported inside functions, after
# hostmem.cli_prepare.

TOPK_RULES = ("rice", "sqrt", "sturges")
METRICS = ("mutual_knn",)
DEFAULT_SAMPLES = 5000  # configs/default.yaml `layer_selection.n_samples`
REPORT = "layer_selection.json"


# --------------------------------------------------------------------------- the metric (pure)

def resolve_topk(topk, n: int, where: str = "--topk") -> int:
    """k of the kNN metric for n samples: "rice" ceil(2 n^(1/3)), "sqrt" ceil(sqrt(n)), "sturges"
    ceil(log2(n) + 1) (measure_alignment.py l. 53-61), or a positive integer (also as a string of
    digits). The sample must hold more than k others' worth: n > k, else the kNN set includes the
    sample itself (the code does not check)."""
    if isinstance(topk, str) and topk.strip().isdigit():
        topk = int(topk)
    if isinstance(topk, str):
        rules = {"sqrt": lambda: np.ceil(np.sqrt(n)), "sturges": lambda: np.ceil(np.log2(n) + 1),
                 "rice": lambda: np.ceil(2 * n ** (1 / 3))}
        if topk not in rules:
            raise ValueError(f"{where}: unknown topk rule {topk!r} (known: {', '.join(TOPK_RULES)}, or a number)")
        k = int(rules[topk]())
    elif isinstance(topk, (int, np.integer)) and not isinstance(topk, bool):
        k = int(topk)
    else:
        raise ValueError(f"{where}: topk must be one of {', '.join(TOPK_RULES)} or a positive integer, got {topk!r}")
    if k < 1:
        raise ValueError(f"{where}: topk must be >= 1, got {k}")
    if n <= k:
        raise ValueError(f"--samples: {n} paired samples, but the kNN metric needs more than topk = {k} "
                         "(raise --samples or lower --topk)")
    return k


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize(x, p=2, dim=-1): x / max(||x||, 1e-12), in float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_indices(feats: np.ndarray, topk: int) -> np.ndarray:
    """feats [N, D] -> int [N, topk]: each row's topk largest inner products with the other rows
    (metrics.py `compute_nearest_neighbors`: the diagonal set to -1e8, sorted descending)."""
    feats = np.asarray(feats, np.float32)
    if feats.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {feats.shape}")
    sims = feats @ feats.T
    np.fill_diagonal(sims, -1e8)
    return np.argsort(-sims, axis=1, kind="stable")[:, :topk]


def _knn_mask(feats: np.ndarray, topk: int) -> np.ndarray:
    """bool [N, N]: row i marks the kNN of sample i."""
    idx = knn_indices(feats, topk)
    mask = np.zeros((len(idx), len(idx)), bool)
    mask[np.arange(len(idx))[:, None], idx] = True
    return mask


def mutual_knn(feats_a: np.ndarray, feats_b: np.ndarray, topk: int) -> float:
    """metrics.py `AlignmentMetrics.mutual_knn`: mean over samples of the fraction of sample i's
    topk neighbours in A that are also among its topk neighbours in B. feats_*: [N, D_*] (no
    normalisation here; `score_matrix` normalises first, as compute_score does)."""
    if len(feats_a) != len(feats_b):
        raise ValueError(f"paired features differ in length: {len(feats_a)} != {len(feats_b)}")
    return float(((_knn_mask(feats_a, topk) & _knn_mask(feats_b, topk)).sum(1) / topk).mean())


def score_matrix(image_layers, text_layers, topk="rice", normalize: bool = True) -> np.ndarray:
    """float [I, T]: mutual_knn of image layer i and text layer j (each a [N, D] array, rows
    paired), both L2-normalised when `normalize` (compute_score). Each layer's kNN sets are
    computed once."""
    n = len(image_layers[0])
    if any(len(x) != n for x in (*image_layers, *text_layers)):
        raise ValueError("every layer's features must hold the same N paired samples")
    k = resolve_topk(topk, n)
    prep = l2_normalize if normalize else (lambda x: np.asarray(x, np.float32))
    masks_t = [_knn_mask(prep(x), k) for x in text_layers]
    out = np.zeros((len(image_layers), len(text_layers)), np.float64)
    for i, x in enumerate(image_layers):
        mi = _knn_mask(prep(x), k)
        for j, mt in enumerate(masks_t):
            out[i, j] = ((mi & mt).sum(1) / k).mean()
    return out


def choose(scores: np.ndarray) -> tuple[int, int]:
    """The (image layer, text layer) of the highest score (best_only; the first in row-major order
    among equal scores)."""
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(i), int(j)


def sample_indices(n_total: int, samples: int, seed: int) -> np.ndarray:
    """A random order of all n_total records (seeded); the caller takes the first `samples`
    readable ones (alignment_trainer.py l. 443-452: min(n_samples, N) without replacement)."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    return np.random.default_rng(seed).permutation(n_total)


# --------------------------------------------------------------------------- data and towers

def paired_sample(config, samples: int, seed: int):
    """(images f32 [n, S, S, 3], captions [n], record ids [n]) of n = min(samples, readable records)
    training pairs of `config.input.data` drawn at random (module docstring)."""
    from vljax import factory  # noqa: PLC0415  (imports JAX: after cli_prepare)
    from vljax.data import sources  # noqa: PLC0415
    from vljax.data.preprocess import Preprocess  # noqa: PLC0415
    entries = list(config.input.data)
    opened = [sources.get_source(e, data_dir=config.input.get("data_dir")) for e in entries]
    bounds = np.cumsum([0] + [len(s) for s in opened])
    pre = Preprocess(image_size=int(config.input.image_size),
                     value_range=factory.value_range(factory.spec_from_config(config)))
    images, captions, ids = [], [], []
    for g in sample_indices(int(bounds[-1]), samples, seed):
        s = int(np.searchsorted(bounds, g, side="right") - 1)
        rec = opened[s][int(g - bounds[s])]
        ex = pre.eval(rec)
        if "skip" in ex:
            continue
        images.append(ex["image"])
        captions.append(ex["caption"])
        ids.append(f"{s}:{rec.get('id', g - bounds[s])}")
        if len(images) == samples:
            break
    if not images:
        raise ValueError("config key `input.data`: no readable record with a caption")
    return np.stack(images).astype(np.float32), captions, ids


def build(config, rng_seed: int = 0):
    """(model, params, tokenizer, pretrained {tower: name}): the config's two towers, randomly
    initialised, then the pretrained towers of `config.model_init` written in (vljax/pretrained.py)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from vljax import factory, pretrained  # noqa: PLC0415
    spec = factory.spec_from_config(config)
    model = factory.build_model(spec)
    tokenizer = factory.build_tokenizer(spec)
    s = int(config.input.image_size)
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, s, s, 3), jnp.float32),
                                          jnp.zeros((1, tokenizer.max_len), jnp.int32))["params"])(
        jax.random.key(rng_seed))
    loaded = {}
    for tower, name in (config.get("model_init") or {}).items():
        if name:
            loaded_tower = pretrained.lowest_layers(pretrained.load_tower(name), params[tower], tower)
            params = pretrained.write_tower(params, loaded_tower, tower)
            loaded[tower] = name
    for tower in ("img", "txt"):
        if tower not in loaded:
            logging.warning("layer selection: the %s tower has no `model_init`: random weights", tower)
    return model, params, tokenizer, loaded


def _batched(fn, x, batch: int):
    """fn over x in batches of `batch` rows (the last one padded, so fn compiles once); the rows
    of each output leaf concatenated."""
    import jax  # noqa: PLC0415
    outs = []
    for lo in range(0, len(x), batch):
        chunk = x[lo:lo + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
        outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(chunk)))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def image_layer_features(model, params, images: np.ndarray, batch: int = 64):
    """(names, [I arrays [N, C_i]]): each block's output map averaged over space, then the trunk's
    pooled features (`top_conv`, the tower's pre_logits; not with `model.image.feature_block`).
    The image tower must sow its blocks (intermediates `blocks_<i>_out`: EfficientNet-Lite)."""
    import jax  # noqa: PLC0415

    def trunk(p, x):
        pooled, state = model.apply({"params": p}, x, method=model.image_trunk, mutable=["intermediates"])
        inter = state.get("intermediates", {}).get("img", {})
        return {k[:-len("_out")]: v[0].mean(axis=(1, 2)) for k, v in inter.items()
                if k.startswith("blocks_") and k.endswith("_out")}, pooled

    fn = jax.jit(trunk)
    blocks, pooled = _batched(lambda x: fn(params, x), images, batch)
    if not blocks:
        raise ValueError(f"config key `model.image_model`: {model.image_model!r} gives no per-block "
                         "features (intermediates `blocks_<i>_out`); layer selection supports efficientnet_lite")
    names = sorted(blocks, key=lambda k: int(k.rsplit("_", 1)[1]))
    if (model.image or {}).get("feature_block") is not None:  # the trunk ends at its last block
        return names, [blocks[k] for k in names]
    return names + ["top_conv"], [blocks[k] for k in names] + [pooled]


def text_depth(model) -> int:
    """How many blocks the config's text tower has (Bert `num_layers`, TextTransformer `depth`)."""
    from vljax.models.registry import get_model  # noqa: PLC0415
    cls, cfg = get_model(model.text_model), dict(model.text or {})
    if hasattr(cls, "num_layers"):
        return int(cfg.get("num_layers", cls.num_layers))
    if hasattr(cls, "config"):
        return int(cls(**cfg).config()["depth"])
    raise ValueError(f"config key `model.text_model`: {model.text_model!r} has no known depth")


def text_pad_id(model) -> int:
    from vljax.models.registry import get_model  # noqa: PLC0415
    pad = dict(model.text or {}).get("pad_id", getattr(get_model(model.text_model), "pad_id", None))
    if pad is None:
        raise ValueError(f"config key `model.text.pad_id`: the {model.text_model!r} tower has none; "
                         "layer selection averages each layer over the real tokens (tokens != pad_id)")
    return int(pad)


def text_layer_features(model, params, tokens: np.ndarray, batch: int = 256):
    """(names, [T arrays [N, W]]): the states after the embeddings and the first k blocks
    (k = 0..depth; names "embeddings", "encoderblock_<k-1>"), each averaged over the real tokens
    (`pool_txt: avg`)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    depth, pad = text_depth(model), text_pad_id(model)

    def layers(p, t):
        m = (t != pad)[..., None].astype(jnp.float32)
        out = []
        for k in range(depth + 1):
            h = model.apply({"params": p}, t, k, method=model.text_lower).astype(jnp.float32)
            out.append((h * m).sum(1) / jnp.maximum(m.sum(1), 1.0))
        return out

    fn = jax.jit(layers)
    feats = _batched(lambda t: fn(params, t), np.asarray(tokens, np.int32), batch)
    return ["embeddings"] + [f"encoderblock_{k}" for k in range(depth)], list(feats)


def select(config, *, samples: int = DEFAULT_SAMPLES, seed: int = 0, topk="rice", normalize: bool = True,
           metric: str = "mutual_knn") -> dict:
    """Runs the layer choice on `config`'s towers and training data; the report (JSON-able dict:
    `scores` [I][T], `image_layers`, `text_layers`, `chosen`, `config_keys`, `n`, settings)."""
    if metric not in METRICS:
        raise ValueError(f"--metric: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if samples < 2:
        raise ValueError(f"--samples must be >= 2, got {samples}")
    resolve_topk(topk, samples)  # refuse bad settings before anything heavy runs
    t0 = time.time()
    model, params, tokenizer, loaded = build(config)
    images, captions, ids = paired_sample(config, samples, seed)
    n = len(images)
    k = resolve_topk(topk, n)
    t1 = time.time()
    img_names, img_feats = image_layer_features(model, params, images)
    txt_names, txt_feats = text_layer_features(model, params, np.asarray(tokenizer(captions), np.int32))
    t2 = time.time()
    scores = score_matrix(img_feats, txt_feats, k, normalize)
    i, j = choose(scores)
    keys = {f"model.text.{'num_layers' if model.text_model == 'bert' else 'depth'}": j}
    if model.image_model == "efficientnet_lite":
        keys["model.image.feature_block"] = None if img_names[i] == "top_conv" else i
    return dict(
        scores=scores.tolist(), image_layers=img_names, text_layers=txt_names,
        chosen=dict(image=i, text=j, image_layer=img_names[i], text_layer=txt_names[j],
                    score=float(scores[i, j])),
        last=dict(image=len(img_names) - 1, text=len(txt_names) - 1, score=float(scores[-1, -1])),
        config_keys=keys, n=n, requested_samples=samples, seed=seed, metric=metric, topk=topk,
        topk_value=k, normalize=normalize, selection="best_only", pool_img="spatial mean",
        pool_txt="avg", image_model=model.image_model, text_model=model.text_model,
        pretrained=loaded, first_ids=ids[:5],
        seconds=dict(data_and_init=round(t1 - t0, 1), features=round(t2 - t1, 1),
                     scores=round(time.time() - t2, 1)))


def table(report: dict) -> str:
    """The score matrix as text: image layers down, text layers across; the chosen pair starred."""
    ti, tj = report["chosen"]["image"], report["chosen"]["text"]
    txt = [n.replace("encoderblock_", "blk").replace("embeddings", "emb") for n in report["text_layers"]]
    width = max(len(n) for n in report["image_layers"]) + 1
    lines = ["img/txt".ljust(width) + " ".join(f"{n:<7}" for n in txt)]
    for i, (name, row) in enumerate(zip(report["image_layers"], report["scores"])):
        cells = [f"{v:6.4f}" + ("*" if (i, j) == (ti, tj) else " ") for j, v in enumerate(row)]
        lines.append(f"{name:<{width}}" + " ".join(cells))
    c = report["chosen"]
    lines.append(f"chosen: image {c['image_layer']} x text {c['text_layer']} (mutual kNN {c['score']:.4f}, "
                 f"last layers {report['last']['score']:.4f}); N = {report['n']}, topk = "
                 f"{report['topk_value']} ({report['topk']})")
    lines.append("config keys: " + ", ".join(f"{k}={v}" for k, v in report["config_keys"].items()))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI

# Flags on a module-private FlagValues (vljax/cliflags.py): other entry points define --config too.
_FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config whose towers (`model`, "
                                          "`model_init`) and training data (`input.data`) to measure.",
                                          flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, f"Directory for {REPORT}.", flag_values=_FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", DEFAULT_SAMPLES, "Paired training records drawn at random "
                                "(the code's n_samples: 5000).", flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random sample.", flag_values=_FLAGS)
_TOPK = flags.DEFINE_string("topk", "rice", "k of the mutual kNN metric: rice, sqrt, sturges or a number.",
                            flag_values=_FLAGS)
_NORMALIZE = flags.DEFINE_bool("normalize", True, "L2-normalise each layer's features first.",
                               flag_values=_FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=_FLAGS)


def write_report(workdir: str, report: dict) -> str:
    """Writes `report` as WORKDIR/layer_selection.json (temp name, then rename); its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, REPORT)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def main(argv):
    """Exit status 0; a bad flag or config exits with one line naming it."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    try:
        keep_host = hostmem.cli_prepare()  # before JAX starts its CPU client (as vljax.main)
        resolve_topk(_TOPK.value, max(_SAMPLES.value, 2))
        if _SAMPLES.value < 2:
            raise ValueError(f"--samples must be >= 2, got {_SAMPLES.value}")
    except ValueError as e:
        raise SystemExit(f"vljax.layer_selection: {e}") from None
    import jax  # noqa: PLC0415  (after cli_prepare, see the top)
    if hostmem.cli_apply(jax.default_backend(), keep_host):
        logs.info(hostmem.APPLIED)
    try:
        report = select(_CONFIG.value, samples=_SAMPLES.value, seed=_SEED.value, topk=_TOPK.value,
                        normalize=_NORMALIZE.value)
    except (OSError, ValueError) as e:
        raise SystemExit(f"vljax.layer_selection: {e}") from None
    report["config"] = _FLAGS["config"].config_filename
    path = write_report(_WORKDIR.value, report)
    print(table(report), end="")
    logs.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cliflags.parser(_FLAGS)))
