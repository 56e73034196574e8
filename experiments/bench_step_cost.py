"""FLOPs and memory of one training step at ViT-B/16 + its text tower (SigLIP B/16), compiled
only, on a simulated 8-device mesh (data x fsdp), for each part of the recipe.

    python experiments/bench_step_cost.py                          # the SigLIP parts, 8 pairs per device
    python experiments/bench_step_cost.py --parts sigmoid_ring --batch-per-device 16 --dtype bfloat16
    python experiments/bench_step_cost.py --parts siglip2:sigmoid,siglip2:decoder,siglip2:full \
        --out experiments/results/bench_step_cost_siglip2.json

The step is vljax's own (`vljax.step.make_train_step` under `objective.make_loss` and its logged
parts, jitted with the trainer's shardings and donation) on abstract inputs: `lower(...).compile()`
and XLA's analyses (`vljax.perf.step_cost`), no parameter is materialised and nothing runs. Each
part is one entry of `PARTS`: a config file (configs/siglip.py, configs/siglip2.py) with its
arguments and an edit. The step compiled is the one of the config's last stage
(`config.stages`), built as `train.Trainer` builds it: with self-distillation the heads
(params["ssl"]) and the EMA teacher (state["teacher"], its shardings) in the state,
`teacher.SelfDistill` in the step and the views of `teacher.multi_crop` in the batch; with NaFlex
the patch dict at one of the stage's budgets (`--naflex-budget`). The SigLIP 2 parts run at the
paper's B/16 setting (256 px, 64 text tokens, the Gemma tokenizer's 256k vocabulary; configs/
siglip2.py's docstring), `siglip2:sigmoid` their baseline.

For each part: XLA's FLOPs per device and on all devices, per-device memory (arguments, outputs,
temp, peak), the analytic count (`analytic_flops`: 6 x params x tokens for the towers' and the
caption decoder's matmuls, plus attention, the MAP head, the loss's similarity matrix, and in a
self-distillation stage the student's views, the heads and the teacher's forward) and XLA /
analytic. Memory is XLA:CPU's buffer assignment: the argument and output sizes (params, optimizer
state, teacher, batch) carry over to accelerators exactly, temp sizes depend on the backend's
fusion and are indicative only.

Prints a table and writes experiments/results/bench_step_cost.json (--out).
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vljax import factory, objective, optim, perf, sharding, stages, teacher  # noqa: E402
from vljax.data import naflex_train  # noqa: E402
from vljax.models.naflex import example_input  # noqa: E402
from vljax.state_init import make_init_fns  # noqa: E402
from vljax.step import flat, make_train_step  # noqa: E402


def _sigmoid(impl):
    def edit(c):
        c.loss = dict(name="sigmoid", impl=impl)
    return edit


def _softmax(c):
    c.loss = dict(name="softmax")
    c.model.bias_init = None  # the softmax loss has no bias


def _remat(c):
    _sigmoid("ring")(c)
    c.remat = True


# SigLIP 2's B/16 text side (configs/siglip2.py docstring; SigLIP 2, Sec. 2): the Gemma
# tokenizer's 256k vocabulary (transformers' Siglip2TextConfig and google/siglip2-base-patch16-*:
# vocab_size 256000, pad id 0), captions of 64 tokens. The tokenizer itself is not needed: the
# compiled step sees token ids only.
GEMMA_VOCAB = 256_000


def _text(vocab, max_len=64):
    """The text tower's (and the caption decoder's, when there is one) vocabulary and length."""
    def edit(c):
        c.tokenizer.max_len = max_len
        c.model.text.update(vocab_size=vocab, max_len=max_len, pad_id=0)
        if c.model.get("decoder") is not None:
            c.model.decoder.update(vocab_size=vocab, max_len=max_len, pad_id=0)
    return edit


@dataclasses.dataclass(frozen=True)
class Part:
    """A row: configs/<config>.py at `img=B/16,txt=B,size=...,batch=...` plus `arg`, then `edit`.
    The step compiled is the one of the config's LAST stage (`config.stages`: after SigLIP 2's
    switch to self-distillation or to NaFlex), built as the trainer builds it."""
    config: str
    arg: str = ""
    edit: object = None
    size: int | None = None  # image size; None: --size


def _siglip2(arg, vocab=GEMMA_VOCAB):
    return Part("siglip2", arg, _text(vocab), size=256)


PARTS = {
    "softmax": Part("siglip", edit=_softmax),
    "sigmoid": Part("siglip", edit=_sigmoid("all_gather")),
    "sigmoid_ring": Part("siglip", edit=_sigmoid("ring")),
    "sigmoid_ring+remat": Part("siglip", edit=_remat),
    # SigLIP 2 at its B/16 setting (256 px = 256 patches, 64 text tokens, 256k vocabulary):
    # the baseline (decoder=off,sd=off is configs/siglip.py exactly), then each part.
    "siglip2:sigmoid": _siglip2("decoder=off,sd=off"),
    "siglip2:decoder": _siglip2("decoder=on,sd=off"),
    "siglip2:sigmoid_32k": _siglip2("decoder=off,sd=off", vocab=32_000),  # the 32k row's baseline
    "siglip2:decoder_32k": _siglip2("decoder=on,sd=off", vocab=32_000),
    "siglip2:self_distill": _siglip2("decoder=off,sd=consistency"),
    "siglip2:masked": _siglip2("decoder=off,sd=masked"),
    "siglip2:full": _siglip2("decoder=on,sd=on"),
    "siglip2:naflex": _siglip2("decoder=on,sd=off,naflex=on"),
}


def load_config(name, arg):
    spec = importlib.util.spec_from_file_location(f"vljax_configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tokens(spec, image_size) -> tuple[int, int]:
    """(image tokens, text tokens) per example of a ViT + text-transformer spec."""
    img, txt = spec["model"]["image"], spec["model"]["text"]
    patch = img.get("patch_size") or int(img["variant"].split("/")[1])
    n_img = (image_size // patch) ** 2 + (1 if img.get("pool_type") == "cls" else 0)
    return n_img, int(txt["max_len"])


def _forward(params, tower, n, pooled=True) -> tuple[int, int]:
    """(matmul, attention) forward FLOPs of one example through tower "img" or "txt" on n tokens:
    2 x kernel size per token for the encoder's kernels, the patch embedding and the MAP head's
    keys / values; per example for the rest (the MAP head's query, out projection and MLP over
    its one probe, the projection head; `pooled=False` leaves the projection head out, for views
    whose features nothing reads); attention 4 n^2 W per layer (QK^T, AV), the MAP probe 4 n W."""
    matmul, layers, map_head = 0, 0, False
    for name, leaf in params.items():
        if not name.startswith(tower + "/") or not name.endswith("kernel"):
            continue
        layers += "encoderblock_" in name and name.endswith("query/kernel")
        map_head |= "MAPHead" in name
        if (("Transformer/" in name or "Encoder_0/" in name) or name == "img/embedding/kernel"
                or ("MAPHead" in name and ("/key/" in name or "/value/" in name))):
            matmul += 2 * leaf.size * n
        elif pooled or name != f"{tower}/head/kernel":
            matmul += 2 * leaf.size
    width = params[[k for k in params if k.startswith(tower + "/") and k.endswith(
        "encoderblock_0/MlpBlock_0/Dense_0/kernel")][0]].shape[0]
    return matmul, 4 * width * (layers * n * n + (n if map_head else 0))


def _decoder_forward(params, n_txt, n_img) -> tuple[int, int]:
    """(matmul, attention) forward FLOPs of the caption decoder (dec/..., vljax/models/decoder.py)
    on one caption of n_txt tokens over n_img image tokens: its cross-attention's keys / values
    over the image tokens, every other kernel (self-attention, cross-attention query / out, MLP,
    the [W, V] output projection) over the caption's tokens; attention 4 W (n_txt^2 + n_txt n_img)
    per block (a causal or parallel mask computes the full square all the same). The embedding is
    a lookup: no FLOPs."""
    matmul, layers = 0, 0
    for name, leaf in params.items():
        if not name.startswith("dec/") or not name.endswith("kernel"):
            continue
        layers += name.endswith("MultiHeadDotProductAttention_0/query/kernel")
        cross_kv = "MultiHeadDotProductAttention_1/" in name and ("/key/" in name or "/value/" in name)
        matmul += 2 * leaf.size * (n_img if cross_kv else n_txt)
    width = params["dec/decoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[0]
    return matmul, 4 * width * layers * (n_txt * n_txt + n_txt * n_img)


def _head_size(params, head) -> int:
    """Matmul weights of one self-distillation head (`ssl/pooled_head` or `ssl/patch_head`)."""
    return sum(v.size for k, v in params.items() if k.startswith(f"ssl/{head}/")
               and (k.endswith("kernel") or k.endswith("prototypes")))


def analytic_flops(params, n_img, n_txt, batch, embed_dim, sd=None) -> dict:
    """The step's FLOPs by the 6ND convention (Kaplan et al. 2020, PaLM appendix B): each matmul
    kernel of size N applied to T tokens costs 2 N T forward and twice that backward, attention
    likewise 3x its forward (`_forward`); the loss's similarity matrix 2 B^2 E, 3x. With a caption
    decoder (params dec/...), its matmuls and attention (`_decoder_forward`), 3x. With `sd` (a
    self-distillation stage: dict of global_views, global_tokens, local_views, local_tokens),
    the student's image tower on every view (3x; the projection head left out: nothing reads it),
    the two heads (pooled head on every view's pooled features, patch head on the global views'
    tokens; 3x; a head whose term has weight 0 is not run, vljax/teacher.py), and the EMA teacher's
    forward only (1x: no gradient) on the global views with the heads in use. No optimizer, EMA, norms, softmax or elementwise work (the self-distillation
    losses' cross-entropies over the prototypes are elementwise: B Vg (Vg + Vl) K and B Vg N Kp,
    about 1 GFLOP here). `params`: the flat abstract tree; n_img, n_txt: tokens per example."""
    img_mm, img_att = _forward(params, "img", n_img)
    txt_mm, txt_att = _forward(params, "txt", n_txt)
    out = {"matmuls_6ND": 3 * batch * (img_mm + txt_mm), "attention": 3 * batch * (img_att + txt_att),
           "loss": 3 * 2 * batch * batch * embed_dim}
    if any(k.startswith("dec/") for k in params):
        dec_mm, dec_att = _decoder_forward(params, n_txt, n_img)
        out["decoder"] = 3 * batch * (dec_mm + dec_att)
    if sd is not None:
        vg, ng, vl, nl = sd["global_views"], sd["global_tokens"], sd["local_views"], sd["local_tokens"]
        g = sum(_forward(params, "img", ng, pooled=False))
        loc = sum(_forward(params, "img", nl, pooled=False)) if vl else 0
        pooled, patch = 2 * _head_size(params, "pooled_head"), 2 * _head_size(params, "patch_head")
        pooled, patch = pooled * sd["consistency"], patch * sd["masked"]  # a term of weight 0 is skipped
        out["sd_student"] = 3 * batch * (vg * g + vl * loc)
        out["sd_heads"] = 3 * batch * (pooled * (vg + vl) + patch * vg * ng)
        out["sd_teacher"] = batch * vg * (g + pooled + patch * ng)
    out["total"] = sum(out.values())
    return out


def sd_views(config, stage, model) -> dict | None:
    """The self-distillation stage's views as the trainer cuts them (`teacher.multi_crop`, the
    input's multi-crop entry of `Trainer.make_input`): their sizes, counts and patch tokens."""
    if not stage.self_distill:
        return None
    opts = teacher.options(config)
    crop = teacher.multi_crop(opts, stage.image_size, model)
    patch = teacher.image_tower(model, config.input.image_size).config()["patch_size"][0]
    return {**crop, "global_tokens": (crop["global_size"] // patch) ** 2,
            "local_tokens": (crop["local_size"] // patch) ** 2,
            "consistency": float(opts["consistency_weight"]) > 0, "masked": float(opts["masked_weight"]) > 0}


def abstract_batch(config, stage, model, batch_sh, naflex_budget) -> dict:
    """The global batch the stage's step takes, as ShapeDtypeStructs: images [B, S, S, 3] (a
    NaFlex stage: the patch dict at `naflex_budget`, `models.naflex.example_input`), text
    [B, stage.max_len], and a self-distillation stage's views sd_global [B, Vg, S, S, 3] and
    sd_local [B, Vl, s, s, 3] (data.preprocess.MultiCrop's float32)."""
    b, s = config.input.batch_size, stage.image_size
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)  # noqa: E731
    if config.input.get("naflex") and stage.naflex:
        budgets = naflex_train.plan(config.input.naflex).budgets
        if budgets and naflex_budget not in budgets:
            raise ValueError(f"--naflex-budget {naflex_budget}: not one of the stage's budgets {budgets}")
        image = {k: sds(a.shape, a.dtype) for k, a in
                 example_input(config.model.image.to_dict(), b, naflex_budget).items()}
    else:  # a NaFlex tower's fixed-resolution stage is not benchmarked here
        image = sds((b, s, s, 3), jnp.float32)
    batch = {"image": image, "text": sds((b, stage.max_len), jnp.int32)}
    views = sd_views(config, stage, model)
    if views is not None:
        g, loc = views["global_size"], views["local_size"]
        batch["sd_global"] = sds((b, views["global_views"], g, g, 3), jnp.float32)
        batch["sd_local"] = sds((b, views["local_views"], loc, loc, 3), jnp.float32)
    return batch


def bench_part(name, part, args):
    size = part.size or args.size
    config = load_config(part.config, ",".join(
        a for a in (f"img=B/16,txt=B,size={size},batch={8 * args.batch_per_device}", part.arg) if a))
    config.mesh = [("data", 4), ("fsdp", 2)]
    config.sharding_rules = [(".*", "fsdp")]
    config.dtype = args.dtype
    if part.edit is not None:
        part.edit(config)
    # The step after the last switch of config.stages (SigLIP 2: self-distillation, NaFlex).
    stage = stages.parse(config)[-1]
    mesh = sharding.make_mesh(config.mesh)
    spec = factory.spec_from_config(config)
    model = factory.build_model(spec)
    # The state as train.Trainer builds it: params (+ the self-distillation heads), optimizer
    # state, and the EMA teacher with its shardings (vljax/teacher.py).
    params = factory.abstract_params(model, spec)
    sd_opts = teacher.options(config)
    if sd_opts is not None:
        params = teacher.with_heads(params, model, sd_opts)
    tx, _, mask = optim.make_optimizer(config, params)
    _, init_opt = make_init_fns(model, tx, config)
    abstract = {"params": params, "opt_state": jax.eval_shape(init_opt, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key(0))}
    if sd_opts is not None:
        abstract["teacher"] = teacher.abstract(params)
    state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules)
    if sd_opts is not None:
        state_sh["teacher"] = teacher.shardings(abstract["teacher"], mesh, config.sharding_rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = abstract_batch(config, stage, model, batch_sh, args.naflex_budget)
    # The stage's step as Trainer.fit's `enter` builds it.
    stage_model = stages.model_for(model, stage)
    sd = (teacher.SelfDistill.build(stage_model, sd_opts, config.input.image_size)
          if stage.self_distill else None)
    step = make_train_step(stage_model, tx, objective.make_loss(config, mesh), mask, self_distill=sd,
                           parts=objective.make_parts(config, mesh))
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        cost = perf.compiled_cost(fn, mesh.devices.size, state, batch)
    compile_s = time.perf_counter() - t
    fp = flat(params)
    batch_size = config.input.batch_size
    n_img = (batch["image"]["patches"].shape[1] if isinstance(batch["image"], dict)
             else tokens(spec, stage.image_size)[0])
    n_txt = stage.max_len
    views = sd_views(config, stage, model)
    analytic = analytic_flops(fp, n_img, n_txt, batch_size, config.model.image.num_classes, views)
    return {"part": name, "config": f"configs/{part.config}.py", "config_arg": part.arg,
            "loss": dict(config.loss), "remat": bool(config.get("remat", False)),
            "dtype": args.dtype, "global_batch": batch_size, "devices": cost.devices,
            "mesh": dict(mesh.shape), "image_size": stage.image_size, "image_tokens": n_img,
            "text_tokens": n_txt, "vocab_size": int(config.model.text.vocab_size),
            "decoder": config.model.get("decoder") is not None and dict(config.model.decoder),
            "self_distill": views, "naflex": bool(config.input.get("naflex")) and stage.naflex,
            "params": int(sum(x.size for x in fp.values())), "compile_s": round(compile_s, 1),
            "xla_tflops_per_device": cost.flops_per_device / 1e12, "xla_tflops": cost.flops / 1e12,
            "analytic_tflops": analytic["total"] / 1e12,
            "analytic_terms_tflops": {k: v / 1e12 for k, v in analytic.items()},
            "xla_over_analytic": cost.flops / analytic["total"], "loops_with_matmuls": cost.has_loops,
            "argument_gib": cost.argument_bytes / perf.GIB, "output_gib": cost.output_bytes / perf.GIB,
            "alias_gib": cost.alias_bytes / perf.GIB, "temp_gib": cost.temp_bytes / perf.GIB,
            "peak_gib_per_device": cost.peak_bytes / perf.GIB}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(k for k in PARTS if not k.startswith("siglip2:")),
                    help=f"comma-separated, of {list(PARTS)}")
    ap.add_argument("--batch-per-device", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--naflex-budget", type=int, default=256,
                    help="a NaFlex stage's patch budget (one of its input.naflex.budgets)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_step_cost.json"))
    args = ap.parse_args()
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; known: {list(PARTS)}")
    rows = []
    head = (f"{'part':<22} {'XLA TFLOPs':>10} {'/device':>8} {'analytic':>9} {'ratio':>6} {'args GiB':>8} "
            f"{'temp GiB':>8} {'peak GiB':>8} {'compile s':>9}")
    print(head)
    for name in args.parts.split(","):
        r = bench_part(name, PARTS[name], args)
        rows.append(r)
        print(f"{name:<22} {r['xla_tflops']:>10.3f} {r['xla_tflops_per_device']:>8.3f} {r['analytic_tflops']:>9.3f} "
              f"{r['xla_over_analytic']:>6.3f} {r['argument_gib']:>8.3f} {r['temp_gib']:>8.3f} "
              f"{r['peak_gib_per_device']:>8.3f} {r['compile_s']:>9.1f}"
              + ("  (loop with matmuls: XLA undercounts)" if r["loops_with_matmuls"] else ""), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "jax": jax.__version__,
                               "backend": jax.default_backend(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
