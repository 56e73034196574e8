"""Strict config validation: a typo anywhere in a nested dict is refused, naming the full key, before
anything runs or is written; every shipped config validates."""
import importlib.util
import os
import subprocess
import sys

import pytest
from helpers import REPO, tiny_config

from vljax import config_check

CONFIGS = os.path.join(REPO, "configs")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,arg", [
    ("clip", None), ("clip", "img=B/16,txt=B,size=224,batch=32768,steps=100"),
    ("siglip", None), ("siglip", "img=So400m/14,txt=B,size=224"),
    ("lit", None), ("lit", "steps=200,batch=64"), ("lit_eval", None), ("lit_eval", "steps=100"),
    ("adapt", None), ("adapt", "seeds=1,coop_steps=50"),
    ("siglip2", None), ("siglip2", "decoder=off,sd=off"),
])
def test_every_shipped_config_validates(name, arg):
    config_check.validate(_load(name).get_config(arg))


@pytest.mark.parametrize("recipe", ["clip", "siglip", "lit"])
def test_test_configs_validate(recipe):
    config_check.validate(tiny_config("/nowhere/data.jsonl", recipe))


def _set(path, value):
    def mutate(c):
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


# The four typos, and one per other nested dict: (mutation, full key, suggestion).
TYPOS = [
    (_set("input.augment.greyscal", 0.1), "input.augment.greyscal", "greyscale"),
    (_set("loss.temprature", 0.1), "loss.temprature", None),
    (_set("model.temperatur_init", 3.0), "model.temperatur_init", "temperature_init"),
    (_set("evals.emoji.templats", "clip80"), "evals.emoji.templats", "templates"),
    (_set("evals.emoji.data.lable", "category"), "evals.emoji.data.lable", "label"),
    (_set("model.image.num_clases", 3), "model.image.num_clases", "num_classes"),
    (_set("model.text.intermediate", 3), "model.text.intermediate", "intermediate_size"),
    (_set("tokenizer.maxlen", 8), "tokenizer.maxlen", "max_len"),
    (_set("optax.beta2", 0.9), "optax.beta2", None),
    (_set("input.batchsize", 8), "input.batchsize", "batch_size"),
    (_set("model_init.image", "minilm"), "model_init.image", None),
    (lambda c: c.input.data[0].update(splt="train"), "input.data[0].splt", "split"),
    # A source entry's keys are its kind's (vljax/data/sources): a folder's, a JSONL manifest's.
    (lambda c: c.input.update(data=[dict(source="folder", path="x", label_from_foldr=True)]),
     "input.data[0].label_from_foldr", "label_from_folder"),
    (lambda c: c.input.update(data=[dict(source="jsonl", path="x", num_label=3)]),
     "input.data[0].num_label", "num_labels"),
    (lambda c: c.update(schedule=[(".*", dict(warmup=3))]), "schedule[0].warmup", "warmup_steps"),
]


@pytest.mark.parametrize("mutate,key,suggestion", TYPOS, ids=[t[1] for t in TYPOS])
def test_a_typo_in_any_nested_dict_is_refused_naming_the_key(mutate, key, suggestion):
    config = _load("lit").get_config()
    mutate(config)
    with pytest.raises(ValueError) as e:
        config_check.validate(config)
    msg = str(e.value)
    assert msg.startswith(f"config key `{key}`: unknown (known: "), msg
    if suggestion:
        assert msg.endswith(f"did you mean `{suggestion}`?"), msg
        assert suggestion in msg.split("known: ")[1]


def test_keys_follow_the_classes_named_in_the_config():
    """model.image is checked against the tower named by image_model, loss against the named loss."""
    config = _load("siglip").get_config()
    config_check.validate(config)  # loss.impl is a sigmoid_loss argument
    config.loss.name = "dcl"  # no impl= (softmax and sigmoid have ring forms)
    with pytest.raises(ValueError, match=r"`loss.impl`: unknown"):
        config_check.validate(config)
    config = _load("lit").get_config()
    config.model.image.pool_type = "map"  # a ViT option, not an EfficientNet-Lite one
    with pytest.raises(ValueError, match=r"`model.image.pool_type`: unknown"):
        config_check.validate(config)
    config.model.image_model = "vit"
    config.model.image = dict(variant="Ti/16", pool_type="map", num_classes=384)
    config_check.validate(config)


def test_bad_values_name_the_key():
    config = _load("lit").get_config()
    config.loss.name = "softmx"
    with pytest.raises(ValueError, match=r"`loss.name`: 'softmx' is not one of .*did you mean 'softmax'"):
        config_check.validate(config)
    config = _load("lit").get_config()
    config.evals.emoji.type = "zero_shot"
    with pytest.raises(ValueError, match=r"`evals.emoji.type`: 'zero_shot' .*did you mean 'zeroshot'"):
        config_check.validate(config)
    config = _load("lit").get_config()
    config.remat = True  # EfficientNet-Lite has no remat: build_model would fail deep inside flax
    with pytest.raises(ValueError, match=r"config key `remat`: the image tower 'efficientnet_lite'"):
        config_check.validate(config)
    config = _load("lit").get_config("steps=20")  # the heads warm up for 50 steps
    with pytest.raises(ValueError, match=r"config key `schedule\[0\]` \('img/head/.\*'\): decay_type 'cosine' "
                                         r"needs config.total_steps > warmup_steps"):
        config_check.validate(config)
    config = _load("lit").get_config()
    config.input.augment.greyscale = 3
    with pytest.raises(ValueError, match=r"`input.augment.greyscale` is a probability"):
        config_check.validate(config)


def _main(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "vljax.main", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_main_refuses_a_config_file_typo_before_writing_anything(tmp_path):
    cfg = tmp_path / "typo.py"
    cfg.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('clip', {os.path.join(CONFIGS, 'clip.py')!r})\n"
        "clip = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(clip)\n\n"
        "def get_config(arg=None):\n"
        "    c = clip.get_config(arg)\n"
        "    c.loss.temprature = 1.0\n"
        "    return c\n")
    workdir = tmp_path / "wd"
    proc = _main([f"--config={cfg}", f"--workdir={workdir}"], tmp_path)
    assert proc.returncode != 0
    assert "config key `loss.temprature`: unknown" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()
    # A command-line override of an unknown key: ml_collections refuses it while parsing flags.
    proc = _main([f"--config={os.path.join(CONFIGS, 'clip.py')}", f"--workdir={workdir}",
                  "--config.loss.temprature=1"], tmp_path)
    assert proc.returncode != 0 and "temprature" in proc.stderr
    assert not workdir.exists()


def test_a_decoder_evaluator_without_a_decoder_is_refused_naming_the_eval():
    """caption_nll / cappa_zeroshot score captions with the decoder: configs/siglip2.py with
    decoder=off and either evaluator added is refused before any work, naming the entry."""
    module = _load("siglip2")
    config_check.validate(module.get_config("decoder=off,sd=off"))
    for kind in ("caption_nll", "cappa_zeroshot"):
        c = module.get_config("decoder=off,sd=off")
        c.evals.x = dict(type=kind, data=dict(name="emoji", split="test"))
        with pytest.raises(ValueError, match=rf"evals\.x.*{kind}.*model\.decoder"):
            config_check.validate(c)
    config_check.validate(module.get_config("decoder=on,sd=off"))
