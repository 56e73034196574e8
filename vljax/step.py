"""The update step: one optimizer (micro-)step of the configured loss, a pure function of the
training state and a batch (`make_train_step`), with gradients for the trainable parameters only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from vljax import objective


def flat(tree):
    """A params-like pytree -> {"img/.../kernel": leaf}."""
    return traverse_util.flatten_dict(tree, sep="/")


def split(params, mask):
    """Splits params into (trainable, frozen) flat dicts by a bool pytree of the same structure."""
    fp, fm = flat(params), flat(mask)
    return ({k: v for k, v in fp.items() if fm[k]}, {k: v for k, v in fp.items() if not fm[k]})


def join(trainable, frozen):
    return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")



def make_train_step(model, tx, loss, trainable_mask, label_text=None, label_blocks=0, text_blocks=0,
                    self_distill=None, acid=None, momentum=None, parts=None, ssl=None, mixing=None,
                    catlip=None, label_sharding=None, grad_accum_steps=1):
    """One optimizer (micro-)step, `step_fn(state, batch[, label_states])`. Gradients are
    computed for trainable parameters only.

    A batch with "image_features" ([B, F], a locked trunk's stored features, vljax/features.py)
    instead of "image" runs only the image tower's head on them; with "image_tokens" ([B, N, W],
    the trunk's stored tokens) also the tower's token projection (out["img/tokens_proj"], FILIP;
    out["img/patches_proj"], DreamLIP's grouping loss).
    `label_text` ([K, L] token ids of one prompt per label, `objective.label_prompts`) is embedded by the text
    tower in every step (out["labels/ztxt"], the multi-label loss's classifier). With
    `label_blocks` = k > 0 (`text_memo.locked_text_blocks`) the step takes `label_states`, the
    prompts' states after the k locked lowest blocks (`TwoTowers.text_lower`, computed once per
    run), and runs only the blocks above them: the same embeddings, without recomputing fixed
    values. Likewise a batch with "text_states" ([B, L, W], the captions' states after the
    `text_blocks` locked lowest blocks, `text_memo.TextMemo`, config.text_cache) runs only the
    text blocks above them on its captions.
    `self_distill` (a `teacher.SelfDistill`, a self-distillation stage) adds its term to the loss
    and updates state["teacher"] after the step (EMA, centres); without it a state's teacher and
    its heads (params["ssl"]) pass through unchanged.
    `acid` (an `acid.Acid`, config.acid) takes a super-batch and the teacher's params
    (`step_fn(state, batch, label_states, acid_params)`): the step trains on the sub-batch it
    selects (vljax/acid.py) and reports the chosen rows as m["acid/indices"].
    `parts` (`objective.make_parts`) gives terms of the loss logged as `train/<name>` (no
    gradient flows through them).
    `momentum` (a `momentum.Momentum`, config.queue) advances state["queue"]'s momentum towers,
    gives the loss their embeddings and the queues (`momentum/...`, `queue/...`) and enqueues them.
    `ssl` (a `slip.Slip`, config.ssl) gives the loss the SimCLR head's embeddings of the batch's
    two views (`ssl/z1`, `ssl/z2`; SLIP's term is in the configured loss, vljax/objective.py).
    `mixing` (a `mixing.Mixing`, config.mixing) mixes the global batch's images from the step's rng
    and gives the loss their soft targets (`batch/mix_lam`, `batch/mix_partner`; vljax/mixing.py);
    the step logs the mean lam as `train/mix_lam`.
    A batch with "prefix_id" (int32 [B], Prefix Conditioning, vljax/data/prefix.py) gives the
    text tower each caption's prefix row (`TwoTowers(text_prefix_ids=...)`).
    `catlip` (a `catlip.CatLIP`, config.catlip) gives the loss its head's logits on the image
    embedding (`catlip/logits` [B, V], params["catlip"]; vljax/catlip.py); when the loss takes
    nothing of the text side (`catlip.image_only`) the text tower is not run.
    `label_sharding` (`label_shards.place`, config.loss.label_axis) splits the label prompts'
    rows, their states and their embeddings over the label axis: no device holds all K.
    The loss's input `step` is the optimizer step, state["step"] // `grad_accum_steps` (0 at the
    first update; config.grad_accum_steps, as the learning-rate schedules count).
    """
    def on_label_axis(x):
        return x if label_sharding is None else jax.lax.with_sharding_constraint(x, label_sharding)

    def forward(params, batch, rng, label_states):
        zimg, ztxt, out = _towers(params, batch, rng)
        if label_text is not None:
            lower = None if not label_blocks else (label_blocks, on_label_axis(label_states))
            # The barrier keeps XLA from constant-folding the tower's reductions over the prompts
            # (a closure constant): at K = 100k that folding took minutes of compile on CPU.
            text = on_label_axis(jax.lax.optimization_barrier(jnp.asarray(label_text)))
            _, zlabels, _ = model.apply({"params": params}, None, text, train=True, rngs={"dropout": rng},
                                        text_lower=lower)
            out["labels/ztxt"] = on_label_axis(zlabels)
        if "subcaptions" in batch:  # DreamLIP: input.subcaptions, [B, K, L] -> out["sub/ztxt"] [B, K, D]
            b, k, length = batch["subcaptions"].shape
            _, sub, _ = model.apply({"params": params}, None, batch["subcaptions"].reshape(b * k, length),
                                    train=True, rngs={"dropout": rng})
            out["sub/ztxt"] = sub.reshape(b, k, -1)
        return zimg, ztxt, out

    def _towers(params, batch, rng):
        kw = dict(train=True, rngs={"dropout": rng})
        # CatLIP without a text-side input: the text tower is not run (ztxt None), as in the paper
        text = None if catlip is not None and catlip.image_only else batch["text"]
        if "text_states" in batch:
            if not text_blocks:
                raise ValueError("a batch with text_states needs the step's text_blocks > 0")
            kw["text_lower"] = (text_blocks, batch["text_states"])
        if "prefix_id" in batch and text is not None:  # Prefix Conditioning: each text's prefix row
            kw["text_prefix_ids"] = batch["prefix_id"]
        if "image_features" not in batch:
            if "dec_tokens" in batch:  # LocCa's rows for the decoder (vljax/data/locca.py)
                kw["dec_rows"] = {k: batch[k] for k in ("dec_tokens", "dec_target", "dec_task")}
            return model.apply({"params": params}, batch["image"], text, **kw)
        txt_kw = dict(kw)
        kw.pop("text_lower", None)
        kw.pop("text_prefix_ids", None)
        _, ztxt, out = model.apply({"params": params}, None, text, **txt_kw)
        if "image_tokens" in batch:
            zimg, out["img/tokens_proj"] = model.apply(
                {"params": params}, batch["image_features"], batch["image_tokens"].astype(jnp.float32),
                method=model.image_head_tokens, **kw)
            out["img/patches_proj"] = model.image_patches(out["img/tokens_proj"])
        else:
            zimg = model.apply({"params": params}, batch["image_features"], method=model.image_head, **kw)
        return zimg, ztxt, out

    def step_fn(state, batch, label_states=None, acid_params=None):
        if label_blocks and label_states is None:
            raise ValueError(f"this step skips the label prompts' {label_blocks} locked text "
                             f"blocks: pass their states (TwoTowers.text_lower)")
        rng, step_rng = jax.random.split(state["rng"])
        acid_m = {}
        if acid is not None:  # the sub-batch of the super-batch (vljax/acid.py)
            batch, indices, acid_m = acid.select(model, state["params"], acid_params, batch,
                                                 jax.random.fold_in(step_rng, 0xAC1D))
            acid_m["acid/indices"] = indices
            kd_targets = {k: acid_m.pop(k) for k in ("kd/zimg", "kd/ztxt", "kd/t")}
        if mixing is not None:  # TiMix / M3CoL: the global batch's images mixed (vljax/mixing.py)
            batch = mixing.apply(batch, jax.random.fold_in(step_rng, 0x313C))
        trainable, frozen = split(state["params"], trainable_mask)
        teacher = state.get("teacher")
        if self_distill is not None:
            teacher = self_distill.start(teacher, state["params"])
        extra, mparams = {}, None
        if momentum is not None:  # MoCo's order: EMA first, then the momentum embeddings
            mparams = momentum.advance(state["queue"], state["params"])
            extra = momentum.inputs(model, state["queue"], mparams, state["params"], batch)

        def loss_and_out(tr):
            params = join(tr, jax.lax.stop_gradient(frozen))
            zimg, ztxt, out = forward(params, batch, step_rng, label_states)
            if ssl is not None:  # SLIP's two views through the image tower and the SimCLR head
                out = {**out, **ssl.embed(model, params, batch, jax.random.fold_in(step_rng, 2))}
            if catlip is not None:  # CatLIP's large-vocabulary head on the image embedding
                out = {**out, **catlip.inputs(params, zimg)}
            values = objective.loss_inputs(zimg, ztxt, {**out, **extra}, batch,
                                           step=state["step"] // grad_accum_steps)
            value, aux = loss(values), {}
            if acid is not None and acid.kd_weight:  # ACED's KD term (vljax/acid.py)
                aux["acid_kd"] = acid.kd_term(zimg, ztxt, out["t"], kd_targets)
                value = value + aux["acid_kd"]
            if self_distill is not None:
                sd_value, sd_aux = self_distill.loss(params, teacher, batch, jax.random.fold_in(step_rng, 1))
                value, aux = value + sd_value, {**aux, **sd_aux}
            return value, (out, aux, parts(values) if parts is not None else {})

        (value, (out, aux, logged)), grads = jax.value_and_grad(loss_and_out, has_aux=True)(trainable)
        zeros = {k: jnp.zeros_like(v) for k, v in frozen.items()}
        grads = join(grads, zeros)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        if self_distill is None and "ssl" in params:  # the heads wait for their stage (weight decay too)
            params = {**params, "ssl": state["params"]["ssl"]}
        grad_norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
        # A non-finite loss or gradient never reaches the state: the update is dropped (params and
        # optimizer state stay as they were) and the step reports it; the loop stops or counts it.
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "rng": rng}
        if teacher is not None:
            new_teacher = teacher if self_distill is None else self_distill.update(teacher, params, aux)
            new_state["teacher"] = keep(new_teacher, state["teacher"])
        if "queue" in state:
            new_queue = state["queue"] if momentum is None else momentum.update(state["queue"], mparams, extra)
            new_state["queue"] = keep(new_queue, state["queue"])
        m = {"train/loss": value, "train/grad_norm": grad_norm, "train/t": out["t"],
             "train/nonfinite": 1.0 - finite.astype(jnp.float32)}
        if "b" in out:
            m["train/b"] = out["b"]
        m.update({f"train/{k}": v for k, v in logged.items()})
        if self_distill is not None:
            m["train/sd_consistency"], m["train/sd_masked"] = aux["consistency"], aux["masked"]
        if "acid_kd" in aux:
            m["train/acid_kd"] = aux["acid_kd"]
        if mixing is not None:  # the step's mean share of each mixed image's own pair (1: unmixed)
            m["train/mix_lam"] = jnp.mean(batch["mix_lam"])
        return new_state, {**m, **acid_m}

    return step_fn

