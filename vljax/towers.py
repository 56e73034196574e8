"""The jitted tower functions of a two-tower model on a mesh, and the cache that shares them.

`TowerCache.get(model, mesh)` returns the jitted towers of an equal model on the same mesh, so
every Embedder (vljax/embedder.py) of an equal model compiles nothing after the first. Image
inputs may be arrays [B, S, S, 3] or NaFlex dicts (one compilation per patch budget).

Besides the embeddings: the image tower's tokens (`img_patch`, the dense probe's features,
vljax/evaluators/dense_probe.py) and the caption decoder's log-likelihood of texts given the
images (`dec_loglik` / `dec_loglik_paired`, vljax/evaluators/captioning.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax.models.registry import DECODERS


def _pick(out: dict, *keys):
    return tuple(out[k] for k in keys)


def patch_tokens(model, params, images):
    """images -> the image tower's tokens out["img/tokens"] [B, N, W] (after its final norm;
    a class token first for pool_type="cls"). A tower without tokens is refused, naming it."""
    out = model.apply({"params": params}, images, None)[2]
    if "img/tokens" not in out:
        raise ValueError(f"model.image_model {model.image_model!r} gives no patch tokens "
                         f"(out['tokens']; it gives {sorted(out)}): a dense probe needs them")
    return out["img/tokens"]


def decoder_loglik(model, params, images, texts):
    """The caption decoder's log-likelihood of `texts` int [B, L] given `images` (one text per
    image), read autoregressively with teacher forcing (train=False: no parallel prediction):
    [B] float32, sum over the real tokens (ids != the decoder's pad_id) of log p(token | the
    tokens before it, image). The decoder is the model's own (params `dec`), on the image tower's
    tokens and NaFlex mask as `TwoTowers._decode` gives them; a model without one is refused."""
    check_decoder(model)
    out = model.apply({"params": params}, images, None)[2]
    return _decode_loglik(model, params, out["img/tokens"], out.get("img/mask"), texts)


def check_decoder(model) -> None:
    """Refuses a model without a caption decoder, naming `model.decoder`."""
    if getattr(model, "decoder", None) is None:
        raise ValueError("the model has no caption decoder (model.decoder is None): caption "
                         "log-likelihood and CapPa scoring need a model trained with one")


def _decode_loglik(model, params, tokens, image_mask, texts):
    check_decoder(model)
    dec = DECODERS[model.decoder_model]()(**model.decoder)
    logits, d = dec.apply({"params": params["dec"]}, tokens, texts, train=False, image_mask=image_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ll = jnp.take_along_axis(logp, texts[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(d["mask"], ll, 0.0), axis=1)


def decoder_loglik_all(model, params, images, texts):
    """`decoder_loglik` of every text of `texts` int [T, L] with every image: [B, T]. The image
    tower runs once; the decoder once per text (lax.map: memory of one [B, L, V] logits block,
    as big_vision's CapPa scoring, `trainers/proj/cappa/predict_fns.py`)."""
    check_decoder(model)
    out = model.apply({"params": params}, images, None)[2]
    tokens, mask = out["img/tokens"], out.get("img/mask")

    def one(text):  # [L] -> [B]
        return _decode_loglik(model, params, tokens, mask, jnp.broadcast_to(text, (tokens.shape[0],) + text.shape))
    return jax.lax.map(one, texts).T


class _Towers:
    """The jitted tower functions of `model` on `mesh`, outputs replicated."""

    def __init__(self, model, mesh):
        replicated = NamedSharding(mesh, P())
        self.img = jax.jit(lambda p, x, m: (model.apply({"params": p}, x, None)[0], m),
                           out_shardings=(replicated, replicated))
        self.txt = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1],
                           out_shardings=replicated)
        # The same from the states after the k locked lowest text blocks (a `TextMemo`).
        self.txt_upper = jax.jit(lambda p, t, s, k: model.apply({"params": p}, None, t, text_lower=(k, s))[1],
                                 out_shardings=replicated, static_argnums=3)
        self.head = jax.jit(lambda p, f, m: (model.apply({"params": p}, f, method=model.image_head), m),
                            out_shardings=(replicated, replicated))
        # Late interaction: the projected tokens (and the text masks) instead of the pooled z.
        self.img_tok = jax.jit(lambda p, x, m: (model.apply({"params": p}, x, None)[2]["img/tokens_proj"], m),
                               out_shardings=(replicated, replicated))
        self.txt_tok = jax.jit(lambda p, t: _pick(model.apply({"params": p}, None, t)[2],
                                                  "txt/tokens_proj", "txt/mask"),
                               out_shardings=replicated)
        self.txt_tok_upper = jax.jit(
            lambda p, t, s, k: _pick(model.apply({"params": p}, None, t, text_lower=(k, s))[2],
                                     "txt/tokens_proj", "txt/mask"),
            out_shardings=replicated, static_argnums=3)
        self.head_tok = jax.jit(lambda p, f, t, m: (model.apply({"params": p}, f, t.astype(f.dtype),
                                                                method=model.image_head_tokens)[1], m),
                                out_shardings=(replicated, replicated))
        # The image tower's tokens (dense probe) and the caption decoder's log-likelihoods.
        self.img_patch = jax.jit(lambda p, x, m: (patch_tokens(model, p, x), m),
                                 out_shardings=(replicated, replicated))
        self.dec_loglik_paired = jax.jit(lambda p, x, m, t: (decoder_loglik(model, p, x, t), m),
                                         out_shardings=(replicated, replicated))
        self.dec_loglik = jax.jit(lambda p, x, m, t: (decoder_loglik_all(model, p, x, t), m),
                                  out_shardings=(replicated, replicated))


def same_module(a, b) -> bool:
    """Equal modules; one whose fields cannot be compared (arrays in its config) only to itself."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class TowerCache:
    """The jitted towers of the `size` most recently used (model, mesh) pairs.

    `get` returns the towers of an equal model (flax modules compare by their fields; they are
    not hashable) on the same mesh, jitted once: jax caches compilations per jitted function, so
    Embedders made afresh for each evaluation with the same cache reuse them. A few models at
    most (soups, WiSE-FT) are evaluated in one process, hence the small default size.
    """

    def __init__(self, size: int = 4):
        self.size = int(size)
        self._entries = []  # [(model, mesh, _Towers)], the most recent last

    def get(self, model, mesh) -> _Towers:
        for i, (m, me, t) in enumerate(self._entries):
            if me == mesh and same_module(m, model):
                self._entries.append(self._entries.pop(i))
                return t
        self._entries.append((model, mesh, _Towers(model, mesh)))
        del self._entries[:-self.size]
        return self._entries[-1][2]
