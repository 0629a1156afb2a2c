"""The output names of ``restore``: a contract that the command line, the Slicer module and the tests share."""

from __future__ import annotations

__all__ = ["OUTPUT_FILES"]

#: The output file names: a contract that tests, benchmarks and users rely on.
OUTPUT_FILES = {
    "restored_ct": "restored_ct.nii.gz",
    "spine_seg": "spine_seg.nii.gz",
    "lesion_seg": "lesion_seg.nii.gz",
    "restored_seg": "restored_seg.nii.gz",
    "restored_spine": "restored_spine.stl",
    "report_json": "report.json",
    "report_png": "report.png",
}
