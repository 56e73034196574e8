"""LocCa's location-aware decoder rows (vljax/data/locca.py; Wan et al. 2024): boxes as location
tokens round-trip within a bin, each task's row is prompt + target with the loss on the target
only, the loss equals a numpy reference on those positions, boxes follow the crop, and with the
feature off (or on Cap rows) the batches and the decoder are what they were."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import make_shapes_manifest, run_main, tiny_config, tiny_config_file
from vljax import config_check, metrics
from vljax.data import locca as L
from vljax.data.preprocess import Collate, Preprocess
from vljax.losses.captioning import caption_loss, task_caption_loss
from vljax.models.two_towers import TwoTowers


def test_box_tokens_round_trip_within_half_a_bin():
    rng = np.random.default_rng(0)
    for bins in (10, 1024):
        box = np.sort(rng.uniform(size=(200, 2, 2)), axis=1).reshape(200, 4)[:, [0, 2, 1, 3]]
        box = np.concatenate([box, [[0.0, 0.0, 1.0, 1.0]]])  # the edges: 1.0 -> the last bin
        ids = L.quantise(box, bins)
        assert ids.min() >= 0 and ids.max() <= bins - 1
        assert np.all(np.abs(L.dequantise(ids, bins) - box) <= 0.5 / bins + 1e-12)
    spec = L.Locca(vocab_offset=100, bins=10)
    np.testing.assert_array_equal(spec.box_ids([0.0, 0.25, 0.5, 1.0]), [100, 102, 105, 109])


def test_each_tasks_row_is_prompt_then_target_with_the_loss_on_the_target():
    spec = L.Locca(vocab_offset=100, bins=10, pad_id=0)
    aref, gcap = spec.task_id(L.AREF), spec.task_id(L.GCAP)
    assert (aref, gcap, spec.vocab_size) == (110, 111, 112)
    cap, region, box = [1, 5, 6, 2], [1, 7, 2], [101, 103, 105, 108]
    tokens, target = spec.sequence(L.CAP, cap, region, box, 8)
    np.testing.assert_array_equal(tokens, [1, 5, 6, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(target, [1, 1, 1, 1, 0, 0, 0, 0])
    tokens, target = spec.sequence(L.AREF, cap, region, box, 10)
    np.testing.assert_array_equal(tokens, [aref, 1, 7, 2, 101, 103, 105, 108, 0, 0])
    np.testing.assert_array_equal(target, [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    tokens, target = spec.sequence(L.GCAP, cap, region, box, 10)
    np.testing.assert_array_equal(tokens, [gcap, 101, 103, 105, 108, 1, 7, 2, 0, 0])
    np.testing.assert_array_equal(target, [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    # Too long: ARef's region caption is cut so that the 4 box tokens stay.
    tokens, target = spec.sequence(L.AREF, cap, [1, 7, 7, 7, 7, 2], box, 8)
    np.testing.assert_array_equal(tokens, [aref, 1, 7, 7, 101, 103, 105, 108])
    assert target.sum() == 4


def _np_nll(logits, targets, mask):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum(1) / np.maximum(mask.sum(1), 1)


def test_loss_is_the_cross_entropy_on_the_target_positions_only():
    spec = L.Locca(vocab_offset=20, bins=8, pad_id=0)
    rows = [spec.sequence(t, [1, 5, 6, 2], [1, 7, 2], spec.box_ids([0.1, 0.2, 0.6, 0.9]), 10)
            for t in (L.CAP, L.AREF, L.GCAP, L.AREF)]
    targets = np.stack([r[0] for r in rows])
    mask = np.stack([r[1] for r in rows]) & (targets != 0)
    task = np.array([0, 1, 2, 1], np.int32)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 10, spec.vocab_size)).astype(np.float32)
    want = _np_nll(logits.astype(np.float64), targets, mask)
    got = caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(got, want.mean(), rtol=1e-5)
    for which in range(3):
        part = task_caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                 jnp.asarray(task), which=which)
        np.testing.assert_allclose(part, want[task == which].mean(), rtol=1e-5)
    # The prompt's logits do not count: changing them leaves the loss as it was.
    changed = np.where(mask[..., None], logits, rng.normal(size=logits.shape)).astype(np.float32)
    np.testing.assert_allclose(caption_loss(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(mask)),
                               got, rtol=1e-6)


def _record(tmp_path, w=80, h=48, box=(0.25, 0.125, 0.75, 0.5)):
    """An image w x h, white, with a red rectangle at `box` (normalised ymin, xmin, ymax, xmax)."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    y0, x0, y1, x1 = box
    ImageDraw.Draw(img).rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], fill=(255, 0, 0))
    path = os.path.join(tmp_path, "rect.png")
    img.save(path)
    return {"image": path, "captions": ["a picture"], "label": -1, "labels": [],
            "regions": [(box, "a red box")]}


def _red_box(image):
    """The red pixels' box [ymin, xmin, ymax, xmax] in [0, 1] of the output image [S, S, 3]."""
    red = (image[..., 0] > 0.5) & (image[..., 1] < 0.0) & (image[..., 2] < 0.0)  # value range (-1, 1)
    ys, xs = np.nonzero(red)
    s = image.shape[0]
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / s


def test_boxes_follow_the_random_crop_and_the_image_is_unchanged(tmp_path):
    record = _record(str(tmp_path))
    spec = L.Locca(vocab_offset=100, bins=64, tasks=(0.0, 1.0, 0.0))
    kw = dict(image_size=32, value_range=(-1.0, 1.0), crop_scale=(0.3, 1.0))
    with_locca, without = Preprocess(**kw, locca=spec), Preprocess(**kw)
    seen = 0
    for seed in range(12):
        ex = with_locca(record, np.random.default_rng(seed))
        plain = without(record, np.random.default_rng(seed))
        np.testing.assert_array_equal(ex["image"], plain["image"])  # the same crop draws
        assert "locca" not in plain and "_regions" not in ex
        if ex["locca"]["task"] == L.CAP:  # the box fell out of the crop
            continue
        seen += 1
        got = L.dequantise(ex["locca"]["box"] - 100, 64)
        # Within a bin (1/64) plus a resampled pixel's edge (1/32).
        np.testing.assert_allclose(got, _red_box(ex["image"]), atol=0.5 / 64 + 1.5 / 32)
    assert seen >= 6
    # No random crop (the eval crop of a train example): the centre crop, followed alike.
    ex = Preprocess(image_size=32, value_range=(-1.0, 1.0), locca=spec)(record, np.random.default_rng(0))
    np.testing.assert_allclose(L.dequantise(ex["locca"]["box"] - 100, 64), _red_box(ex["image"]),
                               atol=0.5 / 64 + 1.5 / 32)


def test_collate_builds_the_rows_and_nothing_without_the_feature(tmp_path):
    record = _record(str(tmp_path))
    def tok(texts):  # a toy tokenizer, L = 8: <start>, one id per word (3 + its length), <end>, pad 0
        rows = [[1] + [3 + len(w) for w in t.split()][:5] + [2] for t in texts]
        return np.array([r + [0] * (8 - len(r)) for r in rows], np.int32)
    spec = L.Locca(vocab_offset=100, bins=16, tasks=(0.0, 0.0, 1.0))
    kw = dict(image_size=32, value_range=(-1.0, 1.0), crop_scale=None)
    exs = [Preprocess(**kw, locca=spec)(record, np.random.default_rng(s)) for s in range(2)]
    batch = Collate(tok, locca=spec)(exs, np.zeros(4, np.int64))
    assert batch["dec_tokens"].shape == batch["dec_target"].shape == (2, 8)
    np.testing.assert_array_equal(batch["dec_task"], [L.GCAP] * 2)
    box = exs[0]["locca"]["box"]
    np.testing.assert_array_equal(batch["dec_tokens"][0], [spec.task_id(L.GCAP), *box, 1, 4, 6])
    np.testing.assert_array_equal(batch["dec_target"][0], [0] * 5 + [1] * 3)
    # Off: no LocCa fields, the same images and texts (regions in the record are ignored).
    plain = [Preprocess(**kw)(record, np.random.default_rng(s)) for s in range(2)]
    off = Collate(tok)(plain, np.zeros(4, np.int64))
    assert not {"dec_tokens", "dec_target", "dec_task"} & set(off)
    np.testing.assert_array_equal(off["text"], batch["text"])
    np.testing.assert_array_equal(off["image"], batch["image"])


V, LEN = 40, 8
KW = dict(image=dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, pool_type="map"),
          text=dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=V, max_len=LEN, causal=False,
                    pool_type="last", eot_id=2, pad_id=0, num_classes=32),
          temperature_init=10.0, bias_init=-5.0,
          decoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=V + 16 + 2, max_len=LEN,
                       pad_id=0, parallel_fraction=0.5))


@pytest.mark.slow  # ~15 s of CPU: three compiles of a tiny model
def test_cap_rows_train_the_decoder_as_before_and_prompted_rows_are_autoregressive():
    """Cap rows (task 0, tokens = the captions) give the decoder's outputs of a run without
    LocCa, parallel draws included; ARef / GCap rows are never read in parallel and count only
    their targets."""
    model = TwoTowers(**KW)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 16, 16, 3)).astype(np.float32)
    ids = np.array([[1, 4, 5, 2, 0, 0, 0, 0]] * 4, np.int32)
    params = model.init(jax.random.key(0), images, ids)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    apply = jax.jit(lambda images, ids, rows: model.apply({"params": params}, images, ids, train=True,
                                                         rngs={"dropout": jax.random.key(3)}, dec_rows=rows))
    _, _, before = apply(images, ids, None)
    cap = {"dec_tokens": ids, "dec_target": ids != 0, "dec_task": np.zeros(4, np.int32)}
    _, _, after = apply(images, ids, cap)
    for k in ("dec/logits", "dec/mask", "dec/parallel", "dec/targets"):
        np.testing.assert_array_equal(after[k], before[k])
    spec = L.Locca(vocab_offset=V, bins=16)
    rows = [spec.sequence(t, [1, 4, 5, 2], [1, 6, 2], spec.box_ids([0.1, 0.2, 0.5, 0.7]), LEN)
            for t in (L.AREF, L.GCAP, L.AREF, L.GCAP)]
    prompted = {"dec_tokens": np.stack([r[0] for r in rows]), "dec_target": np.stack([r[1] for r in rows]),
                "dec_task": np.array([1, 2, 1, 2], np.int32)}
    _, _, out = apply(images, ids, prompted)
    assert not np.asarray(out["dec/parallel"]).any()
    np.testing.assert_array_equal(out["dec/mask"], prompted["dec_target"])


def test_bad_locca_configs_are_refused(tmp_path):
    c = tiny_config(make_shapes_manifest(str(tmp_path), n_per=1), "siglip", steps=10)
    c.input.locca = dict(vocab_offset=49408, bins=16)
    with pytest.raises(ValueError, match="input.locca.*decoder"):
        config_check.validate(c)
    c.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=49408, max_len=16)
    with pytest.raises(ValueError, match="model.decoder.vocab_size"):
        config_check.validate(c)
    c.model.decoder.vocab_size = 49408 + 18
    c.input.locca.vocab_offset = 100
    with pytest.raises(ValueError, match="input.locca.vocab_offset"):
        config_check.validate(c)
    c.input.locca = dict(vocab_offset=49408, bins=16, tasks=(1.0, -1.0, 0.0))
    with pytest.raises(ValueError, match="input.locca.tasks"):
        config_check.validate(c)
    c.input.locca = None
    c.loss = dict(name="sigmoid_locca")
    with pytest.raises(ValueError, match="sigmoid_locca.*input.locca"):
        config_check.validate(c)


def _regions_manifest(root, n=32, size=48, seed=0):
    """Two coloured rectangles per image at random places; the caption names both, each region
    its own: a jsonl set with regions."""
    rng = np.random.default_rng(seed)
    colours = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}
    names = list(colours)
    lines = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        regions = []
        for c in rng.choice(len(names), 2, replace=False):
            w, h = rng.integers(10, 24, size=2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            d.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=colours[names[c]])
            regions.append(dict(box=[y0 / size, x0 / size, (y0 + h) / size, (x0 + w) / size],
                                caption=f"a {names[c]} box"))
        img.save(os.path.join(root, f"{i}.png"))
        lines.append(dict(image=f"{i}.png", caption=" and ".join(r["caption"] for r in regions),
                          regions=regions))
    path = os.path.join(root, "regions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


@pytest.mark.slow
def test_main_trains_aref_and_gcap_and_their_losses_fall(tmp_path):
    """`vljax.main` on a tiny jsonl set with regions: train/locca_aref and train/locca_gcap
    logged every step, finite, and lower at the end than at the start."""
    data = _regions_manifest(str(tmp_path))
    lines = [f"c.input.data = [dict(source='jsonl', path={data!r})]",
             "c.input.image_size = 32",
             "c.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=49408 + 64 + 2, "
             "max_len=16, pad_id=0, parallel_fraction=0.5)",
             "c.input.locca = dict(vocab_offset=49408, bins=64, tasks=(1 / 3, 1 / 3, 1 / 3), pad_id=0)",
             "c.loss = dict(name='sigmoid_locca', impl='ring')",
             "c.model.bias_init = -10.0",
             "c.lr = 1e-2"]
    cfg = tiny_config_file(str(tmp_path / "cfg.py"), str(tmp_path / "shapes"), lines, steps=40, batch=16)
    workdir = str(tmp_path / "wd")
    run_main(cfg, workdir, devices=2)
    rows = [r for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/locca_aref" in r]
    assert len(rows) == 40
    for k in ("train/locca_aref", "train/locca_gcap", "train/locca_cap"):
        v = np.array([r[k] for r in rows])
        assert np.isfinite(v).all(), k
        assert v[-8:].mean() < 0.7 * v[:4].mean(), (k, v[:4], v[-8:])
