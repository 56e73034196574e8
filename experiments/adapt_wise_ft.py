r"""WiSE-FT curve of the LiT demo model fine-tuned on Fashion-MNIST train (issue 11).

    python experiments/adapt_wise_ft.py --model=/tmp/adapt_lit --finetuned=/tmp/adapt_lit_ft

1. Fine-tune: the demo's trainable image projection (`img/head`; the EfficientNet trunk is
   locked in LiT) with cross-entropy against the zero-shot Fashion-MNIST classifier (the 80-
   template class embeddings, frozen), on `--train_images` Fashion-MNIST train images, AdamW;
   the result is saved as a workdir (`soup.save_workdir`), loadable by every vljax tool.
2. `vljax.wise_ft`: theta_alpha = (1 - alpha) theta_zero-shot + alpha theta_fine-tuned for each
   alpha, scored on Fashion-MNIST test (in-distribution) and held-out emoji image->text
   retrieval (out of distribution); writes experiments/results/adapt_wise_ft.json and .png.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "experiments", "results")


def finetune(model_dir: str, out_dir: str, train_images: int, steps: int, lr: float) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from vljax import factory, soup
    from vljax.data import pipeline
    from vljax.evaluators import data as data_lib
    from vljax.evaluators import prompts, zeroshot
    from vljax.embedder import Embedder
    from vljax import sharding

    b = factory.load(model_dir)
    source, labels, names = data_lib.classification(
        "wise_ft", dict(name="vljax_fashion_mnist", split="train", max_examples=train_images))
    feats_fn = jax.jit(lambda p, x: b.model.apply({"params": p}, x, method="image_trunk"))
    feats, index = [], []
    for batch in pipeline.make_eval_batches(source, batch_size=64, image_size=b.image_size,
                                            value_range=b.value_range):
        keep = batch["mask"]
        feats.append(np.asarray(feats_fn(b.params, batch["image"]))[keep])
        index.append(batch["index"][keep])
    x, y = np.concatenate(feats), np.asarray(labels)[np.concatenate(index)]
    emb = Embedder.from_bundle(b, mesh=sharding.make_mesh([("data", -1)]))
    texts = prompts.class_texts([prompts.canonicalize_name(n) for n in names], "clip80", None)
    ztxt = jnp.asarray(zeroshot.ensemble(zeroshot.class_text_embeddings(emb, texts)))
    scale = float(np.exp(b.params["t"]))

    def loss_fn(head, xb, yb):
        p = dict(b.params, img=dict(b.params["img"], head=head))
        z = b.model.apply({"params": p}, xb, method="image_head")
        return optax.softmax_cross_entropy_with_integer_labels(scale * z @ ztxt.T, yb).mean()

    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.1)
    head = jax.tree.map(jnp.asarray, b.params["img"]["head"])
    state = opt.init(head)

    @jax.jit
    def step(head, state, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(head, xb, yb)
        updates, state = opt.update(g, state, head)
        return optax.apply_updates(head, updates), state, loss

    rng = np.random.default_rng(0)
    for i in range(steps):
        idx = rng.choice(len(x), 256, replace=False)
        head, state, loss = step(head, state, x[idx], y[idx])
        if i % 50 == 0 or i == steps - 1:
            print(f"fine-tune step {i}: loss {float(loss):.3f}", flush=True)
    params = dict(b.params, img=dict(b.params["img"], head=jax.tree.map(np.asarray, head)))
    soup.save_workdir(b.spec, soup.read_config(model_dir), params, out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/adapt_lit")
    parser.add_argument("--finetuned", default="/tmp/adapt_lit_ft")
    parser.add_argument("--train_images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--test_images", type=int, default=500)
    args = parser.parse_args()
    import ml_collections

    from vljax import eval_builder, soup, wise_ft
    t0 = time.perf_counter()
    finetune(args.model, args.finetuned, args.train_images, args.steps, args.lr)
    t_ft = time.perf_counter() - t0
    config = ml_collections.ConfigDict({"evals": {
        "fashion_mnist": dict(type="zeroshot", data=dict(name="vljax_fashion_mnist", split="test",
                                                         max_examples=args.test_images),
                              templates="clip80"),
        "emoji_retrieval": dict(type="retrieval", data=dict(name="vljax_emoji", split="test",
                                                            exclude="skin tone")),
    }})
    spec, model, ingredients = soup.load_ingredients([args.model, args.finetuned])
    results = wise_ft.sweep(spec, model, ingredients[0][1], ingredients[1][1],
                            [float(a) for a in args.alphas.split(",")],
                            eval_builder.build(config))
    id_m, ood_m = "zeroshot/fashion_mnist/top1", "retrieval/emoji_retrieval/i2t_r1"
    os.makedirs(OUT, exist_ok=True)
    wise_ft.plot(results, id_m, ood_m, os.path.join(OUT, "adapt_wise_ft.png"))
    with open(os.path.join(OUT, "adapt_wise_ft.json"), "w") as f:
        json.dump({"args": vars(args), "finetune_seconds": round(t_ft, 1),
                   "seconds": round(time.perf_counter() - t0, 1), "results": results}, f, indent=1)
    print("| alpha | Fashion-MNIST top-1 % | emoji i2t R@1 % | emoji t2i R@1 % |\n|---|---|---|---|")
    for r in results:
        m = r["metrics"]
        print(f"| {r['alpha']:g} | {100 * m[id_m]:.1f} | {100 * m[ood_m]:.1f} | "
              f"{100 * m['retrieval/emoji_retrieval/t2i_r1']:.1f} |")


if __name__ == "__main__":
    main()
