"""Vertebra label ids (TotalSegmentator v2) and the tissue names used across the project."""

from __future__ import annotations

import numpy as np

__all__ = [
    "VERTEBRA_NAMES", "VERTEBRA_IDS", "THORACOLUMBAR", "is_vertebra", "vertebra_name", "vertebra_id",
    "vertebra_mask", "spine_mask",
]

#: TotalSegmentator v2 ids of the vertebrae, caudal to cranial (sacrum 25 ... C1 50).
VERTEBRA_NAMES: dict[int, str] = {25: "sacrum", 26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1"}
VERTEBRA_NAMES.update({32 + i: f"T{12 - i}" for i in range(12)})  # 32 T12 ... 43 T1
VERTEBRA_NAMES.update({44 + i: f"C{7 - i}" for i in range(7)})  # 44 C7 ... 50 C1

VERTEBRA_IDS: tuple[int, ...] = tuple(sorted(VERTEBRA_NAMES))

#: The levels our phantoms always hold, caudal to cranial: S1 (26) to T10 (34).
THORACOLUMBAR: tuple[int, ...] = tuple(range(26, 35))

_BY_NAME = {name.upper(): label for label, name in VERTEBRA_NAMES.items()}


def is_vertebra(label: int) -> bool:
    """True for a TotalSegmentator v2 vertebra id (25-50)."""
    return int(label) in VERTEBRA_NAMES


def vertebra_name(label: int) -> str:
    """Name of a vertebra id, e.g. ``29 -> 'L3'``."""
    try:
        return VERTEBRA_NAMES[int(label)]
    except KeyError:
        raise ValueError(f"{label} is not a TotalSegmentator v2 vertebra id (25-50)") from None


def vertebra_id(name: str | int) -> int:
    """Id of a vertebra given by name (``'L3'``) or id (``29``)."""
    if isinstance(name, int) or str(name).isdigit():
        label = int(name)
        vertebra_name(label)
        return label
    try:
        return _BY_NAME[str(name).strip().upper()]
    except KeyError:
        raise ValueError(f"unknown vertebra '{name}' (expected e.g. L3, T12, S1 or an id 25-50)") from None


# --- label maps ------------------------------------------------------------------------------------
def vertebra_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the voxels that hold a vertebra id (TotalSegmentator v2 ids 25-50)."""
    labels = np.asarray(labels)
    return (labels >= VERTEBRA_IDS[0]) & (labels <= VERTEBRA_IDS[-1])


def spine_mask(labels: np.ndarray) -> np.ndarray:
    """Binary mask (uint8) of every vertebra (TotalSegmentator v2 ids 25-50)."""
    return vertebra_mask(labels).astype(np.uint8)
