"""Evaluate segmentation: per-case IoU / Dice / HD95 and per-vertebra Dice, Table I, Figure 4."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.evaluation.metrics import overlap as metrics
from SpineInpaintLib.segmentation import inference as seg
from SpineInpaintLib.segmentation.networks import NETWORKS
from SpineInpaintLib.training.segmentation import _iou_values, slice_iou

__all__ = ["PAPER_TABLE_I", "evaluate_cases", "format_case", "evaluate_case", "summarise", "format_table_i", "plot_figure4"]

#: Table I of Miao et al.: loss and IoU on the training and validation sets.
PAPER_TABLE_I = {
    "unet": {"train_loss": 0.0404, "val_loss": 0.0400, "train_iou": 0.9582, "val_iou": 0.9584},
    "vnet": {"train_loss": 0.0158, "val_loss": 0.0157, "train_iou": 0.9829, "val_iou": 0.9831},
}


# --- evaluation -----------------------------------------------------------------------------------------
def evaluate_case(result: seg.SegmentationResult, case: datasets.Case) -> dict:
    """Scores of a whole-volume segmentation against a case's healthy labels, on the case's own grid.

    ``iou_3d``/``dice_3d``: the binary spine mask over the volume; ``slice_iou``: the spine IoU pooled
    over the axial slices holding spine (truth or prediction) and ``slice_mean_iou_2class`` the mean of
    it and the background IoU of those slices (Keras' 2-class ``MeanIoU``, the paper's likely
    definition); per vertebra (TotalSegmentator ids present in the truth): Dice and HD95 (mm).
    """
    truth_labels = case.labels.array
    truth = spine_mask(truth_labels) > 0
    pred = result.spine.array > 0
    spacing = case.ct.spacing_zyx
    rows = np.nonzero((truth | pred).reshape(truth.shape[0], -1).any(axis=1))[0]
    counts = np.array(slice_iou(pred[rows], truth[rows]), float) if rows.size else np.zeros(4)
    s_iou, s_miou = _iou_values(counts)
    per_level = {}
    truth_v = np.where(truth, truth_labels, 0)
    for level in sorted(int(v) for v in np.unique(truth_v) if v):
        t_mask = truth_v == level
        p_mask = result.labels.array == level
        per_level[level] = {"dice": metrics.dice(p_mask, t_mask),
                            "hd95_mm": metrics.hd95(p_mask, t_mask, spacing) if p_mask.any() else float("inf"),
                            "truth_ml": float(np.count_nonzero(t_mask) * np.prod(spacing) / 1000.0)}
    return {"case_id": case.case_id, "iou_3d": metrics.iou(pred, truth), "dice_3d": metrics.dice(pred, truth),
            "hd95_mm": metrics.hd95(pred, truth, spacing) if pred.any() else float("inf"),
            "slice_iou": s_iou, "slice_mean_iou_2class": s_miou, "per_vertebra": per_level,
            "seconds": result.timings.get("total"), "flags": result.flags}


def evaluate_cases(model, cases: Iterable[datasets.Case], *, net: str) -> list[dict]:
    """:func:`evaluate_case` for every case, segmenting each with ``model``."""
    return [evaluate_case(seg.segment_volume(case.ct, net, model=model), case) for case in cases]


def format_case(net: str, record: dict) -> str:
    """One line of a case's scores, as ``evaluate segmentation`` prints it."""
    return (f"  {net} {record['case_id']}: 3D IoU {record['iou_3d']:.4f}  Dice {record['dice_3d']:.4f}  "
            f"slice 2-class mIoU {record['slice_mean_iou_2class']:.4f}  ({record['seconds']:.1f} s)")


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summarise(records: Sequence[dict]) -> dict:
    """Means over cases, and per vertebra over the cases holding it."""
    levels: dict[int, list[dict]] = {}
    for r in records:
        for level, v in r["per_vertebra"].items():
            levels.setdefault(int(level), []).append(v)
    return {
        "cases": len(records),
        "iou_3d": _mean(r["iou_3d"] for r in records),
        "dice_3d": _mean(r["dice_3d"] for r in records),
        "hd95_mm": _mean(r["hd95_mm"] for r in records),
        "slice_iou": _mean(r["slice_iou"] for r in records),
        "slice_mean_iou_2class": _mean(r["slice_mean_iou_2class"] for r in records),
        "per_vertebra": {level: {"dice": _mean(v["dice"] for v in vs), "hd95_mm": _mean(v["hd95_mm"] for v in vs),
                                 "missing": sum(1 for v in vs if not np.isfinite(v["hd95_mm"])), "n": len(vs)}
                         for level, vs in sorted(levels.items())},
    }


def held_out_phantoms(meta: dict) -> list[tuple[int, bool]]:
    """(seed, healthy) of the held-out test-split phantoms of a training's seed range."""
    seeds = meta.get("training", {}).get("phantom_seeds") or [1000, 1040]
    fraction = meta.get("training", {}).get("healthy_fraction", 0.3)
    out = []
    for s in range(int(seeds[0]), int(seeds[1])):
        if datasets.split_of(f"phantom_{s:04d}") == "test":
            out.append((s, bool(np.random.default_rng([s, 15485863]).random() < fraction)))
    return out


def format_table_i(rows: dict) -> str:
    """The paper's Table I (loss and IoU, train and validation) for our networks beside the paper's."""
    nets = [n for n in NETWORKS if n in rows]
    head = f"{'':<22}" + "".join(f"{'ours ' + n:>14}{'paper ' + n:>14}" for n in nets)
    lines = ["Table I (Miao et al.) - loss and IoU", head]
    for key, name in (("train_loss", "loss, training set"), ("val_loss", "loss, validation set"),
                      ("train_iou", "IoU, training set"), ("val_iou", "IoU, validation set"),
                      ("train_mean_iou_2class", "2-class mean IoU, train"), ("val_mean_iou_2class", "2-class mean IoU, val")):
        cells = ""
        for n in nets:
            ours = rows[n].get(key)
            paper = PAPER_TABLE_I[n].get(key)
            cells += f"{ours:>14.4f}" if isinstance(ours, (int, float)) else f"{'-':>14}"
            cells += f"{paper:>14.4f}" if paper is not None else f"{'-':>14}"
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


def plot_figure4(csv_paths: dict[str, Path], png: Path, *, example: tuple[io.Volume, io.Volume] | None = None) -> Path:
    """The paper's Figure 4 layout: loss and IoU per epoch, U-Net blue and V-Net red (train solid,
    validation dashed); with ``example`` = (CT, per-vertebra labels) a third panel shows a mid-sagittal
    slice of the CT with the labels over it.
    """
    import csv

    plt = pyplot()

    panels = 3 if example is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    colours = {"unet": "tab:blue", "vnet": "tab:red"}
    for net, path in csv_paths.items():
        with Path(path).open() as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes[:2], ("loss", "iou")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [float(r[f"{split}_{key}"]) for r in rows]
                ax.plot(epochs, values, style, color=colours.get(net), label=f"{net} {split}")
    for ax, name in zip(axes[:2], ("loss (Dice + cross-entropy)", "IoU of the spine mask")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if example is not None:
        ct, labels = (io.reorient(v, "LPS") for v in example)
        column = int(np.argmax(np.bincount(np.nonzero(labels.array)[2]))) if labels.array.any() else ct.shape[2] // 2
        image = ct.array[:, :, column]
        lab = labels.array[:, :, column].astype(float)
        aspect = ct.spacing[2] / ct.spacing[1]
        axes[2].imshow(np.clip(image, -200, 1300), cmap="gray", origin="lower", aspect=aspect)
        axes[2].imshow(np.ma.masked_equal(lab, 0), cmap="tab10", alpha=0.5, origin="lower", aspect=aspect,
                       interpolation="nearest")
        axes[2].set_title("per-vertebra labels (sagittal)")
        axes[2].axis("off")
    fig.suptitle("Spine segmentation on CPU: loss and IoU per epoch (cf. Miao et al., Fig. 4)")
    fig.tight_layout()
    return save_figure(fig, png, dpi=100)
