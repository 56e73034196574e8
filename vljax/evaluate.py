r"""Evaluate a model with a config's evaluators: a vljax workdir or a converted checkpoint.

    python -m vljax.evaluate --model=/tmp/vljax_lit --config=configs/lit_eval.py --out=/tmp/lit_eval.json
    python -m vljax.evaluate --model=hf_clip_dir/ --config=configs/lit.py --evals=fashion_mnist
    python -m vljax.evaluate --model=siglip2_naflex_dir/ --max_num_patches=256 --config=configs/lit.py
    python -m vljax.evaluate --model=/tmp/vljax_lit --suite=imagenet --data_dir=/data --out=/tmp/suite

`--model` is anything `vljax.factory.load` takes (a workdir: its latest checkpoint; a
transformers CLIP / SigLIP / SigLIP 2 directory; a big_vision SigLIP .npz with `--tokenizer`
or its .model beside it). The evaluators are `config.evals` (default: the workdir's own
config.json), built by vljax/eval_builder.py; images are streamed with the MODEL's image size and
normalisation, so a converted CLIP at 224 px is evaluated on the same data as a demo LiT model at 112 px.
With `--suite` (imagenet, vtab+, retrieval, datacomp, voc2007: vljax/suites) the standard
zero-shot suite runs instead of config.evals, reading webdataset directories or TFDS data under
`--data_dir`; `--out` is then the results directory (one CLIP_benchmark JSON per dataset, kept
and skipped on a rerun, so a stopped suite resumes; `<suite>.md` and `<suite>.csv`).
Unlike `vljax.main --mode=eval`, nothing is written into the model's directory. On a CPU run
freed host memory is kept, as in `vljax.main` (vljax/hostmem.py; `VLJAX_KEEP_HOST_MEMORY=0`: off).
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from vljax import cliflags, hostmem, logs

# Only absl, ml_collections and the jax-free vljax.cliflags / hostmem / logs are imported above:
# `python -m vljax.evaluate` sets up host memory (hostmem.cli_prepare) before anything imports JAX,
# as vljax.main does, so every vljax module that imports JAX is imported inside a function.

# Flags on a module-private FlagValues: vljax.main and vljax.soup define --config too (cliflags).
_FLAGS = flags.FlagValues()
_MODEL = flags.DEFINE_string("model", None, "vljax workdir, transformers CLIP / SigLIP / SigLIP 2 "
                             "directory or big_vision SigLIP .npz.", flag_values=_FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece .model of a big_vision npz "
                                 "(default: the one beside it), or a directory overriding the "
                                 "model's tokenizer.", flag_values=_FLAGS)
_MAX_NUM_PATCHES = flags.DEFINE_integer("max_num_patches", None, "NaFlex models: the patch budget "
                                        "(default: the checkpoint's).", flag_values=_FLAGS)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose `evals` to run (default: the workdir's config.json).",
    flag_values=_FLAGS)
_EVALS = flags.DEFINE_list("evals", None, "Only these names of config.evals (default: all).",
                           flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write the metrics here as JSON; with --suite, the results "
                           "directory.", flag_values=_FLAGS)
_SUITE = flags.DEFINE_string("suite", None, "Run this zero-shot suite (imagenet, vtab+, retrieval, "
                             "datacomp, voc2007) instead of config.evals.", flag_values=_FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "--suite: the directory of the webdataset copies "
                                "(wds_<name>/) and / or TFDS data (default: TFDS's).", flag_values=_FLAGS)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "--suite: the first records of each dataset "
                                     "only (a quick check).", flag_values=_FLAGS)
_PLOTS = flags.DEFINE_string("plot_dir", None, "Where zero-shot confusion matrices go (default: none).",
                             flag_values=_FLAGS)
flags.mark_flags_as_required(["model"], flag_values=_FLAGS)


def evaluate(predictor, config, only=None, plot_dir: str | None = None) -> dict[str, float]:
    """Runs `config.evals` (or those named in `only`) on a model (`factory.load`'s Bundle or a
    `Predictor`); {metric: value}, with `time/eval_<name>_s` as the trainer writes them.

    One Embedder streams every eval set over a mesh of all devices (params replicated), with the
    model's image size, normalisation and similarity; evals over the same data or class prompts
    share it.
    """
    from vljax import eval_builder, sharding  # noqa: PLC0415  (they import JAX: after cli_prepare, see the top)
    from vljax.embedder import Embedder  # noqa: PLC0415  (imports JAX: after cli_prepare)
    evaluators = eval_builder.build(config, plot_dir, only=only)
    embedder = Embedder.from_bundle(predictor, mesh=sharding.make_mesh([("data", -1)]),
                                    batch_size=config.get("eval_batch_size", 64),
                                    workers=config.get("input", {}).get("eval_workers", 0))
    return eval_builder.run_all(evaluators, embedder)


def run_suite(predictor, suite: str, *, out_dir: str, model: str, data_dir=None,
              max_examples: int | None = None, batch_size: int = 64):
    """Runs zero-shot suite `suite` on a model (vljax/suites/runner.py); its SuiteReport."""
    from vljax import sharding  # noqa: PLC0415  (imports JAX: after cli_prepare, see the top)
    from vljax.embedder import Embedder  # noqa: PLC0415  (imports JAX: after cli_prepare)
    from vljax.suites import runner  # noqa: PLC0415  (imports JAX: after cli_prepare)
    embedder = Embedder.from_bundle(predictor, mesh=sharding.make_mesh([("data", -1)]), batch_size=batch_size)
    return runner.run_suite(embedder, suite, out_dir=out_dir, model=model,
                            pretrained=os.path.basename(os.path.normpath(model)), data_dir=data_dir,
                            max_examples=max_examples)


def _main_suite(path):
    """--suite: exit status 0 when every dataset ran or was read back, 1 when some are missing."""
    from vljax import factory, suites  # noqa: PLC0415  (they import JAX: after cli_prepare)
    if not _OUT.value:
        raise SystemExit("vljax.evaluate: --suite needs --out (the results directory)")
    try:
        suites.suite(_SUITE.value)
        predictor = factory.load(path, tokenizer=_TOKENIZER.value, max_num_patches=_MAX_NUM_PATCHES.value)
    except (OSError, ValueError) as e:
        raise SystemExit(f"vljax.evaluate: {e}") from None
    report = run_suite(predictor, _SUITE.value, out_dir=_OUT.value, model=path, data_dir=_DATA_DIR.value,
                       max_examples=_MAX_EXAMPLES.value)
    print(report.table, end="")
    for why in report.missing.values():  # each starts with the dataset's name
        print(f"missing {why}", file=sys.stderr)
    return 1 if report.missing else 0


def _workdir_config(path):
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"no {cfg} (expected a vljax workdir or a transformers directory)")
    with open(cfg) as f:
        raw = json.load(f)
    if "model_type" in raw or "architectures" in raw:
        raise ValueError(f"{path} is a transformers directory: pass --config with the evals to run")
    return ml_collections.ConfigDict(raw)


def main(argv):
    """Exit status 0; 1 with one line on stderr when the model or the evals cannot be loaded."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logs.setup(verbose=flags.FLAGS["verbosity"].present)
    path = os.path.expanduser(_MODEL.value)
    try:
        keep_host = hostmem.cli_prepare()  # before JAX starts its CPU client (as vljax.main)
    except ValueError as e:
        raise SystemExit(f"vljax.evaluate: {e}") from None
    if _SUITE.value:
        import jax  # noqa: PLC0415  (after cli_prepare, see the top)
        if hostmem.cli_apply(jax.default_backend(), keep_host):
            logs.info(hostmem.APPLIED)
        return _main_suite(path)
    from vljax import config_check, factory  # noqa: PLC0415  (they import JAX: after cli_prepare)
    try:
        config = _CONFIG.value if _CONFIG.value is not None else _workdir_config(path)
        config_check.validate_evals(config.get("evals"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"vljax.evaluate: {e}") from None
    import jax  # noqa: PLC0415  (after cli_prepare, see the top)
    if hostmem.cli_apply(jax.default_backend(), keep_host):
        logs.info(hostmem.APPLIED)
    try:
        predictor = factory.load(path, tokenizer=_TOKENIZER.value,
                                 max_num_patches=_MAX_NUM_PATCHES.value)
    except (OSError, ValueError) as e:
        where = "" if path in str(e) else f"{path}: "
        raise SystemExit(f"vljax.evaluate: cannot load the model: {where}{e}") from None
    results = evaluate(predictor, config, only=_EVALS.value, plot_dir=_PLOTS.value)
    for k, v in sorted(results.items()):
        print(f"{k} = {v:.4f}")
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump({"model": path, **results}, f, indent=1)
        logs.info("wrote %s", _OUT.value)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cliflags.parser(_FLAGS)))
