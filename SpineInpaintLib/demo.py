"""``make demo``: the main job on the embedded default case.

Until the end-to-end restore lands (issue 7), the main job is what exists of the pipeline: load
the real sample scan, summarise its spine per vertebra, and draw its three orthogonal views with
the vertebra labels. The restore issue replaces this with ``restore`` on a phantom with a
destructive lytic lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

from SpineInpaintLib import io
from SpineInpaintLib.report import plot_orthogonal_views
from SpineInpaintLib.stats import volume_summary

__all__ = ["run_demo", "plot_orthogonal_views"]


def run_demo(out: Path, case: str = "totalsegmentator") -> int:
    """Run the demo on an embedded real case, write its outputs to ``out`` and list them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ct, labels = io.load_real_case(case)
    summary = volume_summary(ct, labels)
    summary["case"] = case
    json_path = out / "spine_summary.json"
    json_path.write_text(json.dumps(summary, indent=2))
    png_path = plot_orthogonal_views(ct, labels, out / "spine_views.png", title=f"real case '{case}'")
    print(f"case '{case}': {ct.size_xyz[0]}x{ct.size_xyz[1]}x{ct.size_xyz[2]} voxels at "
          f"{', '.join(f'{s:g}' for s in ct.spacing)} mm")
    for row in summary["vertebrae"]:
        print(f"  {row['name']:>6}: {row['volume_ml']:7.1f} mL, HU {row['hu_mean']:6.1f} +/- {row['hu_std']:5.1f}")
    print("outputs:")
    for p in (json_path, png_path):
        print(f"  {p}")
    return 0
