"""Data side: TFDS writing/reading without TensorFlow, decoding, sources, the grain pipeline.

Fast tests build tiny datasets from generated images in tmp_path. Tests marked slow read the real
demo datasets (`python3 -m vljax.data.build_demo`) and are skipped when those are not built.
"""
import io
import json
import re

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import helpers
from vljax.data import demo_emoji
from vljax.data import demo_openclipart
from vljax.data import pipeline
from vljax.data import sources
from vljax.data import tfds_writer
from vljax.data import transforms as T
from vljax.data.preprocess import SKIP_REASONS


class CharTokenizer:
    """Picklable stand-in for vljax.tokenizers (grain worker processes unpickle it)."""
    max_len = 12

    def __call__(self, texts):
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            ids = [ord(c) % 1000 + 1 for c in t][:self.max_len]
            out[i, :len(ids)] = ids
        return out


def _colour(k: int):
    return ((37 * k) % 256, (91 * k + 40) % 256, (53 * k + 100) % 256)


def _png(k: int, size=(20, 14)) -> bytes:
    return tfds_writer.encode_png(Image.new("RGB", size, _colour(k)))


def _folder(tmp_path, n: int, name="imgs"):
    """n solid-colour PNGs with one-line captions "image k"; returns the folder."""
    root = tmp_path / name
    root.mkdir()
    for k in range(n):
        (root / f"{k:03d}.png").write_bytes(_png(k))
        (root / f"{k:03d}.txt").write_text(f"image {k}\n")
    return root


def _config(data, **kw):
    cfg = dict(data=data, batch_size=4, image_size=8, value_range=(0.0, 1.0),
               augment=dict(random_resized_crop=(0.8, 1.0), greyscale=0.0),
               num_workers=0, read_threads=2, keep_captions=True)
    cfg.update(kw)
    return cfg


def _captions(it, n_batches):
    return [c for _ in range(n_batches) for c in next(it)["caption"]]


# --- TFDS writing and reading -------------------------------------------------------------------

def _tiny_spec(n=12):
    def examples(split):
        for k in range(n):
            if tfds_writer.split_of(f"item{k}", (("train", 0.5), ("test", 0.5))) == split:
                yield f"item{k}", {"id": f"item{k}", "image": _png(k, size=(5 + k, 9)),
                                   "captions": [f"image {k}", "" if k % 2 else f"thing {k}"],
                                   "label": k % 3, "tags": sorted({k % 2, 2})}
    return tfds_writer.DatasetSpec(
        name="vljax_tiny",
        features={"id": tfds.features.Text(), "image": tfds_writer.png_bytes_feature(),
                  "captions": tfds.features.Sequence(tfds.features.Text()),
                  "label": tfds.features.ClassLabel(names=["a_b", "c-d", "e"]),
                  "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=["x", "y", "z"]))},
        splits={s: (lambda s=s: examples(s)) for s in ("train", "test")},
        class_names={"label": ["a b", "c d", "e"]})


def test_tfds_round_trip_images_captions_labels(tmp_path):
    out = tfds_writer.write_tfds(_tiny_spec(), tmp_path)
    assert tfds_writer.is_built("vljax_tiny", tmp_path)
    seen = {}
    for split in ("train", "test"):
        ds = tfds.data_source("vljax_tiny", split=split, data_dir=str(tmp_path))
        for i in range(len(ds)):
            r = ds[i]
            k = int(r["id"].decode()[4:])
            img = T.decode_image(r["image"])
            assert img.size == (5 + k, 9)
            np.testing.assert_array_equal(np.asarray(img), np.full((9, 5 + k, 3), _colour(k)))
            assert [c.decode() for c in r["captions"]][0] == f"image {k}"
            assert r["label"] == k % 3 and sorted(int(t) for t in r["tags"]) == sorted({k % 2, 2})
            seen[k] = split
    assert sorted(seen) == list(range(12)) and set(seen.values()) == {"train", "test"}
    # Readable names come from the metadata (and class_names.json); raw ones from the ClassLabel.
    src = sources.TfdsSource("vljax_tiny", "train", data_dir=tmp_path, label_key="label")
    assert tfds_writer.read_class_names(src.info, "label") == ["a b", "c d", "e"]
    assert tfds_writer.read_class_names(src.info, "tags") == ["x", "y", "z"]
    assert json.loads((out / "class_names.json").read_text())["label"] == ["a b", "c d", "e"]
    rec = src[0]
    assert isinstance(rec["captions"][0], str) and rec["label"] == int(rec["id"][4:]) % 3


def test_tfds_source_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="vljax_nothing.*build_demo"):
        sources.TfdsSource("vljax_nothing", "train", data_dir=tmp_path)
    tfds_writer.write_tfds(_tiny_spec(), tmp_path)
    with pytest.raises(ValueError, match="no feature 'colour'"):
        sources.TfdsSource("vljax_tiny", "train", data_dir=tmp_path, label_key="colour")


def test_split_of_is_deterministic_and_roughly_proportional():
    splits = [tfds_writer.split_of(f"id{i}") for i in range(5000)]
    assert splits == [tfds_writer.split_of(f"id{i}") for i in range(5000)]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["val"] - 0.1) < 0.02


def test_emoji_builder_on_a_tiny_package(tmp_path):
    img_dir = tmp_path / "img" / "google" / "64"
    img_dir.mkdir(parents=True)
    entries = []
    for k in range(12):
        uid = f"1F{k:03X}"
        entry = {"name": f"CAT FACE {k}", "short_names": [f"cat_{k}"], "unified": uid,
                 "image": f"{uid.lower()}.png", "category": "Animals & Nature" if k % 2 else "Flags",
                 "subcategory": "animal-mammal" if k % 2 else "country-flag", "has_img_google": True}
        if k < 4:
            entry["skin_variations"] = {"1F3FB-1F3FF": {"unified": f"{uid}-1F3FB-1F3FF",
                                                        "image": f"{uid.lower()}-v.png"}}
            Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(img_dir / f"{uid.lower()}-v.png")
        Image.new("RGBA", (4, 4), (255, 0, 0, 255)).save(img_dir / entry["image"])
        entries.append(entry)
    (tmp_path / "emoji.json").write_text(json.dumps(entries))
    tfds_writer.write_tfds(demo_emoji.make_spec(tmp_path), tmp_path / "tfds")
    info = sources.TfdsSource("vljax_emoji", "train", tmp_path / "tfds").info
    split_of, n = {}, 0
    for split in info.splits:
        src = sources.TfdsSource("vljax_emoji", split, tmp_path / "tfds", label_key="subcategory")
        for i in range(len(src)):
            r, n = src[i], n + 1
            k = int(r["captions"][0].split(",")[0].split()[-1])
            assert split_of.setdefault(k, split) == split  # variants stay with their emoji
            pixel = T.decode_image(r["image"]).getpixel((0, 0))
            if r["id"].endswith("-1F3FB-1F3FF"):
                assert r["captions"][0] == f"cat face {k}, light and dark skin tones"
                assert pixel == (255, 255, 255)  # transparent -> white
            else:
                assert r["captions"] == [f"cat face {k}", f"emoji of cat face {k}", f"cat {k}"]
                assert pixel == (255, 0, 0)
            assert r["label"] == (0 if k % 2 else 1)  # sorted: animal-mammal, country-flag
    assert n == 16
    assert tfds_writer.read_class_names(info, "category") == ["animals and nature", "flags"]
    assert tfds_writer.read_class_names(info, "subcategory") == ["animal mammal", "country flag"]
    assert tfds_writer.read_class_names(info, "tags") == ["cat", "face"]  # numbers: < 8 emoji


def test_openclipart_svg_metadata(tmp_path):
    svg = tmp_path / "bat.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><metadata><rdf:RDF><cc:Work>'
        '<dc:title>Flying_bat</dc:title><dc:description>A bat  at night</dc:description>'
        '<dc:subject><rdf:Bag><rdf:li>Mammal</rdf:li><rdf:li>unsorted</rdf:li><rdf:li>bat</rdf:li>'
        '<rdf:li>mammal</rdf:li></rdf:Bag></dc:subject><dc:creator><cc:Agent><dc:title>someone'
        '</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata></svg>')
    title, desc, tags = demo_openclipart.svg_metadata(svg)
    assert (title, desc, tags) == ("Flying bat", "A bat at night", ["mammal", "bat"])
    assert demo_openclipart._captions(title, desc, tags) == [
        "Flying bat", "A bat at night", "Flying bat, mammal, bat"]
    (tmp_path / "broken.svg").write_text("<svg><metadata>")
    assert demo_openclipart.svg_metadata(tmp_path / "broken.svg") == ("", "", [])
    assert demo_openclipart.readable_path("signs_and_symbols/map-symbols") == "signs and symbols map symbols"


def test_openclipart_build_leaves_out_unusable_pngs_with_a_reason(tmp_path):
    # Debian's openclipart-png holds PNGs of 231M and 623M pixels: PIL refuses those at open
    # (over twice its limit); the build must leave them out, not stop (scripts/setup.sh did).
    from test_cli import png_claiming
    cases = {"bomb": png_claiming(20990, 29700), "large": png_claiming(8000, 6000), "junk": b"not a png"}
    for name, data in cases.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    reasons = {name: demo_openclipart._prepare(str(tmp_path / f"{name}.png")) for name in cases}
    assert "623403000 pixels" in reasons["bomb"] and "decode budget" in reasons["bomb"]
    assert reasons["large"] == "8000x6000 pixels, over the build's decode budget of 40,000,000"
    assert reasons["junk"] == "UnreadableImage: unknown image format"
    assert demo_openclipart._prepare(str(tmp_path / "missing.png")).startswith("FileNotFoundError")
    Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "ok.png")
    with Image.open(io.BytesIO(demo_openclipart._prepare(str(tmp_path / "ok.png")))) as img:
        assert img.size == (demo_openclipart.MAX_SIDE, demo_openclipart.MAX_SIDE * 2 // 3)


# --- decoding and transforms --------------------------------------------------------------------

def _roundtrip(img: Image.Image, fmt="PNG") -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = T.decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_rgba_and_la_composite_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red
    rgba[0, 1] = (255, 0, 0, 0)     # fully transparent red -> white
    rgba[0, 2] = (0, 0, 255, 128)   # half blue over white
    x = _roundtrip(Image.fromarray(rgba))
    assert tuple(x[0, 0]) == (255, 0, 0) and tuple(x[0, 1]) == (255, 255, 255)
    np.testing.assert_allclose(x[0, 2], (127, 127, 255), atol=1)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), mode="LA")
    assert _roundtrip(la).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_with_transparency_and_other_modes():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 200, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0      # palette index 0 transparent -> white
    assert _roundtrip(p).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    assert T.to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert T.to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert T.to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    i16 = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # I;16: scaled, not clipped
    assert np.asarray(T.to_rgb(i16))[0, :, 0].tolist() == [0, 128, 255]
    assert _roundtrip(Image.new("RGB", (3, 2), (1, 2, 3)), "JPEG").shape == (2, 3, 3)
    # Decoded arrays (TFDS Image features) too: grey [H, W, 1] and RGBA on white.
    assert np.asarray(T.decode_image(np.full((2, 2, 1), 9, np.uint8))).tolist() == [[[9] * 3] * 2] * 2
    assert T.decode_image(np.zeros((1, 1, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="uint8"):
        T.decode_image(np.zeros((2, 2, 3), np.float32))


def test_decode_errors_are_the_documented_types(tmp_path):
    with pytest.raises(FileNotFoundError):
        T.decode_image(str(tmp_path / "nope.png"))
    with pytest.raises(T.DECODE_ERRORS):
        T.decode_image(b"not an image at all")
    with pytest.raises(T.DECODE_ERRORS):
        T.decode_image(_png(3)[:40])  # truncated


def test_crops_value_ranges_and_caption_choice():
    img = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    assert T.resize_small_center_crop(img, 16).size == (16, 16)
    a = T.random_resized_crop(img, 16, np.random.default_rng(1), scale=(0.5, 1.0))
    b = T.random_resized_crop(img, 16, np.random.default_rng(1), scale=(0.5, 1.0))
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    x = np.array([[[0, 127, 255]]], np.uint8)
    np.testing.assert_allclose(T.normalize(x, (-1, 1)), [[[-1, -1 / 255, 1]]], atol=1e-6)
    np.testing.assert_allclose(T.normalize(x, "efficientnet"), [[[-127 / 128, 0, 1]]])
    assert T.normalize(x, "clip").dtype == np.float32
    with pytest.raises(ValueError, match="value_range"):
        T.normalize(x, "bogus")
    assert T.choose_caption(["", "  ", "b"], None) == "b" and T.choose_caption(["", " "], None) is None
    picks = {T.choose_caption(["a", "b", "c"], np.random.default_rng(s)) for s in range(30)}
    assert picks == {"a", "b", "c"}


# --- sources ------------------------------------------------------------------------------------

def test_folder_source(tmp_path):
    root = _folder(tmp_path, 3)
    (root / "sub").mkdir()
    (root / "sub" / "x.png").write_bytes(_png(9))
    (root / "sub" / "x.txt").write_text("first\n\nsecond\n")
    src = sources.FolderSource(root, label_from_folder=True)
    assert len(src) == 4 and src.class_names == [".", "sub"]
    assert src[3]["captions"] == ["first", "", "second"] and src[3]["label"] == 1
    (root / "sub" / "x.txt").unlink()
    assert src[3]["error"] == "missing_file"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        sources.FolderSource(tmp_path / "empty")


def test_jsonl_source_paths_and_errors(tmp_path):
    root = _folder(tmp_path, 2)
    lines = [{"image": "imgs/000.png", "captions": ["zero", "nil"], "label": 4},
             {"image": str(root / "001.png"), "caption": "one"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = sources.JsonlSource(manifest)
    assert len(src) == 2 and src[0]["image"] == str(root / "000.png")
    assert src[0]["captions"] == ["zero", "nil"] and src[0]["label"] == 4
    assert src[1]["captions"] == ["one"] and src[1]["label"] == -1
    manifest.write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        sources.JsonlSource(manifest)
    manifest.write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: needs 'captions'"):
        sources.JsonlSource(manifest)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        sources.JsonlSource(tmp_path / "missing.jsonl")


# --- training pipeline --------------------------------------------------------------------------

def test_batches_have_the_contract_shapes(tmp_path):
    root = _folder(tmp_path, 10)
    it = pipeline.make_train_iterator(_config([dict(source="folder", path=str(root))], label=True),
                                      CharTokenizer(), seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == (4, 12) and b["text"].dtype == np.int32
    assert b["label"].tolist() == [-1] * 4
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert "_skipped" not in b and it.skipped == dict.fromkeys(SKIP_REASONS, 0)
    assert {k: int(b[k]) for k in b if k.startswith("skipped/")} == {
        f"skipped/{r}": 0 for r in SKIP_REASONS}
    # batch_size is global: two processes get 2 each. Configs may be ConfigDicts.
    cfg = ml_collections.ConfigDict(_config([dict(source="folder", path=str(root))]))
    it2 = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=0, process_index=1,
                                       process_count=2)
    assert next(it2)["image"].shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        pipeline.make_train_iterator(_config([dict(source="folder", path=str(root))]),
                                     CharTokenizer(), seed=0, process_index=0, process_count=3)


def test_process_shards_partition_the_records(tmp_path):
    root = _folder(tmp_path, 16)
    cfg = _config([dict(source="folder", path=str(root))], batch_size=8)
    epochs = []
    for p in range(2):  # 8 records a process: 2 local batches of 4 are exactly one epoch
        it = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=3, process_index=p,
                                          process_count=2)
        epochs.append(_captions(it, 2))
    assert all(len(set(e)) == 8 for e in epochs)
    assert not set(epochs[0]) & set(epochs[1])
    assert set(epochs[0]) | set(epochs[1]) == {f"image {k}" for k in range(16)}


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    """Process p reads rows [p*b, (p+1)*b) of the one global stream: 2 processes = 1 process."""
    root = _folder(tmp_path, 24)
    cfg = _config([dict(source="folder", path=str(root))], batch_size=8)
    whole = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=5, process_index=0, process_count=1)
    halves = [pipeline.make_train_iterator(cfg, CharTokenizer(), seed=5, process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(4):
        one = next(whole)
        two = [next(h) for h in halves]
        np.testing.assert_array_equal(one["image"], np.concatenate([t["image"] for t in two]))
        assert list(one["caption"]) == list(two[0]["caption"]) + list(two[1]["caption"])


def test_seeds_fix_the_order_and_epochs_reshuffle(tmp_path):
    root = _folder(tmp_path, 16)
    cfg = _config([dict(source="folder", path=str(root))])

    def order(seed, n=8):
        return _captions(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=seed,
                                                      process_index=0, process_count=1), n)
    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    assert sorted(a[:16]) == sorted(a[16:])   # each epoch sees every record once ...
    assert a[:16] != a[16:]                   # ... in a new order


def test_mixture_follows_the_weights(tmp_path):
    a, b = _folder(tmp_path, 8, "a"), _folder(tmp_path, 8, "b")
    for k in range(8):
        (b / f"{k:03d}.txt").write_text(f"other {k}")
    cfg = _config([dict(source="folder", path=str(a), weight=3.0),
                   dict(source="folder", path=str(b), weight=1.0)], batch_size=8)
    caps = _captions(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=0, process_index=0,
                                                  process_count=1), 10)
    assert sum(c.startswith("image") for c in caps) == 60


def _bad_records_folder(tmp_path):
    """7 good records and one each: corrupt image, empty caption, missing caption file."""
    root = _folder(tmp_path, 10)
    (root / "007.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "008.txt").write_text("  \n\n")
    (root / "009.txt").unlink()
    return root


def test_bad_records_are_skipped_and_counted(tmp_path):
    root = _bad_records_folder(tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "imgs/nope.png", "caption": "gone"}) + "\n")
    it = pipeline.make_train_iterator(_config([dict(source="folder", path=str(root))], batch_size=7),
                                      CharTokenizer(), seed=0, process_index=0, process_count=1)
    for n in range(1, 5):  # each epoch has 7 good records: batch n ends inside epoch n
        batch = next(it)
        assert batch["image"].shape[0] == 7
        assert sorted(batch["caption"]) == [f"image {k}" for k in range(7)]
        for reason in ("decode_error", "empty_caption", "missing_file"):
            assert it.skipped[reason] in (n - 1, n)
            assert batch[f"skipped/{reason}"] == it.skipped[reason]  # cumulative, in the batch
    it = pipeline.make_train_iterator(_config([dict(source="jsonl", path=str(manifest)),
                                               dict(source="folder", path=str(root))]),
                                      CharTokenizer(), seed=0, process_index=0, process_count=1)
    _captions(it, 5)
    assert it.skipped["missing_file"] >= 8  # the manifest's one image is missing: half the mix


def _restore_check(cfg, n_before=3, n_after=3):
    it = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=5, process_index=0,
                                      process_count=1)
    for _ in range(n_before):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(n_after)]
    it.close()
    it2 = pipeline.make_train_iterator(cfg, CharTokenizer(), seed=5, process_index=0,
                                       process_count=1)
    it2.set_state(state)
    got = [next(it2) for _ in range(n_after)]
    it2.close()
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    assert it2.skipped == it.skipped
    return it


def test_state_restore_gives_the_same_following_batches(tmp_path):
    root = _bad_records_folder(tmp_path)
    cfg = _config([dict(source="folder", path=str(root))],
                  augment=dict(random_resized_crop=(0.5, 1.0), greyscale=0.5, colour_jitter=0.2))
    it = _restore_check(cfg)
    assert sum(it.skipped.values()) > 0


def test_state_restore_and_counts_with_worker_processes(tmp_path):
    # Spawns 2 x 2 worker processes that import the stack: 8 s here, up to 40 s on busy cores.
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    root = _bad_records_folder(tmp_path)
    cfg = _config([dict(source="folder", path=str(root))], num_workers=2, batch_size=7)
    it = _restore_check(cfg, n_before=4, n_after=2)
    # Counts travel inside the batches from the workers: 6 batches of 7 = 6 epochs of good records.
    for reason in ("decode_error", "empty_caption", "missing_file"):
        assert it.skipped[reason] in (5, 6)


# --- eval batches and sets ----------------------------------------------------------------------

def test_eval_batches_slice_and_mask(tmp_path):
    root = _bad_records_folder(tmp_path)
    data = dict(source="folder", path=str(root), label_from_folder=True)
    ev = pipeline.make_eval_batches(data, batch_size=4, image_size=8, tokenizer=CharTokenizer(),
                                    process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == len(ev) == 3
    assert [len(b["mask"]) for b in batches] == [4, 4, 2]  # the consumer pads the last batch
    assert batches[-1]["mask"].tolist() == [False, False]  # records 8, 9 are bad
    assert sum(int(b["mask"].sum()) for b in batches) == 7
    assert ev.skipped == {"missing_file": 1, "decode_error": 1, "empty_caption": 1, "read_error": 0}
    np.testing.assert_array_equal(batches[0]["image"], list(ev)[0]["image"])  # deterministic
    # Two processes: same number of batches each; process p reads rows [2p, 2p + 2) of every
    # global batch of 4, so their concatenation is the 10 records in order.
    per = [list(pipeline.make_eval_batches(data, batch_size=4, image_size=8, process_index=p,
                                           process_count=2)) for p in range(2)]
    assert len(per[0]) == len(per[1]) == 3
    order = np.concatenate([np.concatenate([per[p][j]["index"] for p in range(2)]) for j in range(3)])
    np.testing.assert_array_equal(order, np.arange(10))
    assert [len(b["index"]) for b in per[1]] == [2, 2, 0]
    # Without a tokenizer, a record whose caption is empty still counts as an image.
    assert sum(int(b["mask"].sum()) for p in per for b in p) == 8


def test_eval_batches_from_worker_processes_equal_threads(tmp_path):
    """eval_workers: the same batches, in order, and the same skip counts as threads in-process."""
    root = _bad_records_folder(tmp_path)
    data = dict(source="folder", path=str(root), label_from_folder=True)
    runs = {}
    for workers in (0, 2):
        ev = pipeline.make_eval_batches(data, batch_size=4, image_size=8, tokenizer=CharTokenizer(),
                                        workers=workers, process_index=0, process_count=1)
        runs[workers] = (list(ev), dict(ev.skipped))
    (threads, skipped), (procs, skipped_procs) = runs[0], runs[2]
    assert skipped_procs == skipped == {"missing_file": 1, "decode_error": 1, "empty_caption": 1, "read_error": 0}
    assert len(procs) == len(threads) == 3
    for a, b in zip(threads, procs):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_evaluators_read_metadata_of_a_tiny_tfds_set(tmp_path):
    from vljax.evaluators import FewShotEvaluator, MultilabelEvaluator, RetrievalEvaluator
    from vljax.evaluators import ZeroShotEvaluator, data as eval_data
    tfds_writer.write_tfds(_tiny_spec(), tmp_path)
    base = dict(name="vljax_tiny", split="train", data_dir=tmp_path)
    cls = ZeroShotEvaluator.from_config("t", dict(data=base, templates="name"))
    n = len(cls.labels)
    assert cls.class_names == ["a b", "c d", "e"]
    ids = [int(eval_data.field(cls.data, i, "id").decode()[4:]) for i in range(n)]
    assert cls.labels.tolist() == [k % 3 for k in ids]
    ret = RetrievalEvaluator.from_config("t", dict(data=base))
    # Odd records have an empty second caption; every record keeps its non-empty ones, in order.
    assert ret.captions == [[f"image {k}"] + ([] if k % 2 else [f"thing {k}"]) for k in ids]
    ml = MultilabelEvaluator.from_config("t", dict(data=base, templates="name"))
    assert ml.class_names == ["x", "y", "z"]
    assert ml.targets.tolist() == [[k % 2 == 0, k % 2 == 1, True] for k in ids]
    # Few-shot: at most per_class train records per class; the config alias `label` works.
    fs = FewShotEvaluator.from_config("t", dict(data=dict(name="vljax_tiny", label="label",
                                                          per_class=1, data_dir=tmp_path),
                                                shots=(1,), l2_regs=(1.0,)))
    assert sorted(fs.train_labels.tolist()) == sorted(set(cls.labels.tolist()))
    assert len(fs.test_data) == len(fs.test_labels) == 12 - n
    capped = ZeroShotEvaluator.from_config("t", dict(data=dict(base, max_examples=2), templates="name"))
    assert len(capped.data) == 2 and capped.labels.tolist() == cls.labels[:2].tolist()


# --- the real demo datasets (build them first) ---------------------------------------------------

def _need_demo(name):
    if not tfds_writer.is_built(name, sources.default_data_dir()):
        pytest.skip(f"{name} not built: python3 -m vljax.data.build_demo")


@pytest.mark.slow
def test_demo_fashion_mnist_classification_set():
    _need_demo("vljax_fashion_mnist")
    from vljax.evaluators import ZeroShotEvaluator
    ev = ZeroShotEvaluator.from_config("f", dict(data=dict(name="fashion_mnist", split="test",
                                                           max_examples=200)))
    assert len(ev.data) == len(ev.labels) == 200 and ev.class_names[9] == "ankle boot"
    assert set(ev.labels.tolist()) == set(range(10))
    batch = next(iter(pipeline.make_eval_batches(ev.data, batch_size=8, image_size=28,
                                                 value_range=(0, 1))))
    assert np.allclose(batch["image"][..., 0], batch["image"][..., 2])  # greyscale source


@pytest.mark.slow
def test_demo_emoji_variants_share_a_split_and_names_are_readable():
    _need_demo("vljax_emoji")
    base, n_variants = {}, 0
    for split in ("train", "val", "test"):
        src = sources.TfdsSource("vljax_emoji", split)
        names = [src[i]["captions"][0] for i in range(len(src))]
        n_variants += sum("skin tone" in c for c in names)
        base[split] = {re.sub(r", [a-z -]+ skin tones?$", "", c) for c in names}
    assert n_variants > 1000
    assert not base["train"] & base["test"] and not base["train"] & base["val"]
    from vljax.evaluators import ZeroShotEvaluator
    ev = ZeroShotEvaluator.from_config("e", dict(data=dict(name="emoji", split="test",
                                                           label="subcategory", max_examples=50)))
    assert "animal mammal" in ev.class_names and len(ev.class_names) == 99


def test_grey_view_is_the_centre_crop_made_grey(tmp_path):
    """The stored LiT features' grey view (make_eval_batches(greyscale=True)) is the eval crop made
    grey, as the training augmentation greys its crop: greying before resizing differs."""
    manifest = helpers.make_shapes_manifest(str(tmp_path / "shapes"), n_per=1)
    first = json.loads(open(manifest).readline())
    batch = next(iter(pipeline.make_eval_batches(dict(source="jsonl", path=manifest), batch_size=4,
                                                 image_size=24, value_range=(-1.0, 1.0), greyscale=True)))
    img = Image.open(tmp_path / "shapes" / first["image"]).convert("RGB")
    want = T.normalize(T.resize_small_center_crop(img, 24).convert("L").convert("RGB"), (-1.0, 1.0))
    np.testing.assert_array_equal(batch["image"][0], want)
