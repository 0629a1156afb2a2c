"""Judge a restoration against the healthy truth: the restored vertebra's Dice, HD95, volume and HU error."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.labels import VERTEBRA_NAMES
from SpineInpaintLib.core.weights import weights_dir
from SpineInpaintLib.data import lesions, lesions_focal
from SpineInpaintLib.data.real import load_real_case, trained_scans
from SpineInpaintLib.evaluation.metrics import overlap as metrics
from SpineInpaintLib.pipeline import DEFAULT_METHOD, RestoreResult, restore

__all__ = ["truth_metrics", "evaluate_restore", "folder_training_scans", "shipped_training_scans"]


def truth_metrics(result: RestoreResult, truth: dict) -> dict:
    """Dice, HD95, volume error of the restored vertebra, and HU errors inside the lesion, against the truth.

    Parameters
    ----------
    result
        What :func:`SpineInpaintLib.pipeline.restore` returned.
    truth
        The healthy truth ``{'labels': Volume, 'ct': Volume, 'level': int}`` (``ct`` optional).
    """
    restored_labels, restored_ct, mask = result.restored_labels, result.restored_ct, result.lesion_mask
    level = int(truth["level"])
    spacing = restored_labels.spacing_zyx
    pred = restored_labels.array == level
    gold = truth["labels"].array == level
    volume = metrics.volume_error(pred, gold, spacing)
    out = {
        "level": VERTEBRA_NAMES[level],
        "dice": float(metrics.dice(pred, gold)),
        "hd95_mm": float(metrics.hd95(pred, gold, spacing)),
        "volume_ml": volume.pred_ml,
        "truth_volume_ml": volume.truth_ml,
        "volume_error_relative": volume.relative,
    }
    if "ct" in truth and mask.array.any():
        inside = mask.array > 0
        diff = restored_ct.array[inside].astype(np.float64) - truth["ct"].array[inside].astype(np.float64)
        out["hu_mae_in_lesion"] = float(np.abs(diff).mean())
    return out


def folder_training_scans(folder: str | Path) -> tuple[str, ...]:
    """Every real scan the models whose JSON sidecars are in ``folder`` were trained on."""
    scans: set[str] = set()
    for path in sorted(Path(folder).glob("*.json")):
        meta = json.loads(path.read_text())
        if "training" in meta:
            scans.update(trained_scans(meta))
    return tuple(sorted(scans))


def shipped_training_scans(stages: Sequence[str] = ("segmentation", "detection", "gan")) -> tuple[str, ...]:
    """Every real scan the shipped models of ``stages`` were trained on (read from their JSON sidecars)."""
    return tuple(sorted({scan for stage in stages for scan in folder_training_scans(weights_dir(stage))}))


def _destructive_lesion(simulator: str, ct, labels, level: str, seed: int):
    """A destructive lesion of the body at ``level``: the classic lytic one, or the focal soft-tissue mass."""
    if simulator == "classic":
        return lesions.simulate_lesion(ct, labels, level, "lytic", True, size=0.7, seed=seed)
    if simulator == "focal":
        return lesions_focal.simulate_focal_lesions(ct, labels, seed, levels=[level], kinds=["soft_tissue_mass"],
                                                    locations=["body"], sizes=[0.7])
    raise SpineInpaintError(f"unknown lesion simulator '{simulator}' (use classic, focal)")


def evaluate_restore(case: str = "s0009", level: str = "L3", seeds=(1, 2, 3),
                     methods=(DEFAULT_METHOD, "biharmonic"), simulators=("classic", "focal")) -> list[dict]:
    """Restore a real scan with simulated destructive lesions; score against the healthy label.

    Each seed gives one lesion per simulator (the classic lytic blob, the focal soft-tissue mass);
    the rows say which, so that the two looks are reported apart.

    The lesion mask is given (this judges segmentation + inpainting + reconstruction, not
    detection). The bar: Dice >= 0.90, HD95 <= 6 mm, volume within 5 %. The scan's labels are
    TotalSegmentator predictions, used as the healthy truth; choose a scan the models were not
    trained on (:func:`shipped_training_scans`).
    """
    ct, labels = load_real_case(case)
    rows = []
    for seed, simulator in itertools.product(seeds, simulators):
        sim = _destructive_lesion(simulator, ct, labels, level, int(seed))
        truth = {"labels": labels, "ct": ct, "level": sim.level}
        for method in methods:
            start = time.perf_counter()
            result = restore(sim.ct, sim.mask, method=method, seed=int(seed))
            m = result.report["truth_metrics"] = truth_metrics(result, truth)
            rows.append({"case": case, "level": m["level"], "seed": int(seed), "simulator": simulator,
                         "method": method,
                         "lesion_ml": result.report["lesion_ml"], "dice": m["dice"], "hd95_mm": m["hd95_mm"],
                         "volume_error_pct": 100.0 * m["volume_error_relative"],
                         "hu_mae_in_lesion": m.get("hu_mae_in_lesion"), "seconds": time.perf_counter() - start})
    return rows
