"""The source registry: one place declares a kind (its keys, cache key, label fields), and the
config check, the pipeline, the embedder's cache and the evaluators read it; the same records
served as TFDS, a folder or a JSONL manifest give the same evaluation metrics."""
import json

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import SHAPES, _draw, tiny_config
from test_eval_sharded import SIZE, VALUE_RANGE, model_and_params

from vljax import config_check, sharding
from vljax.data import pipeline, sources, tfds_writer
from vljax.embedder import Embedder, data_key
from vljax.evaluators import RetrievalEvaluator, ZeroShotEvaluator


@sources.register("toy")
class ToySource(sources.Source):
    """A kind defined outside vljax: `n` solid-colour images, labelled by colour."""
    REQUIRED = ("n",)
    OPTIONAL = ("seed",)
    COLOURS = ["black", "white"]

    def __init__(self, n, seed=0):
        self.n, self.seed = int(n), int(seed)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.full((8, 8, 3), 255 * (i % 2), np.uint8)
        return {"id": f"toy{i}", "image": image, "captions": [f"a {self.COLOURS[i % 2]} square"],
                "label": i % 2, "labels": []}

    def cache_key(self):
        return sources.base.digest("toy", self.n, self.seed)

    def gives_label(self):
        return True

    def class_names_of(self, key=None):
        self._no_key(key, "label")
        return list(self.COLOURS)


def test_a_kind_registered_outside_vljax_is_checked_built_batched_keyed_and_evaluated():
    entry = dict(source="toy", n=6)
    config = tiny_config("unused.jsonl")
    config.input.data = [entry]
    config_check.validate(config)
    config.input.data = [dict(source="toy", nn=6)]
    with pytest.raises(ValueError, match=r"^config key `input.data\[0\].nn`: unknown .*did you mean `n`\?"):
        config_check.validate(config)
    config.input.data = [dict(source="toy", seed=1)]
    with pytest.raises(ValueError, match=r"`input.data\[0\].n` is missing \(source 'toy'\)"):
        config_check.validate(config)
    src = sources.get_source(entry)
    assert isinstance(src, ToySource) and len(src) == 6
    assert sources.missing_labels(src, "label") is None
    assert sources.missing_labels(src, "labels") == "source` ('toy' has no 'labels')"
    # The embedder's cache key is the source's, equal for equal entries, other for other records.
    assert data_key(entry) == data_key(src) == src.cache_key() != data_key(dict(entry, seed=1))
    cfg = dict(data=[entry], batch_size=4, image_size=8, value_range=(0.0, 1.0), num_workers=0,
               augment=dict(random_resized_crop=None))
    batch = next(pipeline.make_train_iterator(cfg, lambda t: np.zeros((len(t), 4), np.int32), seed=0))
    assert batch["image"].shape == (4, 8, 8, 3)
    ev = ZeroShotEvaluator.from_config("t", dict(data=dict(entry, max_examples=4), templates="name"))
    assert ev.class_names == ["black", "white"] and ev.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="already registered"):
        sources.register("toy", type("Other", (sources.Source,), {}))


def test_unknown_kinds_keys_and_types_are_named():
    with pytest.raises(ValueError, match=r"`input.data.source`: 'lmdb' is not one of"):
        sources.get_source(dict(source="lmdb", path="x"))
    with pytest.raises(ValueError, match=r"`input.data\[1\].path` is missing \(source 'jsonl'\)"):
        sources.get_source(dict(source="jsonl"), where="input.data[1]")
    with pytest.raises(ValueError, match=r"`input.data.root`: unknown for source 'folder'"):
        sources.get_source(dict(source="folder", root="x"))
    with pytest.raises(ValueError, match=r"`evals.t.data.source`: 'lmdb' is not one of"):
        ZeroShotEvaluator.from_config("t", dict(data=dict(source="lmdb", path="x")))
    with pytest.raises(TypeError, match="list is not a data source"):
        data_key([{"image": b""}])


# --- the same records as TFDS, a folder and a JSONL manifest ---------------------------------------

N_PER = 3


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory):
    """Entries of the same 3 x N_PER shape images (labels: their shape, captions: two each) as a
    TFDS set, a folder (one subfolder per shape) and a JSONL manifest with class names."""
    root = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    records = []
    for si, shape in enumerate(SHAPES):
        for k in range(N_PER):
            colour = ("red", "green", "blue", "yellow")[(si + k) % 4]
            png = tfds_writer.encode_png(_draw(shape, colour, rng))
            records.append((f"{shape}{k}", png, si, [f"a {colour} {shape}", f"{shape} number {k}"]))
    for key, png, si, caps in records:
        (root / "folder" / SHAPES[si]).mkdir(parents=True, exist_ok=True)
        (root / "folder" / SHAPES[si] / f"{key}.png").write_bytes(png)
        (root / "folder" / SHAPES[si] / f"{key}.txt").write_text("\n".join(caps) + "\n")
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(dict(image=f"folder/{SHAPES[si]}/{key}.png", captions=caps,
                                                label=si)) + "\n" for key, _, si, caps in records))
    spec = tfds_writer.DatasetSpec(
        name="vljax_kinds",
        features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                  "captions": tfds.features.Sequence(tfds.features.Text()),
                  "label": tfds.features.ClassLabel(names=list(SHAPES))},
        splits={"test": lambda: ((key, {"id": key, "image": png, "captions": caps, "label": si})
                                 for key, png, si, caps in records)})
    tfds_writer.write_tfds(spec, root / "tfds")
    return {"tfds": dict(name="vljax_kinds", split="test", data_dir=str(root / "tfds")),
            "folder": dict(source="folder", path=str(root / "folder")),
            "jsonl": dict(source="jsonl", path=str(manifest), class_names=list(SHAPES))}


@pytest.fixture(scope="module")
def embedder():
    model, params, tok = model_and_params()
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    return Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE,
                    batch_size=4, progress=False)


def test_zeroshot_and_retrieval_equal_on_tfds_folder_and_jsonl(three_kinds, embedder):
    metrics, names = {}, {}
    for kind, data in three_kinds.items():
        zs = ZeroShotEvaluator.from_config("t", dict(data=data, templates="name"))
        ret = RetrievalEvaluator.from_config("t", dict(data=data))
        assert len(zs.data) == len(ret.data) == 3 * N_PER
        assert sorted(zs.labels.tolist()) == sorted(list(range(3)) * N_PER)
        names[kind] = zs.class_names
        metrics[kind] = {**zs.run(embedder), **ret.run(embedder)}
    assert names["folder"] == names["jsonl"] == names["tfds"] == list(SHAPES)
    assert metrics["tfds"]["retrieval/t/i2t_r10"] == 1.0  # 9 images: every caption is in the top 10
    for kind in ("folder", "jsonl"):
        assert metrics[kind].keys() == metrics["tfds"].keys()
        for key, value in metrics["tfds"].items():
            assert metrics[kind][key] == pytest.approx(value, abs=1e-6), (kind, key)
    # A subset's cache key names its source's records and the indices.
    capped = [ZeroShotEvaluator.from_config("t", dict(data=dict(three_kinds["jsonl"], max_examples=m),
                                                      templates="name")).data for m in (4, 5)]
    assert len({data_key(c) for c in capped}) == 2


def test_source_entries_of_evaluators_are_checked_by_kind(three_kinds):
    jsonl = three_kinds["jsonl"]
    evals = ml_collections.ConfigDict({"t": dict(type="zeroshot", data=dict(jsonl, max_examples=2))})
    config_check.validate_evals(evals)
    evals.t.data.pth = "x"
    with pytest.raises(ValueError, match=r"`evals.t.data.pth`: unknown .*did you mean `path`\?"):
        config_check.validate_evals(evals)
    with pytest.raises(ValueError, match=r"`evals.t.data`: unknown keys \['name'\]"):
        ZeroShotEvaluator.from_config("t", dict(data=dict(jsonl, name="emoji")))
    no_names = {k: v for k, v in jsonl.items() if k != "class_names"}
    with pytest.raises(ValueError, match="give the source `class_names`"):
        ZeroShotEvaluator.from_config("t", dict(data=no_names))
    with pytest.raises(ValueError, match="'folder' has no named features: label='shape'"):
        ZeroShotEvaluator.from_config("t", dict(data=dict(three_kinds["folder"], label="shape")))
    with pytest.raises(ValueError, match=r"m\.jsonl:1: 'label' 0 is not one of the 0 class_names|"
                                         r"class_names must be a non-empty list"):
        sources.get_source(dict(jsonl, class_names=[]))
