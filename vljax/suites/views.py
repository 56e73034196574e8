"""A source whose decoded images are multiplied by a constant: dSprites stores its binary
images as 0 / 1 uint8, which VTAB multiplies by 255 before use (task_adaptation
`data/dsprites.py`, "image needs to ... be in [0, 255)")."""
from __future__ import annotations

import numpy as np

from vljax.data import sources as sources_lib
from vljax.data.sources import base as source_base


class ScaledImages:
    """Every record of `source` with its image array times `factor` (uint8, clipped to 255); a
    source itself (metadata accessors delegated, its own cache key)."""

    def __init__(self, source, factor: int):
        self.source, self.factor = source, int(factor)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[i]
        if not isinstance(record, dict) or "error" in record or not isinstance(record.get("image"), np.ndarray):
            return record
        scaled = np.minimum(record["image"].astype(np.int32) * self.factor, 255).astype(np.uint8)
        return {**record, "image": scaled}

    def cache_key(self) -> str:
        return source_base.digest("scaled", sources_lib.cache_key(self.source), self.factor)

    def __getattr__(self, name):  # raw, info, label_of, class_names_of, ...: the source's
        return getattr(self.source, name)

    def __repr__(self):
        return f"ScaledImages({self.source!r}, factor={self.factor})"
