"""Embedders made afresh for each evaluation (vljax.evaluate, soups, benchmarks) share the towers
jitted for an equal model on the same mesh: after the first, an evaluation compiles nothing."""
import jax
import numpy as np

from test_eval_sharded import SIZE, VALUE_RANGE, SyntheticSource, model_and_params
from vljax import sharding
from vljax.embedder import Embedder


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
