"""A loaded SigLIP 2 NaFlex model embeds and classifies like its own forward pass: streamed eval
batches (padded patch dicts, mixed aspect ratios, an unreadable record, sharded over 2 devices,
one compilation), the Predictor on photos in memory, texts with the directory's tokenizer and
padding (equal to transformers' text tower); a NaFlex batch over the budget is refused."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from siglip_dirs import PATCH, siglip2_dir, siglip_dir  # noqa: E402
from test_load_siglip import SIZES, hf_ids, ours  # noqa: E402
from test_naflex import random_images  # noqa: E402

from vljax import factory, sharding  # noqa: E402
from vljax.data import tfds_writer  # noqa: E402
from vljax.data import transforms as T  # noqa: E402
from vljax.embedder import Embedder  # noqa: E402
from vljax.inference import Predictor  # noqa: E402

BUDGET = 12


class ImagesSource:
    """Records of the given uint8 images (PNG bytes); None gives an undecodable record."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def cache_key(self):
        return f"images:{len(self.images)}"

    def __getitem__(self, i):
        im = self.images[i]
        data = b"not an image" if im is None else tfds_writer.encode_png(T.Image.fromarray(im))
        return {"id": str(i), "image": data, "captions": [], "label": -1}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip_eval")
    (s2, model2), (s1, model1) = siglip2_dir(root), siglip_dir(root)
    return {"siglip2": (factory.load(s2, max_num_patches=BUDGET), s2, model2),
            "siglip": (factory.load(s1), s1, model1)}


def test_naflex_streams_in_padded_batches_compiled_once(bundles):
    bundle, _, _ = bundles["siglip2"]
    images = random_images(SIZES + [(9, 30), (40, 12)], seed=3)
    want = ours(bundle, bundle.eval_image.stack([bundle.preprocess(im) for im in images]),
                bundle.tokenizer(["x"]))[0]
    mesh = sharding.make_mesh([("data", 2)], devices=jax.devices()[:2])
    emb = Embedder.from_bundle(bundle, mesh=mesh, batch_size=4, progress=False,
                               towers=type(Embedder.shared_towers)())
    got = emb.embed_images(ImagesSource(images[:3] + [None] + images[3:]))  # 8 records, 2 batches
    np.testing.assert_array_equal(got.index, [0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_allclose(got.z, want, atol=1e-5, rtol=0)
    assert emb._fn.img._cache_size() == 1  # every batch one static shape: [4, BUDGET, P*P*3]
    pred = Predictor.from_bundle(bundle, batch_size=3)
    np.testing.assert_allclose(pred.embed_images(images), want, atol=1e-5, rtol=0)


def test_naflex_batch_over_the_budget_is_refused(bundles):
    bundle, _, _ = bundles["siglip2"]
    pred = Predictor.from_bundle(bundle)
    over = {"patches": np.zeros((1, 25, PATCH * PATCH * 3), np.float32),
            "mask": np.ones((1, 25), bool), "shapes": np.asarray([[5, 5]], np.int32)}
    with pytest.raises(ValueError, match=f"25 patches.*max_num_patches={BUDGET}"):
        pred.embed_images(over)
    with pytest.raises(ValueError, match="NaFlex model takes"):
        pred.embed_images(np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_texts_and_zero_shot_use_the_directory_tokenizer(bundles, name):
    """Class prompts go through the spec's tokenizer (SigLIP's padding to max_length): text
    embeddings equal transformers' text tower on transformers' ids; classify is sigmoid."""
    bundle, path, model = bundles[name]
    pred = Predictor.from_bundle(bundle)
    texts = ["a photo of a cat.", "A DOG", "東京 🐈"]
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(hf_ids(path, texts)).long())
    ref = getattr(ref, "pooler_output", ref).numpy()
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(pred.embed_texts(texts), ref, atol=1e-5, rtol=0)
    images = random_images(SIZES[:2], seed=5)
    top = pred.classify(images, ["cat", "dog", "car"], templates=["a photo of a {}."], top_k=3)
    zimg, zcls = pred.embed_images(images), pred.embed_texts([f"a photo of a {c}." for c in
                                                              ("cat", "dog", "car")])
    probs = 1 / (1 + np.exp(-(pred.embedder.logit_scale * zimg @ zcls.T + pred.embedder.logit_bias)))
    for i, row in enumerate(top):
        assert [p for _, p in row] == pytest.approx(sorted(probs[i], reverse=True), abs=1e-5)
