"""``make demo``: the main job on the embedded default case.

Until the end-to-end restore lands (issue 7), the main job is what exists of the pipeline: load
the real sample scan, summarise its spine per vertebra, and draw its three orthogonal views with
the vertebra labels. The restore issue replaces this with ``restore`` on a phantom with a
destructive lytic lesion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from SpineInpaintLib import io
from SpineInpaintLib.stats import volume_summary

__all__ = ["run_demo", "plot_orthogonal_views"]


def plot_orthogonal_views(ct: io.Volume, labels: io.Volume | None, path: Path, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the spine centre (bone window), labels outlined.

    Slices go through the centroid of the vertebra labels, or the volume centre without labels;
    each view is drawn with its physical aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Radiological display whatever the file's orientation: anterior up, patient left on the right.
    ct = io.reorient(ct, "LPS")
    array = ct.array.astype(np.float32)
    spine = None
    if labels is not None:
        label_array = io.reorient(labels, "LPS").array
        spine = (label_array >= 25) & (label_array <= 50)
    centre = np.argwhere(spine).mean(axis=0) if spine is not None and spine.any() else np.array(array.shape) / 2
    cz, cy, cx = (int(round(c)) for c in centre)
    sz, sy, sx = ct.spacing_zyx
    views = [
        ("axial", array[cz], None if spine is None else spine[cz], sy / sx),
        ("coronal", array[:, cy, :], None if spine is None else spine[:, cy, :], sz / sx),
        ("sagittal", array[:, :, cx], None if spine is None else spine[:, :, cx], sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, image, mask, aspect) in zip(axes, views):
        if name != "axial":  # superior (high z) at the top
            image, mask = image[::-1], None if mask is None else mask[::-1]
        ax.imshow(image, cmap="gray", vmin=-400, vmax=1000, aspect=aspect)
        if mask is not None and mask.any():
            ax.contour(mask, levels=[0.5], colors="orange", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title or "CT (W1400/L300) with vertebra labels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
