"""The representation evaluator: modality gap, alignment and uniformity by hand and against the
definitions on random embeddings, built from a config entry like any other evaluator."""
import numpy as np
import pytest

from vljax.embedder import Embedded
from vljax.evaluators import EVALUATORS, representation


class _Table:
    logit_scale, logit_bias = 10.0, None

    def __init__(self, images, texts):
        self.images, self.texts = np.asarray(images, np.float32), texts

    def embed_images(self, data):
        return Embedded(z=self.images[list(data)], index=np.arange(len(data)))

    def embed_texts(self, texts):
        return np.stack([np.asarray(self.texts[t], np.float32) for t in texts])


def test_representation_by_hand():
    # Images e0, e1; both captions point along e0: centroids (.5, .5) and (1, 0).
    emb = _Table(np.eye(2), {"a": [1, 0], "b": [1, 0]})
    ev = representation.RepresentationEvaluator([0, 1], ["a", "b"], name="toy")
    assert ev.run(emb) == pytest.approx({
        "representation/toy/modality_gap": np.sqrt(0.5),
        "representation/toy/alignment": 1.0,         # (0 + ||e1 - e0||^2) / 2
        "representation/toy/uniformity_img": -4.0,   # log exp(-2 * 2)
        "representation/toy/uniformity_txt": 0.0})   # identical texts: log exp(0)
    assert EVALUATORS["representation"] is representation.RepresentationEvaluator


def test_uniformity_blocks_equal_the_definition():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 5))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    pairs = [np.sum((z[i] - z[j]) ** 2) for i in range(7) for j in range(7) if i != j]
    assert representation.uniformity(z, batch_size=3) == pytest.approx(np.log(np.mean(np.exp(-2 * np.array(pairs)))))
