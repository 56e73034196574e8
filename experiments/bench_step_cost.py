"""FLOPs and memory of one training step at ViT-B/16 + its text tower (SigLIP B/16), compiled
only, on a simulated 8-device mesh (data x fsdp), for each part of the recipe.

    python experiments/bench_step_cost.py                          # all parts, 8 pairs per device
    python experiments/bench_step_cost.py --parts sigmoid_ring --batch-per-device 16 --dtype bfloat16

The step is vljax's own (`vljax.step.make_train_step` under `objective.make_loss`, jitted with the
trainer's shardings and donation) on abstract inputs: `lower(...).compile()` and XLA's analyses
(`vljax.perf.step_cost`), no parameter is materialised and nothing runs. Each part is one entry of
`PARTS` (a function editing the configs/siglip.py config). For each part: XLA's FLOPs per device and
on all devices, per-device memory (arguments, outputs, temp, peak), the analytic count
(`analytic_flops`: 6 x params x tokens for the towers' matmuls, plus attention, the MAP head and
the loss's similarity matrix) and XLA / analytic. Memory is XLA:CPU's buffer assignment: the
argument and output sizes (params, optimizer state, batch) carry over to accelerators exactly,
temp sizes depend on the backend's fusion and are indicative only.

Prints a table and writes experiments/results/bench_step_cost.json (--out).
"""
import argparse
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
from vljax import factory, objective, optim, perf, sharding  # noqa: E402
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


# part name -> edit of the configs/siglip.py config. A SigLIP 2 part (decoder, self-distillation,
# masked prediction) is one more entry here, setting its config keys.
PARTS = {
    "softmax": _softmax,
    "sigmoid": _sigmoid("all_gather"),
    "sigmoid_ring": _sigmoid("ring"),
    "sigmoid_ring+remat": _remat,
}


def load_config(arg):
    spec = importlib.util.spec_from_file_location("vljax_configs_siglip", ROOT / "configs" / "siglip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tokens(spec, image_size) -> tuple[int, int]:
    """(image tokens, text tokens) per example of a ViT + text-transformer spec."""
    img, txt = spec["model"]["image"], spec["model"]["text"]
    patch = img.get("patch_size") or int(img["variant"].split("/")[1])
    n_img = (image_size // patch) ** 2 + (1 if img.get("pool_type") == "cls" else 0)
    return n_img, int(txt["max_len"])


def analytic_flops(params, n_img, n_txt, batch, width, embed_dim) -> dict:
    """The step's FLOPs by the 6ND convention (Kaplan et al. 2020, PaLM appendix B): each matmul
    kernel of size N applied to T tokens costs 2 N T forward and twice that backward; attention
    4 T^2 W per layer forward (QK^T and AV), 3x for training; the MAP head's keys/values run over
    every image token, its query, out projection and MLP over one probe; the loss's similarity
    matrix 2 B^2 E, 3x. No optimizer, norms or elementwise work. `params`: the flat abstract tree."""
    per_token, per_example = 0, 0  # matmul FLOPs (forward, one example)
    layers = {"img": 0, "txt": 0}
    for name, leaf in params.items():
        if not name.endswith("kernel"):
            continue
        tower = name.split("/")[0]
        if "encoderblock_" in name and name.endswith("query/kernel"):
            layers[tower] += 1
        if tower == "img" and ("Transformer/" in name or name == "img/embedding/kernel"
                               or ("MAPHead" in name and ("/key/" in name or "/value/" in name))):
            per_token += 2 * leaf.size * n_img
        elif tower == "txt" and "Encoder_0/" in name:
            per_token += 2 * leaf.size * n_txt
        else:
            per_example += 2 * leaf.size  # applied to one pooled token
    attention = 4 * width * (layers["img"] * n_img ** 2 + layers["txt"] * n_txt ** 2)
    if any("MAPHead" in k for k in params):
        attention += 4 * width * n_img
    towers = 3 * batch * (per_token + per_example + attention)
    loss = 3 * 2 * batch * batch * embed_dim
    return {"matmuls_6ND": 3 * batch * (per_token + per_example), "attention": 3 * batch * attention,
            "loss": loss, "total": towers + loss}


def bench_part(name, edit, args):
    config = load_config(f"img=B/16,txt=B,size={args.size},batch={8 * args.batch_per_device}")
    config.mesh = [("data", 4), ("fsdp", 2)]
    config.sharding_rules = [(".*", "fsdp")]
    config.dtype = args.dtype
    edit(config)
    mesh = sharding.make_mesh(config.mesh)
    spec = factory.spec_from_config(config)
    model = factory.build_model(spec)
    params = factory.abstract_params(model, spec)
    tx, _, mask = optim.make_optimizer(config, params)
    _, init_opt = make_init_fns(model, tx, config)
    abstract = {"params": params, "opt_state": jax.eval_shape(init_opt, params),
                "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key(0))}
    state_sh = sharding.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_size = config.input.batch_size
    n_img, n_txt = tokens(spec, config.input.image_size)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, config.input.image_size, config.input.image_size, 3),
                                           jnp.float32, sharding=batch_sh),
             "text": jax.ShapeDtypeStruct((batch_size, n_txt), jnp.int32, sharding=batch_sh)}
    step = make_train_step(model, tx, objective.make_loss(config, mesh), mask)
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        cost = perf.compiled_cost(fn, mesh.devices.size, state, batch)
    compile_s = time.perf_counter() - t
    fp = flat(params)
    width = fp["img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[0]
    analytic = analytic_flops(fp, n_img, n_txt, batch_size, width, config.model.image.num_classes)
    return {"part": name, "loss": dict(config.loss), "remat": bool(config.get("remat", False)),
            "dtype": args.dtype, "global_batch": batch_size, "devices": cost.devices,
            "mesh": dict(mesh.shape), "image_tokens": n_img, "text_tokens": n_txt,
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
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    ap.add_argument("--batch-per-device", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_step_cost.json"))
    args = ap.parse_args()
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; known: {list(PARTS)}")
    rows = []
    head = (f"{'part':<20} {'XLA TFLOPs':>10} {'/device':>8} {'analytic':>9} {'ratio':>6} {'args GiB':>8} "
            f"{'temp GiB':>8} {'peak GiB':>8} {'compile s':>9}")
    print(head)
    for name in args.parts.split(","):
        r = bench_part(name, PARTS[name], args)
        rows.append(r)
        print(f"{name:<20} {r['xla_tflops']:>10.3f} {r['xla_tflops_per_device']:>8.3f} {r['analytic_tflops']:>9.3f} "
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
