"""Prompt learning on a frozen two-tower model: CoOp and CoCoOp.

CoOp (Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022, Sec. 3.2):
the prompt of class i is t_i = [V]_1 [V]_2 ... [V]_M [CLASS_i]. (Eq. 2), the M context vectors
[V]_m (each of the token-embedding width) shared by all classes and learned; both towers stay
frozen. The class probability is (Eq. 3)

    p(y = i | x) = exp(cos(g(t_i), f) / tau) / sum_j exp(cos(g(t_j), f) / tau),

trained with cross-entropy on the few-shot images; vljax uses the model's own logit scale
1 / tau. The context is initialised from the word embeddings of "a photo of a" (M = 4, the
paper's initialisation) and trained with SGD (momentum 0.9) and a cosine schedule.

CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
Sec. 3.2): a light meta-net h_theta (Linear-ReLU-Linear, hidden width D / 16) maps the image
embedding x to a token pi = h_theta(x), and every context vector is shifted by it,
v_m(x) = v_m + pi; the prompt t_i(x) = {v_1(x), ..., v_M(x), c_i} is then image-specific,

    p(y = i | x) = exp(cos(g(t_i(x)), x) / tau) / sum_j exp(cos(g(t_j(x)), x) / tau)   (Eq. 4),

the context vectors and theta learned jointly.

The learned vectors enter the text tower through its token-embedding input (the towers'
`prefix` argument: after the start / [CLS] token, before the class name's tokens), so every
text tower works: CLIP's causal one, the bidirectional SigLIP one, BERT / MiniLM. The prompt
keeps its usual length: the M trailing pad positions the tokenizer left are dropped, so a tower
trained at a fixed length (SigLIP) sees that length.

Images are embedded once (the frozen image tower, streamed by the Embedder); training touches
only the text tower's forward and backward passes over C prompts per step (C x batch for CoCoOp).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def token_table(params) -> jax.Array:
    """The text tower's token-embedding table [V, W] (TextTransformer or Bert)."""
    txt = params["txt"]
    for name in ("Embed_0", "word_embeddings"):
        if name in txt:
            return txt[name]["embedding"]
    raise ValueError(f"no token-embedding table in the text tower's params ({sorted(txt)})")


@dataclasses.dataclass
class Prompts:
    """Learned prompts: ctx [M, W]; meta (CoCoOp's meta-net params) or None for CoOp."""
    learner: PromptLearner
    ctx: jax.Array
    meta: dict | None = None

    def class_embeddings(self, classes=None) -> np.ndarray:
        """CoOp: [C, D] L2-normalised text embeddings of the classes' prompts."""
        if self.meta is not None:
            raise ValueError("CoCoOp prompts depend on the image: use predict")
        ids = self.learner.class_ids(classes)
        return np.asarray(self.learner.encode(self.learner.params, self.ctx[None], ids))

    def logits(self, zimg, classes=None, batch_size: int = 32) -> np.ndarray:
        """[N, C] cosine similarities of images zimg [N, D] and the class prompts."""
        zimg = np.asarray(zimg, np.float32)
        if self.meta is None:
            return zimg @ self.class_embeddings(classes).T
        ids = self.learner.class_ids(classes)
        out = []
        for lo in range(0, len(zimg), batch_size):
            chunk = zimg[lo:lo + batch_size]
            pad = np.zeros((batch_size - len(chunk), zimg.shape[1]), np.float32)
            z = self.learner.cocoop_scores(self.learner.params, self.ctx, self.meta,
                                           np.concatenate([chunk, pad]), ids)
            out.append(np.asarray(z)[:len(chunk)])
        return np.concatenate(out)

    def predict(self, zimg, classes=None) -> np.ndarray:
        """[N] the argmax class (an index into `classes`, default all classes)."""
        return np.argmax(self.logits(zimg, classes), axis=1)


class PromptLearner:
    """Learns CoOp / CoCoOp prompts for `class_names` on a frozen TwoTowers.

    Args:
      model, params, tokenizer: the two-tower model (vljax/factory.py or an Embedder's).
      class_names: all classes; `fit_*` and `predict` may use a subset (base-to-new).
      n_ctx: context length M, used when `ctx_init` is None (random N(0, 0.02^2) vectors).
      ctx_init: the phrase whose word embeddings initialise the context (M = its length).
      steps / lr / batch_size: CoOp's SGD (cosine schedule, momentum 0.9).
      cocoop_steps / cocoop_lr / cocoop_batch_size: the same for CoCoOp.
      logit_scale: 1 / tau (default: the model's exp(t)).
    """

    def __init__(self, model, params, tokenizer, class_names: Sequence[str], *,
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", steps: int = 200,
                 lr: float = 2e-3, batch_size: int = 32, cocoop_steps: int = 200,
                 cocoop_lr: float = 2e-3, cocoop_batch_size: int = 4,
                 logit_scale: float | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.params = jax.tree.map(jnp.asarray, params)  # on the device once, not every step
        self.class_names = list(class_names)
        self.steps, self.lr, self.batch_size = steps, lr, batch_size
        self.cocoop_steps, self.cocoop_lr = cocoop_steps, cocoop_lr
        self.cocoop_batch_size = cocoop_batch_size
        self.scale = float(np.exp(np.asarray(params["t"]))) if logit_scale is None \
            else float(logit_scale)
        table = np.asarray(token_table(params), np.float32)
        if ctx_init:
            ids = self._ids([ctx_init], 0)[0]
            words = ids[1:int(np.flatnonzero(ids != tokenizer.pad_id)[-1])]  # no start / end
            self.ctx_init = table[words]
        else:
            self.ctx_init = 0.02 * np.random.default_rng(0).normal(
                size=(n_ctx, table.shape[1])).astype(np.float32)
        self.n_ctx = len(self.ctx_init)
        self.ids = self._ids([f"{n}." for n in self.class_names], self.n_ctx)  # "[V]... name."
        self.encode = jax.jit(self._encode)
        self.cocoop_scores = jax.jit(self._cocoop_scores)
        # Compiled once per learner (ids are an argument: any class subset of one size reuses it).
        self._coop_step = self._make_step(self._coop_loss, steps, lr)
        self._cocoop_step = self._make_step(self._cocoop_loss, cocoop_steps, cocoop_lr)

    @classmethod
    def from_embedder(cls, embedder, class_names, **kwargs) -> PromptLearner:
        """On an Embedder's model, params and tokenizer (vljax/embedder.py)."""
        for attr in ("model", "params", "tokenizer"):
            if not hasattr(embedder, attr):
                raise TypeError(f"CoOp needs the text tower: {type(embedder).__name__} has no "
                                f"`{attr}` (use vljax.embedder.Embedder)")
        params = jax.tree.map(np.asarray, embedder.params)
        return cls(embedder.model, params, embedder.tokenizer, class_names,
                   logit_scale=embedder.logit_scale, **kwargs)

    def _ids(self, texts, room: int) -> np.ndarray:
        """Token ids [N, L - room]: the tokenizer's, less `room` trailing pad columns."""
        ids = np.asarray(self.tokenizer(list(texts)), np.int32)
        if room:
            tail = ids[:, ids.shape[1] - room:]
            if (tail != self.tokenizer.pad_id).any():
                longest = texts[int(np.argmax((tail != self.tokenizer.pad_id).any(axis=1)))]
                raise ValueError(f"prompt {longest!r} leaves no room for {room} context "
                                 f"vectors within the tokenizer's max_len {ids.shape[1]}")
            ids = ids[:, :ids.shape[1] - room]
        return ids

    def class_ids(self, classes=None) -> np.ndarray:
        return self.ids if classes is None else self.ids[np.asarray(classes)]

    def _encode(self, params, prefix, ids):
        """prefix [1 or B, M, W] (broadcast over the B prompts ids [B, L]) -> ztxt [B, D]."""
        prefix = jnp.broadcast_to(prefix, (len(ids),) + prefix.shape[1:])
        return self.model.apply({"params": params}, None, ids, text_prefix=prefix)[1]

    def _cocoop_scores(self, params, ctx, meta, zimg, ids):
        """[B, C] cosines of images zimg [B, D] with their own prompts t_i(x) (Eq. 4)."""
        pi = meta_net(meta, zimg)                                    # [B, W]
        prefix = ctx[None] + pi[:, None]                             # [B, M, W]
        b, c = len(zimg), len(ids)
        prefix = jnp.repeat(prefix, c, axis=0)                       # [B*C, M, W]
        z = self._encode(params, prefix, jnp.tile(ids, (b, 1))).reshape(b, c, -1)
        return jnp.einsum("bd,bcd->bc", zimg, z)

    def _coop_loss(self, ctx, params, z, y, ids):
        ztxt = self._encode(params, ctx[None], ids)
        logits = self.scale * z @ ztxt.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def _cocoop_loss(self, p, params, z, y, ids):
        logits = self.scale * self._cocoop_scores(params, p["ctx"], p["meta"], z, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @staticmethod
    def _make_step(loss_fn, steps, lr):
        """(jitted step(trainable, opt_state, params, z, y, ids), optimizer): SGD with momentum
        0.9 and a cosine schedule over `steps`, as CoOp / CoCoOp."""
        opt = optax.sgd(optax.cosine_decay_schedule(lr, max(steps, 1)), momentum=0.9)

        @jax.jit
        def step(trainable, state, params, z, y, ids):
            loss, g = jax.value_and_grad(loss_fn)(trainable, params, z, y, ids)
            updates, state = opt.update(g, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss
        return step, opt

    def _fit(self, step_opt, trainable, zimg, labels, ids, steps, batch_size, seed):
        step, opt = step_opt
        state, rng = opt.init(trainable), np.random.default_rng(seed)
        zimg, labels = np.asarray(zimg, np.float32), np.asarray(labels, np.int32)
        n, b = len(zimg), min(batch_size, len(zimg))
        ids = jnp.asarray(ids)
        self.losses = []
        for _ in range(steps):
            idx = rng.choice(n, b, replace=False)
            trainable, state, loss = step(trainable, state, self.params, zimg[idx], labels[idx],
                                          ids)
            self.losses.append(loss)
        self.losses = [float(x) for x in self.losses]
        return trainable

    def fit_coop(self, zimg, labels, classes=None, seed: int = 0) -> Prompts:
        """CoOp on images zimg [N, D] (L2-normalised) with labels [N] indexing `classes`."""
        ctx = self._fit(self._coop_step, jnp.asarray(self.ctx_init), zimg, labels,
                        self.class_ids(classes), self.steps, self.batch_size, seed)
        return Prompts(self, ctx)

    def fit_cocoop(self, zimg, labels, classes=None, seed: int = 0) -> Prompts:
        """CoCoOp: context and meta-net, on images zimg [N, D] with labels [N] into `classes`."""
        meta = init_meta_net(jax.random.key(seed), np.shape(zimg)[1], self.ctx_init.shape[1])
        p = self._fit(self._cocoop_step, {"ctx": jnp.asarray(self.ctx_init), "meta": meta}, zimg,
                      labels, self.class_ids(classes), self.cocoop_steps, self.cocoop_batch_size,
                      seed)
        return Prompts(self, p["ctx"], p["meta"])


def init_meta_net(key, in_dim: int, out_dim: int) -> dict:
    """CoCoOp's meta-net Linear(D, D/16)-ReLU-Linear(D/16, W), PyTorch's default Linear init
    (uniform +-1/sqrt(fan_in)), as the official code builds it."""
    hidden = max(in_dim // 16, 1)
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def u(k, shape, fan_in):
        return jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / np.sqrt(fan_in)
    return {"w1": u(k1, (in_dim, hidden), in_dim), "b1": u(k2, (hidden,), in_dim),
            "w2": u(k3, (hidden, out_dim), hidden), "b2": u(k4, (out_dim,), hidden)}


def meta_net(p, x):
    """pi = h_theta(x): x [B, D] -> [B, W]."""
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
