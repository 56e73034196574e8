"""Training stages: a schedule of what the step sees, for cheap pre-training at scale.

    config.stages = [
        dict(until=900, image_size=112, max_len=16, patch_dropout=0.5),  # short sequences, masked
        dict(until=1000),                                                 # full size, unmasked tune
    ]

Each stage runs steps (previous `until`, `until`]; the last `until` is `config.total_steps`. A stage
may set `image_size` (training images; evaluation always uses `config.input.image_size`), `max_len`
(text tokens: captions are tokenised to that length, end-of-text kept) and `patch_dropout` (the ViT's
FLIP masking rate); what it does not set is the config's own value (the model's `patch_dropout`,
the tokenizer's `max_len`, `input.image_size`), `self_distill` (True: SigLIP 2's self-distillation
and masked prediction with an EMA teacher, configured by `config.self_distill`; vljax/teacher.py)
and `naflex` (with `config.input.naflex`, a NaFlex image tower: True, the default, trains at native
aspect ratio with the patch budgets of `input.naflex`; False, the stage's square images at
`image_size` as the tower's full patch grid, i.e. the fixed-resolution ViT: SigLIP 2's NaFlex
training continues a fixed-resolution stage, vljax/data/naflex_train.py).
This covers:

* FLIP (Li et al., CVPR 2023, "Scaling Language-Image Pre-training via Masking"): patch dropout for most
  of the run, then a short unmasked tuning stage (`patch_dropout=0.0`).
* CLIPA (Li, Wang & Xie, NeurIPS 2023, "An Inverse Scaling Law for CLIP Training"): training on
  smaller images and shorter texts, then a short stage at full length.

The state is the same in every stage: a learned ViT position embedding lives at the full resolution's
grid (`posemb_grid`, set by `factory.spec_from_config` when stages change the image size) and is
resampled bilinearly to a smaller stage's grid inside the forward pass (deviation from CLIPA, which
trains a small-grid embedding and interpolates it once at the switch: here no parameter changes shape,
so checkpoints, optimizer moments and resumption need nothing special; the gradient reaches the
full-grid parameters through the interpolation). Text position embeddings are used up to the stage's
length. Each stage compiles its own step (one compilation per stage) and reads its own input stream
(seeded by the stage index; stage 0 is the unstaged stream).
"""
from __future__ import annotations

import dataclasses

STAGE_KEYS = ("until", "image_size", "max_len", "patch_dropout", "self_distill", "naflex")


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start: int           # steps (start, until] belong to the stage
    until: int
    image_size: int
    max_len: int
    patch_dropout: float | None  # None: the model's own
    self_distill: bool = False  # SigLIP 2's self-distillation stage (vljax/teacher.py)
    naflex: bool = False  # native aspect ratio (a NaFlex tower's stage; False: fixed resolution)


def parse(config) -> list[Stage]:
    """The stages of `config.stages` (one stage covering the run when absent); errors name the key."""
    raw = list(config.get("stages") or [dict(until=config.total_steps)])
    naflex_tower = bool(config.input.get("naflex"))
    out, start = [], 0
    for i, entry in enumerate(raw):
        entry = dict(entry)
        unknown = sorted(set(entry) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"config key `stages[{i}]`: unknown keys {unknown} (known: {', '.join(STAGE_KEYS)})")
        until = entry.get("until")
        if not isinstance(until, int) or until <= start:
            raise ValueError(f"config key `stages[{i}].until` must be an int after {start}, got {until!r}")
        pd = entry.get("patch_dropout")
        if pd is not None and not 0.0 <= float(pd) < 1.0:
            raise ValueError(f"config key `stages[{i}].patch_dropout` must be in [0, 1), got {pd!r}")
        out.append(Stage(i, start, until, int(entry.get("image_size", config.input.image_size)),
                         int(entry.get("max_len", config.tokenizer.max_len)),
                         None if pd is None else float(pd), bool(entry.get("self_distill", False)),
                         _naflex(entry, i, naflex_tower)))
        start = until
    if out[-1].until != config.total_steps:
        raise ValueError(f"config key `stages[{len(out) - 1}].until` must equal total_steps "
                         f"({config.total_steps}), got {out[-1].until}")
    for s in out:
        if s.max_len > config.tokenizer.max_len:
            raise ValueError(f"config key `stages[{s.index}].max_len`: {s.max_len} exceeds tokenizer.max_len "
                             f"({config.tokenizer.max_len}), the model's text length")
        if s.image_size > config.input.image_size:
            raise ValueError(f"config key `stages[{s.index}].image_size`: {s.image_size} exceeds "
                             f"input.image_size ({config.input.image_size}), the model's resolution")
    if naflex_tower and any(s.patch_dropout for s in out):
        raise ValueError("config key `stages`: patch_dropout with a NaFlex image tower "
                         "(`input.naflex`), which has no patch dropout")
    if any(s.self_distill for s in out) and config.get("self_distill") is None:
        raise ValueError("config key `stages`: a stage sets self_distill=True but `config.self_distill` "
                         "is not set (e.g. dict(), vljax/teacher.py DEFAULTS)")
    if config.get("lit_cache") and any(s.image_size != config.input.image_size or s.patch_dropout
                                       for s in out):
        raise ValueError("config key `stages`: stored LiT features (`lit_cache`) are computed at "
                         "input.image_size without patch dropout; stages may only change max_len")
    return out


def _naflex(entry: dict, i: int, naflex_tower: bool) -> bool:
    value = entry.get("naflex", naflex_tower)
    if not isinstance(value, bool):
        raise ValueError(f"config key `stages[{i}].naflex` must be True or False, got {value!r}")
    if "naflex" in entry and not naflex_tower:
        raise ValueError(f"config key `stages[{i}].naflex`: needs a NaFlex image tower "
                         "(`config.input.naflex` and model.image_model='naflex_vit')")
    return value


def at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs step `step + 1` (the next step after `step` steps are done)."""
    for s in stages:
        if step < s.until:
            return s
    return stages[-1]


def model_for(model, stage: Stage):
    """The model as `stage` trains it (its patch dropout, if the stage sets one); the same
    parameters. `model`: a TwoTowers (the trainer's, `train.Trainer.stage_model`)."""
    if stage.patch_dropout is None:
        return model
    return model.clone(image={**(model.image or {}), "patch_dropout": stage.patch_dropout})


def changes_image_size(config) -> bool:
    return any(s.image_size != config.input.image_size for s in parse(config))


def switch_on_at(raw_stages, total_steps: int, step: int, **settings) -> list[dict]:
    """`config.stages` (None: one stage) with `settings` (e.g. self_distill=True) added from
    `step` on: the stage that holds `step` is split there, each part keeping its own settings; for
    a config file (pure, imports nothing). SigLIP 2: self-distillation for the last 20%."""
    if not 0 < step < total_steps:
        raise ValueError(f"stages.switch_on_at: step {step} must be inside (0, {total_steps})")
    out, start = [], 0
    for entry in list(raw_stages or [dict(until=total_steps)]):
        entry = dict(entry)
        if entry["until"] <= step:
            out.append(entry)
        elif start < step:
            out += [{**entry, "until": step}, {**entry, **settings}]
        else:
            out.append({**entry, **settings})
        start = entry["until"]
    return out
