r"""SigLIP 2 NaFlex at B/16 size: vljax's tower loaded from a transformers `Siglip2Model` directory against
that model, on whatever backend is found (written for one GPU; `--size=tiny` runs on a CPU in a minute).

    python experiments/bench_naflex.py                 # B/16 image tower, budgets 256 / 576 / 1024
    python experiments/bench_naflex.py --size=tiny     # a smoke run

A `Siglip2Model` with the SigLIP 2 B/16 vision tower (width 768, depth 12, patch 16, a 16 x 16 position
grid) and a 2-block text tower, random weights, is saved as a user's directory and loaded by
`vljax.convert.hf_siglip2.load_hf_siglip2`. For each patch budget, one batch of images of mixed aspect
ratios (square, 4:3, 3:4, 4:1, 1:4, 9:1) is made into NaFlex inputs by `vljax.data.naflex` and run through
both (fp32; matmuls at full fp32 precision on both sides for the parity column, the default precision for
the timing columns): the largest difference of the L2-normalised image embeddings, images/s of each
(median of timed repeats after a warm-up), and how often the jitted tower compiled (once per budget).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vljax.convert.hf_siglip2 import load_hf_siglip2  # noqa: E402
from vljax.data.naflex import naflex_batch  # noqa: E402
from vljax.models import TwoTowers  # noqa: E402

SIZES = {"b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16, num_patches=256),
         "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=16, num_patches=64)}
ASPECTS = [(384, 384), (480, 640), (640, 480), (256, 1024), (1024, 256), (160, 1440)]


def make_dir(size: str, path: str):
    torch.manual_seed(0)
    config = transformers.Siglip2Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=256, max_position_embeddings=16, eos_token_id=1, pad_token_id=0,
                         bos_token_id=2, projection_size=SIZES[size]["hidden_size"]),
        vision_config=SIZES[size])
    model = transformers.Siglip2Model(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(path)
    return model


def images(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*ASPECTS[i % len(ASPECTS)], 3), dtype=np.uint8) for i in range(batch)]


def torch_embed(model, x, device):
    out = model.get_image_features(
        pixel_values=torch.from_numpy(np.asarray(x["patches"])).to(device),
        pixel_attention_mask=torch.from_numpy(np.asarray(x["mask"])).long().to(device),
        spatial_shapes=torch.from_numpy(np.asarray(x["shapes"])).long().to(device))
    z = getattr(out, "pooler_output", out)
    return torch.nn.functional.normalize(z, dim=-1)


def timed(fn, repeats: int):
    fn()  # warm-up (compilation / autotuning)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="b16", choices=sorted(SIZES))
    parser.add_argument("--budgets", default="256,576,1024")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "experiments/results"),
                                                      "bench_naflex.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = tempfile.mkdtemp(prefix="siglip2_")
    ref = make_dir(args.size, path).to(device)
    kwargs, params = load_hf_siglip2(path)
    model = TwoTowers(**kwargs)
    params = jax.device_put(params)
    embed = jax.jit(lambda p, x: model.apply({"params": p}, x, None)[0])
    p = kwargs["image"]["patch_size"]
    imgs = images(args.batch)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        x = naflex_batch(imgs, p, budget)
        xd = jax.device_put({k: np.asarray(v) for k, v in x.items()})
        with jax.default_matmul_precision("highest"):
            ours = np.asarray(jax.jit(lambda p_, x_: model.apply({"params": p_}, x_, None)[0])(params, xd))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            want = torch_embed(ref, x, device).cpu().numpy()
        diff = float(np.abs(ours - want).max())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        def run_ours():
            jax.block_until_ready(embed(params, xd))

        def run_torch():
            with torch.no_grad():
                torch_embed(ref, x, device)
            if device == "cuda":
                torch.cuda.synchronize()
        t_ours, t_torch = timed(run_ours, args.repeats), timed(run_torch, args.repeats)
        real = int(np.asarray(x["mask"]).sum())
        rows.append(dict(budget=budget, real_patches=real, padded=args.batch * budget - real, max_abs_diff=diff,
                         ours_images_per_s=args.batch / t_ours, torch_images_per_s=args.batch / t_torch,
                         compiles=embed._cache_size()))
    print(f"\nSigLIP 2 NaFlex {args.size} image tower · batch {args.batch} of {len(ASPECTS)} aspect ratios · "
          f"{jax.devices()[0].device_kind} (jax) / {device} (torch {torch.__version__})\n")
    print("| budget | real / padded patches | max abs diff (fp32, highest) | vljax img/s | transformers img/s | "
          "ratio | compilations so far |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['real_patches']} / {r['padded']} | {r['max_abs_diff']:.1e} | "
              f"{r['ours_images_per_s']:.0f} | {r['torch_images_per_s']:.0f} | "
              f"{r['ours_images_per_s'] / r['torch_images_per_s']:.2f}x | {r['compiles']} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(size=args.size, batch=args.batch, device=jax.devices()[0].device_kind, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
