r"""Training-step throughput and memory: vljax vs transformers' PyTorch `CLIPModel` (and open_clip).

    python experiments/bench_train.py                      # CPU: tiny and base, both cores, ~6 min
    python experiments/bench_train.py --threads=1 --out=experiments/results/bench_train_1thread.json
    python experiments/bench_train.py --sizes=tiny --steps=5           # a quick look
    python experiments/bench_train.py --sizes=b16 --dtype=bfloat16 --frameworks=vljax   # on a GPU
    # FLIP patch dropout: vljax with and without it, alternating steps in one run.
    python experiments/bench_train.py --sizes=base --frameworks=vljax,vljax_pd --patch_dropout=0.5 \
        --out=experiments/results/bench_patch_dropout.json

Same architecture on both sides (CLIP ViT image tower + causal text transformer, quick-GELU,
pre-LN, softmax contrastive loss, AdamW), same batch, same thread count (`--threads=N` pins both
to the same N cores), same real batches (emoji and openclipart images with their captions, CLIP
BPE), each framework in its own process (clean peak-RSS figures). The processes alternate step by
step (the driver gates them through stdin), so both see the same load on a shared machine;
`--sequential` runs them one after the other. The vljax step is the trainer's own
(`vljax.train.make_train_step`, jitted with the trainer's shardings and donation as in `Trainer.fit`).
Every step is timed after a blocking wait; the table reports the median, the 90th percentile and
the worst step after the first (compile) step, pairs/s from the median, and the number of XLA
compilations of the step (a second compilation is the classic cause of slow early steps). FLOP/s of
the vljax step use the analytic model FLOPs (of the kept tokens under patch dropout) (XLA's cost analysis is kept beside them in the JSON),
against an XLA matmul in the same dtype timed after every step (`_MatmulPeak`). "vs HF" divides by
the faster transformers run of the table.

    # host malloc: vljax and transformers with and without vljax/hostmem.py, alternating steps
    # (`_keep`: the setting `python -m vljax.main` applies on a CPU run).
    python experiments/bench_train.py --threads=1 \
        --frameworks=vljax,vljax_keep,transformers,transformers_keep \
        --out=experiments/results/bench_train_1thread.json
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    # name: image tower, text tower, batch, embed dim
    "tiny": dict(img=dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8, image_size=64),
                 txt=dict(width=128, depth=4, mlp_dim=512, num_heads=4, max_len=32), batch=32, embed=128),
    # ViT-B/32-like image tower and a 12-layer text tower at reduced width.
    "base": dict(img=dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=32, image_size=224),
                 txt=dict(width=384, depth=12, mlp_dim=1536, num_heads=6, max_len=32), batch=32, embed=256),
    # CLIP ViT-B/16 at 224 px with its 12-layer, width-512 text tower (for a GPU).
    "b16": dict(img=dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16, image_size=224),
                txt=dict(width=512, depth=12, mlp_dim=2048, num_heads=8, max_len=77), batch=256, embed=512),
}

_SIZES = flags.DEFINE_list("sizes", ["tiny", "base"], f"Sizes among {list(SIZES)}.")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["vljax", "transformers", "open_clip"],
                                "Frameworks to time; `vljax_pd` is vljax with --patch_dropout; a "
                                "`_keep` suffix (`vljax_keep`, `transformers_keep`) runs it with "
                                "VLJAX_KEEP_HOST_MEMORY=1 (vljax/hostmem.py: what `python -m "
                                "vljax.main` does on a CPU run), the others with =0.")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps after the first (0: tiny 20, base 6, b16 20).")
_THREADS = flags.DEFINE_integer("threads", 0, "CPU threads for both frameworks (0 = all cores).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (vljax).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise transformer blocks (vljax).")
_BATCH = flags.DEFINE_integer("batch", 0, "Override the batch size of every size.")
_PATCH_DROPOUT = flags.DEFINE_float("patch_dropout", 0.5, "Fraction of image patches the "
                                    "`vljax_pd` framework drops in training (FLIP).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_train.json", "JSON output path.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one framework/size in this process.")
_FROM_JSON = flags.DEFINE_string("from_json", None, "Print the table of an earlier run's JSON (adding "
                                  "derived fields) and exit.")
_GATED = flags.DEFINE_bool("gated", False, "Internal: step when the driver says so (stdin).")
_SEQUENTIAL = flags.DEFINE_bool("sequential", False, "Run the frameworks one after the other instead "
                                "of alternating their steps.")

N_BATCHES = 8  # distinct real batches, cycled
KEEP = "_keep"  # framework suffix: the worker keeps freed host memory (vljax/hostmem.py)
DEFAULT_STEPS = {"tiny": 20, "base": 6, "b16": 20}


def real_batches(size: dict, n: int, seed: int = 0):
    """n batches of real images (emoji + openclipart, half each) and captions, CLIP-tokenised."""
    import numpy as np
    from vljax.data import pipeline
    from vljax.tokenizers import get_tokenizer

    s, b = size["img"]["image_size"], size["batch"]
    tok = get_tokenizer("clip", max_len=size["txt"]["max_len"])
    images, captions = [], []
    for name in ("vljax_emoji", "vljax_openclipart"):  # a margin for records without a caption
        x, caps = pipeline.first_examples(dict(name=name, split="train"), (n * b) // 2 + b,
                                          image_size=s, value_range="clip")
        images.append(x)
        captions += caps
    images = np.concatenate(images)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))[: n * b]
    texts = tok([captions[i] for i in order])
    return [(images[order[i * b:(i + 1) * b]], texts[i * b:(i + 1) * b]) for i in range(n)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed_loop(one_step, steps, after=None):
    """Runs steps + 1 steps; with --gated, each waits for a line on stdin (the driver alternates
    the frameworks step by step, so both see the same machine load) and reports on stdout."""
    times, cpu, losses = [], [], []
    for i in range(steps + 1):
        if _GATED.value:
            sys.stdin.readline()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(one_step(i))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if after is not None:  # e.g. the matmul peak, under the same load as the step
            after()
        if _GATED.value:
            print(f"STEP {i} {times[-1]:.3f}", flush=True)
    return times, cpu, losses


def _summary(times, cpu, pairs):
    import numpy as np
    t = np.asarray(times[1:])
    return dict(first_step_s=float(times[0]), median_s=float(np.median(t)),
                p90_s=float(np.percentile(t, 90)), worst_s=float(t.max()),
                worst_step=int(np.argmax(t)) + 1, pairs_per_s=pairs / float(np.median(t)),
                median_cpu_s=float(np.median(cpu[1:])),
                step_times_s=[round(x, 4) for x in times])


def vljax_config(size: dict, dtype: str, remat: bool = False, patch_dropout: float = 0.0):
    """A SIZES entry as a vljax trainer config: CLIP ViT + causal text tower, softmax, AdamW."""
    import ml_collections
    common = dict(act="quick_gelu", ln_eps=1e-5, num_classes=size["embed"], head_bias=False)
    img = {k: v for k, v in size["img"].items() if k != "image_size"}
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 10_000
    c.mesh = [("data", 1)]
    c.dtype = dtype
    c.remat = remat
    c.input = dict(batch_size=size["batch"], image_size=size["img"]["image_size"])
    c.tokenizer = dict(kind="clip", max_len=size["txt"]["max_len"])
    c.model = dict(
        image_model="vit", image=dict(variant=None, pool_type="cls", ln_pre=True, patch_bias=False,
                                      patch_dropout=patch_dropout, **img, **common),
        text_model="text_transformer", text=dict(variant=None, vocab_size=49408, causal=True,
                                                 pool_type="eot", eot_id=49407, **size["txt"], **common),
        temperature_init=1 / 0.07)
    c.loss = dict(name="softmax")
    c.optax = dict(name="adamw")  # torch.optim.AdamW(lr=1e-4, weight_decay=0.1) on the other side
    c.lr, c.wd = 1e-4, 0.1
    c.schedule = dict(decay_type="constant")
    return c


def kept_patches(n: int, patch_dropout: float) -> int:
    """Patches the ViT keeps of n under patch dropout (vljax.models.vit.keep_random_patches)."""
    return n if not patch_dropout else max(1, int((1.0 - patch_dropout) * n + 0.5))


def model_flops(size: dict, patch_dropout: float = 0.0) -> float:
    """Analytic FLOPs of one training step (fwd + bwd = 3x the forward's matmul FLOPs); under
    patch dropout the image encoder runs on the kept patches (the patch stem on all of them)."""
    b, img, txt = size["batch"], size["img"], size["txt"]

    def tower(width, depth, mlp, tokens):
        per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
        return depth * per_layer

    n_patches = (img["image_size"] // img["patch_size"]) ** 2
    n_img = kept_patches(n_patches, patch_dropout) + 1
    patch = 2 * n_patches * img["width"] * 3 * img["patch_size"] ** 2
    fwd = (tower(img["width"], img["depth"], img["mlp_dim"], n_img) + patch
           + tower(txt["width"], txt["depth"], txt["mlp_dim"], txt["max_len"])
           + 2 * (img["width"] + txt["width"]) * size["embed"]) * b + 2 * 2 * b * b * size["embed"]
    return 3.0 * fwd


def vljax_step(config, devices):
    """The trainer's own step (vljax.train.make_train_step, jitted with the trainer's shardings
    and donation as in Trainer.fit) on the trainer's state: (train_step, state, mesh, init_s)."""
    import jax
    import numpy as np
    from vljax import objective, optim, sharding, train

    mesh = sharding.make_mesh(config.mesh, devices=devices)
    model = train.build_model(config)
    t0 = time.perf_counter()
    params = train.init_params(model, config, jax.random.key(0))
    init_s = time.perf_counter() - t0
    tx, _, mask = optim.make_optimizer(config, params)
    state = {"params": params, "opt_state": tx.init(params), "step": np.zeros((), np.int32),
             "rng": jax.random.key(1)}
    state_sh = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh, [(".*", "replicate")])
    state = jax.device_put(state, state_sh)
    step_fn = train.make_train_step(model, tx, objective.make_loss(config, mesh), mask)
    train_step = jax.jit(step_fn, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                         out_shardings=(state_sh, None), donate_argnums=(0,))  # as Trainer.fit
    return train_step, state, mesh, init_s


def run_vljax(size_name: str, steps: int, dtype: str, remat: bool = False,
              patch_dropout: float = 0.0):
    """vljax_step on real batches, blocking on the loss after each step."""
    import jax
    from vljax import sharding

    compiles = []
    jax.config.update("jax_log_compiles", True)

    class _Count(logging.Handler):  # counts the compilations of the train step
        def emit(self, record):
            msg = record.getMessage()
            if "Finished XLA compilation" in msg and "step_fn" in msg:
                compiles.append(msg)

    logging.getLogger("jax").addHandler(_Count())
    logging.getLogger("jax").setLevel(logging.WARNING)

    size = SIZES[size_name]
    config = vljax_config(size, dtype, remat, patch_dropout)
    batches = real_batches(size, N_BATCHES)
    rss_data = _rss_mb()
    train_step, state, mesh, init_s = vljax_step(config, jax.devices()[:1])
    params_m = sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6

    with jax.set_mesh(mesh):
        batch0 = sharding.shard_batch({"image": batches[0][0], "text": batches[0][1]}, mesh)
        lowered = train_step.lower(state, batch0)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        box = [state]

        def one_step(i):
            images, texts = batches[i % N_BATCHES]
            box[0], m = train_step(box[0], sharding.shard_batch({"image": images, "text": texts}, mesh))
            return float(m["train/loss"])  # blocks

        peak = _MatmulPeak(dtype)
        times, cpu, losses = _timed_loop(one_step, steps, after=peak)
        mem = train_step.lower(box[0], batch0).compile().memory_analysis()
    flops = float(cost.get("flops", 0.0))
    out = _summary(times, cpu, size["batch"])
    out.update(compiles=len(compiles), jit_cache_size=int(train_step._cache_size()), init_s=init_s,
               xla_step_flops=flops, model_step_flops=model_flops(size, patch_dropout),
               temp_mb=mem.temp_size_in_bytes / 2**20 if mem else None, rss_after_data_mb=rss_data,
               loss_first=losses[0], loss_last=losses[-1],
               params_m=params_m,
               device=jax.devices()[0].device_kind, dtype=dtype, remat=remat,
               patch_dropout=patch_dropout)
    out["peak"] = peak.summary()
    return _add_fractions(out)


def _add_fractions(out):
    """Step FLOP/s (analytic model FLOPs) over the matmul peak: median step over median matmul, and
    fastest step over fastest matmul (the least disturbed estimate of each on a shared machine)."""
    out["step_flops_per_s"] = out["model_step_flops"] / out["median_s"]
    out["flops_fraction_of_peak"] = out["step_flops_per_s"] / out["peak"]["flops_per_s"]
    best_step = min(out["step_times_s"][1:])
    out["flops_fraction_of_peak_best"] = out["model_step_flops"] / best_step / out["peak"]["best_flops_per_s"]
    return out


class _MatmulPeak:
    """XLA matmul FLOP/s in `dtype` on the default device: `reps` n x n products per call, called
    after every step so the peak is measured under the same machine load as the steps. On CPU
    n = 1024 (the operands fit the caches; 2048 runs about 20% slower on this machine)."""

    def __init__(self, dtype: str, n: int | None = None, reps: int = 3):
        import jax
        import jax.numpy as jnp
        self.n = n or (1024 if jax.devices()[0].platform == "cpu" else 8192)
        self.reps = reps
        self.a = jax.random.normal(jax.random.key(1), (self.n, self.n), jnp.dtype(dtype))
        self.f = jax.jit(lambda x, y: x @ y)
        self.f(self.a, self.a).block_until_ready()
        self.times = []

    def __call__(self):
        for _ in range(self.reps):
            t0 = time.perf_counter()
            self.f(self.a, self.a).block_until_ready()
            self.times.append(time.perf_counter() - t0)

    def summary(self):
        import numpy as np
        t = np.asarray(self.times)
        return dict(n=self.n, flops_per_s=2 * self.n**3 / float(np.median(t)),
                    best_flops_per_s=2 * self.n**3 / float(t.min()))


def run_transformers(size_name: str, steps: int):
    import torch
    from transformers import CLIPConfig, CLIPModel

    size = SIZES[size_name]
    img, txt = size["img"], size["txt"]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=txt["width"], intermediate_size=txt["mlp_dim"], num_hidden_layers=txt["depth"],
                         num_attention_heads=txt["num_heads"], max_position_embeddings=txt["max_len"],
                         vocab_size=49408, eos_token_id=49407, bos_token_id=49406, pad_token_id=0),
        vision_config=dict(hidden_size=img["width"], intermediate_size=img["mlp_dim"], num_hidden_layers=img["depth"],
                           num_attention_heads=img["num_heads"], image_size=img["image_size"],
                           patch_size=img["patch_size"]),
        projection_dim=size["embed"])
    batches = [(torch.from_numpy(i).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t.astype("int64")))
               for i, t in real_batches(size, N_BATCHES)]
    rss_data = _rss_mb()
    torch.manual_seed(0)
    model = CLIPModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def one_step(i):
        images, texts = batches[i % N_BATCHES]
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=texts, pixel_values=images, return_loss=True).loss
        loss.backward()
        opt.step()
        return float(loss)

    times, cpu, losses = _timed_loop(one_step, steps)
    out = _summary(times, cpu, size["batch"])
    out.update(loss_first=losses[0], loss_last=losses[-1], torch=torch.__version__,
               threads=torch.get_num_threads(), rss_after_data_mb=rss_data,
               attn_implementation=model.config._attn_implementation,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    return out


def run_open_clip(size_name: str, steps: int):
    try:
        import open_clip  # noqa: F401
    except Exception as e:  # torchvision is not importable beside CPU torch here (TOOLCHAIN.md)
        return dict(skipped=f"open_clip does not import: {type(e).__name__}: {e}"[:200])
    raise NotImplementedError("open_clip imported: add its step here")


def worker(spec: str):
    framework, size_name = spec.split(":")
    framework = framework.removesuffix(KEEP)
    load = os.getloadavg()
    steps = _STEPS.value or DEFAULT_STEPS[size_name]
    if framework in ("vljax", "vljax_pd"):
        out = run_vljax(size_name, steps, _DTYPE.value, _REMAT.value,
                        _PATCH_DROPOUT.value if framework == "vljax_pd" else 0.0)
    elif framework == "transformers":
        import torch
        if _THREADS.value:
            torch.set_num_threads(_THREADS.value)
        out = run_transformers(size_name, steps)
    else:
        out = run_open_clip(size_name, steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["loadavg_start"], out["loadavg_end"] = load, os.getloadavg()
    print("RESULT " + json.dumps(out))


def main(argv):
    del argv
    if _BATCH.value:
        for s in SIZES.values():
            s["batch"] = _BATCH.value
    if _WORKER.value:
        return worker(_WORKER.value)
    if _FROM_JSON.value:
        with open(_FROM_JSON.value) as f:
            results = json.load(f)
        for r in results.values():
            if "model_step_flops" in r:
                _add_fractions(r)
        with open(_FROM_JSON.value, "w") as f:  # adds the derived fields of newer versions
            json.dump(results, f, indent=1)
        return print_table(results)
    results = {"_meta": dict(cpus=os.cpu_count(), threads=_THREADS.value or "all",
                             steps={s: _STEPS.value or DEFAULT_STEPS[s] for s in _SIZES.value},
                             alternating=not _SEQUENTIAL.value,
                             dtype=_DTYPE.value, loadavg_start=os.getloadavg(),
                             n_distinct_batches=N_BATCHES)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for size in _SIZES.value:
        cmds = {}
        for fw in _FRAMEWORKS.value:
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={fw}:{size}",
                   f"--steps={_STEPS.value}", f"--threads={_THREADS.value}", f"--dtype={_DTYPE.value}",
                   f"--batch={_BATCH.value}", f"--remat={_REMAT.value}", f"--gated={fw != 'open_clip'}",
                   f"--patch_dropout={_PATCH_DROPOUT.value}"]
            if _THREADS.value:  # the same cores for both: XLA's pool follows the affinity mask
                cmd = ["taskset", "-c", ",".join(str(i) for i in range(_THREADS.value))] + cmd
            cmds[fw] = cmd
        envs = {fw: dict(os.environ, VLJAX_KEEP_HOST_MEMORY="1" if fw.endswith(KEEP) else "0")
                for fw in cmds}
        groups = [[fw] for fw in cmds] if _SEQUENTIAL.value else [list(cmds)]
        for group in groups:
            print(f"[bench_train] {size}: {' and '.join(group)}" + (" alternating steps" if len(group) > 1 else ""),
                  flush=True)
            errs = {fw: tempfile.TemporaryFile("w+") for fw in group}  # a pipe could fill and block
            procs = {fw: subprocess.Popen(cmds[fw], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=errs[fw], text=True, cwd=root, env=envs[fw])
                     for fw in group}
            gated = [fw for fw in group if fw != "open_clip"]
            alive = set(gated)
            for i in range((_STEPS.value or DEFAULT_STEPS[size]) + 1):
                for fw in gated:
                    if fw not in alive:
                        continue
                    try:
                        procs[fw].stdin.write("go\n")
                        procs[fw].stdin.flush()
                        while True:
                            line = procs[fw].stdout.readline()
                            if not line or line.startswith("STEP "):
                                break
                        if not line:
                            alive.discard(fw)
                    except BrokenPipeError:
                        alive.discard(fw)
            for fw, proc in procs.items():
                stdout, _ = proc.communicate()
                errs[fw].seek(0)
                stderr = errs[fw].read()
                line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
                if proc.returncode or not line:
                    results[f"{fw}:{size}"] = dict(error=stderr[-2000:], returncode=proc.returncode)
                    print(stderr[-2000:])
                else:
                    results[f"{fw}:{size}"] = json.loads(line[-1][7:])
    results["_meta"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {_OUT.value}")


def print_table(results):
    """A markdown table: per-step times after the first (compile) step, pairs/s from the median."""
    cols = ["size", "framework", "batch", "median s", "p90 s", "worst s", "first s", "pairs/s",
            "vs HF", "compiles", "peak RSS MB", "FLOP/s / matmul peak (median; best)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for key, r in results.items():
        if key.startswith("_"):
            continue
        fw, size = key.split(":")
        if "median_s" not in r:
            why = r.get("skipped") or f"exit status {r.get('returncode')}: {r.get('error', '')[-100:]!r}"
            print(f"| {size} | {fw} | {why} |")
            continue
        hf = [results.get(f"transformers{v}:{size}", {}).get("pairs_per_s") for v in ("", KEEP)]
        hf = max([x for x in hf if x] or [float("nan")])  # the faster transformers run
        ratio = r["pairs_per_s"] / hf
        frac = r.get("flops_fraction_of_peak")
        print(f"| {size} | {fw} | {SIZES[size]['batch']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
              f"{r['worst_s']:.3f} | {r['first_step_s']:.2f} | {r['pairs_per_s']:.1f} | {ratio:.2f}x | "
              f"{r.get('compiles', '-')} | {r['peak_rss_mb']:.0f} | "
              + (f"{frac:.0%}; {r['flops_fraction_of_peak_best']:.0%} |" if frac is not None else "- |"))
    for key, r in results.items():  # FLIP's speed-up, from the same alternating run
        base = results.get(key.replace("vljax_pd:", "vljax:"), {})
        if key.startswith("vljax_pd:") and "pairs_per_s" in r and "pairs_per_s" in base:
            print(f"{key.split(':')[1]}: patch dropout {r['patch_dropout']:.0%} runs at "
                  f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x the pairs/s of no dropout (median "
                  f"steps; fastest steps {min(base['step_times_s'][1:]) / min(r['step_times_s'][1:]):.2f}x)")
    meta = results.get("_meta", {})
    print(f"load average (1/5/15 min) at start {meta.get('loadavg_start')}, end {meta.get('loadavg_end')}")


if __name__ == "__main__":
    app.run(main)
