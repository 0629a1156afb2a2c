"""Appearance models of the focal lesion simulator (:mod:`SpineInpaintLib.data.lesions_focal`).

Each painter works on a crop of the scan around one lesion, given the crop's HU, its vertebra label and
the local frame's coordinates (mm; lateral ``u``, anterior ``v``, superior ``w``) of its voxels, so that
shapes are in millimetres whatever the spacing and orientation:

- :func:`paint_lytic_remnant`: an irregular geographic lytic lesion, tumour tissue (10-70 HU) in which a
  thresholded fraction (10-35 %) of the original cancellous texture survives as thinned struts (they keep
  45-80 % of their contrast over the tumour), sometimes (40 %) with a 1-2 voxel sclerotic rim
  (+200 to +500 HU over the original bone) around it;
- :func:`paint_soft_tissue_mass`: an ellipsoidal soft-tissue mass (30-60 HU) growing out of the bone into
  the paravertebral tissue a caller allows, heterogeneous (two smooth fields), often (60 %) with a
  necrotic low-density centre (0-20 HU), and an enhancing rim (+10 to +30 HU);
- :func:`paint_blastic_nodular`: 3-7 coalescing dense nodules (600-1400 HU) with fuzzy (logistic)
  margins, inside the bone, never darker than the bone they replace.

A painter returns the new HU (only read on the lesion's voxels), the tumour, the rim (sclerotic reaction,
outside the tumour) and a JSON-ready record of its draws.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage, special

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.data.lesion_geometry import _boundary, _component_at, _component_touching
from SpineInpaintLib.data.lesions import _EDGE_WEIGHT, _smooth_field

__all__ = ["Site", "Painted", "paint_lytic_remnant", "place_mass", "paint_soft_tissue_mass", "paint_blastic_nodular"]

HU_REMNANT_TUMOUR = (10.0, 70.0)
#: Fraction of the lytic lesion's voxels kept as trabecular remnants.
REMNANT_FRACTION = (0.10, 0.35)
#: Share of a strut's contrast over the tumour that a thinned strut keeps (partial volume of a thinner strut).
_REMNANT_THINNING = (0.45, 0.80)
#: A remnant is drawn only where the original bone is this much denser than the tumour (else it is invisible).
_REMNANT_MIN_CONTRAST_HU = 50.0
RIM_HU = (200.0, 500.0)
_RIM_PROBABILITY = 0.4
HU_MASS = (30.0, 60.0)
HU_NECROSIS = (0.0, 20.0)
_MASS_ENHANCEMENT_HU = (10.0, 30.0)
_NECROSIS_PROBABILITY = 0.6
HU_NODULE = (600.0, 1400.0)
_NODULE_COUNT = (3, 7)
#: Width (mm) of a nodule's logistic margin.
_NODULE_FUZZ_MM = (0.6, 1.4)


@dataclasses.dataclass
class Site:
    """A crop of the scan around one lesion.

    Attributes
    ----------
    hu
        HU of the crop (float; never written to).
    vert
        The lesion's vertebra label in the crop.
    u, v, w
        Local-frame coordinates (mm) of the crop's voxels.
    spacing
        Voxel size (mm), (z, y, x).
    noise_std
        The scan's noise (HU) the tumour copies.
    allowed
        Voxels a soft-tissue mass may replace outside the bone (None for the intraosseous kinds).
    """

    hu: np.ndarray
    vert: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    spacing: tuple[float, float, float]
    noise_std: float
    allowed: np.ndarray | None = None


@dataclasses.dataclass
class Painted:
    """A painted lesion: new HU (read on ``tumour | rim``), the tumour, the rim and the draws."""

    values: np.ndarray
    tumour: np.ndarray
    rim: np.ndarray
    params: dict


def _q(site: Site, centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of every voxel, axes along the frame."""
    return np.sqrt(((site.u - centre[0]) / semi[0]) ** 2 + ((site.v - centre[1]) / semi[1]) ** 2
                   + ((site.w - centre[2]) / semi[2]) ** 2)


def _distance(site: Site, point: np.ndarray) -> np.ndarray:
    """Distance (mm) of every voxel from ``point`` (local frame)."""
    return np.sqrt((site.u - point[0]) ** 2 + (site.v - point[1]) ** 2 + (site.w - point[2]) ** 2)


def _noise(rng: np.random.Generator, site: Site) -> np.ndarray:
    return rng.standard_normal(site.hu.shape).astype(np.float32) * np.float32(site.noise_std)


def _soft_edge(tumour: np.ndarray, tumour_hu: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Blend the tumour's outermost voxel layer with the original (a one-voxel soft edge inside the tumour)."""
    weight = np.where(_boundary(tumour), np.float32(_EDGE_WEIGHT), np.float32(1.0))
    return weight * tumour_hu + (1.0 - weight) * hu


def _check_size(tumour: np.ndarray, what: str) -> None:
    if int(tumour.sum()) < 8:
        raise SpineInpaintError(f"the {what} lesion holds {int(tumour.sum())} voxels only (too small for this "
                                "scan's voxels: use a larger size)")


# --- lytic with trabecular remnants ----------------------------------------------------------------
def paint_lytic_remnant(rng: np.random.Generator, site: Site, centre: np.ndarray, semi: np.ndarray) -> Painted:
    """A geographic lytic lesion with surviving trabecular struts and sometimes a sclerotic rim.

    Parameters
    ----------
    rng
        The simulation's generator.
    site
        The crop around the lesion.
    centre, semi
        Centre and semi-axes (mm, local frame) of the ellipsoid the margin is perturbed from.

    Returns
    -------
    Painted
        Inside the bone only; ``rim`` is the sclerotic rim (empty without one).
    """
    spacing = site.spacing
    # Geographic margin: a coarse lobulation plus a fine ragged edge.
    coarse = _smooth_field(rng, site.hu.shape, 0.35 * float(np.mean(semi)), spacing)
    fine = _smooth_field(rng, site.hu.shape, 0.8 * min(spacing), spacing)
    q = _q(site, centre, semi)
    tumour = _component_at((q < 1.0 + 0.25 * coarse + 0.12 * fine) & site.vert, q)
    _check_size(tumour, "lytic_remnant")
    tumour_hu = float(rng.uniform(*HU_REMNANT_TUMOUR))
    texture = _smooth_field(rng, site.hu.shape, 1.5, spacing)
    tissue = tumour_hu + 10.0 * texture + _noise(rng, site)

    # Remnants: ridges of the original texture (its high-pass), patchy, thresholded to the drawn fraction.
    keep = float(rng.uniform(*REMNANT_FRACTION))
    thinning = float(rng.uniform(*_REMNANT_THINNING))
    detail = site.hu - ndimage.gaussian_filter(site.hu, [1.5 / s for s in spacing], mode="nearest")
    scale = float(detail[tumour].std()) or 1.0
    score = detail / scale + 0.7 * _smooth_field(rng, site.hu.shape, 2.0, spacing)
    # Struts are cancellous bone: the label's outer layer (the cortex, whose high-pass is always high) is left out.
    cancellous = ndimage.binary_erosion(site.vert, border_value=0)
    candidates = tumour & cancellous & (site.hu > tumour_hu + _REMNANT_MIN_CONTRAST_HU)
    remnant = np.zeros_like(tumour)
    n_keep = int(round(keep * int(tumour.sum())))
    if candidates.any() and n_keep > 0:
        if int(candidates.sum()) <= n_keep:
            remnant = candidates
        else:
            cut = np.sort(score[candidates])[-n_keep]
            remnant = candidates & (score >= cut)
    strut = tissue + thinning * (site.hu - tissue)
    values = np.where(remnant, strut, tissue).astype(np.float32)
    values = _soft_edge(tumour, values, site.hu)

    rim = np.zeros_like(tumour)
    params: dict = {"tumour_hu": round(tumour_hu, 2), "remnant_fraction_drawn": round(keep, 4),
                    "remnant_fraction": round(float(remnant.sum()) / float(tumour.sum()), 4),
                    "remnant_thinning": round(thinning, 3), "rim": False}
    if rng.random() < _RIM_PROBABILITY:
        rim_voxels = int(rng.integers(1, 3))
        rim = ndimage.binary_dilation(tumour, iterations=rim_voxels) & site.vert & ~tumour
        added = float(rng.uniform(*RIM_HU))
        # Never below the range's floor: the rim is always denser than the bone it reinforces.
        boost = np.maximum(RIM_HU[0], added + 30.0 * _smooth_field(rng, site.hu.shape, 1.5, spacing))
        values = np.where(rim, site.hu + boost, values).astype(np.float32)
        params.update(rim=bool(rim.any()), rim_voxels=rim_voxels, rim_added_hu=round(added, 2))
    return Painted(values, tumour, rim, params)


# --- soft-tissue mass --------------------------------------------------------------------------------
def _exit_distance(bone: np.ndarray, start: np.ndarray, direction: np.ndarray, near_mm: float) -> float:
    """Distance (mm) from ``start`` along ``direction`` to the last of the ``bone`` points (3, N) near the ray."""
    offset = bone - start[:, None]
    t = direction @ offset
    off = (offset ** 2).sum(axis=0) - t ** 2
    near = (t > 0) & (off < near_mm ** 2)
    return float(t[near].max()) if near.any() else 0.0


def mass_directions(theta: float, tries: int = 8) -> list[float]:
    """The drawn direction first, then alternately either side of it in 30-degree steps."""
    out = [theta]
    for k in range(1, tries):
        out.append(theta + math.radians(30.0) * ((k + 1) // 2) * (1 if k % 2 else -1))
    return [math.atan2(math.sin(a), math.cos(a)) for a in out]


def place_mass(site: Site, start: np.ndarray, semi: np.ndarray, theta: float, outward: float) -> tuple:
    """Where a mass growing from ``start`` sits: the first direction (from ``theta``) that finds soft tissue.

    Parameters
    ----------
    site
        A crop holding the vertebra and the tissue around it; ``site.allowed`` is the tissue a mass may
        replace outside the bone.
    start
        Where the mass grows from (mm, local frame; inside the bone).
    semi
        Semi-axes (mm, local frame) of the mass's ellipsoid.
    theta
        Direction of growth in the axial plane (radians from anterior towards lateral +u); the next
        directions (:func:`mass_directions`) are tried when this one finds no tissue.
    outward
        How far beyond the bone's outline the ellipsoid's centre sits, as a fraction of its reach.

    Returns
    -------
    (centre, angle)
        The ellipsoid's centre (mm, local frame) and the direction taken (radians).

    Raises
    ------
    SpineInpaintError
        No direction gives an extra-osseous part.
    """
    allowed = site.allowed if site.allowed is not None else np.zeros_like(site.vert)
    bone = np.stack([site.u[site.vert], site.v[site.vert], site.w[site.vert]]).astype(np.float64)
    for angle in mass_directions(theta):
        direction = np.array([math.sin(angle), math.cos(angle), 0.0])
        reach = 1.0 / math.sqrt((direction[0] / semi[0]) ** 2 + (direction[1] / semi[1]) ** 2)
        exit_mm = _exit_distance(bone, start, direction, max(site.spacing))
        centre = start + direction * (exit_mm + outward * reach)
        q = _q(site, centre, semi)
        inside = _component_at((q < 1.0) & site.vert, q)
        outside = _component_touching((q < 1.0) & allowed & ~site.vert, inside)
        if inside.any() and int(outside.sum()) >= max(8, int(0.2 * inside.sum())):
            return centre, angle
    raise SpineInpaintError("cannot place a soft-tissue mass: no paravertebral soft tissue next to the bone")


def paint_soft_tissue_mass(rng: np.random.Generator, site: Site, centre: np.ndarray, semi: np.ndarray) -> Painted:
    """A heterogeneous soft-tissue mass: the ellipsoid at ``centre`` in the bone and the allowed tissue.

    Parameters
    ----------
    rng
        The simulation's generator.
    site
        A crop around the mass (:func:`place_mass` found its centre); ``site.allowed`` as there.
    centre, semi
        Centre and semi-axes (mm, local frame) of the mass's ellipsoid.

    Returns
    -------
    Painted
        The mass (bone replaced and the extra-osseous part connected to it) and no rim.

    Raises
    ------
    SpineInpaintError
        The mass is too small.
    """
    spacing = site.spacing
    allowed = site.allowed if site.allowed is not None else np.zeros_like(site.vert)
    q = _q(site, centre, semi)
    blob = q < 1.0 + 0.1 * _smooth_field(rng, site.hu.shape, 0.5 * float(np.mean(semi)), spacing)
    inside = _component_at(blob & site.vert, q)
    tumour = inside | _component_touching(blob & allowed & ~site.vert, inside if inside.any() else site.vert)
    _check_size(tumour, "soft_tissue_mass")
    base_hu = float(rng.uniform(*HU_MASS))
    values = (base_hu + 8.0 * _smooth_field(rng, site.hu.shape, 1.5, spacing)
              + 6.0 * _smooth_field(rng, site.hu.shape, 4.0, spacing))
    params: dict = {"mass_hu": round(base_hu, 2), "mass_centre_frame_mm": [round(float(x), 3) for x in centre],
                    "necrosis": False}
    if rng.random() < _NECROSIS_PROBABILITY:
        radius = float(rng.uniform(0.3, 0.55))
        necrosis_hu = float(rng.uniform(*HU_NECROSIS))
        edge = radius + 0.08 * _smooth_field(rng, site.hu.shape, 2.0, spacing) - q
        share = special.expit(edge / 0.05)  # a necrotic core with a sharp-ish, irregular border
        values = share * necrosis_hu + (1.0 - share) * values
        params.update(necrosis=True, necrosis_radius=round(radius, 3), necrosis_hu=round(necrosis_hu, 2))
    enhancement = float(rng.uniform(*_MASS_ENHANCEMENT_HU))
    values = values + enhancement * special.expit((q - 0.8) / 0.06) + _noise(rng, site)
    params.update(rim_enhancement_hu=round(enhancement, 2))
    values = _soft_edge(tumour, values.astype(np.float32), site.hu)
    return Painted(values, tumour, np.zeros_like(tumour), params)


# --- blastic nodules -----------------------------------------------------------------------------------
def paint_blastic_nodular(rng: np.random.Generator, site: Site, centre: np.ndarray, semi: np.ndarray) -> Painted:
    """Several coalescing sclerotic nodules with fuzzy margins inside the bone.

    Parameters
    ----------
    rng
        The simulation's generator.
    site
        The crop around the lesion.
    centre, semi
        Centre and semi-axes (mm, local frame) of the region the nodules' centres are drawn in.

    Returns
    -------
    Painted
        Inside the bone only, no rim.
    """
    spacing = site.spacing
    q = _q(site, centre, semi)
    pool = site.vert & (q < 1.0)
    if not pool.any():
        pool = site.vert & (q < 1.5)
    if not pool.any():
        raise SpineInpaintError("the blastic_nodular lesion holds no bone voxel (too small for this scan's voxels)")
    count = int(rng.integers(_NODULE_COUNT[0], _NODULE_COUNT[1] + 1))
    mean_semi = float(np.mean(semi))
    weight = np.zeros(site.hu.shape, dtype=np.float32)
    target = np.zeros(site.hu.shape, dtype=np.float32)
    nodules: list[dict] = []
    for _ in range(count):
        radius = max(float(rng.uniform(0.3, 0.55)) * mean_semi, 1.2 * max(spacing))
        # Coalescing: the first nodule near the centre, each next one overlapping one drawn before it.
        if nodules:
            anchor = nodules[int(rng.integers(0, len(nodules)))]
            reach = 0.8 * (anchor["radius_mm"] + radius)
            near = pool & (_distance(site, np.asarray(anchor["centre_frame_mm"])) <= reach)
        else:
            near = pool & (q < 0.4)
        candidates = np.argwhere(near if near.any() else pool)
        index = tuple(candidates[int(rng.integers(0, len(candidates)))])
        at = np.array([site.u[index], site.v[index], site.w[index]], dtype=float)
        peak = float(rng.uniform(*HU_NODULE))
        fuzz = float(rng.uniform(*_NODULE_FUZZ_MM))
        share = special.expit((radius - _distance(site, at)) / (0.5 * fuzz)).astype(np.float32)
        weight = np.maximum(weight, share)
        target = np.maximum(target, share * np.float32(peak))
        nodules.append({"centre_frame_mm": [round(float(x), 3) for x in at], "radius_mm": round(radius, 3),
                        "peak_hu": round(peak, 2), "fuzz_mm": round(fuzz, 3)})
    tumour = site.vert & (weight >= 0.1)
    _check_size(tumour, "blastic_nodular")
    texture = 40.0 * _smooth_field(rng, site.hu.shape, 1.5, spacing) + _noise(rng, site)
    dense = target + weight * texture
    # Sclerosis adds bone: a voxel never gets darker than the bone it was.
    values = np.maximum(site.hu, dense).astype(np.float32)
    return Painted(values, tumour, np.zeros_like(tumour), {"nodules": nodules})
