"""LiT features as data: a tower's head on its trunk's features is the tower; the store holds the
trunk's features of every record and view, skips what cannot be read, is reused when complete; the
training pipeline over the store yields exactly the features of the image pipeline's batches; the
step gets them as a batch-sharded input (each device holds 1/N), never as a closed-over table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_shapes_manifest, tiny_config
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax import features, objective, sharding, train
from vljax.data import pipeline, sources
from vljax.models.two_towers import TwoTowers


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=2, bad=True)


@pytest.fixture(scope="module")
def lit(manifest):
    """(config, model, params) of the tiny LiT recipe, greyscale augmentation on (two views)."""
    config = tiny_config(manifest, "lit", steps=4, batch=8)
    config.input.augment = dict(random_resized_crop=None, greyscale=0.5)
    model = train.build_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
    return config, model, params


def _trunk(model, params, images):
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.image_trunk))(params, images))


@pytest.mark.parametrize("tower", [
    ("vit", dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, num_classes=16)),
    pytest.param(("efficientnet_lite", dict(variant="lite0", num_classes=16)), marks=pytest.mark.slow),
])
def test_head_of_trunk_is_the_tower(tower):
    """image_head(image_trunk(x)) equals the image half of __call__, with the tower's own params."""
    model = TwoTowers(image_model=tower[0], image=tower[1], text_model="text_transformer",
                      text=dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=64,
                                max_len=8, num_classes=16))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x, jnp.zeros((2, 8), jnp.int32))["params"]
    assert "head" in params["img"]
    zimg, _, _ = model.apply({"params": params}, x, None)
    f = model.apply({"params": params}, x, method=model.image_trunk)
    z = model.apply({"params": params}, f, method=model.image_head)
    np.testing.assert_allclose(np.asarray(z), np.asarray(zimg), rtol=1e-5, atol=1e-6)
    # The head alone needs exactly the params under img/head/ (no re-declared module).
    head_only = {"img": {"head": params["img"]["head"]}, "t": params["t"]}
    np.testing.assert_allclose(np.asarray(model.apply({"params": head_only}, f, method=model.image_head)),
                               np.asarray(zimg), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tower", [
    ("vit", dict(variant=None, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, num_classes=16)),
    pytest.param(("efficientnet_lite", dict(variant="lite0", num_classes=16)), marks=pytest.mark.slow),
])
def test_sliced_trunk_equals_the_whole_batch_bitwise(tower):
    """On one CPU device the store runs the trunk's batch as slices inside one jit (one per core):
    every row bitwise equal to the whole batch's, so the stored features do not change."""
    model = TwoTowers(image_model=tower[0], image=tower[1], text_model="text_transformer",
                      text=dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=64,
                                max_len=8, num_classes=16))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 32, 32, 3)), jax.devices()[0])
    params = model.init(jax.random.key(0), x[:1], jnp.zeros((1, 8), jnp.int32))["params"]
    whole = np.asarray(jax.jit(features._trunk(model, False, 1))(params, x))
    for parts in (2, 4):
        np.testing.assert_array_equal(np.asarray(jax.jit(features._trunk(model, False, parts))(params, x)),
                                      whole)
    one_cpu = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    assert 1 <= features.trunk_parts(one_cpu) <= 4
    assert features.trunk_parts(sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])) == 1


def test_store_round_trips_and_skips_unreadable(lit, manifest, tmp_path):
    config, model, params = lit
    mesh = sharding.make_mesh([("data", -1)])
    src = sources.get_source(config.input.data[0])
    kw = dict(mesh=mesh, image_size=32, value_range=(-1.0, 1.0), views=features.VIEWS, batch_size=8)
    store = features.ensure_features(model, params, src, tmp_path, **kw)
    assert len(store) == len(src) and store.views == ("colour", "grey")

    for grey in (False, True):
        batch = next(iter(pipeline.make_eval_batches(src, batch_size=len(src), image_size=32,
                                                     value_range=(-1.0, 1.0), greyscale=grey)))
        want = _trunk(model, params, batch["image"])
        for i in range(len(src)):
            if batch["mask"][i]:
                np.testing.assert_allclose(store[i]["features"][int(grey)], want[i], rtol=1e-5, atol=1e-5)
    assert not np.allclose(store[0]["features"][0], store[0]["features"][1])  # the grey view differs
    reasons = {store.index["unreadable"][k] for k in store.index["unreadable"]}
    assert reasons == {"decode_error", "missing_file"}
    for i in store.index["unreadable"]:
        assert store[int(i)] == {"error": store.index["unreadable"][i]}
    ids = [src[int(i)]["image"] for i in store.index["unreadable"]]
    assert sorted(p.rsplit("/", 1)[1] for p in ids) == ["corrupt.png", "missing.png"]

    # Complete with the same fingerprint: reused, not rewritten; other trunk params: another store.
    files = sorted(tmp_path.rglob("*.array_record"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = features.ensure_features(model, params, src, tmp_path, **kw)
    assert again.path == store.path and [f.stat().st_mtime_ns for f in files] == mtimes
    other = jax.tree.map(lambda x: x * 1.01, params)
    fp_kw = {k: kw[k] for k in ("mesh", "image_size", "value_range", "views")}
    assert features.fingerprint(model, other, src, **fp_kw) != store.path.name
    # Other images, the same count: subsets of other records, augmented views (few-shot evals).
    from vljax.evaluators.data import AugmentedView, Subset
    prints = {features.fingerprint(model, params, s, **fp_kw) for s in (
        Subset(src, [0, 1]), Subset(src, [0, 2]), AugmentedView(src, 0), AugmentedView(src, 1))}
    assert len(prints) == 4 and store.path.name not in prints


def test_pipeline_over_store_equals_image_pipeline(lit, tmp_path):
    """The same records in the same order, and the grey view exactly where the image augmentation
    turned the image grey: stored features == the trunk on the image pipeline's batches."""
    config, model, params = lit
    mesh = sharding.make_mesh([("data", -1)])
    stores = features.training_stores(config, model, params, train._flat(_mask(config, params)), mesh, tmp_path)
    tok = train.build_tokenizer(config)
    with_images = pipeline.make_train_iterator(config.input, tok, seed=0, process_index=0, process_count=1)
    with_store = pipeline.make_train_iterator(config.input, tok, seed=0, process_index=0, process_count=1,
                                              features=stores)
    grey_views = []
    for _ in range(6):
        a, b = next(with_images), next(with_store)
        assert "image" not in b and b["image_features"].shape == (8, stores[0].num_features)
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_allclose(b["image_features"], _trunk(model, params, a["image"]), rtol=1e-5, atol=1e-5)
        grey_views += list(np.all(a["image"][..., 0] == a["image"][..., 2], axis=(1, 2)))
        assert {k: v for k, v in a.items() if k.startswith("skipped/")} == \
            {k: v for k, v in b.items() if k.startswith("skipped/")}
    assert 0.2 < np.mean(grey_views) < 0.8  # both views were used


def _mask(config, params):
    from vljax import optim
    return optim.make_optimizer(config, params)[2]


def test_step_reads_sharded_features_not_a_table(lit, tmp_path, n_devices):
    """Each device holds b/N rows of the batch's features, and the step closes over no [N, V, F] table."""
    config, _, _ = lit
    trainer = train.Trainer(config, str(tmp_path))
    it = trainer.make_input()
    batch = {k: v for k, v in next(it).items() if not k.startswith("skipped/")}
    glob = sharding.shard_batch(batch, trainer.mesh)
    feats = glob["image_features"]
    b, f = feats.shape
    assert {s.data.shape for s in feats.addressable_shards} == {(b // n_devices, f)}
    assert feats.sharding.is_equivalent_to(NamedSharding(trainer.mesh, P("data")), 2)
    step = train.make_train_step(trainer.model, trainer.tx, objective.make_loss(config, trainer.mesh),
                                 trainer.trainable_mask)
    with jax.set_mesh(trainer.mesh):
        closed = jax.make_jaxpr(step)(trainer.state, glob)
    table = sum(len(s) for s in _stores(tmp_path)) * 2 * f
    assert all(np.size(c) < table for c in closed.consts), [np.shape(c) for c in closed.consts]


def _stores(workdir):
    return [features.FeatureSource(p.parent) for p in sorted((workdir / "features").glob("*/index.json"))]


class _FakeStore:
    """Features of record i are all i (one view): tells which record a batch row came from."""

    def __init__(self, n, offset):
        self.n, self.offset, self.views = n, offset, ("colour",)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"features": np.full((1, 4), self.offset + i, np.float32)}


def test_stored_features_follow_their_records_and_no_image_is_opened(tmp_path):
    """Through mixing, shuffling and process slices each row's features are its record's; the image
    files do not exist, so any attempt to open one would skip the record as missing_file."""
    entries = []
    for name, n, offset in (("a", 8, 0), ("b", 6, 100)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(f'{{"image": "nowhere/{k}.png", "caption": "{offset + k}"}}\n' for k in range(n)))
        entries.append(dict(source="jsonl", path=str(path)))
    cfg = dict(data=entries, batch_size=8, image_size=8, augment=dict(random_resized_crop=None),
               num_workers=0, keep_captions=True)
    stores = [_FakeStore(8, 0), _FakeStore(6, 100)]
    tok = lambda caps: np.zeros((len(caps), 4), np.int32)  # noqa: E731
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, tok, seed=0, process_index=p, process_count=2, features=stores)
        for _ in range(4):
            batch = next(it)
            assert "image" not in batch and batch["image_features"].shape == (4, 4)
            np.testing.assert_array_equal(batch["image_features"][:, 0], [float(c) for c in batch["caption"]])
            assert batch["skipped/missing_file"] == 0


def test_refuses_what_cannot_be_stored(lit):
    """An unlocked trunk or a continuous augmentation would change the features: refused, naming the key."""
    config, _, params = lit
    mask = train._flat(_mask(config, params))
    features.check_cacheable(config, mask)
    unlocked = {k: v or k.startswith("img/") for k, v in mask.items()}
    with pytest.raises(ValueError, match="lit_cache.*img/head"):
        features.check_cacheable(config, unlocked)
    cropped = config.copy_and_resolve_references()
    cropped.input.augment = dict(random_resized_crop=(0.8, 1.0))
    with pytest.raises(ValueError, match="input.augment.random_resized_crop"):
        features.check_cacheable(cropped, mask)
