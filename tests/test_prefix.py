"""Prefix Conditioning (Saito et al. 2023): the text tower's learned prefix (vljax/models/text.py),
the batch field from the source entry (vljax/data/prefix.py), the config check, and
configs/clip.py:prefix=on trained through `python -m vljax.main`."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, losses_of, make_shapes_manifest, run_main
from vljax import config_check, factory
from vljax.data import pipeline, sources, tfds_writer
from vljax.inference import Predictor
from vljax.models.bert import Bert
from vljax.models.text import PREFIX_NAMES, TextTransformer
from vljax.tokenizers import ClipTokenizer

CLASS_NAMES = ["circle", "square", "triangle"]
TEXT = dict(variant=None, width=32, depth=2, mlp_dim=64, num_heads=2, vocab_size=64, max_len=9,
            causal=True, eot_id=63, pad_id=0, num_classes=16)


@pytest.fixture(scope="module")
def towers():
    """(tower with prefix conditioning, the same tower without, its params, token ids [3, 8]):
    rows pad to 8 with 0 after the end-of-text token 63."""
    tokens = jnp.asarray([[1, 5, 6, 63, 0, 0, 0, 0], [1, 7, 63, 0, 0, 0, 0, 0],
                          [1, 8, 9, 10, 11, 12, 13, 63]], jnp.int32)
    on = TextTransformer(**TEXT, prefix_conditioning=True)
    params = on.init(jax.random.PRNGKey(0), tokens)["params"]
    return on, TextTransformer(**TEXT), params, tokens


def _conditioned_vs_inserted(on, off, params, tokens, ids):
    """(on's outputs with `prefix_ids=ids`, off's with the same params less the table and the
    table's rows as a one-token CoOp prefix): asserts their embeddings equal bit for bit."""
    plain = {k: v for k, v in params.items() if k != "prefix_embedding"}
    z_on, out_on = on.apply({"params": params}, tokens, prefix_ids=ids)
    z_off, out_off = off.apply({"params": plain}, tokens, prefix=params["prefix_embedding"][ids][:, None])
    np.testing.assert_array_equal(z_on, z_off)
    return out_on, out_off


def test_prefix_token_is_an_inserted_embedding_and_pools_the_same_text_position(towers):
    """The conditioned tower == the plain tower (same params, no table) given its table row as a
    one-token prefix after the start token, bit for bit; pooling ("eot") reads the end-of-text
    token, one position later; the mask counts the prefix as real."""
    on, off, params, tokens = towers
    assert params["prefix_embedding"].shape == (len(PREFIX_NAMES), 32)
    out_on, out_off = _conditioned_vs_inserted(on, off, params, tokens, jnp.asarray([0, 1, 1], jnp.int32))
    np.testing.assert_array_equal(out_on["tokens"], out_off["tokens"])
    eot = np.argmax(np.asarray(tokens) == 63, axis=1) + 1  # one position later
    np.testing.assert_array_equal(out_on["pre_logits"], np.asarray(out_on["tokens"])[np.arange(3), eot])
    assert out_on["tokens"].shape == (3, 9, 32)
    np.testing.assert_array_equal(out_on["mask"], np.concatenate(
        [np.asarray(tokens)[:, :1] != 0, np.ones((3, 1), bool), np.asarray(tokens)[:, 1:] != 0], axis=1))


def test_eval_prefix_is_the_default_and_the_prefix_changes_the_output(towers):
    on, _, params, tokens = towers
    z_default, _ = on.apply({"params": params}, tokens)
    z_caption, _ = on.apply({"params": params}, tokens, prefix_ids=jnp.zeros(3, jnp.int32))
    z_label, _ = on.apply({"params": params}, tokens, prefix_ids=jnp.ones(3, jnp.int32))
    np.testing.assert_array_equal(z_default, z_caption)  # prefix_at_eval="caption"
    assert np.abs(np.asarray(z_label) - np.asarray(z_caption)).min() > 1e-6
    label_eval = TextTransformer(**TEXT, prefix_conditioning=True, prefix_at_eval="label")
    np.testing.assert_array_equal(label_eval.apply({"params": params}, tokens)[0], z_label)


def test_split_tower_and_mean_pooling_with_the_prefix(towers):
    """stop_after / lower=(k, states) (locked lower blocks) gives the unsplit call's output with
    the eval prefix; "mean" pools over the L + 1 positions."""
    on, _, params, tokens = towers
    states = on.apply({"params": params}, tokens, stop_after=1)
    assert states.shape == (3, 9, 32)
    np.testing.assert_array_equal(on.apply({"params": params}, tokens, lower=(1, states))[0],
                                  on.apply({"params": params}, tokens)[0])
    mean = TextTransformer(**{**TEXT, "pool_type": "mean"}, prefix_conditioning=True)
    _, out = mean.apply({"params": params}, tokens, prefix_ids=jnp.ones(3, jnp.int32))
    np.testing.assert_allclose(out["pre_logits"], np.asarray(out["tokens"]).mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="prefix_conditioning"):
        TextTransformer(**TEXT).apply({"params": params}, tokens, prefix_ids=jnp.zeros(3, jnp.int32))


def test_bert_prefix_token_equals_the_inserted_embedding_and_splits(towers):
    """BERT (bidirectional, key-masked, mean pooled over real tokens): the conditioned tower ==
    the plain one given its table row as a one-token prefix, bit for bit, the prefix counted as a
    real token; a lower=(k, states) split gives the unsplit call's output."""
    tokens = towers[3]
    kw = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
              max_position_embeddings=9, num_classes=16)
    on, off = Bert(**kw, prefix_conditioning=True), Bert(**kw)
    params = on.init(jax.random.PRNGKey(1), tokens)["params"]
    out_on, out_off = _conditioned_vs_inserted(on, off, params, tokens, jnp.asarray([1, 0, 1], jnp.int32))
    np.testing.assert_array_equal(out_on["mask"], out_off["mask"])
    assert out_on["mask"].shape == (3, 9) and out_on["mask"][:, 1].all()
    states = on.apply({"params": params}, tokens, stop_after=1)
    np.testing.assert_array_equal(on.apply({"params": params}, tokens, lower=(1, states))[0],
                                  on.apply({"params": params}, tokens)[0])


@pytest.fixture(scope="module")
def labelled_manifest(tmp_path_factory):
    """The shapes set (2 images per colour and shape) with an integer `label` (the shape)."""
    root = tmp_path_factory.mktemp("shapes")
    path = make_shapes_manifest(str(root), n_per=1)
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    out = root / "labelled.jsonl"
    out.write_text("".join(json.dumps({**d, "label": d["labels"][0]}) + "\n" for d in lines))
    return str(out)


def test_batch_prefix_id_from_the_source_entry(labelled_manifest):
    """A caption source and the same images as label prompts: each row's prefix_id is its source's
    row of PREFIX_NAMES, and the label rows' captions are a template on their class name."""
    templates = ["a {} shape.", "an icon of a {}."]
    cfg = dict(data=[dict(source="jsonl", path=labelled_manifest, prefix="caption"),
                     dict(source="jsonl", path=labelled_manifest, class_names=CLASS_NAMES,
                          prefix="label", label_prompts=templates)],
               batch_size=24, image_size=16, value_range=(-1.0, 1.0), num_workers=0,
               keep_captions=True, label=True)
    batch = next(iter(pipeline.make_train_iterator(cfg, ClipTokenizer(max_len=12), seed=0,
                                                   process_index=0, process_count=1)))
    ids = batch["prefix_id"]
    assert ids.dtype == np.int32 and ids.shape == (24,) and set(ids) == {0, 1}
    for pid, caption, label in zip(ids, batch["caption"], batch["label"]):
        prompts = [t.format(CLASS_NAMES[label]) for t in templates]
        assert (caption in prompts) == (pid == PREFIX_NAMES.index("label")), (pid, caption)
    # No entry names a prefix: no field (the tower then uses its eval prefix).
    plain = dict(cfg, data=[dict(source="jsonl", path=labelled_manifest)])
    assert "prefix_id" not in next(iter(pipeline.make_train_iterator(
        plain, ClipTokenizer(max_len=12), seed=0, process_index=0, process_count=1)))


def test_config_check_names_the_prefix_keys():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import clip  # noqa: PLC0415  (configs/ is not a package)
    c = clip.get_config("prefix=on")
    config_check.validate(c)
    c.input.data[2]["prefix"] = "labels"
    with pytest.raises(ValueError, match=r"`input\.data\[2\]\.prefix`: unknown prefix 'labels'"):
        config_check.validate(c)
    c = clip.get_config("prefix=on")
    c.model.text.prefix_at_eval = "prompt"
    with pytest.raises(ValueError, match=r"`model\.text\.prefix_at_eval`: unknown prefix"):
        config_check.validate(c)
    c = clip.get_config("prefix=on")
    c.model.text.prefix_conditioning = False
    with pytest.raises(ValueError, match=r"`input\.data\[0\]\.prefix` needs .*prefix_conditioning=True"):
        config_check.validate(c)
    c = clip.get_config("prefix=on")
    c.input.data[2]["label_prompts"] = ["an icon"]
    with pytest.raises(ValueError, match=r"`input\.data\[2\]\.label_prompts`: template 'an icon'"):
        config_check.validate(c)
    c = clip.get_config("prefix=on")
    c.text_cache = True  # embeds training texts without the batch's prefix ids
    with pytest.raises(ValueError, match=r"`text_cache` cannot be combined with a source's `input\.data\[i\]\.prefix`"):
        config_check.validate(c)
    # The paper's baseline: the same three sources, no prefix anywhere.
    on, union = clip.get_config("prefix=on"), clip.get_config("prefix=union")
    config_check.validate(union)
    assert [{k: v for k, v in e.items() if k != "prefix"} for e in on.input.data] == list(union.input.data)
    assert not any("prefix" in e for e in union.input.data) and "prefix_conditioning" not in union.model.text
    with pytest.raises(ValueError, match="prefix='both' is not 'on' or 'off' or 'union'"):
        clip.get_config("prefix=both")


_MAIN_CONFIG = """import sys
sys.path.insert(0, {configs!r})
import clip

def get_config(arg=None):
    c = clip.get_config("prefix=on,size=32,batch=16,steps=4")
    c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
    c.schedule = [(".*", dict(decay_type="cosine", warmup_steps=1))]
    c.evals, c.select_metric, c.eval_every, c.ckpt_every, c.log_every, c.progress = {{}}, None, 0, 2, 1, False
    return c
"""


@pytest.mark.slow  # a subprocess: imports, one compile and 4 steps
def test_clip_prefix_config_through_main(tmp_path):
    """`python -m vljax.main` on configs/clip.py:prefix=on (tiny towers, 2 devices): both prefix rows
    move between the checkpoints at steps 2 and 4; the workdir's Predictor (what `python -m
    vljax.inference` loads) embeds texts with the caption prefix, not the label one; the
    transformers export is refused naming the key."""
    if not all(tfds_writer.is_built(n, sources.default_data_dir()) for n in ("vljax_emoji", "vljax_openclipart")):
        pytest.skip("demo sets not built: python3 -m vljax.data.build_demo")
    cfg = tmp_path / "prefix.py"
    cfg.write_text(_MAIN_CONFIG.format(configs=os.path.join(REPO, "configs")))
    wd = tmp_path / "wd"
    run_main(cfg, wd, devices=2)
    losses = losses_of(wd)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    pred = Predictor.load(str(wd))  # the latest checkpoint (step 4)
    early = factory.load(str(wd), step=2)
    moved = np.abs(np.asarray(pred.params["txt"]["prefix_embedding"])
                   - np.asarray(early.params["txt"]["prefix_embedding"])).max(axis=1)
    assert (moved > 0).all(), moved  # both rows: caption and label examples both trained
    texts = ["an emoji of dog face.", "a cartoon cat."]
    z = pred.embed_texts(texts)
    embed = jax.jit(lambda ids: pred.model.apply({"params": pred.params}, None, tokens,
                                                 text_prefix_ids=ids)[1])
    tokens = jnp.asarray(pred.tokenizer(texts))
    ref = {name: np.asarray(embed(jnp.full((2,), i, jnp.int32))) for i, name in enumerate(PREFIX_NAMES)}
    np.testing.assert_allclose(z, ref["caption"], atol=1e-5)
    assert np.abs(z - ref["label"]).max() > 1e-3
    with pytest.raises(ValueError, match="model.text.prefix_conditioning"):
        factory.export(early, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
