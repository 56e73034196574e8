"""ZPE as published: the official notebook's computation (google/uncertainty-baselines,
experimental/multimodal/Zero_shot_prompt_ensembling_for_text_image_models_results.ipynb:
`get_logits`, `get_weights(debias_mode="both", img_mean=True)`, softmax over prompts,
`mad_method`, `agg_logits`) transcribed in numpy and compared on a small hand-made example."""
import numpy as np
import pytest
from scipy import stats

from vljax.embedder import Embedded
from vljax.evaluators import zeroshot


def notebook_zpe(zimg, zref, ztpl, scale, threshold=None):
    """-> (softmax weights [P], raw scores [P], selected prompt indices) as the notebook."""
    logits = np.einsum("nd,pcd->npc", zimg, scale * ztpl)         # [n_img, n_prompt, n_cls]
    random_logits = np.einsum("nd,pcd->npc", zref, scale * ztpl)
    normalised = logits - 0.5 * (random_logits.mean(0, keepdims=True) + logits.mean(0, keepdims=True))
    conf = normalised.max(-1, keepdims=True).mean(0, keepdims=True)  # [1, n_prompt, 1]
    soft = np.exp(conf - conf.max()) / np.exp(conf - conf.max()).sum(axis=1, keepdims=True)
    scores = conf[0, :, 0]
    if threshold is None:
        selected = np.arange(len(scores))
    else:
        med, mad = np.median(scores), np.abs(stats.median_abs_deviation(scores))
        selected = np.array([i for i, v in enumerate(scores) if (v - med) / mad > threshold])
    return soft[0, :, 0], scores, selected


@pytest.fixture
def example():
    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    zimg = unit(rng.normal(size=(12, 6)))
    zref = unit(rng.normal(size=(9, 6)))
    ztpl = unit(rng.normal(size=(7, 4, 6)))
    ztpl[2] = unit(ztpl[2] + 2.0)  # a template every class likes: raised logits, debiased away
    return zimg, zref, ztpl


def test_weights_equal_the_notebooks(example):
    zimg, zref, ztpl = example
    want_w, want_s, _ = notebook_zpe(zimg, zref, ztpl, 10.0)
    w, s = zeroshot.zpe_weights(zimg, ztpl, 10.0, zref=zref)
    np.testing.assert_allclose(s, want_s, rtol=1e-6)
    np.testing.assert_allclose(w, want_w, rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_mad_selection_equals_the_notebooks(example, threshold):
    zimg, zref, ztpl = example
    want_w, _, selected = notebook_zpe(zimg, zref, ztpl, 10.0, threshold)
    assert 0 < len(selected) < len(ztpl)  # the example selects a real subset
    w, _ = zeroshot.zpe_weights(zimg, ztpl, 10.0, zref=zref, select_threshold=threshold)
    np.testing.assert_array_equal(np.flatnonzero(w), selected)
    np.testing.assert_allclose(w[selected], want_w[selected], rtol=1e-6)


def test_evaluator_averages_the_selected_templates_logits(example):
    """The evaluator's predictions are argmax_c of the notebook's agg_logits."""
    zimg, zref, ztpl = example
    names = ["c0", "c1", "c2", "c3"]
    templates = [f"t{p} {{}}." for p in range(len(ztpl))]
    table = {t.format(c): ztpl[p, k] for p, t in enumerate(templates) for k, c in enumerate(names)}

    class Table:
        logit_scale, logit_bias = 10.0, None

        def embed_images(self, data):
            z = zref if isinstance(data, str) else zimg  # "proxy": the pretraining-proxy set
            return Embedded(z=z, index=np.arange(len(z)))

        def embed_texts(self, texts):
            return np.stack([table[t] for t in texts])

    labels = np.arange(len(zimg)) % 4
    ev = zeroshot.ZeroShotEvaluator(list(range(len(zimg))), labels, names, name="t", templates=templates,
                                    canonicalize=False, zpe=True, zpe_reference="proxy", zpe_select=0.5)
    result = ev.evaluate(Table())
    want_w, _, selected = notebook_zpe(zimg, zref, ztpl, 10.0, 0.5)
    logits = np.einsum("nd,pcd->npc", zimg, 10.0 * ztpl)[:, selected]
    agg = (logits * want_w[selected][None, :, None]).mean(axis=1)  # agg_logits
    np.testing.assert_array_equal(result.predictions, agg.argmax(axis=1))
