"""Streaming, sharded evaluation (vljax/embedder.py) equals a direct `model.apply` on all images.

A tiny TFDS set (13 test records of different sizes, one corrupt; 24 train records) and a tiny
CLIP model. The reference embeds every readable image in one `model.apply` call on one device;
the Embedder streams batches on 1 device, on a data 4 x fsdp 2 mesh with FSDP-sharded params,
and in 2 processes x 4 devices. Embeddings agree to 1e-5 and every evaluator's metrics agree.
"""
import json
import os
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import REPO, tiny_config

from vljax import eval_builder, sharding, train
from vljax.data import tfds_writer, transforms as T
from vljax.data.preprocess import Preprocess
from vljax.embedder import Embedded, Embedder
from vljax.evaluators import base

NAME, SIZE, VALUE_RANGE = "vljax_evaltiny", 32, (-1.0, 1.0)
CLASSES = ["crimson", "a green forest at dawn", "the deep blue ocean, with waves and gulls"]
WORDS = "cat dog ship tree kite lamp moon rock fish door wheel cloud bread stone river".split()


def _caption(k):
    """Captions far apart for a random text tower: different words and lengths."""
    rng = np.random.default_rng(1000 + k)
    return " ".join(rng.choice(WORDS, size=2 + k % 9))


def _image(k):
    rng = np.random.default_rng(k)
    img = rng.integers(0, 256, size=(10 + k % 7, 12 + k % 5, 3), dtype=np.uint8)
    img[..., k % 3] = 255  # the class colour dominates
    return tfds_writer.encode_png(T.Image.fromarray(img))


def _spec():
    def examples(split, n, offset):
        for k in range(offset, offset + n):
            image = b"not an image" if k == offset + 5 else _image(k)
            yield f"{split}{k}", {"id": f"{split}{k}", "image": image,
                                  "captions": [_caption(k), _caption(k + 500)],
                                  "label": k % 3, "tags": sorted({k % 2, 2})}
    return tfds_writer.DatasetSpec(
        name=NAME,
        features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                  "captions": tfds.features.Sequence(tfds.features.Text()),
                  "label": tfds.features.ClassLabel(names=["r", "g", "b"]),
                  "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=["x", "y", "z"]))},
        splits={"test": lambda: examples("test", 13, 0), "train": lambda: examples("train", 24, 100)},
        class_names={"label": CLASSES})


def evals_config(data_dir):
    data = dict(name=NAME, split="test", data_dir=data_dir)
    return dict(
        zs=dict(type="zeroshot", data=data, templates="name", ks=(1, 2)),
        gz=dict(type="gzsl", data=data, templates="name", seen_classes=[0]),
        ret=dict(type="retrieval", data=data, ks=(1, 5)),
        ml=dict(type="multilabel", data=dict(data, label="tags"), templates="name", ks=(1,)),
        fs=dict(type="fewshot", data=dict(name=NAME, per_class=4, data_dir=data_dir), shots=(1, 2),
                seeds=2, l2_regs=(1.0,)),
        # Tip-Adapter's augmented views (random crops and flips of the train images) embedded on
        # the mesh equal the reference's.
        fa=dict(type="fewshot_adapt", data=dict(name=NAME, per_class=4, data_dir=data_dir),
                methods=("zeroshot", "ridge", "tip", "tip_f"), shots=(1, 2), seeds=2,
                templates="name", holdout_per_class=2, augment_views=2, tip_f_epochs=2),
    )


def model_and_params():
    config = tiny_config("unused.jsonl", "clip")
    model = train.build_model(config)
    params = jax.device_get(train.init_params(model, config, jax.random.key(0)))
    return model, params, train.build_tokenizer(config)


class ReferenceEmbedder:
    """Every readable image of a source in ONE model.apply call, on one device."""

    def __init__(self, model, params, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        # One jitted call per set (op-by-op dispatch of the towers made the fixture take minutes).
        self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, None)[0])
        self._txt = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1])
        self.logit_scale, self.logit_bias = float(np.exp(params["t"])), None
        self.image_size = SIZE  # Tip-Adapter's augmented views are cropped to it
        self._pre = Preprocess(image_size=SIZE, value_range=VALUE_RANGE, require_caption=False)

    def embed_images(self, data):
        exs = [self._pre.eval(data[i]) for i in range(len(data))]
        index = np.asarray([i for i, ex in enumerate(exs) if "skip" not in ex])
        x = np.stack([exs[i]["image"] for i in index])
        z = self._img(self.params, jax.device_put(x, jax.devices()[0]))
        return Embedded(z=np.asarray(z), index=index)

    def embed_texts(self, texts):
        ids = np.asarray(self.tokenizer(list(texts)), np.int32)
        return np.asarray(self._txt(self.params, jax.device_put(ids, jax.devices()[0])))


def run_all(evaluators, emb):
    out = {}
    for ev in evaluators.values():
        out.update(ev.run(emb))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds_writer.write_tfds(_spec(), data_dir)
    model, params, tok = model_and_params()
    evaluators = eval_builder.build({"evals": evals_config(data_dir)})
    ref = ReferenceEmbedder(model, params, tok)
    source = evaluators["zs"].data
    return dict(data_dir=data_dir, model=model, params=params, tok=tok, evaluators=evaluators,
                source=source, ref_images=ref.embed_images(source), ref_metrics=run_all(evaluators, ref),
                ref_views=_tip_views(evaluators["fa"], ref))


def _tip_views(ev, emb):
    """Tip-Adapter's augmented views of the few-shot images, embedded ([V, U, D], view_row)."""
    from vljax.evaluators import fewshot
    used = np.unique(np.concatenate([np.concatenate(t + [h]) for t, h in ev.splits]))
    _, row, _, _ = fewshot.embed_train_test(emb, ev.train_data, len(ev.train_labels), used, ev.test_data)
    return ev.augmented_views(emb, row)


def _check(setup, emb):
    got = emb.embed_images(setup["source"])
    ref = setup["ref_images"]
    np.testing.assert_array_equal(got.index, ref.index)  # record 5 is corrupt: left out
    assert len(got.index) == 12
    np.testing.assert_allclose(got.z, ref.z, atol=1e-5)
    texts = [_caption(3), CLASSES[0], _caption(4)]
    np.testing.assert_allclose(emb.embed_texts(texts),
                               ReferenceEmbedder(setup["model"], setup["params"], setup["tok"]).embed_texts(texts),
                               atol=1e-5)
    # The views themselves (the accuracies below are too coarse to tell two crops apart).
    views, view_row = _tip_views(setup["evaluators"]["fa"], emb)
    assert views.shape[:2] == (2, 9) and setup["ref_views"][0].shape == views.shape
    np.testing.assert_array_equal(view_row, setup["ref_views"][1])
    np.testing.assert_allclose(views, setup["ref_views"][0], atol=1e-5)
    metrics = run_all(setup["evaluators"], emb)
    assert metrics.keys() == setup["ref_metrics"].keys()
    assert metrics == pytest.approx(setup["ref_metrics"], abs=1e-6)


def test_one_device_equals_reference(setup):
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    emb = Embedder(setup["model"], setup["params"], setup["tok"], mesh=mesh, image_size=SIZE,
                   value_range=VALUE_RANGE, batch_size=4)  # 13 records: the last batch padded
    _check(setup, emb)
    assert emb.logit_scale == pytest.approx(10.0)


def test_fsdp_mesh_with_sharded_params_equals_reference(setup):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    shardings = sharding.param_shardings(setup["params"], mesh, [(".*", "fsdp")])
    params = jax.device_put(setup["params"], shardings)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    emb = Embedder(setup["model"], params, setup["tok"], mesh=mesh, image_size=SIZE,
                   value_range=VALUE_RANGE, batch_size=8)
    # The towers run on the params as sharded: no copy is made.
    assert all(a is b for a, b in zip(jax.tree.leaves(emb.params), jax.tree.leaves(params)))
    _check(setup, emb)


def test_texts_and_images_embedded_once_per_evaluation(setup):
    calls = []

    def tok(texts):
        calls.append(list(texts))
        return setup["tok"](texts)
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    emb = Embedder(setup["model"], setup["params"], tok, mesh=mesh, image_size=SIZE,
                   value_range=VALUE_RANGE, batch_size=8)
    evs = setup["evaluators"]
    evs["zs"].run(emb)
    first = emb.embed_images(evs["zs"].data)
    evs["gz"].run(emb)  # the same test images and class prompts: nothing new is embedded
    assert len(calls) == 1
    assert emb.embed_images(evs["gz"].data) is first


class SyntheticSource:
    """n records of 48 x 48 noise images (PNG bytes), generated on access."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def cache_key(self):  # the embedder's cache key (vljax/data/sources/base.py)
        return f"synthetic:{self.n}"

    def __getitem__(self, i):
        img = np.random.default_rng(i).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
        return {"id": str(i), "image": tfds_writer.encode_png(T.Image.fromarray(img)),
                "captions": [], "label": -1}


def test_memory_does_not_grow_with_the_number_of_images(setup):
    """1536 images at 32 px would be 18.9 MB as one float32 array; streaming holds a few batches."""
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    emb = Embedder(setup["model"], setup["params"], setup["tok"], mesh=mesh, image_size=SIZE,
                   value_range=VALUE_RANGE, batch_size=16)
    emb.embed_images(SyntheticSource(32))  # compiles
    tracemalloc.start()
    out = emb.embed_images(SyntheticSource(1536))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.z.shape == (1536, 32)
    all_images = 1536 * SIZE * SIZE * 3 * 4
    assert peak < all_images / 4, (peak, all_images)
    # Evaluators hold metadata, never pixels.
    for ev in setup["evaluators"].values():
        arrays = [v for v in vars(ev).values() if isinstance(v, np.ndarray)]
        assert all(a.ndim <= 2 for a in arrays), type(ev).__name__


WORKER = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, {tests!r})
import numpy as np
from test_eval_sharded import SIZE, VALUE_RANGE, evals_config, model_and_params, run_all
from vljax import eval_builder, sharding
from vljax.embedder import Embedder
model, params, tok = model_and_params()
mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
params = jax.device_put(params, sharding.param_shardings(params, mesh, [(".*", "fsdp")]))
evaluators = eval_builder.build({{"evals": evals_config({data_dir!r})}})
emb = Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE, batch_size=8)
got = emb.embed_images(evaluators["zs"].data)
metrics = run_all(evaluators, emb)
out = {out!r} + sys.argv[2]
np.savez(out + ".npz", z=got.z, index=got.index)
json.dump(metrics, open(out + ".json", "w"))
"""


@pytest.mark.slow
def test_two_processes_equal_reference(setup, tmp_path):
    """2 JAX processes x 4 CPU devices (jax.distributed on localhost), FSDP-sharded params."""
    import portpicker
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.join(REPO, "tests"), data_dir=setup["data_dir"],
                                    out=str(tmp_path / "out")))
    port = portpicker.pick_unused_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), f"localhost:{port}", str(i)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    for i in range(2):  # every process holds the whole result
        got = np.load(tmp_path / f"out{i}.npz")
        np.testing.assert_array_equal(got["index"], setup["ref_images"].index)
        np.testing.assert_allclose(got["z"], setup["ref_images"].z, atol=1e-5)
        metrics = json.loads((tmp_path / f"out{i}.json").read_text())
        assert metrics == pytest.approx(setup["ref_metrics"], abs=1e-6)


def test_unknown_data_key_is_named(setup):
    config = {"evals": {"zs": dict(type="zeroshot", data=dict(name=NAME, split="test", lable="x",
                                                              data_dir=setup["data_dir"]))}}
    with pytest.raises(ValueError, match=r"evals\.zs\.data.*lable"):
        eval_builder.build(config)
    assert base.l2_normalize(np.ones((1, 4))).shape == (1, 4)
