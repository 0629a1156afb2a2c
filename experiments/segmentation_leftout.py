"""How do segmentation weights do on the real scan they never saw, and where do they fail?

For each weights file (``.safetensors`` with its JSON, or a training ``checkpoint.pt``; U-Net or
V-Net, run on whole slices without the shipped locator), on the real
scan ``totalsegmentator/example_ct.nii.gz`` (labels: TotalSegmentator predictions):

- the spine-mask Dice as ``evaluate segmentation`` scores it (``segment_volume``: clean-up and
  split into vertebrae, which drops pieces no vertebral body reaches), and the raw network mask's
  Dice (spine probability > 0.5 on the network grid, no clean-up, no split);
- false positives by the real scan's tissue label (femur, hip, unlabelled ...), false negatives and
  the share of each vertebra found;
- with ``--figure PNG``: sagittal, coronal and axial views (L3, L5, S1, two sacral slices) of the
  first weights' raw mask (red) over the labels (green).

``--gammas 1,0.7 --flip`` averages the network over test-time variants of its input; ``--case
totalsegmentator_dicom`` scores on the other labelled real scan (T11-T12).

Usage (about 30 s per weights file)::

    .venv/bin/python experiments/segmentation_leftout.py runs/seg/lo_var/unet.safetensors [more ...] \\
        [--figure docs/segmentation_leftout.png]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from SpineInpaintLib import segmentation
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import VERTEBRA_NAMES, spine_mask
from SpineInpaintLib.data.real import load_real_case
from SpineInpaintLib.evaluation.metrics import overlap as metrics
from SpineInpaintLib.training import loop as training

#: TotalSegmentator v2 ids of the bones beside the spine that a phantom-trained network mistakes for it.
OTHER_BONES = {75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right", 0: "unlabelled"}


def load(path: str, net: str = "unet"):
    """A network in eval mode from safetensors weights (the network their JSON names) or a training
    checkpoint (``net``)."""
    if path.endswith(".pt"):
        model = segmentation.build_network(net, segmentation.IN_CHANNELS, segmentation.N_CLASSES)
        training.load_checkpoint(Path(path), models={"net": model})
        return model.eval()
    return segmentation.load_model(net, path)[0]


def with_test_time_augmentation(model, gammas: tuple[float, ...] = (1.0,), flip: bool = False):
    """``model`` averaging its class probabilities over a gamma of its windowed input (each of
    ``gammas``; below 1 brightens) and, with ``flip``, the left-right mirror of each."""
    import torch

    class Averaged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model
            self.spine_grid_mm = getattr(model, "spine_grid_mm", segmentation.GRID_MM)
            self._spine_net = getattr(model, "_spine_net", "unet")

        def forward(self, x):
            probs = []
            for gamma in gammas:
                xg = x.clamp(0.0, 1.0) ** gamma
                probs.append(torch.softmax(self.net(xg).float(), dim=1))
                if flip:
                    probs.append(torch.softmax(self.net(xg.flip(-1)).float(), dim=1).flip(-1))
            # Log of the mean probability: segment_volume's softmax gives that mean back.
            return torch.log(torch.stack(probs).mean(0) + 1e-8)

    return Averaged().eval() if flip or tuple(gammas) != (1.0,) else model


def breakdown(model, ct: io.Volume, labels: io.Volume) -> tuple[dict, io.Volume]:
    """Scores of one network on the real scan, and its raw mask (on the scan's grid)."""
    truth = spine_mask(labels.array) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Whole slices, no locator: the shipped U-Net that would find the V-Net's box saw this scan.
        pipeline = segmentation.segment_volume(ct, model=model, locator=None).spine.array > 0
        raw_volume = segmentation.segment_volume(ct, model=model, clean=False, per_vertebra=False,
                                                 locator=None).spine
    raw = raw_volume.array > 0
    lab = labels.array
    fp_labels, fp_counts = np.unique(lab[pipeline & ~truth], return_counts=True)
    found = {VERTEBRA_NAMES[int(v)]:
             round(float(np.count_nonzero(pipeline & (lab == v)) / np.count_nonzero(lab == v)), 3)
             for v in np.unique(lab[truth])}
    return {
        "dice": round(metrics.dice(pipeline, truth), 4),
        "dice_raw_mask": round(metrics.dice(raw, truth), 4),
        "false_positive_voxels": int(np.count_nonzero(pipeline & ~truth)),
        "false_negative_voxels": int(np.count_nonzero(truth & ~pipeline)),
        "false_positives_by_label": {OTHER_BONES.get(int(v), str(int(v))): int(c)
                                     for v, c in zip(fp_labels, fp_counts) if c >= 50},
        "share_found_by_vertebra": found,
    }, raw_volume


def figure(ct: io.Volume, labels: io.Volume, raw: io.Volume, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, labels, raw = (io.reorient(v, "LPS") for v in (ct, labels, raw))
    a, lab, pred = ct.array, labels.array, raw.array > 0
    truth = spine_mask(lab) > 0
    _, ys, xs = np.nonzero(truth)
    x, y = int(np.median(xs)), int(np.median(ys))

    def show(ax, img, t, p, name):
        ax.imshow(np.clip(img, -200, 1300), cmap="gray")
        ax.contour(t, [0.5], colors="lime", linewidths=0.7)
        if p.any():
            ax.contour(p, [0.5], colors="red", linewidths=0.7)
        ax.set_title(name, fontsize=9)
        ax.axis("off")

    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    show(axes[0, 0], a[::-1, :, x], truth[::-1, :, x], pred[::-1, :, x], "sagittal")
    show(axes[0, 1], a[::-1, y, :], truth[::-1, y, :], pred[::-1, y, :], "coronal")
    slices = []
    for level in (29, 27, 26):
        zs = np.nonzero((lab == level).any(axis=(1, 2)))[0]
        if zs.size:
            slices.append((VERTEBRA_NAMES[level], int(np.median(zs))))
    zs = np.nonzero((lab == 25).any(axis=(1, 2)))[0]
    if zs.size:
        slices += [("sacrum", int(np.percentile(zs, 60))), ("sacrum", int(np.percentile(zs, 25)))]
    for ax, (name, z) in zip(list(axes[0, 2:]) + list(axes[1]), slices):
        show(ax, a[z], truth[z], pred[z], f"{name}, slice {z}")
    for ax in list(axes[0, 2:]) + list(axes[1]):
        if not ax.images:
            ax.axis("off")
    fig.suptitle(f"{title}: real scan left out of training (green: labels, red: raw network mask)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    print(f"figure: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="U-Net or V-Net .safetensors (with JSON) or checkpoint.pt")
    parser.add_argument("--net", default="unet", choices=segmentation.NETWORKS,
                        help="network of checkpoint.pt files (safetensors: the one their JSON names)")
    parser.add_argument("--figure", help="PNG of the first weights' raw mask on the scan")
    parser.add_argument("--case", default="totalsegmentator", choices=("totalsegmentator", "totalsegmentator_dicom"),
                        help="real scan to score on (default: example_ct; the other has T11-T12 only)")
    parser.add_argument("--gammas", default="1", help="test-time gammas of the windowed input, comma-separated "
                        "(probabilities averaged; default 1: none)")
    parser.add_argument("--flip", action="store_true", help="also average over the left-right mirror")
    args = parser.parse_args()
    gammas = tuple(float(g) for g in args.gammas.split(","))
    ct, labels = load_real_case(args.case)
    report = {}
    for k, path in enumerate(args.weights):
        model = with_test_time_augmentation(load(path, args.net), gammas, args.flip)
        scores, raw = breakdown(model, ct, labels)
        report[path] = scores
        print(path, json.dumps(scores), flush=True)
        if k == 0 and args.figure:
            figure(ct, labels, raw, Path(path).parent.name or path, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
