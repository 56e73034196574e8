"""Embedders made afresh for each evaluation (vljax.evaluate, soups, benchmarks) share the towers
jitted for an equal model on the same mesh: after the first, an evaluation compiles nothing.
An Embedder is built from a model bundle; batch size and padding come from vljax/data/batching.py."""
import jax
import numpy as np

from test_eval_sharded import SIZE, VALUE_RANGE, SyntheticSource, model_and_params
from vljax import factory, sharding
from vljax.data import batching
from vljax.embedder import Embedder, TowerCache


def _embed(model, params, tok, mesh):
    emb = Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE,
                   batch_size=8, progress=False)
    return emb.embed_images(SyntheticSource(12)).z, emb.embed_texts(["a", "bb", "ccc"])


def test_fresh_embedder_of_an_equal_model_compiles_nothing():
    model, params, tok = model_and_params()
    mesh = sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)
    rebuilt, _, _ = model_and_params()  # an equal model, built again (its init compiles)
    assert rebuilt is not model and rebuilt == model
    first = _embed(model, params, tok, mesh)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        again = _embed(model, params, tok, mesh)  # the same model object
        equal = _embed(rebuilt, params, tok, mesh)
        assert not compiles, f"{len(compiles)} compilations for an equal model"
        other = jax.tree.map(lambda x: 2 * x, params)  # other params: the same executables
        scaled = _embed(model, other, tok, mesh)
        assert not compiles
        # Another mesh is another compilation.
        _embed(model, params, tok, sharding.make_mesh([("data", 4)], devices=jax.devices()[:4]))
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    for got in (again, equal):
        for a, b in zip(first, got):
            np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], scaled[0], atol=1e-3)  # the params are not baked in


def test_from_bundle_embeds_as_the_bundle_spec_says():
    model, params, tok = model_and_params()
    mesh = sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])
    spec = {"image_size": SIZE, "value_range": list(VALUE_RANGE), "similarity": "global"}  # as JSON gives it
    emb = Embedder.from_bundle(factory.Bundle(model, params, tok, spec), mesh=mesh, batch_size=5,
                               progress=False)
    assert (emb.image_size, emb.value_range, emb.similarity, emb.batch_size) == (SIZE, VALUE_RANGE, "global", 6)
    for a, b in zip(_embed(model, params, tok, mesh), (emb.embed_images(SyntheticSource(12)).z,
                                                       emb.embed_texts(["a", "bb", "ccc"]))):
        # Batch 6 or 8: the same embeddings, up to the last bits: the two batch sizes compile to
        # different XLA kernels, which round differently on some CPUs (1.9e-7 seen with AVX-512).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tower_cache_is_owned_and_keeps_the_most_recent():
    model, _, _ = model_and_params()
    one, two = (sharding.make_mesh([("data", n)], devices=jax.devices()[:n]) for n in (1, 2))
    cache = TowerCache(size=1)
    towers = cache.get(model, one)
    assert cache.get(model, one) is towers
    assert cache.get(model, two) is not towers  # evicts (model, one)
    assert cache.get(model, one) is not towers
    assert Embedder.shared_towers.get(model, one) is not towers  # another cache, other towers


def test_batching_rounds_up_to_the_shards_and_pads_with_zero_rows():
    mesh = sharding.make_mesh([("data", 4)], devices=jax.devices()[:4])
    assert [batching.global_batch_size(b, mesh) for b in (1, 4, 5, 8)] == [4, 4, 8, 8]
    assert batching.global_batch_size(3, mesh, process_count=8) == 8
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = batching.pad_rows(x, 5)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]])
    assert padded.dtype == np.float32 and batching.pad_rows(x, 3) is x


def test_each_distinct_text_is_embedded_once_and_rows_do_not_depend_on_their_batch():
    """Evaluators sharing texts (a subset's captions, repeated captions) reuse an Embedder's rows;
    a text's row is the same whatever texts it is batched with."""
    model, params, tok = model_and_params()
    mesh = sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])
    emb = Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE,
                   batch_size=8, progress=False)
    calls = []
    tokenize = emb.tokenizer
    emb.tokenizer = lambda texts: calls.append(list(texts)) or tokenize(texts)
    texts = [f"caption {i % 11}" for i in range(30)]  # 11 distinct, repeated
    z = emb.embed_texts(texts)
    sub = emb.embed_texts(texts[3:9] + ["new one"])
    assert calls == [[f"caption {i}" for i in range(11)], ["new one"]]
    np.testing.assert_array_equal(z[3:9], sub[:6])
    np.testing.assert_array_equal(z[0], z[11])
    alone = Embedder(model, params, tok, mesh=mesh, image_size=SIZE, value_range=VALUE_RANGE,
                     batch_size=8, progress=False)
    np.testing.assert_array_equal(alone.embed_texts(["caption 7", "zzz"])[0], z[7])
    tokens, mask = emb.embed_text_tokens(texts[:4] + texts[:2])
    np.testing.assert_array_equal(tokens[:2], tokens[4:])
    assert mask.dtype == bool and tokens.shape[:2] == mask.shape
