"""`source="parquet"`: img2dataset's parquet output and Hugging Face exports read in place give the
same records, training batches and evaluation metrics as a JSONL manifest of the same images;
hostile files are counted, never raised; a missing or non-parquet file is named."""
import json
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_gcs import fake_gcs
from helpers import SHAPES, _draw

from vljax.data import pipeline, sources, tfds_writer
from vljax.data.preprocess import SKIP_REASONS, Preprocess, count_skips
from vljax.evaluators import RetrievalEvaluator, ZeroShotEvaluator

COLOURS = ("red", "green", "blue", "yellow")
HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"}, "text": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
    "label": {"names": list(SHAPES), "_type": "ClassLabel"}}}}).encode()}


def _records(root, n=14):
    """n shape images as PNG files under root: (key, png bytes, label, two captions)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        si, colour = i % 3, COLOURS[(i // 3) % 4]
        png = tfds_writer.encode_png(_draw(SHAPES[si], colour, rng))
        (root / f"{i:03d}.png").write_bytes(png)
        out.append((f"{i:03d}", png, si, [f"a {colour} {SHAPES[si]}", f"{SHAPES[si]} number {i}"]))
    return out


def _img2dataset_table(recs):
    """img2dataset's layout (writer.py ParquetSampleWriter): key, jpg, caption, status; a failed
    download (jpg null, status not "success") after every third record."""
    rows = []
    for key, png, _, caps in recs:
        rows.append(dict(url=f"http://x/{key}", caption=caps[0], key=key, status="success",
                         error_message=None, width=32, height=32, jpg=png))
        if int(key) % 3 == 2:
            rows.append(dict(url=f"http://x/{key}f", caption="lost", key=f"{key}f", status="failed_to_download",
                             error_message="timeout", width=None, height=None, jpg=None))
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("jpg", pa.binary())])
    return pa.Table.from_pylist(rows, schema)


def _hf_table(recs):
    """A Hugging Face `datasets` export: image struct {bytes, path}, text list<string>, label ClassLabel."""
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("text", pa.list_(pa.string())), ("label", pa.int64())], metadata=HF_META)
    return pa.Table.from_pylist([dict(image=dict(bytes=png, path=f"{key}.png"), text=caps, label=si)
                                 for key, png, si, caps in recs], schema)


def _write(table, path, row_group_size=3):
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _jsonl(path, recs, one_caption):
    path.write_text("".join(json.dumps(dict(image=f"{key}.png", label=si,
                                            captions=caps[:1] if one_caption else caps)) + "\n"
                            for key, _, si, caps in recs))
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    recs = _records(root)
    first, rest = recs[:6], recs[6:]
    return {
        "img2dataset": dict(source="parquet", urls=str(root / "i2d" / "{00000..00001}.parquet")),
        "img2dataset_jsonl": dict(source="jsonl", path=_jsonl(root / "one.jsonl", recs, True)),
        "hf": dict(source="parquet", urls=[str(root / "hf" / "train-0000*-of-00002.parquet")],
                   label_key="label"),
        "hf_jsonl": dict(source="jsonl", path=_jsonl(root / "two.jsonl", recs, False),
                         class_names=list(SHAPES)),
        "recs": recs, "root": root,
        "files": [(root / "i2d").mkdir() or _write(_img2dataset_table(first), root / "i2d" / "00000.parquet"),
                  _write(_img2dataset_table(rest), root / "i2d" / "00001.parquet"),
                  (root / "hf").mkdir() or _write(_hf_table(first), root / "hf" / "train-00000-of-00002.parquet"),
                  _write(_hf_table(rest), root / "hf" / "train-00001-of-00002.parquet")],
    }


def _same_records(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        with open(rb["image"], "rb") as f:
            assert ra["image"] == f.read(), i
        assert (ra["captions"], ra["label"]) == (rb["captions"], rb["label"]), i


@pytest.mark.parametrize("layout", ["img2dataset", "hf"])
def test_parquet_records_equal_the_jsonl_records(sets, layout):
    src, ref = sources.get_source(sets[layout]), sources.get_source(sets[layout + "_jsonl"])
    if layout == "img2dataset":  # failed downloads are not records; labels are not read
        ref = [dict(ref[i], label=-1) for i in range(len(ref))]
        assert src[2]["id"] == "002" and src[3]["id"] == "003"
    else:
        assert src.class_names_of() == list(SHAPES)  # from the export's ClassLabel metadata
        assert src.gives_label() and src[0]["id"].endswith("train-00000-of-00002.parquet[row 0]")
    assert src.shard_sizes == [6, 8] and len(src) == 14
    _same_records(src, ref)
    _same_records(pickle.loads(pickle.dumps(src)), ref)  # as grain's worker processes get it
    other = sources.get_source(dict(sets[layout], image_key="nope;" + src.image_key))
    assert other.cache_key() == src.cache_key() != sources.get_source(sets[layout + "_jsonl"]).cache_key()


def test_image_paths_and_class_names_files(sets, tmp_path):
    """A Hugging Face Image struct without bytes gives its path (decoded by the preprocessing);
    `class_names` may be a file of one name a line."""
    key, png, si, caps = sets["recs"][4]
    table = pa.Table.from_pylist([dict(image=dict(bytes=None, path=str(sets["root"] / f"{key}.png")), text=caps,
                                       label=si)], _hf_table(sets["recs"][:1]).schema)
    (tmp_path / "names.txt").write_text("\n".join(["circle!", "square!", "triangle!"]) + "\n")
    src = sources.get_source(dict(source="parquet", urls=_write(table, tmp_path / "p.parquet"), label_key="label",
                                  class_names=str(tmp_path / "names.txt")))
    assert src[0]["image"] == str(sets["root"] / f"{key}.png") and src.class_names_of() == ["circle!", "square!", "triangle!"]
    ex = Preprocess(16, (0.0, 1.0)).eval(src[0])
    assert ex["image"].shape == (16, 16, 3) and ex["caption"] == caps[0]


def test_gs_urls_are_read_through_epath(sets):
    urls = "gs://hf/train-{00000..00001}-of-00002.parquet"
    local = sources.get_source(sets["hf"])
    with fake_gcs(sets["root"]) as touched:
        src = sources.get_source(dict(sets["hf"], urls=urls))
        records = [src[i] for i in range(len(src))]
    assert src.paths == ["gs://hf/train-00000-of-00002.parquet", "gs://hf/train-00001-of-00002.parquet"]
    assert set(touched) == set(src.paths) and src.shard_sizes == local.shard_sizes
    assert [(r["image"], r["captions"], r["label"]) for r in records] == [
        (r["image"], r["captions"], r["label"]) for r in map(local.__getitem__, range(len(local)))]


def _tok(texts):
    return np.array([[ord(c) for c in t[:12].ljust(12)] for t in texts], np.int32)


def test_training_batches_equal_the_jsonl_sources_under_the_global_shuffle(sets, monkeypatch):
    """The same records in the same (global shuffle) order give the same batches as JSONL (the
    shard order of sharded kinds is tested in tests/test_webdataset.py)."""
    open_source = sources.get_source

    def unsharded(entry, **kw):
        src = open_source(entry, **kw)
        src.shard_sizes = None  # the global shuffle, as for any unsharded kind
        return src
    monkeypatch.setattr(sources, "get_source", unsharded)
    batches = {}
    for kind in ("hf", "hf_jsonl"):
        cfg = dict(data=[sets[kind]], batch_size=4, image_size=16, value_range=(0.0, 1.0), num_workers=0,
                   augment=dict(random_resized_crop=(0.5, 1.0)), label=True)
        it = pipeline.make_train_iterator(cfg, _tok, seed=3, process_index=0, process_count=1)
        batches[kind] = [next(it) for _ in range(5)]  # 20 examples: more than an epoch of 14
    for a, b in zip(batches["hf"], batches["hf_jsonl"]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_hostile_files_are_counted_and_reading_goes_on(sets, tmp_path):
    recs, png = sets["recs"], sets["recs"][0][1]
    rows = [dict(image=dict(bytes=p, path=None), text=caps, label=si) for _, p, si, caps in recs[:9]]
    rows[1]["image"] = None                                           # a null image
    rows[2]["text"] = [""]                                            # an empty caption
    rows[3]["image"] = dict(bytes=np.random.default_rng(0).bytes(len(png)), path=None)  # random bytes
    path = _write(pa.Table.from_pylist(rows, _hf_table(recs[:1]).schema), tmp_path / "bad.parquet")
    col = pq.ParquetFile(path).metadata.row_group(2).column(0)  # rows 6..8: damage their images
    with open(path, "r+b") as f:
        f.seek(col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset)
        f.write(b"\xff" * col.total_compressed_size)
    src = sources.get_source(dict(source="parquet", urls=path, label_key="label"))
    assert src.shard_sizes == [9]
    counts = count_skips([ex for ex in map(Preprocess(16, (0.0, 1.0)).eval, (src[i] for i in range(9)))
                          if "skip" in ex])
    assert dict(zip(SKIP_REASONS, counts.tolist())) == {
        "missing_file": 1, "decode_error": 1, "empty_caption": 1, "read_error": 3}
    assert src[7]["detail"].startswith("row group 2:")
    # img2dataset: a row group whose `status` cannot be read keeps its rows (a failed download
    # among them comes back as a null image); the other row groups are still filtered.
    i2d = shutil.copy(sets["files"][0], tmp_path / "00000.parquet")  # rows 0 1 2 | 2f 3 4 | 5 5f
    meta = pq.ParquetFile(i2d).metadata
    status = next(meta.row_group(1).column(c) for c in range(meta.num_columns)
                  if meta.row_group(1).column(c).path_in_schema == "status")
    with open(i2d, "r+b") as f:
        f.seek(status.dictionary_page_offset if status.has_dictionary_page else status.data_page_offset)
        f.write(b"\xff" * status.total_compressed_size)
    src = sources.get_source(dict(source="parquet", urls=str(i2d)))
    assert src.shard_sizes == [7] and [src[i]["id"] for i in (2, 4, 6)] == ["002", "003", "005"]
    assert src[3]["error"] == "missing_file" and src[3]["id"] == "002f"
    cfg = dict(data=[dict(source="parquet", urls=path)], batch_size=3, image_size=16,
               value_range=(0.0, 1.0), num_workers=0, augment=dict(random_resized_crop=None))
    it = pipeline.make_train_iterator(cfg, _tok, seed=0, process_index=0, process_count=1)
    last = [next(it) for _ in range(6)][-1]  # 18 examples of the 3 good ones: several epochs
    assert last["image"].shape == (3, 16, 16, 3)
    assert last["skipped/read_error"] >= 3 and last["skipped/missing_file"] >= 1


def test_missing_and_non_parquet_files_and_columns_are_named(sets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"urls`: 1 of 3 shards do not exist; the first: .*00002.parquet"):
        sources.get_source(dict(sets["img2dataset"], urls=str(sets["root"] / "i2d" / "{00000..00002}.parquet")))
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"parquet file .*x.parquet cannot be read as parquet"):
        sources.get_source(dict(source="parquet", urls=[sets["files"][0], str(tmp_path / "x.parquet")]))
    with pytest.raises(ValueError, match=r"00000.parquet: no caption column among \['words'\]"):
        sources.get_source(dict(sets["img2dataset"], caption_key="words"))
    with pytest.raises(ValueError, match=r"00001.parquet has no column 'image' \(the first file, .*train-00000-of-00002.parquet, has it\)"):
        sources.get_source(dict(source="parquet", urls=[sets["files"][2], sets["files"][1]], label_key="label"))
    with pytest.raises(ValueError, match=r"`input.data.url`: unknown for source 'parquet'"):
        sources.get_source(dict(source="parquet", url="x"))


def test_evaluators_open_a_parquet_entry_as_they_open_jsonl(sets):
    """What an evaluator computes from its data (captions, labels, class texts, the eval batches'
    images) equals the JSONL entry's: the model side is the same code for every kind."""
    opened = {}
    for kind in ("hf", "hf_jsonl"):
        zs = ZeroShotEvaluator.from_config("t", dict(data=sets[kind], templates="name"))
        ret = RetrievalEvaluator.from_config("t", dict(data=sets[kind]))
        batches = list(pipeline.make_eval_batches(ret.data, batch_size=8, image_size=16, value_range=(0.0, 1.0),
                                                  tokenizer=_tok, process_index=0, process_count=1))
        opened[kind] = (zs.class_names, zs.labels.tolist(), zs.texts, ret.captions, batches)
    (names, labels, texts, captions, batches), ref = opened["hf"], opened["hf_jsonl"]
    assert (names, labels, texts, captions) == ref[:4] and names == list(SHAPES) and len(captions) == 14
    assert len(batches) == len(ref[4]) == 2
    for a, b in zip(batches, ref[4]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
