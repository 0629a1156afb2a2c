"""What would a finer network grid cost at inference? Forward passes of the shipped networks only.

The phantom IoU targets (U-Net 0.96, V-Net 0.97) are above what a hard mask on the 1.5 mm grid can
reach (0.941, ``segmentation_grid_ceiling.py``; 1.0 mm: 0.966). This times the shipped U-Net and
V-Net on batches of 8 slices at 1.5, 1.0 and 0.7 mm (a 512x512 slice of a 358 mm field of view),
on whole slices and on the V-Net's located box (240 mm, ``LOCATE_MIN_MM``), and
scales to the 100 slices of the ``bench segmentation`` case. Network time only: resampling,
locating, clean-up and the split into vertebrae come on top (about 5-8 s at 1.5 mm; they grow with
the number of grid voxels). The weights are the shipped ones; the output is not used.

Usage (about 1.5 min)::

    .venv/bin/python experiments/segmentation_grid_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from SpineInpaintLib import segmentation
from SpineInpaintLib.segmentation.inference import LOCATE_MIN_MM

FIELD_OF_VIEW_MM = 358.0  # 512 pixels of 0.7 mm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'network':<8}{'grid':>7}{'part':>16}{'pixels':>10}{'s / 100 slices':>16}")
    for net in ("unet", "vnet"):
        model, _ = segmentation.load_model(net)
        for grid_mm in (1.5, 1.0, 0.7):
            for part, size_mm in (("whole slice", FIELD_OF_VIEW_MM), ("240 mm box", LOCATE_MIN_MM)):
                px = int(np.ceil(size_mm / grid_mm / 16) * 16)  # predict_grid pads to a multiple of 16
                x = torch.zeros(8, segmentation.IN_CHANNELS, px, px)
                x[:, :, px // 3: px // 2, px // 3: px // 2] = 0.5
                with torch.inference_mode():
                    model(x)  # warm-up
                    start = time.perf_counter()
                    model(x)
                    model(x)
                    seconds = (time.perf_counter() - start) / 2
                print(f"{net:<8}{grid_mm:>5.1f} mm{part:>16}{px:>6}x{px:<4}{seconds * 100 / 8:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
