"""vljax: language-image contrastive models in JAX/Flax."""

__version__ = "0.1.0"
