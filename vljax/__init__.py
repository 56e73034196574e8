"""vljax: language-image contrastive models in JAX/Flax."""

__version__ = "0.1.0"

from vljax import hostmem as _hostmem

_hostmem.at_import()  # VLJAX_KEEP_HOST_MEMORY=1: before JAX starts its CPU client
