"""Every config file the repository ships loads and passes the strict validation a run applies
before any work (vljax.config_check), including each loss of the ablation and each config argument
form; eval-only configs (`configs/prompting.py`) pass the evaluator checks and build."""
import glob
import importlib.util
import os

import pytest
from helpers import REPO

from vljax import config_check, eval_builder

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# Configs that need an argument (validation reads no file: the checkpoint is read by the trainer).
ARGS = {"finetune.py": "init_from=/data/siglip2-base-patch16-naflex"}


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_validates(path):
    config = _load(path).get_config(ARGS.get(os.path.basename(path)))
    if "model" in config or "init_from" in config:
        config_check.validate(config)
    else:  # evaluation-only config
        config_check.validate_evals(config.evals)
        assert eval_builder.build(config, None)


def test_every_ablation_loss_validates():
    module = _load(os.path.join(REPO, "configs", "lit_ablation.py"))
    for loss in module.LOSSES:
        teacher = ",teacher=/tmp/teacher" if loss in module.TEACHER_ROWS else ""
        config = module.get_config(f"loss={loss},seed=1{teacher}")
        config_check.validate(config)
        assert config.loss.name == module.LOSS_OF.get(loss, loss) and config.seed == 1
        assert config.get("distill", {}).get("teacher") == ("/tmp/teacher" if teacher else None)
    with pytest.raises(ValueError, match="lit_ablation.py: loss='bogus'"):
        module.get_config("loss=bogus")
    with pytest.raises(ValueError, match="need a teacher checkpoint"):
        module.get_config("loss=dcd")
    with pytest.raises(ValueError, match="need a teacher checkpoint"):
        module.get_config("loss=softmax,teacher=/tmp/teacher")
