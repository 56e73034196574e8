"""Encoders by name: `get_model("vit")(**cfg)` builds a flax.linen tower from a config dict."""
from vljax.models.text import TextTransformer
from vljax.models.vit import ViT


def _bert():
    # Imported on use: bert.py / efficientnet.py are optional for the transformer-only models.
    from vljax.models.bert import Bert
    return Bert


def _efficientnet_lite():
    from vljax.models.efficientnet import EfficientNetLite
    return EfficientNetLite


# name -> zero-argument function returning the model class.
MODELS = {
    "vit": lambda: ViT,
    "text_transformer": lambda: TextTransformer,
    "bert": _bert,
    "efficientnet_lite": _efficientnet_lite,
}


def get_model(name: str):
    """The flax.linen module class registered as `name` (see MODELS)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]()


from vljax.models.two_towers import TwoTowers  # noqa: E402  (needs get_model defined above)

__all__ = ["MODELS", "TextTransformer", "TwoTowers", "ViT", "get_model"]
