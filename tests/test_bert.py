"""Bert equals transformers' BertModel: on the real all-MiniLM-L6-v2 weights (sentence
embeddings) and on a tiny random config (cls pooler, padding, remat); conversion errors
name the key."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import assets
from vljax.convert.bert import bert_params_from_state_dict, load_bert, load_minilm
from vljax.models.bert import Bert
from vljax.tokenizers import get_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "a photo of a cat", "a picture of a kitten", "the stock market fell sharply today",
    "A man is playing a guitar on stage.", "Two dogs run across the snowy field",
    "The quick brown fox jumps over the lazy dog.", "Quantum computers use qubits.",
    "Crème brûlée is a French dessert.", "東京は日本の首都です", "emoji 🐈 and 🐕",
    "What time does the train leave?", "I love machine learning!!!", "",
    "a", "HTML &amp; entities", "numbers 3.14159 and 42", "The weather is nice",
    "She sells sea shells by the sea shore. " * 8, "Paris is the capital of France",
    "an image of a bowl of soup",
]


def _torch_mean_pooled(model, ids):
    """sentence-transformers' pipeline: BertModel, mean over the mask, L2 norm."""
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask = (ids_t != 0).long()
    with torch.no_grad():
        h = model(input_ids=ids_t, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy(), h.numpy()


@pytest.fixture(scope="module")
def minilm():
    kwargs, params = load_minilm(normalize=True)
    return Bert(**kwargs), params


def test_minilm_matches_transformers(minilm):
    model, params = minilm
    ids = get_tokenizer("bert", max_len=64)(SENTENCES)
    ref_model = transformers.BertModel.from_pretrained(str(assets.minilm_dir())).eval()
    want, want_tokens = _torch_mean_pooled(ref_model, ids)
    z, out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert z.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(z, want, atol=1e-5)
    mask = ids != 0
    np.testing.assert_allclose(np.asarray(out["tokens"])[mask], want_tokens[mask], atol=1e-4)
    np.testing.assert_array_equal(out["mask"], mask)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)


def test_minilm_semantics(minilm):
    model, params = minilm
    texts = ["a photo of a cat", "a picture of a kitten", "the stock market fell sharply today"]
    z, _ = model.apply({"params": params}, jnp.asarray(get_tokenizer("bert", 16)(texts)))
    sim = np.asarray(z @ z.T)
    assert sim[0, 1] > sim[0, 2] + 0.3, sim


def _tiny_reference(seed=0):
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=24, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # random LayerNorm affine, so a scale/bias swap cannot pass
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return config, model


def _tiny_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(4, 11))
    ids[1, 6:] = 0
    ids[2, 2:] = 0
    return ids.astype(np.int32)


@pytest.mark.parametrize("pool_type", ["cls", "first", "mean"])
def test_tiny_random_bert_matches(tmp_path, pool_type):
    config, ref_model = _tiny_reference()
    ref_model.save_pretrained(tmp_path)  # config.json + model.safetensors
    kwargs, params = load_bert(tmp_path, pool_type=pool_type)
    ids = _tiny_ids()
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        ref = ref_model(input_ids=ids_t, attention_mask=(ids_t != 0).long())
    feats, out = Bert(**kwargs).apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(out["tokens"], ref.last_hidden_state.numpy(), atol=1e-5)
    want = {"cls": ref.pooler_output.numpy(), "first": ref.last_hidden_state[:, 0].numpy()}
    if pool_type == "mean":
        m = (ids != 0)[..., None]
        want["mean"] = (ref.last_hidden_state.numpy() * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(feats, want[pool_type], atol=1e-5)
    assert ("pooler" in params) == (pool_type == "cls")


def test_head_remat_and_init_tree_match_converted(tmp_path):
    _, ref_model = _tiny_reference()
    ref_model.save_pretrained(tmp_path)
    kwargs, params = load_bert(tmp_path)
    ids = jnp.asarray(_tiny_ids())
    init = Bert(**kwargs).init(jax.random.key(0), ids)["params"]
    shapes = lambda t: jax.tree.map(jnp.shape, t)  # noqa: E731
    assert shapes(init) == shapes(params)  # converted tree drops into an initialised model
    base, _ = Bert(**kwargs).apply({"params": params}, ids)
    remat, _ = Bert(**kwargs, remat=True).apply({"params": params}, ids)
    np.testing.assert_allclose(remat, base, atol=1e-6)
    model = Bert(**kwargs, num_classes=8, head_bias=False, normalize=True)
    head = model.init(jax.random.key(1), ids)["params"]["head"]
    assert set(head) == {"kernel"} and head["kernel"].shape == (32, 8)
    z, out = model.apply({"params": {**params, "head": head}}, ids)
    np.testing.assert_allclose(out["logits"], out["pre_logits"] @ head["kernel"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)


def test_bfloat16_compute_close_to_float32(tmp_path):
    _, ref_model = _tiny_reference()
    ref_model.save_pretrained(tmp_path)
    kwargs, params = load_bert(tmp_path, normalize=True)
    ids = jnp.asarray(_tiny_ids())
    z32, _ = Bert(**kwargs).apply({"params": params}, ids)
    z16, out = Bert(**kwargs, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert z16.dtype == out["tokens"].dtype == jnp.bfloat16
    np.testing.assert_allclose(z16.astype(jnp.float32), z32, atol=3e-2)


def test_conversion_errors_name_the_key(tmp_path):
    _, ref_model = _tiny_reference()
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    kwargs = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                  max_position_embeddings=24, type_vocab_size=2)
    broken = dict(state)
    del broken["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(KeyError, match="encoder.layer.1.attention.self.key.weight"):
        bert_params_from_state_dict(broken, kwargs)
    broken = {**state, "encoder.layer.0.output.dense.bias": np.zeros(31, np.float32)}
    with pytest.raises(ValueError, match=r"encoder.layer.0.output.dense.bias.*\(31,\)"):
        bert_params_from_state_dict(broken, kwargs)
    with pytest.raises(ValueError, match="unused checkpoint keys, e.g. 'encoder.layer.2"):
        bert_params_from_state_dict({**state, "encoder.layer.2.output.dense.bias": 0 * state[
            "encoder.layer.0.output.dense.bias"]}, kwargs)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        load_bert(tmp_path)


def test_bad_input_raises():
    model = Bert(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                 max_position_embeddings=4)
    with pytest.raises(ValueError, match="max_position_embeddings 4"):
        model.init(jax.random.key(0), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="int token ids"):
        model.init(jax.random.key(0), jnp.ones((1, 3), jnp.float32))
