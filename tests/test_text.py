"""TextTransformer: causal vs bidirectional attention, pooling positions, mask, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.models import TextTransformer

EOT, PAD = 49, 0
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=50, max_len=10)


def ids(seed=0):
    """[3, 10]: words in 1..47, EOT at 3 / 6 / 9, zero padding; row 1 holds a second EOT."""
    rng = np.random.default_rng(seed)
    x = np.zeros((3, 10), np.int32)
    for i, n in enumerate((3, 6, 9)):
        x[i, :n] = rng.integers(1, EOT - 1, size=n)
        x[i, n] = EOT
    x[1, 8] = EOT
    return jnp.asarray(x)


def run(seq=None, **kw):
    model = TextTransformer(**TINY, **kw)
    seq = ids() if seq is None else seq
    params = jax.jit(model.init)(jax.random.key(0), seq)["params"]
    return model, params, jax.jit(model.apply)({"params": params}, seq)


def test_causal_mask_hides_the_future():
    x = ids()
    later = x.at[:, 5:].set(7)           # change positions >= 5 only
    model, params, (_, out) = run(x, causal=True)
    _, out2 = model.apply({"params": params}, later)
    np.testing.assert_allclose(out["tokens"][:, :5], out2["tokens"][:, :5], atol=1e-6)
    assert np.abs(out["tokens"][:, 5:] - out2["tokens"][:, 5:]).max() > 1e-3

    model, params, (_, out) = run(x, causal=False, pool_type="last")
    _, out2 = model.apply({"params": params}, later)
    assert np.abs(out["tokens"][:, :5] - out2["tokens"][:, :5]).max() > 1e-3


def test_eot_pools_first_eot_and_argmax_the_largest_id():
    x = ids()
    _, _, (feats, out) = run(x, pool_type="eot", eot_id=EOT)
    np.testing.assert_allclose(feats, out["tokens"][jnp.arange(3), jnp.array([3, 6, 9])])
    _, _, (feats, out) = run(x, pool_type="argmax")
    np.testing.assert_allclose(feats, out["tokens"][jnp.arange(3), jnp.array([3, 6, 9])])
    no_eot = x.at[0].set(5)                 # a row without EOT pools its last position
    _, _, (feats, out) = run(no_eot, pool_type="eot", eot_id=EOT)
    np.testing.assert_allclose(feats[0], out["tokens"][0, -1])


@pytest.mark.parametrize("pool_type", ["first", "last", "mean", "map"])
def test_other_pool_types(pool_type):
    _, params, (feats, out) = run(causal=False, pool_type=pool_type, num_classes=16,
                                  pad_id=PAD)
    assert feats.shape == (3, 16) and out["pre_logits"].shape == (3, 32)
    expected = {"first": out["tokens"][:, 0], "last": out["tokens"][:, -1],
                "mean": out["tokens"].mean(axis=1)}.get(pool_type)
    if expected is not None:
        np.testing.assert_allclose(out["pre_logits"], expected, atol=1e-6)
    assert ("MAPHead_0" in params) == (pool_type == "map")
    np.testing.assert_array_equal(out["mask"], ids() != PAD)


def test_shorter_sequences_use_the_first_positions():
    model, params, (_, out) = run(causal=True, eot_id=EOT)
    _, short = model.apply({"params": params}, ids()[:, :6])
    # Causal: the first 6 positions do not depend on the cut-off rest.
    np.testing.assert_allclose(short["tokens"], out["tokens"][:, :6], atol=1e-6)
    # No pad_id: the real tokens are those up to the first end-of-text token (EOT pooling).
    first_eot = np.argmax(ids() == EOT, axis=1)
    np.testing.assert_array_equal(out["mask"], np.arange(10)[None] <= first_eot[:, None])


def test_errors():
    model = TextTransformer(**TINY)
    with pytest.raises(ValueError, match="exceeds max_len=10"):
        model.init(jax.random.key(0), jnp.zeros((1, 11), jnp.int32))
    with pytest.raises(ValueError, match="Unknown pool_type 'cls'"):
        TextTransformer(**TINY, pool_type="cls").init(jax.random.key(0), ids())


@pytest.mark.parametrize("tower", ["causal_eot", "bidirectional_map", "bert"])
def test_split_at_a_block_equals_the_whole_tower(tower):
    """`stop_after=k` then `lower=(k, states)` (the label prompts' locked lower blocks run once,
    vljax/train.py) gives the unsplit tower's features and tokens, for every k; misuse raises."""
    from vljax.models.bert import Bert
    if tower == "bert":
        model = Bert(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                     num_classes=16)
    else:
        kw = dict(causal=True, eot_id=EOT) if tower == "causal_eot" else dict(
            causal=False, pool_type="map", eot_id=None)
        model = TextTransformer(**{**TINY, "depth": 3}, num_classes=16, **kw)
    seq = ids()
    params = model.init(jax.random.key(0), seq)["params"]
    ref, out = model.apply({"params": params}, seq)
    for k in range(4):
        states = jax.jit(lambda p, k=k: model.apply({"params": p}, seq, stop_after=k))(params)
        assert states.shape == (3, 10, 32)
        z, o = jax.jit(lambda p, s, k=k: model.apply({"params": p}, seq, lower=(k, s)))(params, states)
        np.testing.assert_allclose(z, ref, atol=1e-5)
        np.testing.assert_allclose(o["tokens"], out["tokens"], atol=1e-5)
        np.testing.assert_array_equal(o["mask"], out["mask"])
    with pytest.raises(ValueError, match="not both"):
        model.apply({"params": params}, seq, stop_after=1, lower=(1, states))
    with pytest.raises(ValueError, match="layer 4 of a tower of 3"):
        model.apply({"params": params}, seq, stop_after=4)
    with pytest.raises(ValueError, match="prefix"):
        model.apply({"params": params}, seq, prefix=jnp.zeros((3, 1, 32)), lower=(1, states))


def test_a_scanned_encoder_is_not_split():
    model = TextTransformer(**TINY, scan=True)
    params = model.init(jax.random.key(0), ids())["params"]
    with pytest.raises(ValueError, match="scanned encoder"):
        model.apply({"params": params}, ids(), stop_after=1)
    whole = model.apply({"params": params}, ids(), stop_after=2)  # the whole stack: allowed
    z, _ = model.apply({"params": params}, ids(), lower=(2, whole))
    np.testing.assert_allclose(z, model.apply({"params": params}, ids())[0], atol=1e-5)
