"""vljax: language-image contrastive models in JAX/Flax."""

__version__ = "0.1.0"

from vljax import hostmem as _hostmem

_hostmem.keep_freed_memory()  # before JAX starts its CPU client: see vljax/hostmem.py
