"""VTAB's derived labels, computed from a TFDS record's stored features (no image decoded).

Source: google-research/task_adaptation, `data/clevr.py` (`_count_all_pp`,
`_closest_object_distance_pp`) and `data/kitti.py` (`_closest_vehicle_distance_pp`), which
CLIP_benchmark's `vtab/` sets read. Each function takes the raw record (a dict of numpy arrays)
and returns the class index.
"""
from __future__ import annotations

import numpy as np

CLEVR_DISTANCE_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
KITTI_DISTANCE_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])
KITTI_VEHICLES = 3  # object types 0, 1, 2: Car, Van, Truck


def _bin(value: float, thresholds: np.ndarray) -> int:
    """The last i with thresholds[i] < value (VTAB: reduce_max(where(thrs - value < 0))); -1 when
    none is (the caller leaves such a record out, as its class is outside the task's)."""
    below = np.flatnonzero(thresholds < value)
    return int(below.max()) if len(below) else -1


def clevr_count(record) -> int:
    """Objects in the scene minus 3 (CLEVR has 3..10): 8 classes."""
    return int(len(np.asarray(record["objects"]["size"]))) - 3


def clevr_distance(record) -> int:
    """The closest object's depth (pixel_coords[:, 2]) binned by CLEVR_DISTANCE_THRESHOLDS: 6 classes."""
    depth = np.asarray(record["objects"]["pixel_coords"], np.float64).reshape(-1, 3)[:, 2]
    return _bin(float(depth.min()), CLEVR_DISTANCE_THRESHOLDS)


def kitti_distance(record) -> int:
    """The closest vehicle's depth (location[:, 2]; 1000 without a vehicle) binned by
    KITTI_DISTANCE_THRESHOLDS: 4 classes."""
    kinds = np.asarray(record["objects"]["type"]).reshape(-1)
    depth = np.asarray(record["objects"]["location"], np.float64).reshape(-1, 3)[:, 2]
    vehicle = depth[kinds < KITTI_VEHICLES]
    return _bin(float(vehicle.min()) if len(vehicle) else 1000.0, KITTI_DISTANCE_THRESHOLDS)


DERIVED = {"clevr_count": clevr_count, "clevr_distance": clevr_distance, "kitti_distance": kitti_distance}


def derived(kind: str, record) -> int:
    """Label `kind` (a DERIVED key) of `record`; -1 for a record whose object features are missing
    or disagree in length (the caller leaves it out and counts it, as an unreadable record)."""
    try:
        return DERIVED[kind](record)
    except (KeyError, ValueError, IndexError, TypeError):
        return -1
