"""How high can the phantom spine IoU go for a network that works on a coarser in-plane grid?

For each held-out test phantom of the shipped U-Net (``held_out_phantoms``), the true spine
mask is taken to the network grid (that of ``segmentation.to_network_grid``, 1.5 mm, and 1.0 mm for
comparison) and brought back to the phantom's grid as ``segment_volume`` brings the network's
output back (linear interpolation, > 0.5). Three grid outputs a perfect network could give:

- ``soft``: the mask's value interpolated at each grid point (between 0 and 1 near the edge);
- ``hard``: the same thresholded at 0.5 on the grid, what training on nearest-neighbour labels teaches;
- ``area``: about the fraction of each grid pixel's area that is spine (the mask smoothed first by a
  Gaussian with the variance of a pixel-wide box).

Usage (about 20 s a phantom)::

    .venv/bin/python experiments/segmentation_grid_ceiling.py            # the six test phantoms
    .venv/bin/python experiments/segmentation_grid_ceiling.py 1009 1032  # chosen seeds
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
from scipy import ndimage

from SpineInpaintLib import segmentation
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.data.cases import phantom_case
from SpineInpaintLib.evaluation.metrics import overlap as metrics
from SpineInpaintLib.evaluation.segmentation import held_out_phantoms


def ceilings(labels: io.Volume, grid_mm: float) -> dict[str, float]:
    """IoU of the true spine mask after the round trip through a ``grid_mm`` grid, per grid output."""
    truth = spine_mask(labels.array) > 0
    lps = io.reorient(labels.with_array(truth.astype(np.float32)), "LPS")

    def to_grid(mask: np.ndarray) -> io.Volume:
        # The network grid of segmentation.to_network_grid, with 0 (not air) outside the volume.
        return io.resample_to_spacing(lps.with_array(mask), (grid_mm, grid_mm, lps.spacing[2]), default=0.0)

    point = to_grid(lps.array)
    # A centred Gaussian with the variance of a grid-pixel-wide box: the area average.
    sigma = [0.0] + [grid_mm / s / np.sqrt(12.0) for s in lps.spacing_zyx[1:]]
    area = to_grid(ndimage.gaussian_filter(lps.array, sigma))

    def back(grid: io.Volume) -> np.ndarray:
        return io.resample_like(grid, labels).array > 0.5

    return {"soft": metrics.iou(back(point), truth),
            "hard": metrics.iou(back(point.with_array((point.array > 0.5).astype(np.float32))), truth),
            "area": metrics.iou(back(area), truth)}


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    meta = json.loads(segmentation.default_weights("unet").with_suffix(".json").read_text())
    seeds = [int(a) for a in argv] or [s for s, _ in held_out_phantoms(meta)]
    rows = []
    for seed in seeds:
        labels = phantom_case(seed, lesion_types=None).labels
        row = {"seed": seed, "pixel_mm": round(labels.spacing_zyx[1], 3),
               **{f"{g} mm {k}": v for g in (1.5, 1.0) for k, v in ceilings(labels, g).items()}}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    for key in [k for k in rows[0] if k.endswith(("soft", "hard", "area"))]:
        values = [r[key] for r in rows]
        print(f"{key:<14} mean {np.mean(values):.4f}  range {min(values):.4f}-{max(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
