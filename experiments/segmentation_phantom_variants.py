"""Cheap variants of the shipped V-Net on the held-out test phantoms: do they move the 3D IoU?

No training: the shipped weights, three ways of running them through ``segment_volume`` (located by
the shipped U-Net as by default):

- ``vnet``: as shipped;
- ``mirrored``: the mean of the V-Net's probabilities on each slice and on its left-right mirror
  (``segmentation_leftout.with_test_time_augmentation(flip=True)``), 1.1-1.6x the time;
- ``blend``: 0.7 V-Net + 0.3 U-Net probabilities (the U-Net already runs as the locator).

Prints each case and the means over the six test phantoms (3D IoU, Dice, HD95, as
``summarise`` takes them) and the real scan's Dice (in training of both networks).

Usage (about 12 min on 2 threads)::

    .venv/bin/python experiments/segmentation_phantom_variants.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from SpineInpaintLib import segmentation
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.evaluation.segmentation import evaluate_case, held_out_phantoms, summarise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_leftout import with_test_time_augmentation  # noqa: E402


class Blend(torch.nn.Module):
    """Weighted mean of several networks' class probabilities (log of it, for segment_volume's softmax)."""

    def __init__(self, models, weights):
        super().__init__()
        self.models = torch.nn.ModuleList(models)
        self.weights = weights
        self.spine_grid_mm = models[0].spine_grid_mm
        self._spine_net = models[0]._spine_net  # keeps the V-Net's locator

    def forward(self, x):
        probs = sum(w * torch.softmax(m(x).float(), dim=1) for m, w in zip(self.models, self.weights))
        return torch.log(probs + 1e-8)


def main() -> int:
    torch.set_num_threads(2)
    vnet, meta = segmentation.load_model("vnet")
    unet, _ = segmentation.load_model("unet")
    variants = {"vnet": vnet, "mirrored": with_test_time_augmentation(vnet, flip=True),
                "blend": Blend([vnet, unet], [0.7, 0.3])}
    cases = [(f"phantom_{s}", lambda s=s, h=h: datasets.phantom_case(
        s, lesion_types=None if h else ("lytic", "sclerotic", "mixed"))) for s, h in held_out_phantoms(meta)]
    cases.append(("example_ct", lambda: datasets.real_case("totalsegmentator", lesion_types=None)))
    records: dict[str, list[dict]] = {k: [] for k in variants}
    real: dict[str, float] = {}
    for name, make in cases:
        case = make()
        for key, model in variants.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = segmentation.segment_volume(case.ct, model=model, locator=unet)
            r = evaluate_case(result, case)
            if name == "example_ct":
                real[key] = r["dice_3d"]
            else:
                records[key].append(r)
            vert = float(np.mean([v["dice"] for v in r["per_vertebra"].values()]))
            print(f"{name} {key}: IoU {r['iou_3d']:.4f} Dice {r['dice_3d']:.4f} HD95 {r['hd95_mm']:.2f} mm "
                  f"per-vertebra Dice {vert:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for key, found in records.items():
        m = summarise(found)
        print(f"{key}: {m['cases']} test phantoms IoU {m['iou_3d']:.4f} Dice {m['dice_3d']:.4f} "
              f"HD95 {m['hd95_mm']:.2f} mm | example_ct Dice {real[key]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
