"""Where do the shipped U-Net's spine-mask errors lie on a phantom, and are they learned?

For each phantom seed (healthy variant; truth: the phantom's vertebra and sacrum labels):

- on the phantom's own grid (``segment_volume``, as ``evaluate segmentation`` scores it): false
  positives by distance from the true spine and by the tissue label they fall on, false negatives
  by vertebra;
- on the network's 1.5 mm grid, before any clean-up: IoU, false positives and negatives against the
  nearest-neighbour labels the network is trained on, at spine-probability thresholds 0.5, 0.7 and
  0.9 (an error the threshold cannot mend is a blurred boundary, not a shifted one).

Usage (about 40 s a phantom)::

    .venv/bin/python experiments/segmentation_errors.py            # phantoms 1009 and 1015 (test split)
    .venv/bin/python experiments/segmentation_errors.py 1032       # chosen seeds
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from scipy import ndimage

from SpineInpaintLib import segmentation
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.data.cases import phantom_case

#: Distance bands (mm) from the true spine for the false positives.
BANDS = ((0, 1), (1, 2), (2, 4), (4, 6), (6, np.inf))


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[float, int, int]:
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(truth & ~pred))
    return tp / max(tp + fp + fn, 1), fp, fn


def _top_labels(labels: np.ndarray, where: np.ndarray, n: int = 6) -> str:
    ids, counts = np.unique(labels[where], return_counts=True)
    order = np.argsort(counts)[::-1][:n]
    return ", ".join(f"{int(ids[k])}: {int(counts[k])}" for k in order)


def report(seed: int, model) -> None:
    case = phantom_case(seed, lesion_types=None)
    labels = case.labels.array
    truth = spine_mask(labels) > 0
    result = segmentation.segment_volume(case.ct, "unet", model=model)
    pred = result.spine.array > 0
    iou, fp_n, fn_n = _counts(pred, truth)
    spacing = case.ct.spacing_zyx
    print(f"phantom {seed} (voxels {spacing[1]:.2f} x {spacing[2]:.2f} x {spacing[0]:.2f} mm), its own grid: "
          f"IoU {iou:.3f}, false positives {fp_n}, false negatives {fn_n}")
    fp = pred & ~truth
    distance = ndimage.distance_transform_edt(~truth, sampling=spacing)
    hu = case.ct.array
    for lo, hi in BANDS:
        band = fp & (distance > lo) & (distance <= hi)
        median = f"{np.median(hu[band]):.0f}" if band.any() else "-"
        print(f"  FP {lo}-{hi} mm: {int(band.sum()):6d} voxels, median {median} HU; labels (id: voxels) "
              f"{_top_labels(labels, band)}")
    print(f"  FN by label: {_top_labels(labels, truth & ~pred, 8)}")
    grid = segmentation.to_network_grid(case.ct)
    probs = segmentation.predict_grid(model, grid.array, grid.spacing[2])
    grid_truth = spine_mask(segmentation.to_network_grid(case.labels, labels=True).array) > 0
    spine_prob = 1.0 - probs[0]
    for threshold in (0.5, 0.7, 0.9):
        iou, fp_n, fn_n = _counts(spine_prob > threshold, grid_truth)
        print(f"  network grid ({segmentation.GRID_MM} mm), spine probability > {threshold}: IoU {iou:.3f}, "
              f"FP {fp_n}, FN {fn_n}")


def main(argv: list[str]) -> None:
    warnings.simplefilter("ignore")
    seeds = [int(a) for a in argv] or [1009, 1015]
    model, _ = segmentation.load_model("unet")
    for seed in seeds:
        report(seed, model)


if __name__ == "__main__":
    main(sys.argv[1:])
