"""Descriptive statistics of a CT volume and its spine labels (for ``info``, reports and the demo)."""

from __future__ import annotations

import numpy as np

from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.labels import VERTEBRA_NAMES

__all__ = ["vertebra_statistics", "volume_summary"]


def vertebra_statistics(ct: Volume, labels: Volume) -> list[dict]:
    """Per-vertebra voxel count, volume (mL), HU mean/std and centroid (LPS mm).

    Only TotalSegmentator v2 vertebra ids (25-50) are reported, caudal to cranial.
    """
    if not labels.same_grid(ct):
        raise ValueError("labels must be on the CT grid (resample them with io.resample_like)")
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    rows = []
    present = np.unique(labels.array)
    for label in sorted(int(v) for v in present if int(v) in VERTEBRA_NAMES):
        mask = labels.array == label
        hu = ct.array[mask].astype(np.float64)
        centroid_zyx = np.argwhere(mask).mean(axis=0)
        rows.append(
            {
                "label": label,
                "name": VERTEBRA_NAMES[label],
                "voxels": int(mask.sum()),
                "volume_ml": round(mask.sum() * voxel_ml, 3),
                "hu_mean": round(float(hu.mean()), 1),
                "hu_std": round(float(hu.std()), 1),
                "centroid_lps_mm": [round(float(c), 2) for c in ct.index_to_physical(centroid_zyx)[0]],
            }
        )
    return rows


def volume_summary(ct: Volume, labels: Volume | None = None) -> dict:
    """JSON-ready summary: geometry, HU range and percentiles, and vertebra statistics if labels are given."""
    values = ct.array
    summary: dict = {
        "geometry": ct.geometry(),
        "dtype": str(values.dtype),
        "hu": {
            "min": float(values.min()),
            "max": float(values.max()),
            "p1": float(np.percentile(values, 1)),
            "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)),
        },
    }
    if labels is not None:
        summary["vertebrae"] = vertebra_statistics(ct, labels)
    return summary
