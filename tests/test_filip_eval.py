"""Late-interaction (FILIP) evaluation: the zero-shot and retrieval evaluators with
similarity="filip" equal a numpy reference written from the paper's equations on a tiny set, for
any chunking, on 1 device and on a data x fsdp mesh; a model trained with FILIP is evaluated by
late interaction unless the eval config says otherwise."""
import jax
import numpy as np
import pytest
from test_eval_sharded import NAME, SIZE, VALUE_RANGE, _spec, model_and_params

from vljax import eval_builder, sharding
from vljax.data import tfds_writer
from vljax.data.preprocess import Preprocess
from vljax.embedder import Embedder


def np_filip(img, txt, mask):
    """Yao et al. 2021, Eqs. 4-5: i2t = mean_k max_r <x_k, y_r>, t2i = mean_r max_k (real r only)."""
    s = np.einsum("bnd,cmd->bcnm", img.astype(np.float64), txt.astype(np.float64))
    i2t = np.where(mask[None, :, None, :], s, -np.inf).max(axis=3).mean(axis=2)
    t2i = np.where(mask[None], s.max(axis=2), 0.0).sum(axis=2) / mask.sum(axis=1)[None]
    return i2t, t2i


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds_writer.write_tfds(_spec(), data_dir)
    model, params, tok = model_and_params()
    data = dict(name=NAME, split="test", data_dir=data_dir)
    evals = dict(zs=dict(type="zeroshot", data=data, templates=["a photo of {}.", "{}", "art of the {}"],
                         ks=(1, 2), similarity="filip", filip_chunk=(3, 2)),
                 ret=dict(type="retrieval", data=data, ks=(1, 5), similarity="filip", filip_chunk=(3, 5)))
    evaluators = eval_builder.build({"evals": evals})
    # The reference: every readable image and every text in ONE model.apply, scored in numpy.
    src = evaluators["zs"].data
    pre = Preprocess(image_size=SIZE, value_range=VALUE_RANGE, require_caption=False)
    exs = [pre.eval(src[i]) for i in range(len(src))]
    index = np.asarray([i for i, ex in enumerate(exs) if "skip" not in ex])
    img = np.asarray(model.apply({"params": params}, np.stack([exs[i]["image"] for i in index]), None)[2]
                     ["img/tokens_proj"])

    def text_tokens(texts):
        out = model.apply({"params": params}, None, np.asarray(tok(list(texts)), np.int32))[2]
        return np.asarray(out["txt/tokens_proj"]), np.asarray(out["txt/mask"])
    zs = evaluators["zs"]
    labels = zs.labels[index]
    flat = [t for ts in zs.texts for t in ts]
    i2t, _ = np_filip(img, *text_tokens(flat))
    scores = i2t.reshape(len(img), len(zs.texts), -1).mean(axis=2)  # prompt ensemble: mean similarity
    order = np.argsort(-scores, axis=1)
    ref = {"zeroshot/zs/top1": np.mean(order[:, 0] == labels),
           "zeroshot/zs/top2": np.mean((order[:, :2] == labels[:, None]).any(axis=1))}
    ret = evaluators["ret"]
    caps = [ret.captions[i] for i in index]
    owner = np.repeat(np.arange(len(caps)), [len(c) for c in caps])
    i2t, t2i = np_filip(img, *text_tokens([c for cs in caps for c in cs]))
    for k in (1, 5):
        top_t = np.argsort(-i2t, axis=1)[:, :k]  # image -> text by i2t
        ref[f"retrieval/ret/i2t_r{k}"] = np.mean([(owner[top_t[i]] == i).any() for i in range(len(img))])
        top_i = np.argsort(-t2i.T, axis=1)[:, :k]  # text -> image by t2i
        ref[f"retrieval/ret/t2i_r{k}"] = np.mean([(top_i[j] == owner[j]).any() for j in range(len(owner))])
    return dict(model=model, params=params, tok=tok, evaluators=evaluators, index=index, img=img, ref=ref,
                class_scores=scores)


def _metrics(setup, emb):
    out = {}
    for ev in setup["evaluators"].values():
        out.update(ev.run(emb))
    return out


@pytest.mark.parametrize("mesh_kind", ["one_device", "data_fsdp"])
def test_filip_evaluators_equal_numpy_reference_for_any_chunking(setup, mesh_kind):
    params = setup["params"]
    if mesh_kind == "one_device":
        mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
        params = jax.device_put(params, sharding.param_shardings(params, mesh, [(".*", "fsdp")]))
    emb = Embedder(setup["model"], params, setup["tok"], mesh=mesh, image_size=SIZE,
                   value_range=VALUE_RANGE, batch_size=8)
    got = emb.embed_image_tokens(setup["evaluators"]["zs"].data)
    np.testing.assert_array_equal(got.index, setup["index"])
    np.testing.assert_allclose(got.z, setup["img"], atol=1e-5)
    chunked = _metrics(setup, emb)
    for ev in setup["evaluators"].values():
        ev.chunk = (1000, 1000)  # one block: unchunked
    try:
        whole = _metrics(setup, emb)
    finally:
        setup["evaluators"]["zs"].chunk, setup["evaluators"]["ret"].chunk = (3, 2), (3, 5)
    assert chunked == whole
    assert {k: chunked[k] for k in setup["ref"]} == pytest.approx(setup["ref"], abs=1e-9)
    assert chunked["zeroshot/zs/top2"] > chunked["zeroshot/zs/top1"] or chunked["zeroshot/zs/top1"] == 1


def test_similarity_defaults_to_the_model_and_the_config_overrides_it(setup):
    """similarity=None takes the embedder's (the trained loss's, from the model spec)."""
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    zs = setup["evaluators"]["zs"]
    emb = {s: Embedder(setup["model"], setup["params"], setup["tok"], mesh=mesh, image_size=SIZE,
                       value_range=VALUE_RANGE, batch_size=8, similarity=s) for s in ("global", "filip")}
    calls = []
    for s, e in emb.items():
        e.embed_image_tokens = (lambda f, s=s: lambda d: calls.append(s) or f(d))(e.embed_image_tokens)
    zs.similarity = None
    try:
        by_model = {s: zs.run(e) for s, e in emb.items()}
        assert calls == ["filip"]  # only the FILIP model is scored by late interaction
        zs.similarity = "global"
        assert zs.run(emb["filip"]) == by_model["global"]
    finally:
        zs.similarity = "filip"
    assert {k: by_model["filip"][k] for k in setup["ref"] if k.startswith("zeroshot")} == pytest.approx(
        {k: v for k, v in setup["ref"].items() if k.startswith("zeroshot")})


def test_gzsl_scores_a_filip_model_by_late_interaction(setup):
    """GZSL's class scores for a FILIP model are the zero-shot FILIP scores (i2t averaged over each
    class's prompts), chunked or not; the same evaluator scores a global model by cosine."""
    from vljax.evaluators.gzsl import GZSLEvaluator
    zs = setup["evaluators"]["zs"]
    gz = GZSLEvaluator(zs.data, zs.labels, zs.class_names, seen_classes=[0], name="gz",
                       templates=["a photo of {}.", "{}", "art of the {}"], canonicalize=False,
                       filip_chunk=(3, 2))
    assert gz.texts == zs.texts
    mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
    emb = {s: Embedder(setup["model"], setup["params"], setup["tok"], mesh=mesh, image_size=SIZE,
                       value_range=VALUE_RANGE, batch_size=8, similarity=s) for s in ("global", "filip")}
    scores, index = gz.scores(emb["filip"])
    np.testing.assert_array_equal(index, setup["index"])
    np.testing.assert_allclose(scores, setup["class_scores"], atol=1e-5)
    cosine, _ = gz.scores(emb["global"])
    assert np.abs(cosine - scores).max() > 1e-3  # another similarity, not the same numbers
    assert set(gz.run(emb["filip"])) >= {"gzsl/gz/harmonic", "gzsl/gz/ausuc"}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="similarity"):
        eval_builder.build({"evals": dict(r=dict(type="retrieval", data=dict(name="emoji"), similarity="cosine"))})
    with pytest.raises(ValueError, match="zpe.*similarity"):
        eval_builder.build({"evals": dict(z=dict(type="zeroshot", data=dict(name="fashion_mnist"), zpe=True,
                                                 similarity="filip"))})


@pytest.mark.slow
def test_main_trains_filip_lit_with_the_cache_and_evaluates_by_late_interaction(tmp_path):
    """`python -m vljax.main` on the tiny JSONL set: LiT + FILIP with lit_cache trains (loss
    falls), its spec records similarity "filip", and the evaluations it logs are the
    late-interaction ones, as `vljax.evaluate` computes them for the saved model."""
    import json
    import os
    import subprocess
    import sys

    import ml_collections
    from helpers import REPO, losses_of
    from vljax import evaluate as evaluate_lib
    from vljax import metrics as metrics_lib
    from vljax.inference import Predictor
    cfg = tmp_path / "filip.py"
    cfg.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
        "import helpers\n\n"
        "def get_config(arg=None):\n"
        f"    c = helpers.tiny_config(helpers.make_shapes_manifest({str(tmp_path / 'shapes')!r}), 'lit', steps=30)\n"
        "    c.loss = dict(name='filip')\n"
        "    c.eval_every = 30\n"
        "    c.evals = dict(ret=dict(type='retrieval', data=dict(name='emoji', split='test', max_examples=16)),\n"
        "                   zs=dict(type='zeroshot', data=dict(name='fashion_mnist', split='test', max_examples=16),\n"
        "                           templates='name'))\n"
        "    return c\n")
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "vljax.main", f"--config={cfg}", f"--workdir={wd}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = losses_of(wd)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert json.loads((wd / "model_spec.json").read_text())["similarity"] == "filip"
    logged = [r for r in metrics_lib.read_metrics(str(wd / "metrics.jsonl")) if "retrieval/ret/i2t_r1" in r][-1]
    predictor = Predictor.load(str(wd))
    assert predictor.embedder.similarity == "filip"
    config = ml_collections.ConfigDict(dict(evals=json.loads((wd / "config.json").read_text())["evals"]))
    by_model = evaluate_lib.evaluate(predictor, config)
    for ev in config.evals.values():
        ev.similarity = "filip"
    assert evaluate_lib.evaluate(predictor, config).items() >= {k: v for k, v in by_model.items()
                                                               if not k.startswith("time/")}.items()
    for k in ("retrieval/ret/i2t_r1", "retrieval/ret/t2i_r5", "zeroshot/zs/top1"):
        # The trainer scores the stored (float16) trunk tokens, vljax.evaluate recomputes them:
        # at most one of 16 ranks may flip.
        assert abs(logged[k] - by_model[k]) <= 1 / 16 + 1e-9, (k, logged[k], by_model[k])
