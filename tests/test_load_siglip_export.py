"""Round trips of a loaded SigLIP / SigLIP 2 model: `factory.export` -> `factory.load` (and
transformers) gives the same spec, ids and outputs; a workdir spec written from the bundle
carries its tokenizer files and reloads unchanged after the original directory moved away."""
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from siglip_dirs import siglip2_dir, siglip_dir  # noqa: E402
from test_load_siglip import SIZES, TEXTS, assert_close, hf_ids, ours  # noqa: E402
from test_naflex import random_images  # noqa: E402

from vljax import factory  # noqa: E402
from vljax.convert import flatten  # noqa: E402

FILES = factory.TOKENIZER_FILE_KEYS


def _without_files(spec):
    return dict(spec, tokenizer={k: v for k, v in spec["tokenizer"].items() if k not in FILES})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip_export")
    return {"siglip": siglip_dir(root)[0], "siglip2": siglip2_dir(root, max_num_patches=16)[0]}


def _inputs(bundle):
    return bundle.eval_image.stack([bundle.preprocess(im) for im in random_images(SIZES, seed=4)])


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_export_then_load_gives_the_same_model(made, name, tmp_path):
    bundle = factory.load(made[name])
    out = tmp_path / "exported"
    factory.export(bundle, out)
    again = factory.load(out)
    assert _without_files(again.spec) == _without_files(bundle.spec)
    np.testing.assert_array_equal(again.tokenizer(TEXTS), bundle.tokenizer(TEXTS))
    np.testing.assert_array_equal(hf_ids(out, TEXTS), bundle.tokenizer(TEXTS))  # transformers too
    images = _inputs(bundle)
    ids = bundle.tokenizer(TEXTS[:len(SIZES)])
    assert_close(ours(again, images, ids), ours(bundle, images, ids), atol=0)


def test_workdir_spec_survives_the_checkpoint_moving(made, tmp_path):
    src = shutil.copytree(made["siglip2"], tmp_path / "download")
    bundle = factory.load(src, max_num_patches=9)
    wd = tmp_path / "wd"
    factory.write_spec(wd, bundle.spec)
    shutil.rmtree(src)  # the download is gone: the workdir holds its tokenizer
    spec = factory.read_spec(wd)
    assert spec["tokenizer"]["tokenizer_file"] == str(wd / "tokenizer" / "tokenizer.json")
    assert _without_files(spec) == _without_files(bundle.spec)
    np.testing.assert_array_equal(factory.build_tokenizer(spec)(TEXTS), bundle.tokenizer(TEXTS))
    factory.write_spec(wd, spec)  # rewritten from itself (a resumed run): unchanged
    assert factory.read_spec(wd) == spec


def test_export_refuses_a_tokenizer_transformers_would_not_reproduce(made, tmp_path):
    """A big_vision rule (no canonicalisation, sticky eos) has no transformers tokenizer."""
    bundle = factory.load(made["siglip"])
    npz = tmp_path / "bv.npz"
    np.savez(npz, **{f"params/{k}": np.asarray(v) for k, v in flatten(bundle.params).items()})
    shutil.copy(made["siglip"] / "spiece.model", tmp_path / "bv.model")
    with pytest.raises(ValueError, match="would not reproduce the tokenizer.*canonicalize"):
        factory.export(factory.load(npz), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
