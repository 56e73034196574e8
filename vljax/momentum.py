"""Momentum towers and queues of negatives (MoCo, He et al. 2020, Alg. 1; MoCo v2, Chen et al.
2020, arXiv 2003.04297; cross-modal as in WenLan / BriVL, Huo et al. 2021, arXiv 2103.06561,
Sec. 3.2), switched on by

    config.queue = dict(size=Q, momentum=m)          # Q a multiple of input.batch_size
    config.loss = dict(name="queue_contrastive")     # vljax/losses/queue.py
    # batch_negatives=True adds the batch's other momentum embeddings to the negatives (ALBEF)

State. The train state holds state["queue"] = {
  "params": {"img", "txt"}  the momentum towers: an EMA of the online towers, sharded by the run's
                            `sharding_rules` (their names are the online towers'), initialised as
                            a copy of them (MoCo: "initialize", param_k = param_q);
  "img", "txt": [Q, D]      the queues of the momentum towers' L2-normalised embeddings, float32,
                            rows split over the batch axes of the mesh (data x fsdp), initialised
                            as random unit vectors (MoCo's code: normalised randn);
  "ptr": int32              where the next global batch is written}
checkpointed as the item "queue" (vljax/checkpoints.py), so a resumed run equals the uninterrupted
one; the queue's rows are in global order, the same on any mesh.

Step (MoCo's Alg. 1 order): momentum params <- m * momentum + (1 - m) * online (the online
params before this step's update); the momentum towers (eval mode: no dropout, every patch; no
gradient) embed the batch's images and texts; the loss takes them as `momentum/zimg`,
`momentum/ztxt` with the queues before this batch (`queue/img`, `queue/txt`); after the update
the global batch's momentum embeddings replace the oldest B rows (FIFO, `ptr` advances by B mod Q).
Our choices: the momentum towers run in eval mode (MoCo runs its key encoder in train mode for
BatchNorm's shuffle, which ViTs lack); the logit scale `t` is not part of the EMA (the loss uses
the online one). With `grad_accum_steps` = k the EMA and the queue advance every micro-step.
MoCo's default momentum 0.999 is ours.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import config_args, objective, sharding
from vljax.teacher import ema

DEFAULTS = dict(size=None, momentum=0.999)
INPUTS = ("momentum/zimg", "momentum/ztxt", "queue/img", "queue/txt")
TOWERS = ("img", "txt")


def _takes_queue(config) -> bool:
    return any(k in INPUTS for k in objective.spec(config.loss).inputs)


def options(config) -> dict | None:
    """`config.queue` over DEFAULTS, or None when unset; ValueError naming the key when a value is
    bad, when the loss and `queue` do not go together, or when the batch would not feed the
    momentum towers (stored LiT features, cached text states)."""
    raw = config.get("queue")
    name = config.loss.get("name")
    if raw is None:
        if _takes_queue(config):
            raise ValueError(f"config key `queue`: loss {name!r} takes the momentum towers' embeddings and "
                             "the queues of negatives; set config.queue = dict(size=Q, momentum=m)")
        return None
    o = config_args.over_defaults(raw, "queue", DEFAULTS)
    if not _takes_queue(config):
        raise ValueError(f"config key `queue`: loss {name!r} does not take the queues; use "
                         "loss.name='queue_contrastive' or remove `queue`")
    size, batch = o["size"], config.input.batch_size
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"config key `queue.size` must be a positive int, got {size!r}")
    if size % batch:
        raise ValueError(f"config key `queue.size`={size} is not a multiple of the global batch "
                         f"input.batch_size={batch} (each step replaces a whole batch of rows, as MoCo)")
    if not 0.0 <= float(o["momentum"]) < 1.0:
        raise ValueError(f"config key `queue.momentum` must be in [0, 1), got {o['momentum']!r}")
    for key in ("lit_cache", "text_cache"):
        if config.get(key, False):
            raise ValueError(f"config key `{key}`: the momentum towers of `queue` embed the batch's images "
                             f"and texts; set {key}=False")
    return o


def towers(params) -> dict:
    """The params the momentum towers follow."""
    return {k: params[k] for k in TOWERS}


def embed_dim(model, params, images, texts) -> int:
    """D of the model's joint embeddings (abstract evaluation, nothing computed)."""
    return jax.eval_shape(lambda p: model.apply({"params": p}, images, texts)[0], params).shape[-1]


@dataclasses.dataclass(frozen=True)
class Momentum:
    """The momentum towers and queues of a run (see the module docstring)."""
    size: int
    dim: int
    momentum: float

    @classmethod
    def build(cls, config, model, params, images, texts) -> Momentum | None:
        """From `config.queue` (None when unset); `images`, `texts`: dummy inputs for the shapes."""
        o = options(config)
        if o is None:
            return None
        return cls(int(o["size"]), embed_dim(model, params, images, texts), float(o["momentum"]))

    def init(self, params, rng) -> dict:
        """The state before the first step; run under jit with `shardings`."""
        def unit(key):
            x = jax.random.normal(key, (self.size, self.dim), jnp.float32)
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        k_img, k_txt = jax.random.split(rng)
        return {"params": jax.tree.map(jnp.copy, towers(params)), "img": unit(k_img), "txt": unit(k_txt),
                "ptr": jnp.zeros((), jnp.int32)}

    def abstract(self, params) -> dict:
        return jax.eval_shape(self.init, params, jax.random.key(0))

    @staticmethod
    def shardings(abstract_state, mesh, rules) -> dict:
        """Momentum params by the online towers' `rules`, queue rows over the batch axes."""
        rows = sharding.batch_sharding(mesh)
        return {"params": sharding.param_shardings(abstract_state["params"], mesh, rules),
                "img": rows, "txt": rows, "ptr": NamedSharding(mesh, P())}

    def advance(self, state, params) -> dict:
        """The momentum params of this step: EMA towards the online params before the update."""
        return ema(state["params"], towers(params), self.momentum)

    def inputs(self, model, state, momentum_params, params, batch) -> dict:
        """The loss's inputs `momentum/zimg`, `momentum/ztxt` [B, D] (the momentum towers on the
        batch, eval mode, no gradient) and `queue/img`, `queue/txt` [Q, D] (before this batch)."""
        p = jax.lax.stop_gradient({**params, **momentum_params})
        mzimg, mztxt, _ = model.apply({"params": p}, batch["image"], batch["text"], train=False)
        return {"momentum/zimg": jax.lax.stop_gradient(mzimg), "momentum/ztxt": jax.lax.stop_gradient(mztxt),
                "queue/img": state["img"], "queue/txt": state["txt"]}

    def update(self, state, momentum_params, inputs) -> dict:
        """The state after the step: the momentum params, and the batch's momentum embeddings
        written over the oldest rows (FIFO)."""
        ptr = state["ptr"]

        def enqueue(queue, keys):
            return jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.zeros_like(ptr)))

        b = inputs["momentum/zimg"].shape[0]
        return {"params": momentum_params, "img": enqueue(state["img"], inputs["momentum/zimg"]),
                "txt": enqueue(state["txt"], inputs["momentum/ztxt"]),
                "ptr": ((ptr + b) % self.size).astype(jnp.int32)}
