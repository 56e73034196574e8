"""The EMA teacher and the self-distillation term of SigLIP 2's last stage (Tschannen et al. 2025,
arXiv 2502.14786, Sec. 2.3), switched on by a stage of `config.stages` (`self_distill=True`):
SILC's local-to-global consistency (Naeem et al. 2023) and TIPS' masked prediction (Maninis et
al. 2024), losses in vljax/losses/self_distill.py, heads in vljax/models/ssl_heads.py.

    config.self_distill = dict(momentum=0.996, local_views=8, ...)   # `options`: DEFAULTS
    config.stages = [dict(until=800), dict(until=1000, self_distill=True)]

State. With `config.self_distill` set, the train state holds
  params["ssl"]:  the heads and TIPS' mask token (trained by the optimizer like the towers; left
                  unchanged by the steps of stages without self-distillation, so they start from
                  their random init at the stage, as SigLIP 2 initialises them there);
  teacher:        {"params": {"img", "ssl"}, "center" [K], "patch_center" [Kp], "started" bool}:
                  an EMA of the student's image tower and heads with fixed momentum (SILC: a
                  fixed momentum, so the teacher keeps following the image-text loss), sharded by
                  the same `sharding_rules` as the student (its names are the student's),
                  checkpointed as the item "teacher". The first self-distillation step copies the
                  student into it (`started` False -> True; SigLIP 2: "initialise the teacher with
                  the student's parameters" at the stage), so a resumed run needs nothing special.

Step (`SelfDistill.loss`, added to the configured loss): the teacher (eval mode, no gradient)
sees the Vg global views `batch["sd_global"]` [B, Vg, S, S, 3]; the student sees the same views
with a random `mask_ratio` of their patches replaced by the mask token (SigLIP 2: 50%) and the
local crops `batch["sd_local"]` [B, Vl, s, s, 3] (the input workers' multi-crop,
`data.preprocess.MultiCrop`). The consistency loss pairs the teacher's global views with the
student's pooled features of every other view (global, masked, as iBOT; and local); the masked
loss pairs the masked patch tokens with the teacher's. A term weighted 0 is not computed: the
consistency term alone (SILC) sees unmasked global views, the masked term alone (TIPS) no local
crops (configs/siglip2.py `sd=consistency` / `sd=masked`, which also cuts no local crops then). The image-text loss keeps the batch's own
`image` (SigLIP 2: the augmented views feed only the new losses).
Value: weight * (consistency_weight * L_consistency + masked_weight * L_masked); SigLIP 2 gives
1 and 0.25 for the two terms and a further factor by model size (B 0.25, L 0.5, So400m 1, g 0.5),
as we read Sec. 2.3. After the update: teacher <- m teacher + (1 - m) student (new params),
centres <- DINO's centre update of the teacher's logits.
Not stated in what we could read, our choices: momentum 0.996 (DINO's base), DINO's temperatures
(student 0.1, teacher 0.04, no warm-up), centre momentum 0.9, head sizes (ssl_heads), SILC's two
global views of area (0.4, 1) and eight local views of area (0.05, 0.4), local crops at 96/224 of
the image size (DINO), rounded to the patch size.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vljax import config_args, sharding
from vljax.losses.self_distill import consistency_loss, masked_patch_loss, updated_center
from vljax.models.registry import get_model
from vljax.models.ssl_heads import SelfDistillHeads, abstract_heads, init_heads

DEFAULTS = dict(
    momentum=0.996, center_momentum=0.9, student_temp=0.1, teacher_temp=0.04,
    mask_ratio=0.5, weight=1.0, consistency_weight=1.0, masked_weight=0.25,
    global_views=2, local_views=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_size=0,
    out_dim=65536, patch_out_dim=8192, hidden_dim=2048, bottleneck_dim=256, num_layers=3)
HEAD_KEYS = ("out_dim", "patch_out_dim", "hidden_dim", "bottleneck_dim", "num_layers")


def options(config) -> dict | None:
    """`config.self_distill` over DEFAULTS, or None when unset; an unknown key or a bad value is a
    ValueError naming `self_distill.<key>`."""
    raw = config.get("self_distill")
    if raw is None:
        return None
    o = config_args.over_defaults(raw, "self_distill", DEFAULTS)
    for key in ("momentum", "center_momentum"):
        if not 0.0 <= float(o[key]) < 1.0:
            raise ValueError(f"config key `self_distill.{key}` must be in [0, 1), got {o[key]!r}")
    if not 0.0 <= float(o["mask_ratio"]) < 1.0:
        raise ValueError(f"config key `self_distill.mask_ratio` must be in [0, 1), got {o['mask_ratio']!r}")
    if int(o["global_views"]) < 1 or int(o["local_views"]) < 0:
        raise ValueError(f"config key `self_distill.global_views` must be >= 1 and `local_views` >= 0, got "
                         f"{o['global_views']!r}, {o['local_views']!r}")
    model = config.get("model") or {}
    if config.get("lit_cache") or (config.get("input") or {}).get("naflex"):
        raise ValueError("config key `self_distill`: needs images in the batch at a fixed resolution "
                         "(not stored LiT features, `lit_cache`, nor NaFlex patches, `input.naflex`)")
    if model.get("image_model", "vit") != "vit":
        raise ValueError(f"config key `self_distill`: needs the image tower 'vit' (patch tokens, a mask "
                         f"token), got model.image_model={model.get('image_model')!r}")
    return o


def multi_crop(opts: dict, image_size: int, model) -> dict:
    """The input's `multi_crop` entry (`data.preprocess.MultiCrop` kwargs) for images of
    `image_size`: local crops of `local_size`, or 96/224 of the image size rounded to the image
    tower's patch size (DINO: 96 px local crops of 224 px images)."""
    patch = get_model(model.image_model)(**(model.image or {})).config()["patch_size"][0]
    local = int(opts["local_size"]) or max(patch, int(round(image_size * 96 / 224 / patch)) * patch)
    return dict(global_size=image_size, local_size=local, global_views=int(opts["global_views"]),
                local_views=int(opts["local_views"]), global_scale=tuple(opts["global_scale"]),
                local_scale=tuple(opts["local_scale"]))


def image_tower(model, image_size: int):
    """The student's image tower module (params `img/...` of `model`), its learned position
    embedding pinned to the grid of `image_size`, so local crops resample it (vljax/stages.py)."""
    image = dict(model.image or {})
    tower = get_model(model.image_model)(**image)
    p = tower.config()["patch_size"]
    image.setdefault("posemb_grid", (image_size // p[0], image_size // p[1]))
    return get_model(model.image_model)(**image)


def heads_module(model, opts) -> SelfDistillHeads:
    tower = get_model(model.image_model)(**(model.image or {}))
    return SelfDistillHeads(width=tower.config()["width"], **{k: int(opts[k]) for k in HEAD_KEYS})


def with_heads(params, model, opts, rng=None) -> dict:
    """`params` plus "ssl": the heads' random params (`rng`), or their ShapeDtypeStructs (no rng)."""
    heads = heads_module(model, opts)
    return {**params, "ssl": abstract_heads(heads) if rng is None else init_heads(heads, rng)}


def student_part(params) -> dict:
    """The params the teacher follows: the image tower and the heads."""
    return {"img": params["img"], "ssl": params["ssl"]}


def init(params) -> dict:
    """A teacher state before its stage: a copy of the student (replaced by the student at the
    stage's first step), zero centres, `started` False. Run under jit with `shardings`."""
    ssl = params["ssl"]
    k = ssl["pooled_head"]["prototypes"].shape[-1]
    kp = ssl["patch_head"]["prototypes"].shape[-1]
    return {"params": jax.tree.map(jnp.copy, student_part(params)), "center": jnp.zeros((k,), jnp.float32),
            "patch_center": jnp.zeros((kp,), jnp.float32), "started": jnp.zeros((), bool)}


def abstract(params) -> dict:
    return jax.eval_shape(init, params)


def shardings(abstract_teacher, mesh, rules) -> dict:
    """The teacher's params sharded by the student's `rules` (same names), the rest replicated."""
    out = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), abstract_teacher)
    out["params"] = sharding.param_shardings(abstract_teacher["params"], mesh, rules)
    return out


def ema(teacher_params, student_params, momentum: float):
    """m * teacher + (1 - m) * student, leaf by leaf (in the teacher's dtype)."""
    return jax.tree.map(lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype),
                        teacher_params, student_params)


def random_mask(rng, rows: int, n: int, ratio: float):
    """bool [rows, n]: exactly round(ratio * n) patches per row, uniformly without replacement."""
    k = int(round(ratio * n))
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (rows, n)), axis=1), axis=1)
    return ranks < k


@dataclasses.dataclass(frozen=True)
class SelfDistill:
    """The self-distillation term of a step (see the module docstring)."""
    tower: object
    heads: SelfDistillHeads
    opts: dict

    @classmethod
    def build(cls, model, opts, image_size: int) -> SelfDistill:
        return cls(image_tower(model, image_size), heads_module(model, opts), opts)

    def _tokens(self, out):
        """The patch tokens of a tower output (the class token dropped)."""
        return out["tokens"][:, int(self.tower.pool_type == "cls"):]

    def start(self, teacher, params):
        """The teacher a step uses: the student's copy on the stage's first step."""
        first = jnp.logical_not(teacher["started"])
        p = jax.tree.map(lambda t, s: jnp.where(first, s, t), teacher["params"], student_part(params))
        return {**teacher, "params": p}

    def loss(self, params, teacher, batch, rng):
        """(weighted loss, aux): aux holds the teacher's logits for the centre updates and the
        two terms for metrics. A term of weight 0 is not computed (0 in aux): with
        `masked_weight=0` the student's global views are not masked (SILC alone), with
        `consistency_weight=0` the local crops and pooled heads are skipped (TIPS' masked
        prediction alone), and that term's centre is left unchanged by `update`."""
        o, glob = self.opts, batch["sd_global"]
        consistency_on, masked_on = float(o["consistency_weight"]) > 0, float(o["masked_weight"]) > 0
        b, vg = glob.shape[:2]
        flat = glob.reshape(b * vg, *glob.shape[2:])
        tp = jax.lax.stop_gradient(teacher["params"])
        _, tout = self.tower.apply({"params": tp["img"]}, flat, train=False)
        t_cls = t_patch = None
        if consistency_on:
            t_cls = jax.lax.stop_gradient(self.heads.apply({"params": tp["ssl"]}, tout["pre_logits"], method="pooled"))
        if masked_on:
            t_patch = jax.lax.stop_gradient(self.heads.apply({"params": tp["ssl"]}, self._tokens(tout), method="patches"))

        mask_rng, drop_rng = jax.random.split(rng)
        kw = dict(train=True, patch_dropout=0.0, rngs={"dropout": drop_rng})
        temps = dict(student_temp=float(o["student_temp"]), teacher_temp=float(o["teacher_temp"]))
        if masked_on:
            mask = random_mask(mask_rng, b * vg, t_patch.shape[1], float(o["mask_ratio"]))
            _, sout = self.tower.apply({"params": params["img"]}, flat,
                                       token_mask=(mask, params["ssl"]["mask_token"]), **kw)
        else:
            _, sout = self.tower.apply({"params": params["img"]}, flat, **kw)
        zero = jnp.zeros((), jnp.float32)
        lc = lm = zero
        if consistency_on:
            s_cls = self.heads.apply({"params": params["ssl"]}, sout["pre_logits"], method="pooled")
            views = [s_cls.reshape(b, vg, -1)]
            if "sd_local" in batch and batch["sd_local"].shape[1]:
                loc = batch["sd_local"]
                _, lout = self.tower.apply({"params": params["img"]},
                                           loc.reshape(b * loc.shape[1], *loc.shape[2:]), **kw)
                views.append(self.heads.apply({"params": params["ssl"]}, lout["pre_logits"],
                                              method="pooled").reshape(b, loc.shape[1], -1))
            lc = consistency_loss(jnp.concatenate(views, axis=1), t_cls.reshape(b, vg, -1), teacher["center"], **temps)
        if masked_on:
            s_patch = self.heads.apply({"params": params["ssl"]}, self._tokens(sout), method="patches")
            lm = masked_patch_loss(s_patch, t_patch, mask, teacher["patch_center"], **temps)
        value = float(o["weight"]) * (float(o["consistency_weight"]) * lc + float(o["masked_weight"]) * lm)
        return value, {"t_cls": t_cls, "t_patch": t_patch, "consistency": lc, "masked": lm}

    def update(self, teacher, new_params, aux):
        """The teacher after the optimizer step: EMA of the updated student, centres updated."""
        o = self.opts
        cm = float(o["center_momentum"])
        def centre(old, logits):  # a term that was not computed leaves its centre as it was
            return old if logits is None else updated_center(old, logits, cm)
        return {"params": ema(teacher["params"], student_part(new_params), float(o["momentum"])),
                "center": centre(teacher["center"], aux["t_cls"]),
                "patch_center": centre(teacher["patch_center"], aux["t_patch"]),
                "started": jnp.ones((), bool)}
