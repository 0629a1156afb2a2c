"""Procedural spine CT phantoms with TotalSegmentator v2 labels, and their comparison with real scans."""

from SpineInpaintLib.data.phantom.config import (
    FIELD_LEVELS,
    PHANTOM_ONLY_LABELS,
    SUPPORTED_LEVELS,
    TISSUE_LABELS,
    Phantom,
    PhantomConfig,
    SpineLevel,
    totalsegmentator_labels,
)
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.data.phantom.tissues import (
    DISC_MAX_GAP_MM,
    FAT_HU,
    body_outline,
    compare_with_real,
    disc_mask,
    tissue_hu_statistics,
    tissue_masks,
)

__all__ = [
    "TISSUE_LABELS",
    "PHANTOM_ONLY_LABELS",
    "SUPPORTED_LEVELS",
    "FIELD_LEVELS",
    "PhantomConfig",
    "SpineLevel",
    "Phantom",
    "totalsegmentator_labels",
    "make_phantom",
    "body_outline",
    "disc_mask",
    "tissue_masks",
    "tissue_hu_statistics",
    "compare_with_real",
    "FAT_HU",
    "DISC_MAX_GAP_MM",
]
