"""Webdataset tar shards read in place (vljax/data/sources/webdataset.py) and the shard order of
sharded sources (vljax/data/shard_order.py): the same records as the JSONL source, an order that is
a permutation per epoch, process-local and process-count independent, exact resume, hostile shards
counted, and a training run from shards."""
import os
import shutil
import tarfile

import grain
import jax
import numpy as np
import pytest
import web_shards
from fake_gcs import fake_gcs
from helpers import SHAPES, losses_of, tiny_config
from test_data import CharTokenizer
from test_eval_sharded import SIZE, VALUE_RANGE, model_and_params

from vljax import checkpoints, config_check, sharding, train
from vljax.data import pipeline, shard_order, sources
from vljax.data.preprocess import SKIP_REASONS, Preprocess
from vljax.data.sources import shards, tar_index
from vljax.embedder import Embedder
from vljax.evaluators import RetrievalEvaluator, ZeroShotEvaluator

N_PER, PER_SHARD = 2, 5  # 24 records of shapes in shards of 5, 5, 5, 5, 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The shapes set as img2dataset-layout shards and as a JSONL manifest (same records)."""
    root = tmp_path_factory.mktemp("web")
    records = web_shards.shapes_records(N_PER)
    paths = web_shards.write_shards(root / "shards", records, PER_SHARD)
    manifest = web_shards.write_manifest(root / "jsonl", records)
    entry = dict(source="webdataset", urls=str(root / "shards" / "{00000..00004}.tar"),
                 caption_lines=True, label_key="cls", class_names=list(SHAPES), index_dir=str(root / "index"))
    return dict(entry=entry, manifest=manifest, paths=paths, root=root, n=len(records))


def _cfg(data, **kw):
    cfg = dict(data=data, batch_size=8, image_size=8, value_range=(0.0, 1.0),
               augment=dict(random_resized_crop=(0.8, 1.0)), num_workers=0, read_threads=2,
               keep_captions=True, label=True)
    cfg.update(kw)
    return cfg


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- the source ---------------------------------------------------------------------------------

def test_records_equal_the_jsonl_source(pair):
    web = sources.get_source(pair["entry"])
    ref = sources.get_source(dict(source="jsonl", path=pair["manifest"], class_names=list(SHAPES)))
    assert len(web) == len(ref) == pair["n"]
    assert web.shard_sizes == [5, 5, 5, 5, 4]
    for i in range(len(ref)):
        a, b = web[i], ref[i]
        with open(b["image"], "rb") as f:
            assert a["image"] == f.read()
        assert (a["captions"], a["label"], a["labels"]) == (b["captions"], b["label"], b["labels"])
        assert a["id"] == f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}"  # img2dataset's key
        assert web.captions_of(i) == b["captions"] and web.label_of(i) == b["label"]
    assert web.class_names_of() == list(SHAPES) and web.gives_label()
    # One caption a member by default; json:<field> reads the .json member.
    plain = sources.get_source({**pair["entry"], "caption_lines": False})
    assert plain[0]["captions"] == ["a red circle\ncircle, red"]
    as_json = sources.get_source({**pair["entry"], "caption_key": "json:caption"})
    assert as_json[0]["captions"] == ["a red circle"]


def test_the_index_is_cached_and_rebuilt_when_a_shard_changes(pair, tmp_path, monkeypatch):
    shutil.copytree(pair["root"] / "shards", tmp_path / "shards")
    entry = {**pair["entry"], "urls": str(tmp_path / "shards" / "*.tar"), "index_dir": str(tmp_path / "index")}
    first = sources.get_source(entry)
    assert len(list((tmp_path / "index").glob("*.npz"))) == 5

    def no_scan(*args):
        raise AssertionError("rescanned a cached shard")

    monkeypatch.setattr(tar_index.ShardIndex, "scan", no_scan)
    again = sources.get_source(entry)
    assert again.shard_sizes == first.shard_sizes and again.cache_key() == first.cache_key()
    os.utime(tmp_path / "shards" / "00000.tar", (1, 1))  # a changed shard (mtime) is rescanned, and keyed anew
    with pytest.raises(AssertionError, match="rescanned"):
        sources.get_source(entry)


def test_shards_and_index_on_gcs_are_read_through_epath(pair, tmp_path):
    shutil.copytree(pair["root"] / "shards", tmp_path / "bucket" / "shards")
    local = sources.get_source(pair["entry"])
    with fake_gcs(tmp_path) as touched:
        remote = sources.get_source({**pair["entry"], "urls": "gs://bucket/shards/{00000..00004}.tar",
                                     "index_dir": "gs://bucket/index"})
        assert remote.shard_sizes == local.shard_sizes
        for i in range(len(local)):
            assert remote[i] == local[i]
    assert len(list((tmp_path / "bucket" / "index").glob("*.npz"))) == 5
    assert any(t.startswith("gs://bucket/shards/00004.tar") for t in touched)


def test_training_batches_equal_jsonl_under_the_global_shuffle(pair, monkeypatch):
    """The same records in the same (global shuffle) order give the same batches as JSONL."""
    open_source = sources.get_source

    def unsharded(entry, **kw):
        src = open_source(entry, **kw)
        src.shard_sizes = None  # the global shuffle, as for any unsharded kind
        return src

    ref = _batches(pipeline.make_train_iterator(
        _cfg([dict(source="jsonl", path=pair["manifest"])]), CharTokenizer(), seed=3,
        process_index=0, process_count=1), 6)
    jsonl = dict(source="jsonl", path=pair["manifest"])
    # A mix of a sharded and an unsharded source takes the global shuffle as it is.
    mixed = [_batches(pipeline.make_train_iterator(_cfg(data), CharTokenizer(), seed=3, process_index=0,
                                                   process_count=1), 4)
             for data in ([pair["entry"], jsonl], [jsonl, jsonl])]
    _assert_batches_equal(*mixed)
    monkeypatch.setattr(pipeline.sources_lib, "get_source", unsharded)
    web = _batches(pipeline.make_train_iterator(_cfg([pair["entry"]]), CharTokenizer(), seed=3,
                                                process_index=0, process_count=1), 6)
    _assert_batches_equal(web, ref)


def test_a_missing_shard_and_bad_keys_are_named(pair):
    entry = {**pair["entry"], "urls": str(pair["root"] / "shards" / "{00000..00006}.tar")}
    with pytest.raises(FileNotFoundError, match=r"input.data.urls`: 2 of 7 shards .*00005.tar"):
        sources.get_source(entry)
    with pytest.raises(ValueError, match=r"`input.data\[1\].caption_key`: 'json:'"):
        sources.get_source({**pair["entry"], "caption_key": "txt;json:"}, where="input.data[1]")
    with pytest.raises(ValueError, match=r"`input.data.url`: unknown for source .webdataset."):
        sources.get_source({**pair["entry"], "url": "x"})


# --- the shard order ----------------------------------------------------------------------------

SIZES = [5, 3, 0, 7, 4, 6, 2, 5]  # an empty shard too


def _lane(lane, lanes=2, window=2, seed=0):
    n = sum(SIZES)
    return shard_order.LaneOrder(grain.MapDataset.range(n), SIZES, lane, lanes, window, seed)


def test_each_lane_epoch_is_a_permutation_of_its_shards_records():
    starts = np.cumsum([0] + SIZES)
    for lane in range(2):
        order = _lane(lane)
        mine = sorted(r for k in range(lane, len(SIZES), 2) for r in range(starts[k], starts[k + 1]))
        epochs = [[order[q] for q in range(e * len(mine), (e + 1) * len(mine))] for e in range(3)]
        assert all(sorted(ep) == mine for ep in epochs)
        assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    # window=1: each shard is read through before the next (records shuffled within the shard).
    one = _lane(0, window=1)
    shards = [one.shard_of(q) for q in range(sum(SIZES[0::2]))]
    runs = [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]
    assert sorted(runs) == [k for k in range(0, len(SIZES), 2) if SIZES[k]]


def test_lanes_must_divide_the_batch_and_be_whole_per_process(pair):
    with pytest.raises(ValueError, match=r"`input.shard_lanes`=3 does not divide input.batch_size=8"):
        shard_order.check_lanes(3, 8, 1)
    with pytest.raises(ValueError, match=r"`input.shard_lanes`=2 is not a multiple of the 4 processes"):
        shard_order.check_lanes(2, 8, 4)
    with pytest.raises(ValueError, match=r"`input.shard_lanes`=8: input.data\[0\] has no record in lane 5"):
        pipeline.make_train_dataset(_cfg([pair["entry"]], shard_lanes=8), CharTokenizer(), seed=0)
    config = tiny_config("unused.jsonl")
    config.input.data = [pair["entry"]]
    config.input.shard_lanes = 3
    with pytest.raises(ValueError, match=r"`input.shard_lanes`=3 does not divide input.batch_size=16"):
        config_check.validate(config)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """16 shards of 3 samples whose class ("cls") is the record index: batches name their records."""
    root = tmp_path_factory.mktemp("indexed")
    records = [(r[0], r[1], i) for i, r in enumerate(web_shards.shapes_records(N_PER * 2))][:48]
    web_shards.write_shards(root, records, 3)
    return dict(source="webdataset", urls=str(root / "*.tar"), label_key="cls", index_dir=str(root / "index"))


def test_processes_read_only_their_lanes_and_equal_one_process(indexed):
    cfg = _cfg([indexed], shard_lanes=4, shard_window=2)
    whole = _batches(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=1, process_index=0,
                                                  process_count=1), 9)
    halves = [_batches(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=1, process_index=p,
                                                    process_count=2), 9) for p in range(2)]
    for one, a, b in zip(whole, *halves):
        for key in ("image", "text", "label", "caption"):  # skipped/*: counts per process
            np.testing.assert_array_equal(one[key], np.concatenate([a[key], b[key]]), err_msg=key)
    for p, batches in enumerate(halves):
        shards = {int(label) // 3 for batch in batches for label in batch["label"]}
        assert shards == {k for k in range(16) if k % 4 in (2 * p, 2 * p + 1)}  # lanes 2p, 2p+1
    # 9 batches of 8 = 72 elements, each lane 18 of its 12 records: each record once per epoch.
    seen = np.concatenate([b["label"] for b in whole])
    first_epoch = [seen[i * 8 + r] for i in range(6) for r in range(8)]
    assert sorted(first_epoch) == list(range(48))


def test_default_lanes_do_not_depend_on_the_process_count(indexed):
    """No shard_lanes: 8 lanes (batch 8, 16 shards), the same global batches for 1 and 2 processes,
    each process reading only its own shards."""
    assert shard_order.default_lanes(8, [[3] * 16]) == 8
    assert shard_order.default_lanes(96, [[3] * 5, [2] * 40]) == 4  # fewest shards: 5
    assert shard_order.default_lanes(4096, [[1] * 1000]) == shard_order.MAX_DEFAULT_LANES
    cfg = _cfg([indexed], shard_window=2)
    whole = _batches(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=3, process_index=0,
                                                  process_count=1), 3)
    halves = [_batches(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=3, process_index=p,
                                                    process_count=2), 3) for p in range(2)]
    for one, a, b in zip(whole, *halves):
        np.testing.assert_array_equal(one["label"], np.concatenate([a["label"], b["label"]]))
    for p, batches in enumerate(halves):
        shards = {int(label) // 3 for batch in batches for label in batch["label"]}
        assert shards <= {k for k in range(16) if k % 8 in range(4 * p, 4 * p + 4)}


def test_resume_mid_epoch_gives_the_batches_that_followed(pair, indexed):
    mixed = [dict(pair["entry"], weight=1.0), dict(indexed, weight=2.0)]
    cfg = _cfg(mixed, shard_lanes=2, shard_window=3)
    it = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=7, process_index=0, process_count=1)
    _batches(it, 5)
    state = it.get_state()
    straight = _batches(it, 6)
    fresh = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=7, process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_batches_equal(_batches(fresh, 6), straight)


# --- hostile shards -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Two good shards, and one of each hostile kind; the expected skips per epoch by reason."""
    root = tmp_path_factory.mktemp("hostile")
    records = web_shards.shapes_records(1)
    good = [(f"g{i:04d}", web_shards.sample_members(r, cls=False)) for i, r in enumerate(records)]
    web_shards.write_tar(root / "00000.tar", good[:6])
    web_shards.write_tar(root / "00001.tar", good[6:])
    image, caps, _ = records[0]
    bad = [("random", {"png": np.random.default_rng(0).bytes(300), "txt": b"random bytes"}),
           ("empty", {"png": b"", "txt": b"a zero-byte image"}),
           ("nocap", {"png": image}),
           ("noimg", {"txt": b"no image member"}),
           ("blank", {"png": image, "txt": b"   "}),
           ("ok", {"png": image, "txt": caps[0].encode()})]
    web_shards.write_tar(root / "00002.tar", bad)
    # A tar cut inside the image of its third sample: two samples complete, the third counted.
    cut = web_shards.write_tar(root / "00003.tar", good[:3])
    with tarfile.open(cut) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("g0002.png")][0]
    with open(cut, "r+b") as f:
        f.truncate(third.offset_data + 100)
    # Garbage after two samples in place of the end-of-archive blocks: the two are kept.
    damaged = web_shards.write_tar(root / "00004.tar", good[:2])
    with tarfile.open(damaged) as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    with open(damaged, "r+b") as f:
        f.truncate(end)
        f.write(np.random.default_rng(1).bytes(700))
    expected = dict(missing_file=1, decode_error=2, empty_caption=2, read_error=1)
    return dict(source="webdataset", urls=str(root / "{00000..00004}.tar"),
                index_dir=str(root / "index")), expected


def test_hostile_shards_are_counted_and_the_run_goes_on(hostile):
    entry, expected = hostile
    src = sources.get_source(entry)
    assert src.shard_sizes[:3] == [6, 6, 6] and src.shard_sizes[3] == 3
    prep = Preprocess(image_size=8, value_range=(0.0, 1.0))
    reasons = [prep.eval(src[i]).get("skip") for i in range(len(src))]
    assert {r: reasons.count(r) for r in SKIP_REASONS} == expected
    n, bad = len(src), sum(expected.values())
    it = pipeline.make_train_iterator(_cfg([entry], label=False, shard_lanes=1), CharTokenizer(),
                                      seed=0, process_index=0, process_count=1)
    batches = _batches(it, 10)
    consumed = 10 * 8 + sum(it.skipped.values())
    assert all(b["image"].shape == (8, 8, 8, 3) for b in batches)
    for reason, per_epoch in expected.items():  # one lane: whole epochs back to back
        assert per_epoch * (consumed // n) <= it.skipped[reason] <= per_epoch * -(-consumed // n)
    assert sum(it.skipped.values()) >= bad


def test_the_fast_header_reader_equals_tarfile(hostile, tmp_path):
    entry, _ = hostile
    samples = [(f"g{i}", web_shards.sample_members(r)) for i, r in enumerate(web_shards.shapes_records(1)[:3])]
    gnu = web_shards.write_tar(tmp_path / "gnu.tar", samples, format=tarfile.GNU_FORMAT)
    v7 = web_shards.write_tar(tmp_path / "ustar.tar", samples, format=tarfile.USTAR_FORMAT)
    def members(read, path):
        out = []
        with open(path, "rb") as f:
            try:
                out.extend(read(f))
            except tarfile.ReadError:  # tarfile's end of a cut tar ("unexpected end of data")
                pass
        return out

    for path in [*shards.expand(entry["urls"])[:4], gnu, v7]:
        assert members(tar_index._ustar_members, path) == members(tar_index._tarfile_members, path), path
    # A damaged header (the garbage after shard 00004's members) and names over 100 characters
    # (pax headers) are left to tarfile.
    with open(shards.expand(entry["urls"])[4], "rb") as f, pytest.raises(tar_index._NeedTarfile):
        list(tar_index._ustar_members(f))
    deep = "d" * 120
    pax = web_shards.write_tar(tmp_path / "pax.tar", [(f"{deep}/k{i}", {"png": b"x", "txt": b"y"}) for i in range(2)])
    with open(pax, "rb") as f, pytest.raises(tar_index._NeedTarfile):
        list(tar_index._ustar_members(f))
    index = tar_index.ShardIndex.scan(pax, os.path.getsize(pax))
    assert [k.decode() for k in index.keys] == [f"{deep}/k0", f"{deep}/k1"] and index.exts == ["png", "txt"]


# --- training from shards -----------------------------------------------------------------------

@pytest.mark.slow  # 70 s (three tiny runs); the iterator's exact resume is tested above, the
# trainer's resume from an iterator state by tests/test_train.py::test_resume_equals_uninterrupted
def test_training_from_shards_resumes_exactly(pair, tmp_path, monkeypatch):
    """The trainer on a webdataset entry; preempted mid-epoch and resumed = uninterrupted."""
    config = tiny_config("unused.jsonl", "clip", steps=6, batch=8)
    config.input.data = [pair["entry"]]
    config.input.shard_lanes = 2
    config_check.validate(config)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    original = checkpoints.PreemptionGuard.reached
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", lambda self, step: step == 2)
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config, workdir)
    assert len(losses_of(workdir)) == 2
    monkeypatch.setattr(checkpoints.PreemptionGuard, "reached", original)
    resumed = train.train_and_evaluate(config, workdir)
    assert losses_of(workdir) == losses_of(tmp_path / "straight")
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zeroshot_and_retrieval_equal_on_webdataset_and_jsonl(pair):
    """CLIP_benchmark's layout: classes in .cls with class_names, captions one a line in .txt."""
    model, params, tok = model_and_params()
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    embedder = Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE,
                        batch_size=8, progress=False)
    jsonl = dict(source="jsonl", path=pair["manifest"], class_names=list(SHAPES))
    metrics = {}
    for kind, data in (("webdataset", pair["entry"]), ("jsonl", jsonl)):
        zs = ZeroShotEvaluator.from_config("t", dict(data=data, templates="name"))
        ret = RetrievalEvaluator.from_config("t", dict(data=data))
        assert zs.class_names == list(SHAPES) and len(ret.data) == pair["n"]
        metrics[kind] = {**zs.run(embedder), **ret.run(embedder)}
    assert metrics["webdataset"].keys() == metrics["jsonl"].keys()
    for key, value in metrics["jsonl"].items():
        assert metrics["webdataset"][key] == pytest.approx(value, abs=1e-6), key
