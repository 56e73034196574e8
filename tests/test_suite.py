"""The standard zero-shot suite (vljax/suites): every dataset of every suite runs offline on TFDS
mock data with a tiny trained model, the published tables hold the published counts, missing
datasets are named with their prepare command, a stopped suite resumes, results are written in
CLIP_benchmark's JSON layout and as an openclip_results.csv row, and the "suite" evaluator runs
inside training.

TFDS mock data (`tfds.testing.mock_data`, no TensorFlow needed for `data_source`) fills every
variable-length feature with an independent random length; `_mock_tfds` makes them one length,
as real records have (a CLEVR scene's objects, KITTI's boxes), so VTAB's derived labels exist.
"""
import contextlib
import csv
import functools
import json
import math
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import web_shards
from helpers import REPO, SHAPES, make_shapes_manifest, tiny_config
from tensorflow_datasets.testing import mocking

from vljax import config_check, evaluate, factory, metrics, train
from vljax.evaluators.retrieval import RetrievalEvaluator
from vljax.suites import DATASETS, SUITES, entries, labels, runner, scores, tables, views, writers

# DataComp's tasklist.yml `num_classes` (mlfoundations/datacomp), the published class counts.
DATACOMP_NUM_CLASSES = {
    "vtab/caltech101": 102, "cifar10": 10, "vtab/cifar100": 100, "vtab/clevr_count_all": 8,
    "vtab/clevr_closest_object_distance": 6, "country211": 211, "vtab/dtd": 47, "vtab/eurosat": 10,
    "fgvc_aircraft": 100, "food101": 101, "gtsrb": 43, "imagenet1k": 1000, "imagenet_sketch": 1000,
    "imagenetv2": 1000, "imagenet-a": 200, "imagenet-o": 200, "imagenet-r": 200,
    "vtab/kitti_closest_vehicle_distance": 4, "mnist": 10, "objectnet": 113, "vtab/flowers": 102,
    "vtab/pets": 37, "voc2007": 20, "vtab/pcam": 2, "renderedsst2": 2, "vtab/resisc45": 45, "cars": 196,
    "stl10": 10, "sun397": 397, "vtab/svhn": 10, "wilds/iwildcam": 182, "wilds/camelyon17": 2,
    "wilds/fmow": 62, "fairness/dollar_street": 58, "fairness/geode": 40}
# Datasets with no TFDS copy readable here: webdataset only, or TFDS needing TensorFlow to open.
NO_TFDS = {"imagenet-o", "objectnet", "fgvc_aircraft", "gtsrb", "country211", "renderedsst2", "fer2013",
           "voc2007", "flickr30k", "flickr8k", "wilds/iwildcam", "wilds/camelyon17", "wilds/fmow",
           "fairness/dollar_street", "fairness/geode", "misc/winogavil", "mscoco_captions"}
# The header of mlfoundations/open_clip docs/openclip_results.csv, as published.
OPENCLIP_HEADER = (
    "name,pretrained,Average perf. on 38 datasets,ImageNet 1k,Caltech-101,CIFAR-10,CIFAR-100,CLEVR Counts,"
    "CLEVR Distance,Country211,Describable Textures,EuroSAT,FGVC Aircraft,Food-101,GTSRB,ImageNet Sketch,"
    "ImageNet v2,ImageNet-A,ImageNet-O,ImageNet-R,KITTI Vehicle Distance,MNIST,ObjectNet,Oxford Flowers-102,"
    "Oxford-IIIT Pet,Pascal VOC 2007,PatchCamelyon,Rendered SST2,RESISC45,Stanford Cars,STL-10,SUN397,SVHN,"
    "Flickr,MSCOCO,WinoGAViL,iWildCam,Camelyon17,FMoW,Dollar Street,GeoDE")
NUM_MOCK = 40  # enough that ImageNet-A / R (200 of the 1000 classes) get records


@contextlib.contextmanager
def _mock_tfds(num_examples=NUM_MOCK):
    init = functools.partialmethod(mocking.RandomFakeGenerator.__init__, constant_dynamic_shape=True)
    with mock.patch.object(mocking.RandomFakeGenerator, "__init__", init), \
            tfds.testing.mock_data(num_examples=num_examples):
        yield


class CountingEmbedder:
    """An embedder that counts its image passes and can stop the run after `stop_after` of them."""

    def __init__(self, embedder, stop_after=None):
        self.embedder, self.stop_after, self.image_calls = embedder, stop_after, 0

    def embed_images(self, data):
        if self.stop_after is not None and self.image_calls >= self.stop_after:
            raise KeyboardInterrupt("stopped")
        self.image_calls += 1
        return self.embedder.embed_images(data)

    def __getattr__(self, name):
        return getattr(self.embedder, name)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    """A tiny CLIP trained 4 steps whose config evaluates the voc2007 suite and two vtab+ sets
    (the "suite" evaluator inside training; its metrics land in metrics.jsonl)."""
    workdir = str(tmp_path_factory.mktemp("suite") / "wd")
    config = tiny_config(shapes, "clip", steps=4, batch=8)
    config.evals = {"voc": dict(type="suite", data=dict(suite="voc2007", max_examples=16)),
                    "vtab": dict(type="suite", data=dict(suite="vtab+", datasets=["mnist", "objectnet"],
                                                         max_examples=16))}
    with _mock_tfds():
        train.Trainer(config, workdir, devices=jax.devices()[:1]).fit()
    return workdir


@pytest.fixture(scope="module")
def embedder(trained):
    from vljax import sharding
    from vljax.embedder import Embedder
    return Embedder.from_bundle(factory.load(trained), mesh=sharding.make_mesh([("data", -1)]), batch_size=8)


@pytest.fixture(scope="module")
def suite_runs(embedder, trained, tmp_path_factory):
    """Every suite run once on mock data into one results directory. Templates are cut to the
    first of each set (ImageNet's 80 x 1000 prompts would take this CPU most of the test budget;
    the tables themselves are checked in full by test_tables_hold_the_published_counts)."""
    out = str(tmp_path_factory.mktemp("results"))
    first = tables.templates
    with mock.patch.object(tables, "templates", lambda key: first(key)[:1]), _mock_tfds():
        reports = {name: runner.run_suite(embedder, name, out_dir=out, model=trained, pretrained="tiny",
                                          data_dir=str(tmp_path_factory.mktemp("data")))
                   for name in SUITES}
    return out, reports


def test_tables_hold_the_published_counts():
    counts = {"imagenet1k": 1000, "flowers": 102, "pets": 37, "caltech101_vtab": 102, "gtsrb": 43,
              "country211": 211, "eurosat": 10, "fer2013": 7, "mnist": 10, "svhn": 10, "pcam": 2,
              "dmlab": 6, "diabetic_retinopathy": 5, "clevr_count_all": 8, "clevr_closest_object_distance": 6,
              "kitti_closest_vehicle_distance": 4}
    assert {k: len(tables.class_names(k)) for k in counts} == counts
    names = tables.class_names("imagenet1k")
    assert (names[0], names[-1]) == ("tench", "toilet paper")  # OpenAI's list, in WordNet-id order
    assert {k: len(tables.imagenet_subset(k)) for k in ("imagenet-a", "imagenet-r", "imagenet-o")} == \
        dict.fromkeys(("imagenet-a", "imagenet-r", "imagenet-o"), 200)
    templates = {"imagenet1k": 80, "cifar10": 18, "cifar100": 18, "caltech101": 34, "cars": 8, "dtd": 8,
                 "sun397": 2, "fer2013": 6, "svhn": 6, "resisc45": 4, "food101": 1, "pets": 1}
    assert {k: len(tables.templates(k)) for k in templates} == templates
    for key in tables.template_keys():  # every template has vljax's one "{}" slot
        assert all(t.count("{}") == 1 and "{c}" not in t for t in tables.templates(key)), key
    assert len(SUITES["vtab+"]) == 36 and len(SUITES["datacomp"]) == 38
    assert [DATASETS[n].title for n in SUITES["datacomp"]] == OPENCLIP_HEADER.split(",")[3:]


def test_every_tfds_dataset_of_every_suite_runs_on_mock_data(suite_runs):
    out, reports = suite_runs
    done = {d.name for r in reports.values() for d, m, _ in r.rows if m is not None}
    everything = {n for names in SUITES.values() for n in names}
    assert done == everything - NO_TFDS
    for name in done:
        with open(writers.result_path(out, DATASETS[name])) as f:
            record = json.load(f)
        assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
        assert record["dataset"] == name and record["pretrained"] == "tiny" and record["language"] == "en"
        keys = {"zeroshot_classification": {"acc1", "acc5", "mean_per_class_recall", "F1-macro_all"},
                "multilabel": {"mean_average_precision"}}[record["task"]]
        assert set(record["metrics"]) == keys, name


def test_class_counts_of_the_tfds_copies_are_datacomps():
    first = tables.templates
    with mock.patch.object(tables, "templates", lambda key: first(key)[:1]), _mock_tfds():
        built = {name: entries.evaluator(DATASETS[name]) for name in DATACOMP_NUM_CLASSES if name not in NO_TFDS}
    assert {n: len(e.class_names) for n, e in built.items()} == \
        {n: c for n, c in DATACOMP_NUM_CLASSES.items() if n in built}
    # TFDS's names cleaned as CLIP_benchmark cleans its copies' (SUN397: "/a/apartment_building/outdoor").
    assert built["sun397"].class_names[:2] == ["abbey", "airplane cabin"]
    assert "apartment building outdoor" in built["sun397"].class_names
    assert built["food101"].class_names[0] == "apple pie"
    assert built["vtab/eurosat"].class_names[0] == "annual crop land"  # CLIP_benchmark's table


def test_a_missing_dataset_is_named_with_its_prepare_command(suite_runs):
    _, reports = suite_runs
    missing = reports["datacomp"].missing
    assert set(missing) == NO_TFDS & set(SUITES["datacomp"])
    assert "huggingface-cli download --repo-type dataset clip-benchmark/wds_objectnet" in missing["objectnet"]
    assert "djghosh/wds_wilds-fmow_test" in missing["wilds/fmow"]
    assert "tfds build coco_captions" in missing["mscoco_captions"]
    assert "DataComp's evaluate.py" in missing["misc/winogavil"]
    assert "objectnet" in reports["imagenet"].table and "missing: objectnet" in reports["imagenet"].table


def test_results_are_a_clip_benchmark_table_and_an_openclip_csv_row(suite_runs, trained):
    out, reports = suite_runs
    with open(os.path.join(out, "datacomp.csv")) as f:
        header, row = list(csv.reader(f))
    assert ",".join(header) == OPENCLIP_HEADER
    values = dict(zip(header, row))
    assert values["name"] == trained and values["Average perf. on 38 datasets"] == ""  # 16 of 38 missing
    cifar = json.load(open(writers.result_path(out, DATASETS["cifar10"])))["metrics"]
    assert values["CIFAR-10"] == f"{cifar['acc1']:.4f}"
    pets = json.load(open(writers.result_path(out, DATASETS["vtab/pets"])))["metrics"]
    assert values["Oxford-IIIT Pet"] == f"{pets['mean_per_class_recall']:.4f}"  # DataComp's main metric
    assert values["MSCOCO"] == "" and values["ObjectNet"] == ""
    with open(os.path.join(out, "vtab+.md")) as f:
        assert f.read() == reports["vtab+"].table
    assert math.isnan(json.load(open(writers.result_path(out, DATASETS["vtab/pcam"])))["metrics"]["acc5"])


def test_a_stopped_suite_resumes_where_it_stopped(embedder, trained, tmp_path):
    first = tables.templates
    data_dir = str(tmp_path / "data")
    with mock.patch.object(tables, "templates", lambda key: first(key)[:1]), _mock_tfds(16):
        stopping = CountingEmbedder(embedder, stop_after=3)
        with pytest.raises(KeyboardInterrupt):
            runner.run_suite(stopping, "imagenet", out_dir=str(tmp_path), model=trained, data_dir=data_dir)
        written = sorted(f for f in os.listdir(tmp_path) if f.endswith(".json"))
        assert written == ["imagenet1k_zeroshot_classification.json", "imagenet_sketch_zeroshot_classification.json",
                           "imagenetv2_zeroshot_classification.json"]
        stored = {f: json.load(open(tmp_path / f)) for f in written}
        counting = CountingEmbedder(embedder)
        report = runner.run_suite(counting, "imagenet", out_dir=str(tmp_path), model=trained, data_dir=data_dir)
    assert report.computed == ["imagenet-a", "imagenet-r"] and counting.image_calls == 2
    assert {f: json.load(open(tmp_path / f)) for f in written} == stored  # not recomputed
    with pytest.raises(ValueError, match="holds results of model"):
        runner.run_suite(embedder, "imagenet", out_dir=str(tmp_path), model="another", data_dir=data_dir)


def test_webdataset_directories_give_the_agreed_source_entries(tmp_path):
    for name in ("wds_imagenet1k", "wds_mscoco_captions", "wds_vtab-cifar100"):
        os.makedirs(tmp_path / name / "test")
    d = str(tmp_path)
    assert entries.entry(DATASETS["imagenet1k"], d) == dict(
        source="webdataset", urls=f"{d}/wds_imagenet1k/test/*.tar", image_key="webp;png;jpg;jpeg",
        label_key="cls", class_names=f"{d}/wds_imagenet1k/classnames.txt")
    assert entries.entry(DATASETS["vtab/cifar100"], d)["urls"] == f"{d}/wds_vtab-cifar100/test/*.tar"
    assert entries.entry(DATASETS["mscoco_captions"], d) == dict(
        source="webdataset", urls=f"{d}/wds_mscoco_captions/test/*.tar", image_key="webp;png;jpg;jpeg",
        caption_key="txt", caption_lines=True)
    assert entries.entry(DATASETS["vtab/pets"], d)["source"] == "tfds"  # no wds_vtab-pets: TFDS
    with pytest.raises(entries.NotPrepared, match=r"vtab/cifar100: .*wds_vtab-cifar100 cannot be read .*"
                                                  r"clip-benchmark/wds_vtab-cifar100"):
        entries.evaluator(DATASETS["vtab/cifar100"], d)  # a directory without shards: not prepared
    with pytest.raises(entries.NotPrepared, match="clip-benchmark/wds_flickr30k"):
        entries.entry(DATASETS["flickr30k"], d)


def test_clip_benchmark_webdataset_directories_run_through_the_webdataset_kind(embedder, trained, tmp_path):
    """A CLIP_benchmark-layout copy (`wds_<name>/test/*.tar` with KEY.cls or KEY.txt captions one a
    line, and classnames.txt) is read by the "webdataset" source kind and scores exactly as the
    same records read from a JSONL manifest with the same class names."""
    records = web_shards.shapes_records(n_per=1)
    root = tmp_path / "data"
    web_shards.write_shards(str(root / "wds_cifar10" / "test"), records, 3)
    (root / "wds_cifar10" / "classnames.txt").write_text("\n".join(SHAPES) + "\n")
    web_shards.write_shards(str(root / "wds_flickr8k" / "test"), records, 4, cls=False)
    manifest = web_shards.write_manifest(str(tmp_path / "jsonl"), records)
    jsonl = dict(source="jsonl", path=manifest, class_names=list(SHAPES))
    for name in ("cifar10", "flickr8k"):
        dataset = DATASETS[name]
        assert entries.entry(dataset, str(root))["source"] == "webdataset"
        got = scores.compute(name, entries.evaluator(dataset, str(root), None), embedder)
        with mock.patch.object(entries, "entry", lambda d, data_dir: jsonl):
            want = scores.compute(name, entries.evaluator(dataset, None, None), embedder)
        assert got.keys() == want.keys() and len(got) >= 3, got
        for k in got:
            assert got[k] == pytest.approx(want[k], abs=1e-6, nan_ok=True), k


def test_retrieval_metrics_are_clip_benchmarks_names_of_vljax_recalls(embedder, shapes, tmp_path, trained):
    jsonl = dict(source="jsonl", path=shapes)
    with mock.patch.object(entries, "entry", lambda dataset, data_dir: jsonl):
        report = runner.run_suite(embedder, "retrieval", out_dir=str(tmp_path), model=trained)
    got = json.load(open(writers.result_path(str(tmp_path), DATASETS["flickr30k"])))["metrics"]
    source = entries.data_lib.open_entry("flickr30k", jsonl)
    direct = RetrievalEvaluator(source, [source.captions_of(i) for i in range(len(source))],
                                name="x").run(embedder)
    for k in (1, 5, 10):
        assert got[f"image_retrieval_recall@{k}"] == direct[f"retrieval/x/t2i_r{k}"]
        assert got[f"text_retrieval_recall@{k}"] == direct[f"retrieval/x/i2t_r{k}"]
    assert got["mean_recall@1"] == (direct["retrieval/x/t2i_r1"] + direct["retrieval/x/i2t_r1"]) / 2
    assert report.computed == ["mscoco_captions", "flickr30k", "flickr8k"]


def test_macro_f1_is_sklearns_over_the_classes_seen():
    # true: 0 0 1 1 2; predicted: 0 1 1 1 0; class 3 never seen (left out, as f1_score(average="macro")).
    cm = np.zeros((4, 4), np.int64)
    np.add.at(cm, ([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]), 1)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 0.0]  # 2 TP / (true + predicted) per class
    assert scores.macro_f1(cm) == pytest.approx(np.mean(f1), abs=1e-12)


def test_the_suite_evaluator_runs_inside_training_and_equals_the_runner(trained, tmp_path):
    logged = [r for r in metrics.read_metrics(os.path.join(trained, "metrics.jsonl"))
              if "suite/voc2007/average" in r][-1]
    assert "suite/vtab+/objectnet/acc1" not in logged  # not prepared: left out, logged
    with _mock_tfds():
        report = evaluate.run_suite(factory.load(trained), "voc2007", out_dir=str(tmp_path), model=trained,
                                    max_examples=16, batch_size=8)
    voc = report.rows[0][1]
    assert logged["suite/voc2007/voc2007_multilabel/mean_average_precision"] == \
        pytest.approx(voc["mean_average_precision"], abs=1e-6)
    assert logged["suite/voc2007/average"] == pytest.approx(voc["mean_average_precision"], abs=1e-6)
    assert "suite/vtab+/mnist/acc1" in logged and "suite/vtab+/mnist/mean_per_class_recall" in logged


def test_the_command_reports_unprepared_datasets_with_their_commands(trained, tmp_path):
    """`python -m vljax.evaluate --suite` on real (absent) data: exit 1, the table, one line per
    missing dataset naming how to prepare it, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--model={trained}", "--suite=voc2007",
                           f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "| voc2007_multilabel | multilabel | mean_average_precision |  | missing: " in proc.stdout
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("missing voc2007_multilabel: ")]
    assert len(line) == 1 and "tfds build voc/2007" in line[0] and "clip-benchmark/wds_voc2007_multilabel" in line[0]
    assert os.path.isfile(tmp_path / "out" / "voc2007.csv")


def test_the_config_check_refuses_a_typo_in_a_suite_entry():
    config_check.validate_evals({"s": dict(type="suite", data=dict(suite="imagenet", max_examples=8))})
    with pytest.raises(ValueError, match=r"evals\.s\.data\."):
        config_check.validate_evals({"s": dict(type="suite", data=dict(suit="imagenet"))})


def test_vtab_derived_labels_follow_task_adaptation():
    def objects(**fields):
        return {"objects": {k: np.asarray(v) for k, v in fields.items()}}
    assert labels.derived("clevr_count", objects(size=[0, 1, 0])) == 0  # 3 objects: class 0
    assert labels.derived("clevr_count", objects(size=[0] * 10)) == 7
    assert labels.derived("clevr_distance", objects(pixel_coords=[[1, 2, 9.7], [3, 4, 8.2]])) == 1  # (8, 8.5]
    car, pedestrian = 0, 3
    near, far = [0.0, 0.0, 5.0], [0.0, 0.0, 30.0]
    assert labels.derived("kitti_distance", objects(type=[pedestrian, car], location=[near, far])) == 2
    assert labels.derived("kitti_distance", objects(type=[pedestrian], location=[near])) == 3  # no vehicle
    assert labels.derived("kitti_distance", objects(type=[car, car], location=[near])) == -1  # fields disagree


def test_scaled_images_are_dsprites_times_255_under_their_own_cache_key(tmp_path):
    class Binary:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"id": "0", "image": np.array([[[0], [1]]], np.uint8), "label": 3}

        def cache_key(self):
            return "binary"

        def label_of(self, i, key=None):
            return 3
    view = views.ScaledImages(Binary(), 255)
    assert view[0]["image"].tolist() == [[[0], [255]]] and view.label_of(0) == 3
    assert view.cache_key() != "binary"
