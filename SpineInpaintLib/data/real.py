"""The real CT scans beside the project (``../shared/data/real``): where they are and how to load one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume, read_volume, resample_like

__all__ = ["REAL_CASES", "real_data_dir", "load_real_case"]

# --- the real sample cases in ../shared/data/real ---------------------------------------------
#: name -> (CT path, label path), relative to the real-data folder.
REAL_CASES: dict[str, tuple[str, str]] = {
    "totalsegmentator": ("totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz"),
    "totalsegmentator_dicom": ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz"),
    "dcmqi_ct3slice": ("dcmqi_ct3slice", "dcmqi_ct3slice/spine_seg.nrrd"),
}


def real_data_dir() -> Path:
    """The shared real-CT folder: ``$SPINEINPAINT_REAL_DATA``, else ``../shared/data/real`` of the repo."""
    env = os.environ.get("SPINEINPAINT_REAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def load_real_case(name: str = "totalsegmentator") -> tuple[Volume, Volume]:
    """Load a real CT case and its label map, the labels put on the CT's grid.

    The TotalSegmentator DICOM labels are stored with flipped rows; resampling through physical
    space (nearest neighbour) puts them on the series' grid without any special case.

    Returns
    -------
    (ct, labels)
        ``ct`` in HU as int16/int32 as stored; ``labels`` uint8 on the same grid.
    """
    if name not in REAL_CASES:
        raise SpineInpaintError(f"unknown real case '{name}' (known: {', '.join(REAL_CASES)})")
    root = real_data_dir()
    ct_rel, lab_rel = REAL_CASES[name]
    if not (root / ct_rel).exists():
        raise SpineInpaintError(f"real data not found at {root / ct_rel} (set SPINEINPAINT_REAL_DATA)")
    ct = read_volume(root / ct_rel, require_3d=False)
    labels = read_volume(root / lab_rel, require_3d=False)
    if not labels.same_grid(ct):
        labels = resample_like(labels, ct, labels=True)
    labels.array = labels.array.astype(np.uint8)
    return ct, labels
