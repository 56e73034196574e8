"""The caption decoder (LocCa / CapPa) and its losses: each loss equals a numpy reference written
from the papers' equations (value and gradient), the decoder reads captions causally or all at
once (CapPa's parallel prediction), trains beside the sigmoid loss through the one trainer (the
same losses on 1 device and on an 8-device data x fsdp mesh) and is left out of the exported
encoder."""
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, losses_of, make_shapes_manifest, tiny_config, tiny_config_file

from vljax import config_check, factory, metrics, objective, sharding, train
from vljax.losses.captioning import caption_loss, caption_nll, sigmoid_caption_loss
from vljax.models.decoder import TextDecoder, decoder_inputs
from vljax.models.two_towers import TwoTowers
from vljax.tokenizers import caption_bpe

V, L, N, E = 11, 6, 5, 12
DEC = dict(width=16, depth=2, num_heads=2, mlp_dim=32, vocab_size=V, max_len=L, pad_id=0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_caption_loss(logits, targets, mask):
    """CapPa / big_vision: per caption, the mean over its real tokens of -log p(target); then the
    mean over captions."""
    logp = _log_softmax(logits.astype(np.float64))
    per_caption = []
    for i in range(len(targets)):
        real = [l for l in range(targets.shape[1]) if mask[i, l]]
        per_caption.append(np.mean([-logp[i, l, targets[i, l]] for l in real]) if real else 0.0)
    return np.mean(per_caption)


def np_sigmoid_loss(zimg, ztxt, t, b):
    """SigLIP (Zhai et al. 2023, Algorithm 1): -1/B sum_ij log sigmoid(y_ij (t <x_i, y_j> + b))."""
    logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64) + b
    y = 2 * np.eye(len(zimg)) - 1
    return -np.sum(-np.logaddexp(0, -y * logits)) / len(zimg)


@pytest.fixture(scope="module")
def caption_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, L, V)).astype(np.float32) * 2
    targets = rng.integers(1, V, size=(4, L)).astype(np.int32)
    lengths = np.array([6, 3, 1, 0])  # a full caption, shorter ones and one without tokens
    mask = np.arange(L)[None] < lengths[:, None]
    targets[~mask] = 0
    return logits, targets, mask


def test_caption_loss_equals_numpy_reference(caption_batch):
    logits, targets, mask = caption_batch
    got = caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(got, np_caption_loss(logits, targets, mask), rtol=1e-5)
    # The caption without tokens adds 0 (and no NaN): the mean's denominator counts it.
    assert caption_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))[3] == 0.0


def test_caption_loss_gradient_equals_the_analytic_one(caption_batch):
    """d loss / d logits_il = (softmax(logits_il) - onehot(target_il)) * m_il / (n_i * B)."""
    logits, targets, mask = caption_batch
    grad = jax.grad(caption_loss)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    p = np.exp(_log_softmax(logits.astype(np.float64)))
    onehot = np.eye(V)[targets]
    count = np.maximum(mask.sum(1), 1)[:, None, None]
    want = (p - onehot) * mask[..., None] / (count * len(targets))
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_sigmoid_caption_is_the_weighted_sum(caption_batch):
    logits, targets, mask = caption_batch
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 4, 8)).astype(np.float32)
    zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in z)
    got = sigmoid_caption_loss(zimg, ztxt, 10.0, -5.0, logits, targets, mask, caption_weight=0.3)
    want = np_sigmoid_loss(zimg, ztxt, 10.0, -5.0) + 0.3 * np_caption_loss(logits, targets, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def decoder():
    """A tiny decoder with random params (its head is zero at init, which would hide every other
    parameter from the logits), and a batch of image tokens and captions."""
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(3, N, E)), jnp.float32)
    tokens = jnp.asarray([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 1, 2], [5, 0, 0, 0, 0, 0]], jnp.int32)
    model = TextDecoder(**DEC)
    shapes = jax.eval_shape(model.init, jax.random.key(0), image, tokens)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
    return model, params, image, tokens


def test_decoder_parameter_gradient_equals_finite_differences(decoder):
    """jax's gradient of the caption loss along a random direction of all decoder params equals
    the central difference of the loss (float64; jax.nn.dot_product_attention's softmax runs in
    float32 whatever the inputs, which bounds how small a step still measures the slope)."""
    model, params, image, tokens = decoder
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        m64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        img = jnp.asarray(image, jnp.float64)

        @jax.jit
        def loss(p):
            logits, out = m64.apply({"params": p}, img, tokens)
            return caption_loss(logits, out["targets"], out["mask"])

        rng = np.random.default_rng(3)
        v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), p64)
        g = jax.jit(jax.grad(loss))(p64)
        analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        eps = 1e-3
        shift = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, p64, v)  # noqa: E731
        numeric = (loss(shift(1)) - loss(shift(-1))) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=5e-5)
        # Every parameter of the decoder receives a gradient (cross-attention included).
        flat = traverse_util.flatten_dict(g, sep="/")
        assert all(float(jnp.abs(x).max()) > 0 for x in flat.values()), \
            [k for k, x in flat.items() if float(jnp.abs(x).max()) == 0]


def test_autoregressive_decoding_is_causal(decoder):
    """Position l's logits depend on the caption's tokens before l only (teacher forcing)."""
    model, params, image, tokens = decoder
    base, out = model.apply({"params": params}, image, tokens)
    assert not out["parallel"].any()
    changed = tokens.at[:, 3].set(9)
    other, _ = model.apply({"params": params}, image, changed)
    np.testing.assert_array_equal(other[:, :4], base[:, :4])
    assert np.abs(np.asarray(other[:, 4:] - base[:, 4:])).max() > 1e-3


def test_parallel_prediction_reads_the_image_only(decoder):
    """CapPa's parallel rows see only mask tokens: their logits do not depend on the caption, and
    they do depend on the image (cross-attention)."""
    model, params, image, tokens = decoder
    par = jnp.ones((3,), bool)
    a, out = model.apply({"params": params}, image, tokens, parallel=par)
    b, _ = model.apply({"params": params}, image, (tokens + 3) % V, parallel=par)
    np.testing.assert_array_equal(a, b)
    c, _ = model.apply({"params": params}, image[::-1], tokens, parallel=par)
    assert np.abs(np.asarray(c - a)).max() > 1e-3
    np.testing.assert_array_equal(out["mask"], tokens != 0)
    inputs, mask = decoder_inputs(tokens, jnp.array([True, False, True]), bos_id=V + 1, mask_id=V)
    np.testing.assert_array_equal(inputs[0], [V] * L)
    np.testing.assert_array_equal(inputs[1], [V + 1, 7, 8, 9, 10, 1])
    assert mask[0].all() and not mask[1, 0, 0, 1] and mask[1, 0, 1, 0]


def test_parallel_fraction_is_drawn_per_example_in_training_only(decoder):
    _, params, _, _ = decoder
    model = TextDecoder(**DEC, parallel_fraction=0.5)
    image = jnp.zeros((512, N, E))
    tokens = jnp.ones((512, L), jnp.int32)
    _, out = model.apply({"params": params}, image, tokens, train=True,
                         rngs={"dropout": jax.random.key(0)})
    assert 0.4 < float(out["parallel"].mean()) < 0.6
    _, out = model.apply({"params": params}, image, tokens, train=False)
    assert not out["parallel"].any()


def test_padded_image_tokens_are_not_read(decoder):
    """A NaFlex mask hides padded patches from cross-attention."""
    model, params, image, tokens = decoder
    mask = jnp.arange(N)[None] < jnp.array([[5], [3], [1]])
    a, _ = model.apply({"params": params}, image, tokens, image_mask=mask)
    b, _ = model.apply({"params": params}, jnp.where(mask[..., None], image, 7.0), tokens,
                       image_mask=mask)
    np.testing.assert_array_equal(a, b)


SIGLIP2_KW = dict(
    image=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, pool_type="map",
               act="gelu_tanh"),
    text=dict(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=V, max_len=L, causal=False,
              pool_type="last", eot_id=1, pad_id=1, num_classes=32, act="gelu_tanh", ln_eps=1e-6),
    temperature_init=10.0, bias_init=-5.0,
    decoder=dict(DEC, pad_id=1, parallel_fraction=0.5))


@pytest.fixture(scope="module")
def siglip2():
    """A tiny SigLIP 2 model with a decoder: its params, inputs and outputs (jitted once)."""
    model = TwoTowers(**SIGLIP2_KW)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    ids = np.array([[3, 4, 5, 1, 1, 1], [6, 7, 8, 9, 10, 1]], np.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, ids)["params"]
    zimg, ztxt, out = jax.jit(model.apply)({"params": params}, images, ids)
    return params, images, ids, zimg, ztxt, out


def test_encoders_do_not_depend_on_the_decoder(siglip2):
    """The same params less `dec` (`factory.encoder_only`, what export writes) give the same
    embeddings without the decoder."""
    params, images, ids, zimg, ztxt, out = siglip2
    assert "dec" in params and out["dec/logits"].shape == (2, L, V)
    kw, enc = factory.encoder_only(SIGLIP2_KW, params)
    assert "dec" not in enc and "decoder" not in kw
    zimg2, ztxt2, out2 = jax.jit(TwoTowers(**kw).apply)({"params": enc}, images, ids)
    np.testing.assert_array_equal(zimg2, zimg)
    np.testing.assert_array_equal(ztxt2, ztxt)
    assert not any(k.startswith("dec/") for k in out2)


def test_exported_encoder_has_no_decoder_and_loads_in_transformers(siglip2, tmp_path):
    """The transformers SiglipModel exported from a model with a decoder (its weights left out:
    export_hf refuses any parameter it cannot place) gives the vljax embeddings."""
    params, images, ids, zimg, ztxt, _ = siglip2
    kw, enc = factory.encoder_only(SIGLIP2_KW, params)
    # Imported here: transformers and torch are optional heavy dependencies of the export only.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vljax.convert.to_hf import export_hf  # noqa: PLC0415
    export_hf(kw, enc, str(tmp_path), arch="siglip")  # refuses leftover (decoder) params
    hf = transformers.SiglipModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        o = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
               input_ids=torch.from_numpy(ids).long())
    np.testing.assert_allclose(np.asarray(o.image_embeds), zimg, atol=2e-5)
    np.testing.assert_allclose(np.asarray(o.text_embeds), ztxt, atol=2e-5)


def _decoder_config(manifest, steps, weight=1.0):
    config = tiny_config(manifest, "siglip", steps=steps)
    config.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=49408,
                                max_len=16, pad_id=0, parallel_fraction=0.5)
    config.loss = dict(name="sigmoid_caption", caption_weight=weight)
    return config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(str(tmp_path_factory.mktemp("shapes")), n_per=1)


def test_bad_decoder_recipes_are_refused(manifest):
    """A caption loss without a decoder, a typo in the loss's or the decoder's keys: refused,
    naming the key, before any work."""
    config = tiny_config(manifest, "siglip", steps=2)
    config.loss = dict(name="sigmoid_caption")
    with pytest.raises(ValueError, match="model.decoder"):
        objective.check(config, {})
    config = _decoder_config(manifest, steps=2)
    config.loss.caption_wieght = 1.0
    with pytest.raises(ValueError, match="caption_wieght"):
        config_check.validate(config)
    model = TwoTowers(**{**SIGLIP2_KW, "decoder": dict(DEC, parallel_fracton=0.5)})
    with pytest.raises(ValueError, match=r"model.decoder: unknown keys \['parallel_fracton'\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                       jnp.zeros((1, L), jnp.int32))


def test_caption_loss_under_shard_map_equals_one_device(caption_batch):
    """objective.make_loss splits the decoder's outputs over a 4 x 2 data x fsdp mesh: the
    value and its gradient equal the single-device ones."""
    logits, targets, mask = caption_batch
    rng = np.random.default_rng(2)
    logits = np.concatenate([logits, rng.normal(size=(4, L, V)).astype(np.float32)])
    targets = np.concatenate([targets, rng.integers(1, V, size=(4, L)).astype(np.int32)])
    mask = np.concatenate([mask, np.ones((4, L), bool)])
    z = rng.normal(size=(2, 8, 8)).astype(np.float32)
    zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in z)
    values = {"zimg": zimg, "ztxt": ztxt, "t": np.float32(10.0), "b": np.float32(-5.0),
              "dec/logits": logits, "dec/targets": targets, "dec/mask": mask}
    results = []
    for mesh in ([("data", 1)], [("data", 4), ("fsdp", 2)]):
        config = ml_collections.ConfigDict(dict(loss=dict(name="sigmoid_caption", caption_weight=0.5)))
        n = int(np.prod([k for _, k in mesh]))
        fn = objective.make_loss(config, sharding.make_mesh(mesh, jax.devices()[:n]))
        value, grad = jax.jit(jax.value_and_grad(
            lambda lg: fn({**values, "dec/logits": lg})))(jnp.asarray(logits))
        results.append((value, grad))
    want = np_sigmoid_loss(zimg, ztxt, 10.0, -5.0) + 0.5 * np_caption_loss(logits, targets, mask)
    np.testing.assert_allclose(results[0][0], want, rtol=1e-5)
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], atol=1e-8)


@pytest.mark.slow  # two trainer runs and the 8-device step's compile: ~100 s on 2 busy cores
def test_decoder_trains_in_the_state_and_equals_on_1_and_8_devices(manifest, tmp_path):
    """Sigmoid + captioning through the trainer: the decoder's params are in the state, sharded
    by the run's rules (fsdp), and the losses on one device equal those on a 4 x 2 data x fsdp
    mesh."""
    results = []
    for n, mesh in ((1, [("data", 1)]), (8, [("data", 4), ("fsdp", 2)])):
        config = _decoder_config(manifest, steps=4)
        config.mesh = mesh
        config.sharding_rules = [(".*", "fsdp")]
        trainer = train.Trainer(config, str(tmp_path / str(n)), devices=jax.devices()[:n])
        state = trainer.fit()
        dec = traverse_util.flatten_dict(state["params"]["dec"], sep="/")
        assert "decoderblock_0/MultiHeadDotProductAttention_1/key/kernel" in dec
        if n == 8:
            assert "fsdp" in str(dec["decoderblock_0/MlpBlock_0/Dense_0/kernel"].sharding.spec)
        results.append(losses_of(tmp_path / str(n)))
    assert len(results[0]) == 4
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4)


@pytest.mark.slow  # two subprocesses: `vljax.data.train_tokenizer`, then `vljax.main` (compiles, 30 steps)
def test_main_trains_sigmoid_and_caption_loss_goes_down(tmp_path):
    """`python -m vljax.main` on configs/siglip2.py-like settings, with the demo-scale tokenizer
    that `python -m vljax.data.train_tokenizer` learns from the training captions (the ablation's,
    configs/clip.py `tok=`): the tiny set's captions are learned (the combined loss falls, and its
    caption term, logged as train/caption, with it), and the written spec keeps the decoder and
    carries the tokenizer file with it."""
    env = {**os.environ, "PYTHONPATH": REPO}
    data_cfg = tiny_config_file(tmp_path / "data.py", tmp_path / "shapes")
    bpe = tmp_path / "bpe.json"
    proc = subprocess.run([sys.executable, "-m", "vljax.data.train_tokenizer", f"--config={data_cfg}",
                           "--vocab_size=300", f"--out={bpe}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vocab = caption_bpe.tokenizer_spec(str(bpe), 16)["expected_vocab_size"]
    assert 259 < vocab <= 300  # the 256 bytes, 3 specials and the merges the few captions give
    cfg = tiny_config_file(tmp_path / "tiny.py", tmp_path / "shapes", steps=30, batch=8, lines=[
        "from vljax.tokenizers import caption_bpe",
        f"c.tokenizer = caption_bpe.tokenizer_spec({str(bpe)!r}, max_len=16)",
        "c.model.image['pool_type'] = 'map'",
        f"c.model.text.update(causal=False, pool_type='last', vocab_size={vocab}, pad_id=0)",
        "c.model.bias_init = -10.0",
        f"c.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size={vocab}, "
        "max_len=16, pad_id=0, parallel_fraction=0.5)",
        "c.loss = dict(name='sigmoid_caption', caption_weight=1.0)"])
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}",
                           f"--workdir={tmp_path / 'wd'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(tmp_path / "wd")
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    rows = [r for r in metrics.read_metrics(str(tmp_path / "wd" / "metrics.jsonl")) if "train/loss" in r]
    caption = np.array([r["train/caption"] for r in rows])
    # From log(V) nats a token (uniform over the vocabulary: the output projection starts at 0),
    # 30 steps take it down by more than a nat.
    assert len(caption) == 30 and caption[0] == pytest.approx(np.log(vocab), abs=0.2), caption
    assert np.mean(caption[-5:]) < np.mean(caption[:5]) - 1.0, caption
    # The caption term is part of the loss: the sigmoid term left over is positive.
    assert all(r["train/loss"] - r["train/caption"] > 0 for r in rows)
    spec = factory.read_spec(tmp_path / "wd")
    assert spec["model"]["decoder"]["parallel_fraction"] == 0.5 and spec["logits"] == "sigmoid"
    assert spec["tokenizer"]["tokenizer_file"] == str(tmp_path / "wd" / "tokenizer" / "bpe.json")  # copied
    assert (tmp_path / "wd" / "tokenizer" / "bpe.json").read_bytes() == bpe.read_bytes()


def test_siglip2_config_switches_the_decoder():
    spec = importlib.util.spec_from_file_location("siglip2", os.path.join(REPO, "configs", "siglip2.py"))
    siglip2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(siglip2)
    on, off = siglip2.get_config("decoder=on"), siglip2.get_config("decoder=off")
    assert isinstance(on, ml_collections.ConfigDict)
    assert on.loss.name == "sigmoid_caption" and on.model.decoder.parallel_fraction == 0.5
    assert off.loss.name == "sigmoid" and not off.model.get("decoder")
