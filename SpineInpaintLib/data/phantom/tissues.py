"""Tissue masks and HU statistics of a phantom or a real scan, and the comparison between the two."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume, resample_to_spacing
from SpineInpaintLib.core.labels import vertebra_mask
from SpineInpaintLib.data.phantom.config import _MUSCLE_IDS, Phantom

__all__ = [
    "body_outline", "disc_mask", "tissue_masks", "tissue_hu_statistics", "compare_with_real", "FAT_HU",
    "DISC_MAX_GAP_MM",
]

# --------------------------------------------------------------------------------------------
# Tissue HU statistics (the same definitions on a real scan and on a phantom)
# --------------------------------------------------------------------------------------------
#: Fat window (HU) inside the body outline.
FAT_HU = (-190.0, -30.0)

#: Longest gap (mm) between two adjacent vertebra labels still counted as disc.
DISC_MAX_GAP_MM = 20.0


def _si_axis(volume: Volume) -> tuple[int, bool]:
    """Array axis (0 z, 1 y, 2 x) closest to the patient's S-I axis, and whether its index grows
    toward superior."""
    # direction columns are the LPS directions of the i, j, k (x, y, z) index axes
    s_component = volume.direction[2, :]
    ijk = int(np.argmax(np.abs(s_component)))
    return 2 - ijk, bool(s_component[ijk] > 0)


def body_outline(ct: Volume, threshold: float = -500.0) -> np.ndarray:
    """The patient's body: voxels above ``threshold`` HU in the largest connected component, with
    the holes (lungs, bowel gas) filled slice by slice across the S-I axis."""
    mask = ct.array > threshold
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    axis, _ = _si_axis(ct)
    body = np.moveaxis(body, axis, 0)
    for i in range(body.shape[0]):
        body[i] = ndimage.binary_fill_holes(body[i])
    return np.moveaxis(body, 0, axis)


def disc_mask(labels: Volume, max_gap_mm: float = DISC_MAX_GAP_MM) -> np.ndarray:
    """Intervertebral disc voxels defined from vertebra labels alone.

    For each pair of adjacent vertebrae (TotalSegmentator ids ``i`` and ``i + 1``, the latter
    cranial), walk along the array axis closest to the S-I axis: in each line that crosses both,
    the voxels strictly between the top of the lower vertebra and the bottom of the upper one are
    disc, when that gap is at most ``max_gap_mm`` and the voxel lies anterior to both vertebrae's
    centroids (which keeps the vertebral-body footprint and drops the gaps between laminae and
    spinous processes).
    """
    arr = labels.array
    axis, up = _si_axis(labels)
    step = labels.spacing_zyx[axis]
    out = np.zeros(arr.shape, dtype=bool)
    # LPS P coordinate of every voxel, as a broadcastable sum over the three index axes
    m = labels.direction @ np.diag(labels.spacing)
    p_parts = [(np.arange(n) * m[1, 2 - ax]).reshape([-1 if a == ax else 1 for a in range(3)])
               for ax, n in enumerate(arr.shape)]
    present = set(int(v) for v in np.unique(arr))
    for lo in range(25, 50):
        hi = lo + 1
        if lo not in present or hi not in present:
            continue
        m_lo, m_hi = arr == lo, arr == hi
        p_lo = labels.index_to_physical(np.argwhere(m_lo).mean(0))[0, 1]
        p_hi = labels.index_to_physical(np.argwhere(m_hi).mean(0))[0, 1]
        p_cut = min(p_lo, p_hi) - labels.origin[1]
        a_lo, a_hi = np.moveaxis(m_lo, axis, 0), np.moveaxis(m_hi, axis, 0)
        if not up:
            a_lo, a_hi = a_lo[::-1], a_hi[::-1]
        n = a_lo.shape[0]
        idx = np.arange(n).reshape(-1, 1, 1)
        top_lo = np.where(a_lo, idx, -1).max(0)
        bot_hi = np.where(a_hi, idx, n).min(0)
        gap = bot_hi - top_lo - 1
        ok = (top_lo >= 0) & (bot_hi < n) & (gap >= 1) & (gap * step <= max_gap_mm)
        sel = ok[None] & (idx > top_lo[None]) & (idx < bot_hi[None])
        if not up:
            sel = sel[::-1]
        sel = np.moveaxis(sel, 0, axis)
        p_rel = p_parts[0] + p_parts[1] + p_parts[2]
        out |= sel & (p_rel < p_cut)
    return out


def tissue_masks(ct: Volume, labels: Volume) -> dict[str, np.ndarray]:
    """Masks of the four reference tissues, defined the same way on any labelled CT.

    - ``bone``: the vertebra labels (TotalSegmentator ids 25-50, sacrum included);
    - ``disc``: :func:`disc_mask`;
    - ``muscle``: autochthon (86, 87) and iliopsoas (88, 89);
    - ``fat``: -190 to -30 HU inside :func:`body_outline`.
    """
    if not ct.same_grid(labels):
        raise SpineInpaintError("the CT and the label map must share one grid")
    lab = labels.array
    body = body_outline(ct)
    return {
        "bone": vertebra_mask(lab),
        "disc": disc_mask(labels),
        "muscle": np.isin(lab, _MUSCLE_IDS),
        "fat": body & (ct.array >= FAT_HU[0]) & (ct.array <= FAT_HU[1]),
    }


def tissue_hu_statistics(ct: Volume, labels: Volume) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and voxel count of HU in bone, disc, muscle and fat.

    See :func:`tissue_masks` for the definitions. Tissues with no voxel get NaN statistics.
    """
    values = ct.array
    out = {}
    for name, mask in tissue_masks(ct, labels).items():
        v = values[mask].astype(np.float64)
        out[name] = {"mean": float(v.mean()) if v.size else float("nan"),
                     "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}
    return out


def compare_with_real(phantom: Phantom, real_ct: Volume, real_labels: Volume) -> dict[str, dict[str, float]]:
    """HU statistics of a real scan and of a phantom resampled to the real scan's spacing.

    The phantom's CT is resampled linearly and its labels by nearest neighbour (``io.resample_to_spacing``),
    so both are measured at the same resolution with :func:`tissue_hu_statistics`.

    Returns
    -------
    dict
        ``{tissue: {"real_mean", "real_std", "phantom_mean", "phantom_std", "difference",
        "tolerance"}}`` where the tolerance is max(25 %% of the real mean, 25 HU).
    """
    ct_r = resample_to_spacing(phantom.ct, real_ct.spacing, default=-1000.0)
    lab_r = resample_to_spacing(phantom.labels, real_ct.spacing, labels=True)
    ct_r = ct_r.with_array(np.rint(ct_r.array).astype(np.int16))
    real = tissue_hu_statistics(real_ct, real_labels)
    phan = tissue_hu_statistics(ct_r, lab_r)
    out = {}
    for name in real:
        rm, pm = real[name]["mean"], phan[name]["mean"]
        out[name] = {"real_mean": rm, "real_std": real[name]["std"], "real_n": real[name]["n"],
                     "phantom_mean": pm, "phantom_std": phan[name]["std"], "phantom_n": phan[name]["n"],
                     "difference": pm - rm, "tolerance": max(0.25 * abs(rm), 25.0)}
    return out
