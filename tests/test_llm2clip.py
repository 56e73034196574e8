"""LLM2CLIP (Huang et al. 2024): the text adapter (vljax/models/text_adapter.py) against a float64
reference written from the official `TextProj` / `LinearBlock` (microsoft/LLM2CLIP
llm2clip/eva_clip/model.py), the locked text trunk of configs/clip.py:llm2clip=on in a training
step, its config checks, and the recipe through `python -m vljax.main`."""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from helpers import REPO, finite_differences, losses_of, make_shapes_manifest, run_main
from vljax import config_check, factory, train
from vljax.data import sources, tfds_writer
from vljax.inference import Predictor
from vljax.models.bert import Bert
from vljax.models.text import TextTransformer
from vljax.models.two_towers import TwoTowers

sys.path.insert(0, os.path.join(REPO, "configs"))
import clip  # noqa: E402

BERT = dict(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
            max_position_embeddings=16, num_classes=4)
TOKENS = np.array([[3, 7, 9, 2, 0, 0], [4, 5, 6, 11, 12, 2], [8, 2, 0, 0, 0, 0]], np.int32)


# --- the reference: the official TextProj in float64 numpy, torch layout (weight [out, in]) ---

def _layer_norm(x, weight, bias, eps=1e-5):  # torch.nn.LayerNorm: biased variance, eps 1e-5
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _gelu(x):  # torch.nn.GELU(): the exact erf form
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def text_proj(x, blocks, norm, proj):
    """TextProj.forward: Sequential(LinearBlock..., LayerNorm, Linear) then F.normalize(p=2).
    blocks: [(ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)]; norm: (w, b); proj: (w, b)."""
    for ln_w, ln_b, w1, b1, w2, b2 in blocks:  # LinearBlock: x + fn(ln(x)), fn = Linear, GELU, Dropout(0), Linear
        x = x + _gelu(_layer_norm(x, ln_w, ln_b) @ w1.T + b1) @ w2.T + b2
    x = _layer_norm(x, *norm) @ proj[0].T + proj[1]
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _torch_layout(txt, layers):
    """A text tower's adapter and head params -> the reference's arguments (float64)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    blocks = [(f(txt[f"adapter_{i}"]["LayerNorm_0"]["scale"]), f(txt[f"adapter_{i}"]["LayerNorm_0"]["bias"]),
               f(txt[f"adapter_{i}"]["Dense_0"]["kernel"]).T, f(txt[f"adapter_{i}"]["Dense_0"]["bias"]),
               f(txt[f"adapter_{i}"]["Dense_1"]["kernel"]).T, f(txt[f"adapter_{i}"]["Dense_1"]["bias"]))
              for i in range(layers)]
    return (blocks, (f(txt["adapter_norm"]["scale"]), f(txt["adapter_norm"]["bias"])),
            (f(txt["head"]["kernel"]).T, f(txt["head"]["bias"])))


def _two_towers(layers, expansion=2):
    return TwoTowers(image_model="vit", image=dict(variant=None, width=16, depth=1, mlp_dim=32, num_heads=2,
                                                   patch_size=8, num_classes=4),
                     text_model="bert", text=dict(BERT, adapter_layers=layers, adapter_expansion=expansion))


def _perturbed(params, seed=1):
    """Params with the adapter's LayerNorms moved off their (1, 0) init, so the reference's
    scale / shift terms are exercised."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params, sep="/")
    flat = {k: (v + 0.3 * rng.normal(size=v.shape).astype(np.float32) if "adapter" in k and "LayerNorm" in k
                or "adapter_norm" in k else v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def text_side():
    """(the text half of a TwoTowers whose BERT tower has 2 adapter blocks of expansion 3, its
    params with the adapter's LayerNorms perturbed)."""
    model = _two_towers(2, expansion=3)
    return model, _perturbed(model.init(jax.random.key(0), None, jnp.asarray(TOKENS))["params"])


def test_adapter_equals_the_official_text_proj(text_side):
    """ztxt of a BERT tower with 2 adapter blocks (expansion 3) and of a TextTransformer with 2
    equal the float64 TextProj of the tower's pooled output (its `pre_logits`)."""
    model, params = text_side
    _, ztxt, out = model.apply({"params": params}, None, jnp.asarray(TOKENS))
    assert params["txt"]["adapter_0"]["Dense_0"]["kernel"].shape == (8, 24)
    want = text_proj(np.asarray(out["txt/pre_logits"], np.float64), *_torch_layout(params["txt"], 2))
    np.testing.assert_allclose(np.asarray(ztxt), want, rtol=1e-5, atol=1e-6)

    tt = TextTransformer(variant=None, width=8, depth=1, mlp_dim=16, num_heads=2, vocab_size=50, max_len=6,
                         eot_id=2, pad_id=0, num_classes=4, adapter_layers=2)
    tp = _perturbed(tt.init(jax.random.key(1), jnp.asarray(TOKENS))["params"])
    z, tout = tt.apply({"params": tp}, jnp.asarray(TOKENS))
    want = text_proj(np.asarray(tout["pre_logits"], np.float64), *_torch_layout(tp, 2))
    got = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "adapted" in tout and tout["logits"].shape == (3, 4)


def test_adapter_gradient_equals_finite_differences_of_the_reference(text_side):
    """d(sum(w * ztxt)) / d(adapter and head params) by jax.grad equals central differences of the
    float64 reference, for every element of every adapter and head parameter."""
    model, params = text_side
    w = np.random.default_rng(2).normal(size=(3, 4))
    pooled = np.asarray(model.apply({"params": params}, None, jnp.asarray(TOKENS))[2]["txt/pre_logits"], np.float64)

    names = ([f"adapter_{i}/{m}" for i in range(2) for m in ("LayerNorm_0/scale", "LayerNorm_0/bias",
                                                              "Dense_0/kernel", "Dense_0/bias",
                                                              "Dense_1/kernel", "Dense_1/bias")]
             + ["adapter_norm/scale", "adapter_norm/bias", "head/kernel", "head/bias"])
    flat = traverse_util.flatten_dict(params["txt"], sep="/")

    def loss(trained):
        txt = traverse_util.unflatten_dict({**flat, **trained}, sep="/")
        ztxt = model.apply({"params": {**params, "txt": txt}}, None, jnp.asarray(TOKENS))[1]
        return jnp.sum(jnp.asarray(w, jnp.float32) * ztxt)

    got = jax.grad(loss)({k: flat[k] for k in names})

    def ref(*arrays):
        txt = traverse_util.unflatten_dict(dict(zip(names, arrays)), sep="/")
        return float(np.sum(w * text_proj(pooled, *_torch_layout(txt, 2))))

    want = finite_differences(ref, [np.asarray(flat[k]) for k in names])
    for name, g in zip(names, want):
        scale = max(np.abs(g).max(), 1e-3)
        np.testing.assert_allclose(np.asarray(got[name]), g, atol=2e-4 * scale, err_msg=name)
        assert np.abs(g).max() > 0, name  # every parameter reaches the loss


def test_no_adapter_is_the_plain_tower_and_the_adapter_leaves_the_trunk_alone():
    """adapter_layers = 0 (the default): no adapter params and features = pre_logits @ head; with
    an adapter the trunk's params and pooled output are bit-identical to the plain tower's."""
    tokens = jnp.asarray(TOKENS)
    plain = Bert(**BERT)
    assert plain.adapter_layers == 0
    p0 = plain.init(jax.random.key(0), tokens)["params"]
    z0, out0 = plain.apply({"params": p0}, tokens)
    assert not any("adapter" in k for k in traverse_util.flatten_dict(p0, sep="/")) and "adapted" not in out0
    head = p0["head"]
    np.testing.assert_allclose(np.asarray(z0), np.asarray(out0["pre_logits"]) @ np.asarray(head["kernel"])
                               + np.asarray(head["bias"]), rtol=1e-6, atol=1e-6)

    adapted = Bert(**BERT, adapter_layers=2)
    p2 = adapted.init(jax.random.key(0), tokens)["params"]
    _, out2 = adapted.apply({"params": p2}, tokens)
    flat0, flat2 = (traverse_util.flatten_dict(p, sep="/") for p in (p0, p2))
    assert set(flat2) - set(flat0) == {k for k in flat2 if k.startswith("adapter_")}
    for k in flat0:
        if not k.startswith("head/"):
            np.testing.assert_array_equal(flat0[k], flat2[k], err_msg=k)
    np.testing.assert_array_equal(out0["pre_logits"], out2["pre_logits"])
    np.testing.assert_array_equal(out0["tokens"], out2["tokens"])


def test_adapter_init_is_torch_linear_default(text_side):
    """Dense kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's nn.Linear default), as
    nothing in the official code re-initialises TextProj; LayerNorms (1, 0) before training."""
    model, params = text_side
    txt = params["txt"]
    scaled = []
    for leaf, fan_in in ((txt["adapter_0"]["Dense_0"], 8), (txt["adapter_1"]["Dense_1"], 24), (txt["head"], 8)):
        for name in ("kernel", "bias"):
            x = np.asarray(leaf[name]) * math.sqrt(fan_in)  # U(-1, 1)
            assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.5, name
            scaled.append(x.ravel())
    assert abs(np.concatenate(scaled).std() * math.sqrt(3) - 1) < 0.1  # uniform, not normal / lecun
    fresh = model.init(jax.random.key(0), None, jnp.asarray(TOKENS))["params"]["txt"]
    np.testing.assert_array_equal(fresh["adapter_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(fresh["adapter_0"]["LayerNorm_0"]["bias"], 0.0)


def test_config_check_refuses_what_the_adapter_cannot_do():
    config_check.validate(clip.get_config("llm2clip=on"))
    for change, match in (
            (lambda c: c.model.text.update(num_classes=0), r"`model\.text\.adapter_layers` = 4 needs .*num_classes"),
            (lambda c: c.model.text.update(adapter_layers=-1), r"`model\.text\.adapter_layers`: a number"),
            (lambda c: c.model.text.update(adapter_expansion=0), r"`model\.text\.adapter_expansion`"),
            (lambda c: setattr(c, "loss", dict(name="filip")), r"`loss\.name`: 'filip' .*adapter_layers"),
            (lambda c: c.model.image.update(adapter_layers=2), r"`model\.image\.adapter_layers`: unknown")):
        c = clip.get_config("llm2clip=on")
        change(c)
        with pytest.raises(ValueError, match=match):
            config_check.validate(c)
    for arg in ("tok=/x/tokenizer.json", "prefix=on", "txt=B"):
        with pytest.raises(ValueError, match=f"llm2clip=on .*{arg.split('=')[0]}="):
            clip.get_config(f"llm2clip=on,{arg}")


def _tiny_llm2clip(manifest, steps, **over):
    """configs/clip.py:llm2clip=on (its schedule, text_cache, adapter) on a tiny BERT and ViT."""
    c = clip.get_config(f"llm2clip=on,size=32,batch=16,steps={steps},adapters=2")
    c.model.image.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    c.model.text.update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, num_classes=128)
    c.model_init = None
    c.input.data = [dict(source="jsonl", path=manifest)]
    c.schedule = [(rx, None if r is None else dict(r, warmup_steps=0)) for rx, r in c.schedule]
    c.evals, c.select_metric, c.eval_every, c.ckpt_every, c.log_every = {}, None, 0, 0, 1
    c.progress, c.plot = False, False
    c.update(over)
    return c


@pytest.mark.slow  # a Trainer: init, the memo's and the step's compiles (about 15 s)
def test_one_step_trains_the_adapter_and_image_tower_only(tmp_path):
    """One step of the llm2clip recipe: every image param, the adapter, the head and t move; every
    other txt/ param is bit-identical; the whole locked trunk (both blocks) runs from the memo."""
    manifest = make_shapes_manifest(str(tmp_path / "shapes"), n_per=1)
    trainer = train.Trainer(_tiny_llm2clip(manifest, 1), str(tmp_path / "run"))
    assert trainer.text_blocks == 2  # every block: the step runs pooling, adapter and head only
    before = {k: np.array(v) for k, v in traverse_util.flatten_dict(
        jax.device_get(trainer.state["params"]), sep="/").items()}
    trainer.fit()
    after = traverse_util.flatten_dict(jax.device_get(trainer.state["params"]), sep="/")
    assert trainer.text_memo().computed > 0
    trained = [k for k in before if k.startswith(("img/", "txt/adapter_", "txt/head/")) or k == "t"]
    assert any(k.startswith("txt/adapter_norm/") for k in trained)
    # An attention key bias adds the same logit to every key of a query: the softmax ignores it
    # (its gradient is exactly 0), so it is the one trained parameter that stays.
    still = [k for k in trained if np.array_equal(before[k], after[k])]
    assert all(k.endswith("/key/bias") for k in still), still
    locked = [k for k in before if k.startswith("txt/") and k not in trained]
    assert any("encoderblock_1" in k for k in locked) and any("word_embeddings" in k for k in locked)
    for k in locked:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


@pytest.mark.slow  # a subprocess: MiniLM read, imports, compiles, 40 steps on 2 devices
def test_llm2clip_config_through_main(tmp_path):
    """`python -m vljax.main --config=configs/clip.py:llm2clip=on,...` with the real MiniLM (tiny
    ViT, 32 px): the loss falls; the workdir's Predictor embeds texts as the float64 TextProj of
    the frozen MiniLM's pooled output with the trained adapter; MiniLM itself is untouched; the
    transformers export is refused naming the key."""
    if not all(tfds_writer.is_built(n, sources.default_data_dir()) for n in ("vljax_emoji", "vljax_openclipart")):
        pytest.skip("demo sets not built: python3 -m vljax.data.build_demo")
    cfg = tmp_path / "llm2clip.py"
    cfg.write_text(_MAIN_CONFIG.format(configs=os.path.join(REPO, "configs")))
    wd = tmp_path / "wd"
    run_main(cfg, wd, devices=2)
    losses = losses_of(wd)
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3, losses
    assert np.mean(losses[-8:]) < np.log(32) - 0.2, losses  # below chance at batch 32

    pred = Predictor.load(str(wd))
    texts = ["an emoji of dog face.", "a cartoon cat.", "red apple"]
    z = pred.embed_texts(texts)
    tokens = jnp.asarray(pred.tokenizer(texts))
    out = jax.jit(lambda p, t: pred.model.apply({"params": p}, None, t)[2])(pred.params, tokens)
    txt = jax.device_get(pred.params["txt"])
    want = text_proj(np.asarray(out["txt/pre_logits"], np.float64), *_torch_layout(txt, 4))
    np.testing.assert_allclose(z, want, atol=2e-5)
    # the trunk is MiniLM as read, the adapter moved away from its init (sum of |x| of a fresh one)
    from vljax.pretrained import load_tower  # noqa: PLC0415
    minilm = traverse_util.flatten_dict(load_tower("minilm"), sep="/")
    flat = traverse_util.flatten_dict(txt, sep="/")
    for k, v in minilm.items():
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    with pytest.raises(ValueError, match=r"model\.text\.adapter_layers"):
        factory.export(factory.load(str(wd)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


_MAIN_CONFIG = """import sys
sys.path.insert(0, {configs!r})
import clip

def get_config(arg=None):
    c = clip.get_config("llm2clip=on,size=32,batch=32,steps=40")
    c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.schedule = [(rx, None if r is None else dict(r, warmup_steps=4)) for rx, r in c.schedule]
    c.evals, c.select_metric, c.eval_every, c.ckpt_every, c.log_every, c.progress = {{}}, None, 0, 40, 1, False
    return c
"""
