"""ACID: distillation through data selection (Udandarao et al. 2024, "Active Data Curation
Effectively Distills Large-Scale Multimodal Models", arXiv 2411.18674), as SigLIP 2 uses it for
its B-sized models (Tschannen et al. 2025, arXiv 2502.14786, Sec. 2.5).

    config.acid = dict(teacher="/path/to/teacher_workdir_or_export", filter_ratio=0.5, chunks=16)

Each step the input delivers a super-batch of N = B / (1 - filter_ratio) examples; the frozen
teacher ("reference model") and the student (its current params, eval mode, gradient stopped)
score it on its own contrastive problem, and a sub-batch of B examples with the highest
learnability (student loss minus teacher loss: easy for the teacher, hard for the student) is
trained on. The selection is JEST's joint example selection (Evans et al. 2024, arXiv 2406.17711):
the sub-batch is drawn in `chunks` chunks, each sampled without replacement from the softmax of
the learnability that a candidate adds to the examples already chosen.

Scores (`score_matrix`, `learnability_select`):
  * sigmoid loss: the pairwise loss matrix L[i, j] = -log sigmoid(y_ij (t <zimg_i, ztxt_j> + b)),
    y_ii = 1, y_ij = -1 (SigLIP's terms); a sub-batch S's loss is sum_{i, j in S} L[i, j], so the
    learnability A = L_student - L_teacher is joint: adding x to S adds
    A[x, x] + sum_{j in S} (A[x, j] + A[j, x]).
  * softmax loss: the loss is no sum of pairwise terms; each example's score is its loss on the
    super-batch's problem, (CE_i2t(i) + CE_t2i(i)) / 2, and the sub-batch is sampled from the
    per-example learnability (the chunks are then independent: no conditioning).
What we could read of the papers through our tools was their abstracts and summaries, not the
method sections: the equations above are our reading of JEST's "joint learnability" (the
sub-batch's loss on its own problem) and ACID's "student loss minus reference loss". Our choices
where we could not read a detail: the first chunk is sampled from the diagonal A[x, x] (the
learnability of an example alone); sampling at temperature 1 (Gumbel top-k, Kool et al. 2019: the
same law as drawing one by one from the softmax without replacement); `sample=False` takes the
arg max instead (greedy, deterministic); chunks=16 (JEST's default as we recall it).

Where. The selection is GLOBAL over the super-batch (not per data shard as JEST does): the
learnability matrix is [N, N] for the whole super-batch (sharded by XLA), so the result is the
same on any mesh; memory grows as N^2 (at N = 64k, 16 GiB of float32: per-shard selection is the
way at pod scale, not done here). The teacher's params live beside the train state (passed to
the step, sharded by the student's `sharding_rules`, never trained or checkpointed: the
checkpoint holds only the config's path).

ACED (the same paper) adds an explicit softmax KD term on the selected sub-batch, `kd_weight` *
`softmax_kd`: the KL divergence from the teacher's to the student's image-to-text and
text-to-image softmax over the sub-batch, averaged over rows and the two directions, each model at
its own logit scale t (our choice: the paper's KD temperature and weight we could not read;
kd_weight=0 by default, ACID alone).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vljax import config_args, factory, objective, sharding

DEFAULTS = dict(teacher=None, filter_ratio=0.5, chunks=16, sample=True, kd_weight=0.0)


# ----------------------------------------------------------------------------------------------
# Scores and selection (pure functions)
# ----------------------------------------------------------------------------------------------


def sigmoid_pair_losses(zimg, ztxt, t, b):
    """f32 [N, N]: SigLIP's pairwise terms -log sigmoid(y_ij (t <zimg_i, ztxt_j> + b)), y = 2 I - 1."""
    logits = t * (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T) + b
    y = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jax.nn.log_sigmoid(y * logits)


def softmax_example_losses(zimg, ztxt, t):
    """f32 [N]: each example's CLIP loss on the batch's problem, (CE_i2t(i) + CE_t2i(i)) / 2."""
    logits = t * (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T)
    diag = jnp.diagonal(logits)
    return 0.5 * (jax.nn.logsumexp(logits, axis=1) + jax.nn.logsumexp(logits, axis=0)) - diag


def score_matrix(zimg, ztxt, out, kind: str):
    """The scores of a model's embeddings on the super-batch: [N, N] (sigmoid) or [N] (softmax)."""
    if kind == "sigmoid":
        return sigmoid_pair_losses(zimg, ztxt, out["t"], out["b"])
    return softmax_example_losses(zimg, ztxt, out["t"])


def softmax_kd(zimg, ztxt, t, teacher_zimg, teacher_ztxt, teacher_t):
    """Scalar: (KL(p_T || p_S)_i2t + KL(p_T || p_S)_t2i) / 2, each the mean over the k rows of the
    KL divergence between the softmaxes of the teacher's and the student's [k, k] logits
    t <zimg_i, ztxt_j> (i2t: over j; t2i: over i). The teacher's side carries no gradient."""
    ls = t * (zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T)
    lt = jax.lax.stop_gradient(teacher_t * (teacher_zimg.astype(jnp.float32) @ teacher_ztxt.astype(jnp.float32).T))

    def kl(axis):
        log_pt, log_ps = jax.nn.log_softmax(lt, axis=axis), jax.nn.log_softmax(ls, axis=axis)
        return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=axis))
    return 0.5 * (kl(1) + kl(0))


def learnability_select(student_scores, teacher_scores, k: int, *, rng=None, chunks: int = 1):
    """int32 [k]: the indices of the sub-batch, in the order they were chosen.

    `student_scores`, `teacher_scores`: per-example losses [N], or pairwise loss matrices [N, N]
    whose sub-batch loss is the sum over its block (sigmoid). Learnability A = student - teacher.
    The k examples are chosen in `chunks` chunks of k / chunks; each chunk is the top
    k / chunks of logits + Gumbel noise (`rng`; none: the top k / chunks of the logits), the
    chosen examples masked out. Logits: for [N] scores, A; for [N, N], first A[x, x], then the
    learnability that x adds to the chosen set S, A[x, x] + sum_{j in S} (A[x, j] + A[j, x]).
    Chunk c's noise is `jax.random.gumbel(jax.random.fold_in(rng, c), (N,))`.
    """
    a = jnp.asarray(student_scores, jnp.float32) - jnp.asarray(teacher_scores, jnp.float32)
    n = a.shape[0]
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape != (n, n)):
        raise ValueError(f"learnability_select: scores must be [N] or [N, N], got {a.shape}")
    if not 0 < k <= n or chunks < 1 or k % chunks:
        raise ValueError(f"learnability_select: k={k} must be in (0, {n}] and divisible by chunks={chunks}")
    per = k // chunks
    pairwise = a.ndim == 2
    diag = jnp.diagonal(a) if pairwise else a
    chosen = jnp.zeros((n,), bool)
    gain = jnp.zeros((n,), jnp.float32)  # sum_{j in S} A[x, j] + A[j, x]
    picked = []
    for c in range(chunks):
        logits = diag + gain
        if rng is not None:
            logits = logits + jax.random.gumbel(jax.random.fold_in(rng, c), (n,), jnp.float32)
        logits = jnp.where(chosen, -jnp.inf, logits)
        _, idx = jax.lax.top_k(logits, per)
        picked.append(idx)
        chosen = chosen.at[idx].set(True)
        if pairwise:
            gain = gain + a[idx].sum(axis=0) + a[:, idx].sum(axis=1)
    return jnp.concatenate(picked).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Config and the trainer's side
# ----------------------------------------------------------------------------------------------


def options(config) -> dict | None:
    """`config.acid` over DEFAULTS, or None when unset; a bad key or value is a ValueError naming
    `acid.<key>` (a missing teacher path, a filter ratio outside (0, 1), a batch the ratio and the
    chunks do not divide)."""
    raw = config.get("acid")
    if raw is None:
        return None
    o = config_args.over_defaults(raw, "acid", DEFAULTS)
    if not o["teacher"] or not isinstance(o["teacher"], str):
        raise ValueError(f"config key `acid.teacher`: the teacher's path (a vljax workdir or a directory "
                         f"vljax.factory.load reads) is required, got {o['teacher']!r}")
    if not epath.Path(o["teacher"]).expanduser().exists():
        raise ValueError(f"config key `acid.teacher`: {o['teacher']} does not exist")
    ratio = o["filter_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"config key `acid.filter_ratio` must be in (0, 1), got {ratio!r}")
    batch = int(config.input.batch_size)
    super_batch_size(batch, float(ratio))
    chunks = o["chunks"]
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"config key `acid.chunks` must be an integer >= 1, got {chunks!r}")
    if batch % chunks:
        raise ValueError(f"config key `acid.chunks`: {chunks} does not divide input.batch_size={batch}")
    if not isinstance(o["sample"], bool):
        raise ValueError(f"config key `acid.sample` must be True or False, got {o['sample']!r}")
    kd = o["kd_weight"]
    if isinstance(kd, bool) or not isinstance(kd, (int, float)) or float(kd) < 0:
        raise ValueError(f"config key `acid.kd_weight` must be a number >= 0, got {kd!r}")
    if config.get("lit_cache") or (config.get("input") or {}).get("naflex"):
        raise ValueError("config key `acid`: the teacher scores images at a fixed resolution (not stored "
                         "LiT features, `lit_cache`, nor NaFlex patches, `input.naflex`)")
    return o


def super_batch_size(batch: int, filter_ratio: float) -> int:
    """N = B / (1 - filter_ratio), refused (naming the keys) when not an integer."""
    n = batch / (1.0 - filter_ratio)
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"config key `acid.filter_ratio`: input.batch_size={batch} / (1 - {filter_ratio}) "
                         f"= {n:g} is not a whole super-batch")
    return int(round(n))


@dataclasses.dataclass(frozen=True)
class Acid:
    """The selection of a step: the teacher's model (params passed to the step), the student's
    loss family ("sigmoid" | "softmax"), the sub-batch size, sampling options and ACED's KD weight."""
    teacher_model: object
    kind: str
    k: int
    chunks: int
    sample: bool
    batch_sharding: object
    kd_weight: float = 0.0

    @classmethod
    def load(cls, opts: dict, config, spec: dict, mesh, rules):
        """(Acid, teacher params on the mesh sharded by `rules`, their shardings); refuses a teacher
        whose input does not match the run's (image size, tokenizer) or, for a sigmoid loss, one
        without a bias, naming `acid.teacher`."""
        bundle = factory.load(opts["teacher"])
        kind = objective.inference_spec(config.loss)["logits"]
        tspec = bundle.spec
        where = f"config key `acid.teacher` ({opts['teacher']})"
        if int(tspec["image_size"]) != int(config.input.image_size):
            raise ValueError(f"{where}: the teacher reads {tspec['image_size']} px images, the run "
                             f"input.image_size={config.input.image_size}")
        tok, own = tspec["tokenizer"], spec["tokenizer"]
        if (tok.get("kind"), tok.get("max_len")) != (own.get("kind"), own.get("max_len")):
            raise ValueError(f"{where}: its tokenizer ({tok.get('kind')}, max_len {tok.get('max_len')}) is "
                             f"not the run's ({own.get('kind')}, max_len {own.get('max_len')})")
        if kind == "sigmoid" and "b" not in bundle.params:
            raise ValueError(f"{where}: a sigmoid loss scores with a logit bias; this teacher has none "
                             f"(a softmax model)")
        k = int(config.input.batch_size)
        shards = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)]))
        if k % shards:
            raise ValueError(f"config key `acid`: the selected sub-batch input.batch_size={k} is not "
                             f"divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}")
        shardings = sharding.param_shardings(bundle.params, mesh, rules)
        params = jax.device_put(bundle.params, shardings)
        acid = cls(bundle.model, kind, k, int(opts["chunks"]), bool(opts["sample"]),
                   sharding.batch_sharding(mesh), float(opts["kd_weight"]))
        return acid, params, shardings

    def select(self, student_model, params, teacher_params, batch, rng):
        """(the sub-batch: every field of `batch` at the chosen rows, in super-batch order, sharded
        over the batch axes; the chosen rows int32 [k], sorted; metrics: the sub-batch's
        learnability and teacher loss per example; "kd/...": the teacher's embeddings of the
        sub-batch and its t, `kd_term`'s targets). Both models in eval mode, no gradient."""
        params = jax.lax.stop_gradient(params)
        zs_img, zs_txt, s_out = student_model.apply({"params": params}, batch["image"], batch["text"], train=False)
        zt_img, zt_txt, t_out = self.teacher_model.apply({"params": jax.lax.stop_gradient(teacher_params)},
                                                         batch["image"], batch["text"], train=False)
        student = score_matrix(zs_img, zs_txt, s_out, self.kind)
        teacher = score_matrix(zt_img, zt_txt, t_out, self.kind)
        idx = learnability_select(student, teacher, self.k, rng=rng if self.sample else None,
                                  chunks=self.chunks)
        idx = jnp.sort(idx)
        sub = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(jnp.take(x, idx, axis=0),
                                                                      self.batch_sharding), batch)
        a = student - teacher
        chosen = a[idx][:, idx].sum() if a.ndim == 2 else a[idx].sum()
        metrics = {"train/acid_learnability": chosen / self.k,
                   "train/acid_teacher_loss": (teacher[idx][:, idx].sum() if a.ndim == 2 else teacher[idx].sum())
                   / self.k,
                   "kd/zimg": zt_img[idx], "kd/ztxt": zt_txt[idx], "kd/t": t_out["t"]}
        return sub, idx, metrics

    def kd_term(self, zimg, ztxt, t, selected) -> jnp.ndarray:
        """ACED's weighted KD term of the student's sub-batch embeddings against the teacher's
        (`selected`: `select`'s metrics)."""
        return self.kd_weight * softmax_kd(zimg, ztxt, t, selected["kd/zimg"], selected["kd/ztxt"], selected["kd/t"])
