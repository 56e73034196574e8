"""Label sets (multi-hot tags) from the data to the batch: TFDS `Sequence(ClassLabel)` features
(`labels_key`) and JSONL `labels` (`num_labels`), mapped into one label space (the union of the
sources' label names), through the image pipeline and the LiT stored-features pipeline alike."""
import json

import numpy as np
import pytest
from test_data import CharTokenizer, _config, _folder, _tiny_spec

from vljax.data import pipeline, sources, tfds_writer


@pytest.fixture
def tiny_tfds(tmp_path):
    tfds_writer.write_tfds(_tiny_spec(), tmp_path)  # tags {k % 2, 2} over names ["x", "y", "z"]
    return tmp_path


def _manifest(tmp_path, lines):
    root = _folder(tmp_path, 4)
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"image": str(root / f"{k:03d}.png"), **x})
                              for k, x in enumerate(lines)) + "\n")
    return path


def test_tfds_label_sets_are_the_sequence_classlabel_feature(tiny_tfds):
    src = sources.TfdsSource("vljax_tiny", "train", data_dir=tiny_tfds, labels_key="tags")
    assert src.num_labels == 3 and src.label_names == ["x", "y", "z"]
    for i in range(len(src)):
        k = int(src[i]["id"][4:])
        assert sorted(src[i]["labels"]) == sorted({k % 2, 2})
    assert sources.TfdsSource("vljax_tiny", "train", data_dir=tiny_tfds)[0]["labels"] == []
    with pytest.raises(ValueError, match="labels_key='label'.*ClassLabel, not a Sequence"):
        sources.TfdsSource("vljax_tiny", "train", data_dir=tiny_tfds, labels_key="label")


def test_jsonl_label_sets_and_their_errors(tmp_path):
    path = _manifest(tmp_path, [{"caption": "a", "labels": [0, 2]}, {"caption": "b"},
                                {"caption": "c", "labels": []}, {"caption": "d", "labels": [1]}])
    src = sources.JsonlSource(path, num_labels=3)
    assert [r["labels"] for r in src.records] == [[0, 2], [], [], [1]]
    assert src.num_labels == 3 and src.label_names == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"m\.jsonl:1: label 2 in 'labels' is outside \[0, 2\)"):
        sources.JsonlSource(path, num_labels=2)
    path.write_text(json.dumps({"image": "x.png", "caption": "a", "labels": "cat"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: 'labels' must be a list of integers"):
        sources.JsonlSource(path)
    path.write_text(json.dumps({"image": "x.png", "caption": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"num_labels=3: no record of JSONL manifest .*m\.jsonl has 'labels'"):
        sources.JsonlSource(path, num_labels=3)


MANIFEST_SETS = {"a": {"0", "2"}, "b": set(), "c": set(), "d": {"1"}}  # by caption "a 0", ...


def _expected_row(caption, space):
    """The multi-hot row of a record of the tiny TFDS set ("image k" / "thing k": tags {k % 2, 2}
    of ["x", "y", "z"]) or of the manifest."""
    kind, k = caption.split()
    names = {["x", "y"][int(k) % 2], "z"} if kind in ("image", "thing") else MANIFEST_SETS[kind]
    return [n in names for n in space]


def _mixed_config(tiny_tfds, manifest, **kw):
    data = [dict(source="tfds", name="vljax_tiny", split="train", data_dir=str(tiny_tfds), labels_key="tags"),
            dict(source="jsonl", path=str(manifest), num_labels=3)]
    return _config(data, labels=True, batch_size=4, **kw)


def test_batches_carry_multi_hot_label_sets_over_the_union_of_names(tiny_tfds, tmp_path):
    manifest = _manifest(tmp_path, [{"caption": "a 0", "labels": [0, 2]}, {"caption": "b 1"},
                                    {"caption": "c 2", "labels": []}, {"caption": "d 3", "labels": [1]}])
    space = ["0", "1", "2", "x", "y", "z"]
    it = pipeline.make_train_iterator(_mixed_config(tiny_tfds, manifest), CharTokenizer(), seed=0,
                                      process_index=0, process_count=1)
    seen = set()
    for _ in range(6):
        b = next(it)
        assert b["labels"].shape == (4, 6) and b["labels"].dtype == bool
        for caption, row in zip(b["caption"], b["labels"]):
            assert row.tolist() == _expected_row(caption, space), caption
            seen.add(caption.split()[0])
    assert {"a", "d", "image"} <= seen  # both sources, labeled and not
    # A source without label sets is refused, naming its entry's key.
    cfg = _config([dict(source="tfds", name="vljax_tiny", split="train", data_dir=str(tiny_tfds))], labels=True)
    with pytest.raises(ValueError, match=r"`input.data\[0\].labels_key`"):
        pipeline.make_train_iterator(cfg, CharTokenizer(), seed=0, process_index=0, process_count=1)


class _FakeStore:
    """A feature store stand-in: record i's [1, 2] features are (i, -i)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"features": np.asarray([[i, -i]], np.float32)}


def test_stored_features_batches_carry_the_same_label_sets(tiny_tfds, tmp_path):
    """LiT with lit_cache: the records come with stored features instead of images; their label
    sets are the ones the image pipeline gives, in the same order."""
    manifest = _manifest(tmp_path, [{"caption": "a 0", "labels": [0, 2]}, {"caption": "b 1"},
                                    {"caption": "c 2", "labels": []}, {"caption": "d 3", "labels": [1]}])
    cfg = _mixed_config(tiny_tfds, manifest, augment=dict(random_resized_crop=None))
    n = [len(sources.get_source(e)) for e in cfg["data"]]
    images = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=1, process_index=0, process_count=1)
    stored = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=1, process_index=0, process_count=1,
                                          features=[_FakeStore(k) for k in n])
    for _ in range(4):
        a, b = next(images), next(stored)
        assert "image_features" in b and "image" not in b
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert a["caption"].tolist() == b["caption"].tolist()
    assert a["labels"].any()
