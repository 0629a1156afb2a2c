"""Procedural spine CT phantoms with TotalSegmentator v2 labels, and their comparison with real scans."""

from SpineInpaintLib.data.phantom.config import (
    CONTRAST_PHASES,
    FIELD_LEVELS,
    KERNELS,
    PHANTOM_ONLY_LABELS,
    REGIONS,
    SUPPORTED_LEVELS,
    TISSUE_LABELS,
    UPPER_LEVELS,
    Phantom,
    PhantomConfig,
    SpineLevel,
    parse_levels,
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
    "UPPER_LEVELS",
    "REGIONS",
    "CONTRAST_PHASES",
    "KERNELS",
    "parse_levels",
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
