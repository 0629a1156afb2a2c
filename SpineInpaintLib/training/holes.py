"""Training examples for inpainting: random holes and crops of simulated lesions over healthy truth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.labels import VERTEBRA_IDS, spine_mask
from SpineInpaintLib.data import lesions, lesions_focal
from SpineInpaintLib.inpainting.crops import (
    CROP_SIZE,
)
from SpineInpaintLib.inpainting.methods import (
    _crop,
    _grey,
    _neighbour_prior,
    level_geometry,
)

__all__ = ["random_hole", "case_training_arrays"]


# --------------------------------------------------------------------------------------------
# Training arrays (used by gan.build_crop_cache)
# --------------------------------------------------------------------------------------------
def random_hole(rng: np.random.Generator, body: np.ndarray) -> np.ndarray:
    """A lesion-like hole (float32 0/1, 64x64) for training: a perturbed ellipse on or near the body outline,
    or one of the paper's 16x16 squares (20 %) inside the vertebra's bounding box."""
    size = body.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rows, cols = np.nonzero(body)
    if rows.size == 0:
        rows, cols = np.array([size // 2]), np.array([size // 2])
    if rng.random() < 0.2:
        k = int(rng.integers(0, rows.size))
        r0 = int(np.clip(rows[k] - 8, 0, size - 16))
        c0 = int(np.clip(cols[k] - 8, 0, size - 16))
        hole = np.zeros((size, size), np.float32)
        hole[r0:r0 + 16, c0:c0 + 16] = 1.0
        return hole
    edge = body & ~ndimage.binary_erosion(body)
    er, ec = np.nonzero(edge)
    if er.size and rng.random() < 0.7:  # destructive-like: centred on the outline, mostly anterior
        anterior = er <= np.percentile(er, 50)
        pick = np.nonzero(anterior)[0] if rng.random() < 0.7 and anterior.any() else np.arange(er.size)
        k = int(rng.choice(pick))
        cy, cx = er[k] + rng.normal(0, 2), ec[k] + rng.normal(0, 2)
    else:  # inside the bone
        k = int(rng.integers(0, rows.size))
        cy, cx = rows[k], cols[k]
    a, b = rng.uniform(4, 15, 2)
    t = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    r = (u / a) ** 2 + (v / b) ** 2
    noise = ndimage.zoom(rng.normal(0, 0.25, (8, 8)), size / 8, order=1)
    hole = (r + noise < 1.0).astype(np.float32)
    if hole.sum() < 4:
        hole[int(np.clip(cy, 0, size - 1)), int(np.clip(cx, 0, size - 1))] = 1.0
    return hole


def _focal_hole(rng: np.random.Generator, case, level: int):
    """A focal lesion at ``level``: any kind and location, 15 % with a collapse (not at C1)."""
    collapse = float(rng.uniform(0.1, 0.3)) if rng.random() < 0.15 and level != 50 else 0.0
    return lesions_focal.simulate_focal_lesions(
        case.healthy_ct, case.labels, int(rng.integers(0, 2**31 - 1)), levels=[level],
        kinds=[str(rng.choice(lesions_focal.FOCAL_KINDS))], locations=[str(rng.choice(lesions_focal.LOCATIONS))],
        sizes=[float(rng.uniform(0.35, 0.7))], collapse=collapse)


def case_training_arrays(case, *, lesions_per_level: int = 1, seed: int = 0, exclude_levels: Sequence[int] = (),
                         max_lesion_levels: int | None = None, simulator: str = "classic") -> dict[str, np.ndarray]:
    """Crops, priors, neighbour indices and simulated-lesion holes of one healthy case (see ``gan.build_crop_cache``).

    The crops are those of :func:`SpineInpaintLib.datasets.vertebra_crops` (same slices, centre and
    order); the holes are the masks of lesions simulated on the healthy case (70 % destructive,
    15 % with a collapse), cropped like the slices, by the classic simulator, the focal one or, with
    ``simulator='both'``, either (half and half per lesion).
    """
    case = case.oriented("LPS")
    labels = case.labels.array
    spine = spine_mask(labels).astype(np.float32)
    hu = case.healthy_ct.array.astype(np.float32)
    spacing_yx = case.ct.spacing_zyx[1:]
    present = [v for v in np.unique(labels).tolist() if v in VERTEBRA_IDS]
    levels = {v: level_geometry(labels, v) for v in present}
    rng = np.random.default_rng([seed, case.seed, 4242])
    lesion_levels = [v for v in sorted(present) if v != 25 and v not in exclude_levels]
    if max_lesion_levels is not None and len(lesion_levels) > max_lesion_levels:
        lesion_levels = sorted(rng.choice(lesion_levels, max_lesion_levels, replace=False).tolist())
    out: dict[str, list] = {k: [] for k in ("binary", "grey", "prior_binary", "prior_grey", "level", "z", "prev",
                                            "next", "holes", "hole_crop", "hole_prev", "hole_next",
                                            "hole_destructive")}
    for level in sorted(present):
        if level in exclude_levels:
            continue
        geo = levels[level]
        first = len(out["binary"])
        index = {int(z): first + k for k, z in enumerate(geo.slices)}
        for z in geo.slices:
            z = int(z)
            out["binary"].append((_crop(spine[z], geo, spacing_yx) >= 0.5).astype(np.uint8))
            out["grey"].append(_grey(_crop(hu[z], geo, spacing_yx, cval=-1000.0)).astype(np.float16))
            pb, pg = _neighbour_prior(levels, level, z, spine, hu, spacing_yx)
            out["prior_binary"].append(pb.astype(np.float16))
            out["prior_grey"].append(pg.astype(np.float16))
            out["level"].append(level)
            out["z"].append(z)
            out["prev"].append(index.get(z - 1, index[z]))
            out["next"].append(index.get(z + 1, index[z]))
        if level not in lesion_levels:
            continue
        for _k in range(lesions_per_level):
            try:
                focal = simulator == "focal" or (simulator == "both" and rng.random() < 0.5)
                lesion = _focal_hole(rng, case, level) if focal else lesions.simulate_lesion(
                    case.healthy_ct, case.labels, level, str(rng.choice(["lytic", "sclerotic", "mixed"])),
                    bool(rng.random() < 0.7), size=float(rng.uniform(0.35, 0.8)),
                    collapse=float(rng.uniform(0.1, 0.3)) if rng.random() < 0.15 else 0.0,
                    seed=int(rng.integers(0, 2**31 - 1)))
            except SpineInpaintError:
                continue
            mask = lesion.mask.array > 0
            entries = {}
            for z in geo.slices:
                z = int(z)
                if not mask[z].any():
                    continue
                hole = _crop(mask[z].astype(np.float32), geo, spacing_yx) > 0.01
                if not hole.any() or hole.all():
                    continue
                entries[z] = len(out["holes"])
                out["holes"].append(hole.astype(np.uint8))
                out["hole_crop"].append(index[z])
                out["hole_destructive"].append(bool(lesion.destructive))
            for z, _h in entries.items():
                out["hole_prev"].append(entries.get(z - 1, -1))
                out["hole_next"].append(entries.get(z + 1, -1))
    empty = np.zeros((0, CROP_SIZE, CROP_SIZE), np.float32)
    arrays = {k: (np.stack(v) if v else empty) if k in ("binary", "grey", "prior_binary", "prior_grey", "holes")
              else np.asarray(v, dtype=np.int64 if k != "hole_destructive" else bool) for k, v in out.items()}
    arrays["case_id"] = np.array(case.case_id)
    arrays["spacing_zyx"] = np.asarray(case.ct.spacing_zyx)
    return arrays
