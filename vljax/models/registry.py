"""Encoders by name: `get_model("vit")(**cfg)` builds a flax.linen tower from a config dict.

The one place a tower name is resolved: `TwoTowers` and the config check read `MODELS`.
"""
from vljax.models.bert import Bert
from vljax.models.decoder import TextDecoder
from vljax.models.efficientnet import EfficientNetLite
from vljax.models.naflex import NaFlexViT
from vljax.models.text import TextTransformer
from vljax.models.vit import ViT

# name -> zero-argument function returning the model class (callers call it, e.g.
# `module_fields(MODELS[name]())`).
MODELS = {
    "vit": lambda: ViT,
    "naflex_vit": lambda: NaFlexViT,
    "text_transformer": lambda: TextTransformer,
    "bert": lambda: Bert,
    "efficientnet_lite": lambda: EfficientNetLite,
}


def get_model(name: str):
    """The flax.linen module class registered as `name` (see MODELS)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]()


# Caption decoders (`TwoTowers(decoder=...)`, `model.decoder_model`), name -> class, as MODELS.
DECODERS = {
    "text_decoder": lambda: TextDecoder,
}
