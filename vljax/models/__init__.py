"""The towers (flax.linen modules) and the two-tower model; `get_model(name)` / `MODELS` resolve a
tower name (vljax.models.registry)."""
from vljax.models.registry import MODELS, get_model
from vljax.models.text import TextTransformer
from vljax.models.two_towers import TwoTowers
from vljax.models.vit import ViT

__all__ = ["MODELS", "TextTransformer", "TwoTowers", "ViT", "get_model"]
