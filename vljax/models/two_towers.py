"""Two-tower (image, text) contrastive model: CLIP, SigLIP, LiT, ..."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vljax.models.registry import DECODERS, get_model


def _l2_normalize(z):
    # The epsilon keeps an all-zero embedding finite (big_vision uses the same guard).
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


def _project_tokens(tower, tokens):
    """tokens [B, N, W] -> [B, N, D]: the tower's own projection head (`head/...`, the Dense that
    maps pre_logits into the joint space) applied to every token, each L2-normalised: FILIP's
    token features (Yao et al. 2021, Sec. 3.1.1: "the token-wise features ... after the linear
    projection and normalisation"). Shares the head's parameters, so a token-level loss trains
    the projection every evaluator scores with. Returns None for a tower without a head."""
    head = tower.variables.get("params", {}).get("head")
    if head is None:
        return None
    x = jnp.einsum("bnw,wd->bnd", tokens, head["kernel"].astype(tokens.dtype))
    if "bias" in head:
        x = x + head["bias"].astype(x.dtype)
    return _l2_normalize(x)


class TwoTowers(nn.Module):
    """Image tower + text tower + learned logit scale (and optional bias).

    image_model / text_model: names in vljax.models.MODELS; image / text: their config dicts.
    The towers' `num_classes` is the projection into the joint space.
    temperature_init: initial logit scale; the parameter `t` is its log (scalar).
    bias_init: initial logit bias `b` (scalar, SigLIP); None means no bias parameter.
    decoder: None, or the config dict of a caption decoder (vljax/models/decoder.py, LocCa /
      CapPa) whose params are `dec/...`; `decoder_model` names it in `registry.DECODERS`. It runs
      when the model gets images AND texts (a training step), on the image tower's tokens, and
      adds out["dec/logits"] [B, L, V], out["dec/targets"], out["dec/mask"], out["dec/parallel"].
      The encoders' outputs do not depend on it; `factory.encoder_only` leaves it out of exports.
    """
    image_model: str = "vit"
    image: dict[str, Any] | None = None
    text_model: str = "text_transformer"
    text: dict[str, Any] | None = None
    temperature_init: float = 10.0
    bias_init: float | None = None
    decoder_model: str = "text_decoder"
    decoder: dict[str, Any] | None = None

    @nn.compact
    def __call__(self, images, texts, train: bool = False, text_prefix=None, text_lower=None,
                 text_prefix_ids=None, dec_rows=None):
        """images: [B, H, W, C], a NaFlex dict ("naflex_vit": {"patches" [B, N, P*P*C], "mask"
        [B, N], "shapes" [B, 2]}, vljax/models/naflex.py) or None; texts: int [B, L] or None;
        text_prefix: optional [B, M, W] embeddings the text tower inserts after its first token
        (CoOp context);
        text_prefix_ids: optional int [B], the Prefix Conditioning row of each text (the batch's
        "prefix_id"; vljax/models/text.py `prefix_conditioning`); None: the tower's eval prefix;
        dec_rows: optional {"dec_tokens", "dec_target", "dec_task"}: the decoder's LocCa rows
        (vljax/data/locca.py) in place of `texts`;
        text_lower: optional (k, states), states = `text_lower(texts, k)`: the text tower skips
        its embeddings and first k blocks (run once for fixed texts through locked blocks).

        Returns (zimg [B, D] or None, ztxt [B, D] or None, out), embeddings L2-normalised;
        out["t"] = exp(t), out["b"] (when there is a bias), out["img/<k>"] / out["txt/<k>"] for
        every entry of the towers' out dicts (tokens, pre_logits, mask, ...), and
        out["img/tokens_proj"] / out["txt/tokens_proj"] [B, N, D]: the tokens through the tower's
        head, per-token L2-normalised (FILIP's late interaction; None without a head, and for a
        text tower with an adapter, `model.text.adapter_layers`); out["img/patches_proj"]
        [B, N - n, D]: those of the image patches alone, the n = `image_prefix_tokens()` leading
        non-patch tokens (a ViT's class token) left out (DreamLIP's grouping loss).
        """
        out = {}
        zimg = ztxt = None
        if images is not None:
            tower = get_model(self.image_model)(**(self.image or {}), name="img")
            zimg, out_img = tower(images, train=train)
            out.update({f"img/{k}": v for k, v in out_img.items()})
            if "tokens" in out_img:
                out["img/tokens_proj"] = _project_tokens(tower, out_img["tokens"])
                out["img/patches_proj"] = self.image_patches(out["img/tokens_proj"])
            zimg = _l2_normalize(zimg)
        if texts is not None:
            tower = get_model(self.text_model)(**(self.text or {}), name="txt")
            kw = {} if text_prefix is None else {"prefix": text_prefix}
            if text_lower is not None:
                kw["lower"] = text_lower
            if text_prefix_ids is not None:
                kw["prefix_ids"] = text_prefix_ids
            ztxt, out_txt = tower(texts, train=train, **kw)
            out.update({f"txt/{k}": v for k, v in out_txt.items()})
            # With LLM2CLIP's adapter the head reads the adapter's output, not a token's state:
            # no token projection (config_check refuses token-level losses with an adapter).
            out["txt/tokens_proj"] = (None if (self.text or {}).get("adapter_layers")
                                      else _project_tokens(tower, out_txt["tokens"]))
            ztxt = _l2_normalize(ztxt)
        if self.decoder is not None and images is not None and texts is not None:
            out.update(self._decode(out, texts, train, dec_rows))
        if zimg is not None and ztxt is not None and zimg.shape[-1] != ztxt.shape[-1]:
            raise ValueError(f"Image embeddings {zimg.shape} and text embeddings {ztxt.shape} "
                             "differ in width: set the towers' num_classes to one joint size")

        t_init = float(np.log(self.temperature_init))
        t = self.param("t", nn.initializers.constant(t_init), (), jnp.float32)
        out["t"] = jnp.exp(t)
        if self.bias_init is not None:
            out["b"] = self.param("b", nn.initializers.constant(self.bias_init), (), jnp.float32)
        return zimg, ztxt, out

    def image_prefix_tokens(self) -> int:
        """How many leading tokens of the image tower's out["tokens"] are not patches: 1 for a
        class token (`pool_type` "cls", the ViT's default), else 0 (registers are dropped there)."""
        cls = get_model(self.image_model)
        return int((self.image or {}).get("pool_type", getattr(cls, "pool_type", None)) == "cls")

    def image_patches(self, tokens_proj):
        """[B, N, D] projected image tokens -> [B, N - n, D], the patches' (`image_prefix_tokens`);
        None for None (a tower without a head)."""
        return None if tokens_proj is None else tokens_proj[:, self.image_prefix_tokens():]

    def _decode(self, out, texts, train, dec_rows=None):
        """The caption decoder on the image tower's tokens (and their NaFlex mask) -> its
        outputs as `dec/<k>` (logits, targets, mask, parallel). `dec_rows` (LocCa, vljax/data/
        locca.py): the batch's "dec_tokens" / "dec_target" / "dec_task" read in place of the
        captions, the loss mask limited to "dec_target", ARef / GCap rows autoregressive."""
        if "img/tokens" not in out:
            raise ValueError(f"model.decoder: image model {self.image_model!r} gives no "
                             "out['tokens'] for the decoder to cross-attend to")
        if self.decoder_model not in DECODERS:
            raise ValueError(f"model.decoder_model: unknown decoder {self.decoder_model!r}; "
                             f"known: {sorted(DECODERS)}")
        cls = DECODERS[self.decoder_model]()
        known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
        unknown = sorted(set(self.decoder) - known)
        if unknown:
            raise ValueError(f"model.decoder: unknown keys {unknown}; {self.decoder_model!r} "
                             f"takes {sorted(known)}")
        if dec_rows is None:
            logits, dec = cls(**self.decoder, name="dec")(out["img/tokens"], texts, train=train,
                                                          image_mask=out.get("img/mask"))
        else:
            logits, dec = cls(**self.decoder, name="dec")(
                out["img/tokens"], dec_rows["dec_tokens"], train=train,
                image_mask=out.get("img/mask"), no_parallel=dec_rows["dec_task"] > 0)
            dec["mask"] = dec["mask"] & dec_rows["dec_target"]
        return {"dec/logits": logits, **{f"dec/{k}": v for k, v in dec.items()}}

    @nn.compact
    def text_lower(self, texts, layers: int, train: bool = False):
        """texts: int [B, L] -> the text tower's states after its embeddings and first `layers`
        blocks, [B, L, W]: the part `__call__(..., text_lower=(layers, states))` skips. The
        multi-label loss's label prompts are fixed texts: with those blocks locked, the trainer
        runs them once, not in every step (vljax/train.py, `locked_text_blocks`)."""
        return get_model(self.text_model)(**(self.text or {}), name="txt")(
            texts, train=train, stop_after=layers)

    # LiT with a locked trunk whose features are stored (vljax/features.py): the image tower
    # split at its projection head, both halves the real tower module (params `img/...`).
    @nn.compact
    def image_trunk(self, images, train: bool = False, tokens: bool = False):
        """images: [B, H, W, C] (or a NaFlex dict) -> the image tower's features before its head
        (pre_logits), [B, F];
        with `tokens`, (pre_logits [B, F], the tower's final tokens out["tokens"] [B, N, W])."""
        _, out = get_model(self.image_model)(**(self.image or {}), name="img")(images, train=train)
        if not tokens:
            return out["pre_logits"]
        if "tokens" not in out:
            raise ValueError(f"image model {self.image_model!r} gives no out['tokens'] (it has "
                             f"{sorted(out)}): a token-level loss cannot use its stored features")
        return out["pre_logits"], out["tokens"]

    @nn.compact
    def image_head(self, features, train: bool = False):
        """features: [B, F] from `image_trunk` -> zimg [B, D], L2-normalised: the tower's own head,
        so `image_head(image_trunk(x))` equals the image half of `__call__`."""
        tower = get_model(self.image_model)(**(self.image or {}), name="img")
        zimg, _ = tower(None, train=train, features=features)
        return _l2_normalize(zimg)

    @nn.compact
    def image_head_tokens(self, features, tokens, train: bool = False):
        """features: [B, F], tokens: [B, N, W] from `image_trunk(..., tokens=True)` -> (zimg [B, D],
        tokens_proj [B, N, D]): the tower's own head on the pooled features and, per token, the
        projection `__call__` gives as out["img/tokens_proj"] (FILIP on stored LiT features)."""
        tower = get_model(self.image_model)(**(self.image or {}), name="img")
        zimg, _ = tower(None, train=train, features=features)
        return _l2_normalize(zimg), _project_tokens(tower, tokens)
