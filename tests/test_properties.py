"""Property-based tests (hypothesis) of the parts that take untrusted input: tokenizers (any text),
the JSONL manifest parser (any line), image decoding (any bytes)."""
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from vljax.data import sources
from vljax.data import transforms as T
from vljax.data.preprocess import SKIP_REASONS, Preprocess
from vljax.tokenizers import get_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any unicode: every plane and category, surrogates excluded (a Python str from a file or a web
# page cannot hold lone surrogates after decoding).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module", params=["clip", "bert"])
def tokenizers(request):
    return {n: get_tokenizer(request.param, max_len=n) for n in (2, 5, 16)}


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=4), max_len=st.sampled_from([2, 5, 16]))
def test_tokenizer_any_text_gives_ids_of_the_right_shape_ending_in_eot(tokenizers, texts, max_len):
    tok = tokenizers[max_len]
    ids = tok(texts)
    assert ids.shape == (len(texts), max_len) and ids.dtype == np.int32
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    for row in ids:
        # Start and end-of-text survive any text and any truncation; only padding follows the end
        # (CLIP pads with 0, which is also the id of "!": the end is the last eot, not the first pad).
        end = np.flatnonzero(row == tok.eot_id)
        assert row[0] == tok.sot_id and end.size, row
        assert (row[end[-1] + 1:] == tok.pad_id).all(), row
    # A text is tokenised the same alone and in a batch.
    np.testing.assert_array_equal(tok(texts[:1]), ids[:1])


# -- the JSONL manifest -----------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
RECORD = st.fixed_dictionaries(
    {"image": TEXT.filter(lambda s: s.strip() and "\x00" not in s)},
    optional={"captions": st.lists(TEXT, max_size=3) | JSON, "caption": TEXT | JSON,
              "label": st.integers() | JSON, "labels": JSON})


def _manifest(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "m.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@SETTINGS
@given(lines=st.lists(st.one_of(RECORD.map(json.dumps), JSON.map(json.dumps), TEXT.map(lambda s: s.replace("\n", " "))),
                      min_size=1, max_size=4))
def test_manifest_any_line_is_a_record_or_an_error_naming_file_and_line(tmp_path_factory, lines):
    path = _manifest(tmp_path_factory, lines)
    try:
        src = sources.JsonlSource(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}:") or str(e) == f"JSONL manifest {path} has no records", e
        return
    assert len(src) == sum(1 for line in lines if line.strip())
    for i in range(len(src)):
        r = src[i]
        assert isinstance(r["image"], str) and isinstance(r["label"], int)
        assert isinstance(r["captions"], list) and all(isinstance(c, str) for c in r["captions"])


VALID_RECORD = st.fixed_dictionaries(
    {"image": TEXT.filter(lambda s: s.strip() and "\x00" not in s),
     "captions": st.lists(TEXT, max_size=3)},
    optional={"label": st.integers(-1, 10**6), "labels": st.lists(st.integers(0, 10**6), max_size=4)}
) | st.fixed_dictionaries({"image": TEXT.filter(lambda s: s.strip() and "\x00" not in s), "caption": TEXT})


@SETTINGS
@given(record=VALID_RECORD)
def test_manifest_valid_records_round_trip(tmp_path_factory, record):
    r = sources.JsonlSource(_manifest(tmp_path_factory, [json.dumps(record)]))[0]
    assert r["captions"] == (record["captions"] if "captions" in record else [record["caption"]])
    assert r["label"] == record.get("label", -1)
    assert r["labels"] == record.get("labels", [])


# -- image decoding ---------------------------------------------------------------------------


def _encoded(fmt, mode="RGB"):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


VALID = [_encoded("PNG"), _encoded("PNG", "RGBA"), _encoded("PNG", "P"), _encoded("JPEG"),
         _encoded("GIF", "P"), _encoded("BMP"), _encoded("TIFF"), _encoded("WEBP")]


@st.composite
def damaged_images(draw):
    """A valid encoded image with some bytes overwritten, cut short, or garbage appended."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


PRE = Preprocess(image_size=8, value_range=(-1.0, 1.0))


@SETTINGS
@given(data=st.binary(max_size=512) | damaged_images())
def test_decoding_any_bytes_is_an_image_or_a_counted_skip(data):
    out = PRE({"id": "x", "image": data, "captions": ["a caption"], "label": 0})
    if "skip" in out:
        assert out["skip"] in SKIP_REASONS
        return
    assert out["image"].shape == (8, 8, 3) and out["image"].dtype == np.float32
    assert np.isfinite(out["image"]).all() and (np.abs(out["image"]) <= 1.0).all()


@SETTINGS
@given(data=st.binary(max_size=512) | damaged_images())
def test_decode_image_raises_only_unreadable_image_with_a_reason(data):
    try:
        img = T.decode_image(data)
    except T.UnreadableImage as e:
        assert str(e)
        return
    assert img.mode == "RGB"


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 9000)])
def test_decompression_bombs_are_refused_before_decoding(size):
    from test_cli import png_claiming
    with pytest.raises(T.UnreadableImage, match="decompression bomb"):
        T.decode_image(png_claiming(*size))
    assert PRE({"id": "b", "image": png_claiming(*size), "captions": ["a"], "label": 0}) == {"skip": "decode_error"}
