"""Evaluate detection: slice-level AP / FROC per lesion type and split, volume-level hits, figures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.detection import inference as det
from SpineInpaintLib.evaluation.metrics.boxes import box_iou, froc
from SpineInpaintLib.evaluation.metrics.overlap import dice
from SpineInpaintLib.training.detection import (
    SampleSet,
    cache_size,
    make_detection_cases,
    predict_samples,
    samples_from_case,
    samples_from_deeplesion,
    score_detections,
)

__all__ = [
    "evaluate_detection", "format_evaluation", "TUNING_VOLUMES", "tune_volume_level", "truth_box_3d", "volume_hits",
    "summarise_volume_rows", "plot_froc", "plot_examples",
]

#: Validation volumes the volume-level thresholds are tuned on (``evaluate detection --tune``): 30
#: volumes; 15 (6 + 6 + 3) let a single false lesion decide the minimum track length.
TUNING_VOLUMES = {"phantoms": 12, "real": 12, "healthy_phantoms": 6}


# --- evaluation -----------------------------------------------------------------------------------
def _groups(meta: list[dict]) -> dict[str, np.ndarray]:
    """Image indices per reporting group: lesion type, destructive or not, source, lesion simulator."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        keys = [f"type={m['case_lesion_type']}", f"source={m['source']}"]
        if m.get("simulator"):
            keys.append(f"simulator={m['simulator']}")
        if m["destructive"] is not None:
            keys.append("destructive" if m["destructive"] else "intact cortex")
        for k in keys:
            groups.setdefault(k, []).append(i)
    return {k: np.asarray(v) for k, v in sorted(groups.items())}


def evaluate_detection(detectors: dict[str, det.Detector], *, phantoms: int = 15, real: int = 9,
                       healthy_phantoms: int = 4, max_positives: int = 10, deeplesion: str | None = None,
                       seed: int = 0, volume_level: bool = True, progress: bool = True,
                       figures: str | Path | None = None, cases: list[datasets.Case] | None = None,
                       volume_options: dict | None = None) -> dict:
    """Both detectors on the same held-out (test split) slices: AP, FROC, speed, per-group AP.

    Slices: per test case at most ``max_positives`` lesion slices (evenly spaced) and as many
    lesion-free spine slices (at least 10; healthy cases give 10).

    Volume level (the first detector only): lesions found by :func:`detection.detect_volume` on each
    test volume against the simulated lesion (a hit when the 3D boxes overlap with IoU >= 0.1),
    false positives per lesioned and per healthy volume, and the Dice of the lesion mask built by
    :func:`detection.lesion_mask_from_detections` against the simulated tumour inside the vertebra.
    With ``figures``, writes ``detection_froc.png`` and ``detection_examples.png`` there.
    ``cases`` replaces the generated test cases; ``volume_options`` go to ``detect_volume``.
    """
    if cases is None:
        cases = list(make_detection_cases("test", phantoms=phantoms, real=real,
                                          healthy_phantoms=healthy_phantoms, healthy_real=True))
    if not cases:
        raise SpineInpaintError("no test case could be generated")
    inputs: dict[tuple[int, float], tuple[SampleSet, np.ndarray, list]] = {}
    for detector in detectors.values():
        key = (detector.crop_size, detector.grid_mm)
        if key in inputs:
            continue
        # The same slices for every input grid (the draws do not depend on it); truth boxes come
        # from the lesion mask resampled onto each grid.
        rng = np.random.default_rng([seed, 8191])
        size = cache_size(key[0])
        samples = SampleSet.concat(samples_from_case(c, rng=rng, max_positives=max_positives, size=size,
                                                     grid_mm=key[1], negatives_per_positive=1.0, min_negatives=10)
                                   for c in cases)
        if deeplesion:
            samples = SampleSet.concat([samples, samples_from_deeplesion(deeplesion, "test", rng=rng, size=size,
                                                                         grid_mm=key[1])])
        inputs[key] = (samples, samples.centre_crops(key[0]), samples.centre_boxes(key[0]))
    samples, images, truth = next(iter(inputs.values()))
    result = {"seed": seed, "test_cases": [c.case_id for c in cases], "slices": len(samples),
              "positive_slices": int(sum(len(t) > 0 for t in truth)), "detectors": {}}
    groups = _groups(samples.meta)
    predictions, curves = {}, {}
    for name, detector in detectors.items():
        grid_samples, grid_images, grid_truth = inputs[(detector.crop_size, detector.grid_mm)]
        crop_s = float(np.mean([m["crop_s"] for m in grid_samples.meta]))
        detector.predict(grid_images[:2])  # warm-up: the first call allocates (not timed)
        boxes, scores, seconds = predict_samples(detector, grid_images)
        predictions[name] = (boxes, scores)
        row = score_detections(boxes, scores, grid_truth)
        if row["lesion_boxes"]:
            fr = froc(boxes, scores, grid_truth)
            curves[name] = (fr.curve_fps, fr.curve_sensitivity)
        row["images_per_s"] = len(grid_images) / (seconds + crop_s * len(grid_images))
        row["model_images_per_s"] = len(grid_images) / seconds
        row["input_grid"] = {"size": detector.crop_size, "pixel_mm": detector.grid_mm}
        row["groups"] = {}
        for g, idx in groups.items():
            if any(len(grid_truth[i]) for i in idx):
                row["groups"][g] = score_detections([boxes[i] for i in idx], [scores[i] for i in idx],
                                                    [grid_truth[i] for i in idx])
        result["detectors"][name] = row
    # The example figure draws the detectors of the first one's input grid on its crops.
    first = next(iter(detectors.values()))
    same_grid = {n: p for n, p in predictions.items()
                 if (detectors[n].crop_size, detectors[n].grid_mm) == (first.crop_size, first.grid_mm)}
    if figures and curves:
        result["figures"] = [str(plot_froc(result, curves, Path(figures) / "detection_froc.png")),
                             str(plot_examples(images, truth, same_grid, samples.meta,
                                               Path(figures) / "detection_examples.png", seed=seed))]
    if volume_level and detectors:
        result["volume_level"] = _volume_level(next(iter(detectors.values())), cases, progress,
                                               volume_options or {})
    return result


def tune_volume_level(detector: det.Detector, cases: Sequence[datasets.Case], *,
                      score_thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      slice_thresholds: Sequence[float] = (0.2, 0.3, 0.5), min_slices: Sequence[int] = (2, 3, 4),
                      fp_weight: float = 0.5) -> dict:
    """Volume-level thresholds of :func:`detection.detect_volume` for one detector, tuned on ``cases``.

    Every combination of the three thresholds (slice threshold <= score threshold) is scored on the
    cases' volumes by sensitivity minus ``fp_weight`` times the mean false lesions per volume (a hit
    as :func:`volume_hits`); the best wins, ties to the higher score threshold. The network runs once
    per volume. Returns ``{"chosen": {...}, "grid": [...], "cases": [...]}``.
    """
    if not cases:
        raise SpineInpaintError("no validation volume to tune the thresholds on")
    per = []
    for case in cases:
        ct_lps, spine = det.lps_inputs(case.ct, case.labels)
        per_slice = det.detect_slices(ct_lps, spine, detector, score_threshold=min(slice_thresholds))
        per.append((case, ct_lps, spine, per_slice, truth_box_3d(case)))
    grid = []
    for st in score_thresholds:
        for sl in slice_thresholds:
            if sl > st:
                continue
            for ms in min_slices:
                rows = []
                for case, ct_lps, spine, per_slice, truth in per:
                    found = det.lesions_from_slices(per_slice, ct_lps, spine, score_threshold=st,
                                                    slice_threshold=sl, min_slices=ms)
                    tp, fp = volume_hits(found, truth)
                    rows.append({"lesion": case.lesion.lesion_type if case.lesion else "none",
                                 "true_positive": tp, "false_positives": fp})
                summary = summarise_volume_rows(rows)
                summary.pop("cases", None)
                summary["objective"] = summary["sensitivity"] - fp_weight * float(
                    np.mean([r["false_positives"] for r in rows]))
                grid.append({"score_threshold": float(st), "slice_threshold": float(sl), "min_slices": int(ms),
                             **summary})
    best = max(grid, key=lambda g: (g["objective"], g["score_threshold"]))
    return {"chosen": best, "grid": grid, "cases": [c.case_id for c in cases], "fp_weight": fp_weight}


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def truth_box_3d(case: datasets.Case) -> np.ndarray | None:
    if case.lesion is None:
        return None
    mask = io.reorient(case.lesion.bone_destroyed, "LPS").array > 0
    if not mask.any():
        mask = io.reorient(case.lesion.lesion_mask, "LPS").array > 0
    zz, yy, xx = np.nonzero(mask)
    return np.array([[xx.min(), yy.min(), zz.min(), xx.max() + 1, yy.max() + 1, zz.max() + 1]], float)


def _volume_level(detector: det.Detector, cases: list[datasets.Case], progress: bool, options: dict) -> dict:
    rows = []
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="volumes", unit="case")
    for case in iterator:
        start = time.perf_counter()
        found = det.detect_volume(case.ct, case.labels, detector, **options)
        seconds = time.perf_counter() - start
        tp, fps = volume_hits(found, truth_box_3d(case))
        row = {"case_id": case.case_id, "lesion": case.lesion.lesion_type if case.lesion else "none",
               "found": len(found), "true_positive": tp, "false_positives": fps, "seconds": seconds}
        if case.lesion is not None and found:
            mask = det.lesion_mask_from_detections(case.ct, found, case.labels).array > 0
            vert = case.lesion.healthy_labels.array == case.lesion.level
            target = (case.lesion.lesion_mask.array > 0) & vert
            row["mask_dice_in_vertebra"] = dice(mask & vert, target)
        rows.append(row)
    return {"options": options, **summarise_volume_rows(rows)}


def volume_hits(found: list[det.Lesion3D], truth: np.ndarray | None) -> tuple[int, int]:
    """(1 if the true lesion is found else 0, false positives): a hit is a 3D box IoU >= 0.1."""
    hits, fps = 0, 0
    for les in found:
        z1, z2 = les.z_range
        b = np.array([[min(v[0] for v in les.boxes.values()), min(v[1] for v in les.boxes.values()), z1,
                       max(v[2] for v in les.boxes.values()), max(v[3] for v in les.boxes.values()), z2]])
        if truth is not None and box_iou(b, truth)[0, 0] >= 0.1:
            hits += 1
        else:
            fps += 1
    return min(hits, 1), fps + max(0, hits - 1)


def summarise_volume_rows(rows: list[dict]) -> dict:
    """Sensitivity, false positives per lesioned / healthy volume and mean mask Dice of per-case rows."""
    lesioned = [r for r in rows if r["lesion"] != "none"]
    healthy = [r for r in rows if r["lesion"] == "none"]
    dices = [r["mask_dice_in_vertebra"] for r in rows if "mask_dice_in_vertebra" in r]
    return {
        "cases": rows,
        "sensitivity": float(np.mean([r["true_positive"] for r in lesioned])) if lesioned else float("nan"),
        "fp_per_lesioned_volume": _mean([r["false_positives"] for r in lesioned]),
        "fp_per_healthy_volume": _mean([r["false_positives"] for r in healthy]),
        "healthy_volumes": len(healthy),
        "mean_mask_dice_in_vertebra": float(np.mean(dices)) if dices else float("nan"),
    }


def format_evaluation(result: dict) -> str:
    """A side-by-side text table of :func:`evaluate_detection` with the paper's row."""
    cols = ["ap50", "ap50_95", "froc@0.5", "froc@1", "froc@2", "froc@4", "images_per_s"]
    head = f"{'detector':<34}" + "".join(f"{c:>13}" for c in cols)
    lines = [f"held-out slices: {result['slices']} ({result['positive_slices']} with a lesion) from "
             f"{len(result['test_cases'])} test cases", head]
    for name, row in result["detectors"].items():
        lines.append(f"{name:<34}" + "".join(f"{row.get(c, float('nan')):>13.3f}" for c in cols))
    paper = det.PAPER_RESULT
    lines.append(f"{'paper (GPU, DeepLesion bone)':<34}{paper['ap50']:>13.4f}" + f"{'-':>13}" * 5
                 + f"{paper['images_per_s']:>13.2f}")
    lines.append("")
    lines.append("AP@0.5 per group (" + ", ".join(result["detectors"]) + "):")
    names = list(result["detectors"])
    group_names = sorted({g for row in result["detectors"].values() for g in row["groups"]})
    for g in group_names:
        values = []
        for n in names:
            grp = result["detectors"][n]["groups"].get(g)
            values.append(f"{grp['ap50']:.3f} ({grp['lesion_boxes']} boxes)" if grp else "-")
        lines.append(f"  {g:<22}" + "   ".join(values))
    vol = result.get("volume_level")
    if vol:
        lines.append("")
        lines.append(f"volume level ({names[0]}): sensitivity {vol['sensitivity']:.3f}, "
                     f"FP per lesioned volume {vol['fp_per_lesioned_volume']:.2f}, "
                     f"FP per healthy volume {vol['fp_per_healthy_volume']:.2f} "
                     f"({vol['healthy_volumes']} volumes), "
                     f"lesion-mask Dice in the vertebra {vol['mean_mask_dice_in_vertebra']:.3f}")
    return "\n".join(lines)


# --- figures ----------------------------------------------------------------------------------------
def plot_froc(result: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """FROC curves of the detectors of one evaluation."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (fps, sens) in curves.items():
        row = result["detectors"][name]
        ax.plot(fps, sens, label=f"{name} (AP@0.5 {row['ap50']:.3f})")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(0, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity (IoU >= 0.5)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"held-out slices: {result['slices']}")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_examples(images: np.ndarray, truth: list, predictions: dict[str, tuple[list, list]],
                  meta: list[dict], path: Path, *, n: int = 6, seed: int = 0, threshold: float = 0.5) -> Path:
    """Held-out slices with the true box (green) and each detector's boxes above ``threshold``."""
    plt = pyplot()

    rng = np.random.default_rng(seed)
    pos = [i for i, t in enumerate(truth) if len(t)]
    neg = [i for i, t in enumerate(truth) if not len(t)]
    by_type: dict[str, list[int]] = {}
    for i in pos:
        by_type.setdefault(meta[i]["case_lesion_type"] + meta[i]["source"], []).append(i)
    chosen = [int(rng.choice(v)) for _, v in sorted(by_type.items())][: n - 1]
    chosen += [int(rng.choice(neg))] if neg else []
    colours = ["red", "deepskyblue", "orange"]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3 * len(chosen), 3.3), squeeze=False)
    for ax, i in zip(axes[0], chosen):
        ax.imshow(images[i, 1], cmap="gray", vmin=0, vmax=1)
        for b in truth[i]:
            ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                       ec="lime", lw=1.5))
        for colour, (_name, (boxes, scores)) in zip(colours, predictions.items()):
            for b, s in zip(boxes[i], scores[i]):
                if s >= threshold:
                    ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                               ec=colour, lw=1, ls="--"))
                    ax.text(b[0], b[1] - 2, f"{s:.2f}", color=colour, fontsize=7)
        m = meta[i]
        kind = m["case_lesion_type"] if len(truth[i]) else "no lesion"
        ax.set_title(f"{m['source']} {kind}" + (" destr." if m.get("destructive") and len(truth[i]) else ""),
                     fontsize=9)
        ax.axis("off")
    fig.suptitle("green: truth; " + ", ".join(f"{c}: {n}" for c, n in zip(colours, predictions)), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
