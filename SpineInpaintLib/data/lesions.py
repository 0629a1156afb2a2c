"""Simulated spinal metastases on a CT with vertebra labels, keeping the untouched scan as the truth.

A lesion is an irregular blob (an ellipsoid whose surface is perturbed by a smooth random field)
placed in the vertebral body of one level and filled with tumour tissue:

- ``lytic``: bone replaced by soft tissue (20-60 HU) with a smooth texture (15 HU) and the scan's
  own noise level;
- ``sclerotic``: dense bone (800-1500 HU) with texture (80 HU) and noise;
- ``mixed``: both in a blotchy pattern (30-60 % sclerotic).

A *non-destructive* lesion stays inside the vertebra eroded by ``cortex_mm`` (the cortex is
intact). A *destructive* lesion is moved towards the body outline (a random direction, within
120 degrees of anterior first) so that it breaks the cortex, and its extra-osseous part, a
soft-tissue mass (always the lytic HU model) bulging into the paravertebral tissue, is added: only
into soft-tissue HU (-250 to 250) that is unlabelled, muscle or a non-TotalSegmentator class, within
the body's height (not into the discs), never into air, bone, organs, vessels or the cord, and at
most ``_CANAL_REACH_MM`` into the spinal canal (estimated as the holes of the vertebra label on
each array-z slice). An optional
pathological *collapse* compresses the vertebral body along the spine axis (the superior endplate
moves down by ``collapse`` of the body height) and stretches the disc above into the freed space.

Geometry is computed in millimetres in a local frame of the vertebra, built from the label map and
the volume's direction matrix, so any spacing and orientation works:

- *superior* ``w``: the spine tangent through the neighbouring vertebrae's centroids (patient
  superior, LPS +z, when the level has no neighbour wholly inside the scan, or when the tangent
  is more than 45 degrees off it);
- *anterior* ``v``: from the vertebra's own shape: the body is its thickest part (the largest
  inscribed sphere), so the direction from the vertebra's centroid to the centroid of its
  morphological opening's core points anterior. Patient anterior (LPS -y) is the fallback when the
  two disagree by more than 75 degrees (then the label is too odd to trust);
- *lateral* ``u = v x w``.

The vertebral body is the part of the vertebra anterior of the core's posterior wall (the 2nd
percentile of ``v`` over the core), i.e. anterior of the canal and the pedicles.

Masks and the bit-identical guarantee: ``SimulatedLesion.mask`` is every voxel the simulation may
have changed (the tumour plus, with a collapse, every voxel the deformation changed); every voxel
outside it is bit-identical to the input. ``lesion_mask`` is the tumour itself (after the
collapse), ``bone_destroyed`` the tumour inside the healthy vertebra label. Without a collapse
``mask == lesion_mask``.

Boxes: "axial slice" means the array's z index (the first axis), whatever the direction matrix
says. ``boxes_2d[z] = (x1, y1, x2, y2)`` in 0-based pixel indices (x = column, array axis 2;
y = row, array axis 1), start inclusive and end exclusive, tight around ``mask`` on slice ``z``.
``box_3d = (z1, y1, x1, z2, y2, x2)`` likewise; ``box_3d_lps`` is its (min, max) corner in LPS mm
over the voxels' outer faces.

All work happens inside the vertebra's bounding box plus a margin (30 mm, 45 mm with a collapse),
so the cost hardly grows with the scan size (about 1 s for a level of a 512x512x100 scan, 2 s
with a collapse, on one CPU core).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, special

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.labels import (
    VERTEBRA_IDS,
    vertebra_id,
    vertebra_name,
)
from SpineInpaintLib.data.lesion_geometry import (
    _MARGIN_MM,
    _boundary,
    _boxes,
    _collapse,
    _component_at,
    _component_touching,
    _ellipsoid_erosion,
    _Geometry,
    _ray_exit,
    _vertebra_geometry,
    _working_box,
)

__all__ = ["LESION_TYPES", "SimulatedLesion", "estimate_noise_std", "simulate_lesion", "random_lesion"]

#: The lesion types :func:`simulate_lesion` knows.
LESION_TYPES: tuple[str, ...] = ("lytic", "sclerotic", "mixed")

#: TotalSegmentator v2 labels a tumour mass never grows into: organs, vessels, bones, the cord
#: (1-79) and brain, skull, ribs, sternum, cartilage (90-117); a real mass pushes them aside. It may
#: replace unlabelled tissue (0: fat, connective tissue; the discs are excluded by the height limit),
#: the paravertebral muscles (gluteus 80-85, autochthon 86-87, iliopsoas 88-89) and ids beyond the
#: TotalSegmentator range (e.g. the phantom's fat and muscle classes), always within the HU window.
_NO_MASS_LABELS: tuple[int, ...] = tuple(range(1, 80)) + tuple(range(90, 118))

_SPINAL_CORD = 79

_SACRUM = 25

#: Soft-tissue HU window for the extra-osseous mass (excludes air, lung and unlabelled bone).
_MASS_HU = (-250.0, 250.0)

#: How far (mm) a mass may reach into the spinal canal from the bone (a thin epidural component).
_CANAL_REACH_MM = 3.0

#: Levels with less bone than this (mm^3) are not offered by :func:`random_lesion`.
_MIN_LEVEL_VOLUME_MM3 = 5000.0

_HU_LYTIC = (20.0, 60.0)

_HU_SCLEROTIC = (800.0, 1500.0)

_TEXTURE_LYTIC_HU = 15.0

_TEXTURE_SCLEROTIC_HU = 80.0

#: Weight of the tumour value on the mask's outermost voxel layer (a one-voxel soft edge, inside the mask).
_EDGE_WEIGHT = 0.8


@dataclasses.dataclass
class SimulatedLesion:
    """A simulated lesion and the healthy truth it was made from.

    Attributes
    ----------
    ct
        The lesioned CT (same grid and dtype as the input).
    mask
        uint8, 1 on every voxel that may differ from ``healthy_ct`` (tumour and collapse); every voxel
        outside it is bit-identical to the input. This is what an inpainter must fill.
    lesion_mask
        uint8, the tumour tissue (intra- and extra-osseous), after any collapse.
    bone_destroyed
        uint8, ``lesion_mask`` inside the healthy vertebra label of ``level``.
    healthy_ct, healthy_labels
        Copies of the inputs (the truth for restoration).
    level, lesion_type, destructive, collapse, seed
        What was simulated.
    boxes_2d
        ``{z: (x1, y1, x2, y2)}`` around ``mask`` on every array-z slice holding mask voxels;
        0-based pixel indices, start inclusive, end exclusive.
    box_3d
        ``(z1, y1, x1, z2, y2, x2)`` around ``mask`` in array order, end exclusive.
    box_3d_lps
        ``((x, y, z) min, (x, y, z) max)`` LPS mm corners of ``box_3d``'s outer voxel faces.
    params
        JSON-ready record of every drawn and derived parameter (for dataset manifests).
    """

    ct: Volume
    mask: Volume
    lesion_mask: Volume
    bone_destroyed: Volume
    healthy_ct: Volume
    healthy_labels: Volume
    level: int
    lesion_type: str
    destructive: bool
    collapse: float
    boxes_2d: dict[int, tuple[int, int, int, int]]
    box_3d: tuple[int, int, int, int, int, int]
    box_3d_lps: tuple[tuple[float, float, float], tuple[float, float, float]]
    seed: int
    params: dict

    @classmethod
    def from_arrays(cls, ct: Volume, labels: Volume, image: np.ndarray, mask: np.ndarray, lesion_mask: np.ndarray,
                    bone_destroyed: np.ndarray, boxes: tuple, params: dict) -> SimulatedLesion:
        """A result on ``ct``'s grid from its arrays, ``boxes`` = ``(boxes_2d, box_3d, box_3d_lps)`` of ``mask``
        and ``params`` (which give the level, type, destructiveness, collapse and seed); copies the truth."""
        boxes_2d, box_3d, box_lps = boxes
        return cls(ct=ct.with_array(image), mask=ct.with_array(mask), lesion_mask=ct.with_array(lesion_mask),
                   bone_destroyed=ct.with_array(bone_destroyed), healthy_ct=ct.copy(), healthy_labels=labels.copy(),
                   level=params["level"], lesion_type=params["lesion_type"], destructive=params["destructive"],
                   collapse=params["collapse"], boxes_2d=boxes_2d, box_3d=box_3d, box_3d_lps=box_lps,
                   seed=params["seed"], params=params)

    @property
    def level_name(self) -> str:
        """Name of the level, e.g. ``'L3'``."""
        return vertebra_name(self.level)

    def manifest(self) -> dict:
        """JSON-ready summary: ``params`` plus the boxes (slice keys as strings)."""
        return {
            **self.params,
            "box_3d": list(self.box_3d),
            "box_3d_lps": [list(self.box_3d_lps[0]), list(self.box_3d_lps[1])],
            "boxes_2d": {str(z): list(box) for z, box in sorted(self.boxes_2d.items())},
        }


# --- random fields and HU ---------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, shape, sigma_mm: float, spacing_zyx) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ``sigma_mm``."""
    sigma = [sigma_mm / s for s in spacing_zyx]
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    std = float(field.std())
    return field / std if std > 0 else field


#: HU windows of the two homogeneous tissues the noise is measured in: fat and water-like soft tissue.
_NOISE_WINDOWS = ((-200.0, -30.0), (-10.0, 130.0))


def estimate_noise_std(ct: np.ndarray, windows: Sequence[tuple[float, float]] = _NOISE_WINDOWS) -> float:
    """Noise standard deviation (HU) of a CT region, measured in homogeneous fat and soft tissue.

    The residual of a 3x3x3 mean filter is taken on voxels whose whole neighbourhood lies in one of
    the HU ``windows`` (fat, soft tissue), so that edges between tissues do not count; its median
    absolute deviation, scaled to a Gaussian standard deviation and corrected for the filter (white
    noise keeps 26/27 of its variance in the residual), is returned. Correlated noise (smooth
    kernels, resampled scans) reads lower than its pixel standard deviation: the figure matches
    the noise's fine-grained part, which is what a texture must reproduce. White noise is read
    within 3 % up to 30 HU; above about 35 HU the windows clip it and it reads low. Returns 0.0
    when fewer than 200 such voxels exist.
    """
    data = np.asarray(ct, dtype=np.float32)
    low, high = ndimage.minimum_filter(data, size=3), ndimage.maximum_filter(data, size=3)
    homogeneous = np.zeros(data.shape, dtype=bool)
    for lo, hi in windows:
        homogeneous |= (low >= lo) & (high <= hi)
    if int(homogeneous.sum()) < 200:
        return 0.0
    residual = (data - ndimage.uniform_filter(data, size=3))[homogeneous]
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return 1.4826 * mad / math.sqrt(26.0 / 27.0)


# --- the simulation ---------------------------------------------------------------------------------
def _check_inputs(ct: Volume, labels: Volume, lesion_type: str, size: float, collapse: float) -> None:
    """Check the inputs of :func:`simulate_lesion` before anything is drawn.

    Raises
    ------
    SpineInpaintError
        Volumes that are not 3D or empty, grids that differ, a non-integer or all-zero label map, an
        unknown lesion type, a size outside (0, 1] or a collapse outside [0, 0.8].
    """
    for name, volume in (("ct", ct), ("labels", labels)):
        if not isinstance(volume, Volume):
            raise SpineInpaintError(f"{name} must be a Volume, got {type(volume).__name__}")
        if volume.array.ndim != 3:
            raise SpineInpaintError(f"{name} must be a 3D volume, got an array of shape {volume.array.shape}")
        if volume.array.size == 0:
            raise SpineInpaintError(f"the {name} volume is empty (shape {volume.array.shape})")
    if not labels.same_grid(ct):
        raise SpineInpaintError(
            f"ct and labels are on different grids (shape {ct.shape} vs {labels.shape}, spacing "
            f"{ct.spacing} vs {labels.spacing}); resample the labels onto the CT (io.resample_like)"
        )
    if not np.issubdtype(labels.array.dtype, np.integer) and not np.issubdtype(labels.array.dtype, np.bool_):
        raise SpineInpaintError(f"labels must be an integer label map, got dtype {labels.array.dtype}")
    if not labels.array.any():
        raise SpineInpaintError("the label map is empty (every voxel is 0)")
    if lesion_type not in LESION_TYPES:
        raise SpineInpaintError(
            f"unknown lesion type '{lesion_type}' (expected one of {', '.join(LESION_TYPES)})"
        )
    if not (0.0 < float(size) <= 1.0):
        raise SpineInpaintError(
            f"lesion size {size} is larger than the vertebral body or not positive: size is a fraction "
            "of the body's half-extents, 0 < size <= 1"
        )
    if not (0.0 <= float(collapse) <= 0.8):
        raise SpineInpaintError(f"collapse {collapse} is outside [0, 0.8] (the fraction of body height lost)")


def _resolve_level(level: int | str, labels: Volume, objects) -> int:
    """The vertebra id of ``level`` (an id or a name), checked to be in the label map.

    Raises
    ------
    SpineInpaintError
        An unknown vertebra name or id, or a level with no voxel in ``objects`` (the map's boxes).
    """
    try:
        label = vertebra_id(level)
    except ValueError as err:
        raise SpineInpaintError(str(err)) from None
    if label > len(objects) or objects[label - 1] is None:
        raise SpineInpaintError(f"no vertebra {vertebra_name(label)} (id {label}) in the label map")
    return label


def _place_lesion(rng: np.random.Generator, ct: Volume, geo: _Geometry, size: float, destructive: bool,
                  cortex_mm: float, allowed: np.ndarray | None):
    """The tumour's voxels in the working box, the blob's centre (frame mm) and the break direction.

    Non-destructive: the blob, jittered around the body centre, inside the vertebra eroded by the
    cortex. Destructive: the blob centred so that it reaches half its radius beyond the body
    outline in the drawn direction; the part inside the vertebra plus the mass outside it (the blob
    grown by 1.2 where tissue allows, connected to the bone). Returns ``(None, ...)`` when no
    direction gives a mass.
    """
    spacing = ct.spacing_zyx
    region, vert, half = geo.region, geo.vert, geo.half
    semi = size * half
    if destructive:
        angles: list[float | None] = list(_draw_destructive_angles(rng))
        offset = np.zeros(3)
    else:
        angles = [None]
        offset = rng.uniform(-1.0, 1.0, 3) * 0.5 * (1.0 - size) * half
    shape_field = _smooth_field(rng, vert.shape, 0.35 * float(np.mean(semi)), spacing)
    threshold = 1.0 + 0.3 * shape_field  # the perturbed surface: q < 1 + 0.3 g(x)
    centre = geo.body_centre + offset
    for theta in angles:
        if theta is not None:
            direction = np.array([math.sin(theta), math.cos(theta), 0.0])
            exit_mm = _ray_exit(vert, region, ct, geo.body_centre, direction, 4.0 * float(half.max()))
            reach = 1.0 / math.sqrt((direction[0] / semi[0]) ** 2 + (direction[1] / semi[1]) ** 2)
            centre = geo.body_centre + direction * max(0.0, exit_mm - 0.5 * reach)
        q = np.sqrt(((region.u - centre[0]) / semi[0]) ** 2 + ((region.v - centre[1]) / semi[1]) ** 2
                    + ((region.w - centre[2]) / semi[2]) ** 2)
        blob = _component_at(q < threshold, q)
        if theta is None:
            return blob & _ellipsoid_erosion(vert, cortex_mm, spacing), centre, None
        inside = blob & vert
        mass = _component_touching(((q < 1.2 * threshold) | blob) & allowed & ~vert, inside)
        if inside.any() and int(mass.sum()) >= max(5, int(0.05 * inside.sum())):
            return inside | mass, centre, theta
    return None, centre, None


def simulate_lesion(
    ct: Volume,
    labels: Volume,
    level: int | str,
    lesion_type: str = "lytic",
    destructive: bool = False,
    *,
    size: float = 0.6,
    collapse: float = 0.0,
    cortex_mm: float = 2.0,
    seed: int = 0,
) -> SimulatedLesion:
    """Simulate a spinal metastasis in the vertebral body of one level.

    Parameters
    ----------
    ct
        CT in HU (any dtype, spacing and orientation).
    labels
        Integer label map on the CT's grid with TotalSegmentator v2 vertebra ids (25-50); other
        ids are other tissues (used to keep a destructive mass out of organs, vessels and bone).
    level
        Vertebra id (``29``) or name (``'L3'``).
    lesion_type
        ``'lytic'``, ``'sclerotic'`` or ``'mixed'``.
    destructive
        Break the cortex and add an extra-osseous soft-tissue mass (else the cortex stays intact).
    size
        Semi-axes of the lesion's ellipsoid as a fraction (0, 1] of the body's half-extents along
        the lateral, anterior and superior axes (before the random surface perturbation).
    collapse
        Fraction [0, 0.8] of the body's height lost in a pathological compression (0 = none).
    cortex_mm
        Cortical shell (mm) a non-destructive lesion leaves intact (at least one voxel).
    seed
        Seed of every random draw; the same inputs and seed give the same result.

    Returns
    -------
    SimulatedLesion

    Raises
    ------
    SpineInpaintError
        Empty or non-3D volumes, grids that differ, an all-zero label map, a level not in the
        label map, an unknown type, a size outside (0, 1] (a lesion larger than the body), a
        collapse outside [0, 0.8], a body too small to hold a lesion, or no soft tissue next to the
        body for a destructive lesion.
    """
    _check_inputs(ct, labels, lesion_type, size, collapse)
    seed = int(seed)
    rng = np.random.default_rng(seed)
    objects = _label_boxes(labels.array)
    level = _resolve_level(level, labels, objects)
    slices = _working_box(ct, objects[level - 1], _MARGIN_MM + 15.0 * (collapse > 0))
    lab = np.asarray(labels.array[slices])
    hu = _working_hu(ct, slices)
    geo = _vertebra_geometry(ct, labels.array, objects, level, slices)

    lesion, centre, theta = _tumour_voxels(rng, ct, geo, lab, hu, level, size, destructive, cortex_mm)
    new, noise_std, hu_params = _tumour_image(rng, lesion_type, hu, lesion, geo.vert, ct.spacing_zyx)
    new, lesion, changed, collapse_params = _collapsed(ct, geo, lab, level, collapse, new, lesion, slices)
    params = {
        "level": level,
        "level_name": vertebra_name(level),
        "lesion_type": lesion_type,
        "destructive": bool(destructive),
        "size": float(size),
        "collapse": float(collapse),
        "cortex_mm": float(cortex_mm),
        "seed": seed,
        "noise_std_hu": round(noise_std, 3),
        **hu_params,
        **_measurements(ct, geo, float(size), centre, theta, lesion, changed),
        **collapse_params,
    }
    return _result(ct, labels, slices, new, changed, lesion, geo.vert, params)


def _label_boxes(label_array: np.ndarray) -> list:
    """Bounding box of every label id (``ndimage.find_objects``; a boolean map counts as id 1).

    Parameters
    ----------
    label_array
        Integer or boolean (z, y, x) label map.

    Returns
    -------
    ``boxes[id - 1]``: a tuple of slices, or None for an id not in the map.
    """
    return ndimage.find_objects(label_array.astype(np.int64, copy=False) if label_array.dtype == bool
                                else label_array)


def _working_hu(ct: Volume, slices: tuple[slice, slice, slice]) -> np.ndarray:
    """The CT's working box as floats: float64 for a float64 scan, float32 otherwise.

    Parameters
    ----------
    ct
        The input CT.
    slices
        The working box.

    Returns
    -------
    ``ct.array[slices]`` as float32 or float64 (a view where the scan has that dtype: never written to).
    """
    # float64 scans are worked on in float64 so that untouched voxels round-trip exactly.
    work_dtype = np.float64 if ct.array.dtype == np.float64 else np.float32
    return np.asarray(ct.array[slices], dtype=work_dtype)


def _tumour_voxels(rng: np.random.Generator, ct: Volume, geo: _Geometry, lab: np.ndarray, hu: np.ndarray,
                   level: int, size: float, destructive: bool,
                   cortex_mm: float) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Place the tumour: the blob in the body and, for a destructive lesion, its mass in the tissue allowed.

    Parameters
    ----------
    rng
        The simulation's generator (the shape draws come first).
    ct, geo
        The CT and the vertebra's geometry in the working box.
    lab, hu
        Labels and HU of the working box.
    level, size, destructive, cortex_mm
        As in :func:`simulate_lesion` (``level`` as an id).

    Returns
    -------
    (lesion, centre, theta)
        The tumour's voxels in the working box, the blob's centre (frame mm) and the direction of the
        cortex break (radians from anterior; None for a non-destructive lesion).

    Raises
    ------
    SpineInpaintError
        No direction gives a destructive mass, or the lesion holds fewer than 8 voxels.
    """
    name = vertebra_name(level)
    allowed = (_mass_allowed(lab, hu, geo.vert, geo.region.w, geo.lo[2], geo.hi[2], ct.spacing_zyx)
               if destructive else None)
    lesion, centre, theta = _place_lesion(rng, ct, geo, float(size), destructive, cortex_mm, allowed)
    if lesion is None:
        raise SpineInpaintError(
            f"cannot place a destructive lesion at {name}: no paravertebral soft tissue next to the body"
        )
    if int(lesion.sum()) < 8:
        raise SpineInpaintError(
            f"the lesion at {name} holds {int(lesion.sum())} voxels only "
            f"(size {size} is too small for this scan's voxels)"
        )
    return lesion, centre, theta


def _tumour_image(rng: np.random.Generator, lesion_type: str, hu: np.ndarray, lesion: np.ndarray,
                  vert: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, float, dict]:
    """The working box with the tumour's HU blended in (a one-voxel soft edge inside the lesion).

    Parameters
    ----------
    rng
        The simulation's generator (the tumour draws follow the shape draws).
    lesion_type
        As in :func:`simulate_lesion`.
    hu
        HU of the working box (left unchanged).
    lesion, vert
        The tumour's voxels and the vertebra label in the working box (outside it: the soft-tissue mass).
    spacing
        Voxel size (mm), (z, y, x).

    Returns
    -------
    (image, noise_std, params)
        The new HU of the working box, the scan's noise (HU) the tumour copies and the drawn HU parameters.
    """
    noise_std = estimate_noise_std(hu)
    tumour, hu_params = _tumour_hu(rng, lesion_type, hu.shape, spacing, noise_std, lesion, lesion & ~vert)
    weight = np.where(_boundary(lesion), np.float32(_EDGE_WEIGHT), np.float32(1.0))
    new = hu.copy()
    new[lesion] = weight[lesion] * tumour[lesion] + (1.0 - weight[lesion]) * hu[lesion]
    return new, noise_std, hu_params


def _collapsed(ct: Volume, geo: _Geometry, lab: np.ndarray, level: int, collapse: float, image: np.ndarray,
               lesion: np.ndarray,
               slices: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Apply the collapse (if any) to the lesioned working box and find every voxel that changed.

    Parameters
    ----------
    ct, geo, lab, level
        The CT, the vertebra's geometry, the working box's labels and the level's id.
    collapse
        As in :func:`simulate_lesion`; 0 leaves the image as it is.
    image, lesion
        The lesioned HU and the tumour's voxels in the working box.
    slices
        The working box.

    Returns
    -------
    (image, lesion, changed, params)
        The deformed image and tumour, the voxels that may differ from the input (the tumour, and with
        a collapse every voxel whose stored value moved) and the collapse's parameters (empty without).
    """
    if not collapse > 0:
        return image, lesion, lesion.copy(), {}
    image, moved, params = _collapse(ct, geo, lab, level, float(collapse), image)
    lesion = moved(lesion)
    changed = lesion | (_as_stored(image, ct.array.dtype) != ct.array[slices])
    return image, lesion, changed, params


def _measurements(ct: Volume, geo: _Geometry, size: float, centre: np.ndarray, theta: float | None,
                  lesion: np.ndarray, changed: np.ndarray) -> dict:
    """JSON-ready record of the lesion's geometry and volumes (part of ``SimulatedLesion.params``).

    Parameters
    ----------
    ct, geo
        The CT and the vertebra's geometry in the working box.
    size
        As in :func:`simulate_lesion`.
    centre, theta
        The blob's centre (frame mm) and the direction of the cortex break (None: not destructive).
    lesion, changed
        The tumour (after any collapse) and every voxel that may differ, in the working box.

    Returns
    -------
    dict of the centre, semi-axes, body half-extents and axes (LPS), how anterior was found, the break
    angle (degrees) and the volumes (ml) of the lesion, the bone destroyed, the extra-osseous part and the mask.
    """
    region, vert, half = geo.region, geo.vert, geo.half
    voxel_ml = float(np.prod(ct.spacing_zyx)) / 1000.0
    return {
        "centre_lps": [round(float(x), 3) for x in region.centre + centre @ region.axes],
        "semi_axes_mm": [round(float(x), 3) for x in size * half],
        "body_half_extents_mm": [round(float(x), 3) for x in half],
        "axes_lps": {key: axis.round(4).tolist() for key, axis in zip(("lateral", "anterior", "superior"),
                                                                        region.axes)},
        "anterior_from": geo.anterior_from,
        "destructive_angle_deg": None if theta is None else round(math.degrees(theta), 1),
        "lesion_ml": round(float(lesion.sum()) * voxel_ml, 4),
        "bone_destroyed_ml": round(float((lesion & vert).sum()) * voxel_ml, 4),
        "extraosseous_ml": round(float((lesion & ~vert).sum()) * voxel_ml, 4),
        "mask_ml": round(float(changed.sum()) * voxel_ml, 4),
    }


def _result(ct: Volume, labels: Volume, slices: tuple[slice, slice, slice], image: np.ndarray,
            changed: np.ndarray, lesion: np.ndarray, vert: np.ndarray, params: dict) -> SimulatedLesion:
    """Full-size outputs and boxes: voxels outside ``changed`` keep the input's exact bits.

    Parameters
    ----------
    ct, labels
        The inputs (copied as the healthy truth).
    slices
        The working box.
    image, changed, lesion, vert
        The new HU, the voxels that may differ, the tumour and the vertebra label, in the working box.
    params
        The simulation's record; its level, lesion_type, destructive, collapse and seed fill those fields.

    Returns
    -------
    SimulatedLesion
    """
    out = ct.array.copy()
    stored = _as_stored(image, ct.array.dtype)
    window = out[slices]
    window[changed] = stored[changed]
    mask_full = np.zeros(ct.shape, dtype=np.uint8)
    mask_full[slices][changed] = 1
    lesion_full = np.zeros(ct.shape, dtype=np.uint8)
    lesion_full[slices][lesion] = 1
    destroyed_full = np.zeros(ct.shape, dtype=np.uint8)
    destroyed_full[slices][lesion & vert] = 1
    boxes = _boxes(ct, changed, [sl.start for sl in slices])
    return SimulatedLesion.from_arrays(ct, labels, out, mask_full, lesion_full, destroyed_full, boxes, params)


def _draw_destructive_angles(rng: np.random.Generator, tries: int = 12) -> list[float]:
    """Directions (radians from anterior towards lateral +u) to try for the cortex break.

    Anterolateral and lateral breaks (within 120 degrees of anterior) are drawn first, as
    paravertebral masses there are the common picture; the rest of the circle follows as a fallback.
    """
    first = rng.uniform(-1.0, 1.0) * math.radians(120.0)
    ring = [first + k * 2.0 * math.pi / tries for k in range(tries)]
    ring = [math.atan2(math.sin(a), math.cos(a)) for a in ring]
    return sorted(ring, key=lambda a: (abs(a) > math.radians(120.0), abs(a - first)))


def _mass_allowed(lab: np.ndarray, hu: np.ndarray, vert: np.ndarray, w: np.ndarray, w_lo: float, w_hi: float,
                  spacing) -> np.ndarray:
    """Voxels an extra-osseous mass may replace: soft tissue within the body's height, off the canal."""
    allowed = ~np.isin(lab, _NO_MASS_LABELS) & (hu >= _MASS_HU[0]) & (hu <= _MASS_HU[1])
    allowed &= (w >= w_lo) & (w <= w_hi)  # not into the discs above and below
    # The canal: holes of the vertebra on each array-z slice, and the cord where it is labelled.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    canal = (ndimage.binary_fill_holes(vert, structure=in_plane) & ~vert) | (lab == _SPINAL_CORD)
    far = ndimage.distance_transform_edt(~vert, sampling=spacing) > _CANAL_REACH_MM
    return allowed & ~(canal & far)


def _tumour_hu(rng: np.random.Generator, lesion_type: str, shape, spacing, noise_std: float,
               lesion: np.ndarray, soft: np.ndarray) -> tuple[np.ndarray, dict]:
    """Tumour HU on the working box (only its values inside ``lesion`` are used).

    ``soft`` (the extra-osseous mass) always gets the soft-tissue (lytic) model: a paravertebral
    mass is soft tissue whatever the lesion's matrix inside the bone.
    """
    texture = _smooth_field(rng, shape, 2.0, spacing)
    noise = rng.standard_normal(shape).astype(np.float32) * np.float32(noise_std)
    lytic_hu = float(rng.uniform(*_HU_LYTIC))
    sclerotic_hu = float(rng.uniform(*_HU_SCLEROTIC))
    lytic = lytic_hu + _TEXTURE_LYTIC_HU * texture
    sclerotic = sclerotic_hu + _TEXTURE_SCLEROTIC_HU * texture
    params: dict = {}
    if lesion_type == "lytic":
        values = lytic
        params["lytic_hu"] = round(lytic_hu, 2)
    elif lesion_type == "sclerotic":
        values = sclerotic
        params["sclerotic_hu"] = round(sclerotic_hu, 2)
    else:
        fraction = float(rng.uniform(0.3, 0.6))
        blotch = _smooth_field(rng, shape, 3.0, spacing)
        cut = float(np.quantile(blotch[lesion & ~soft if (lesion & ~soft).any() else lesion], 1.0 - fraction))
        # A steep logistic: the two tissues meet over about one voxel.
        share = special.expit((blotch - cut) / 0.1)  # the logistic, without exp overflow far from the cut
        values = share * sclerotic + (1.0 - share) * lytic
        params.update(lytic_hu=round(lytic_hu, 2), sclerotic_hu=round(sclerotic_hu, 2),
                      sclerotic_fraction=round(fraction, 3))
    values = np.where(soft, lytic, values)
    if lesion_type == "sclerotic" and soft.any():
        params["lytic_hu"] = round(lytic_hu, 2)
    return (values + noise).astype(np.float32), params


def _as_stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in the CT's dtype (rounded and clipped for integer types)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def random_lesion(
    ct: Volume,
    labels: Volume,
    seed: int,
    levels: Sequence[int | str] | None = None,
    lesion_types: Sequence[str] | None = None,
) -> SimulatedLesion:
    """A lesion with randomly drawn level, type, size, destructiveness and collapse (dataset building).

    Draws: a level among ``levels`` (default: every vertebra in the label map with at least
    5 cm^3 of labelled bone, the sacrum (25) left out: TotalSegmentator's sacrum label is the whole
    fused bone, whose "body" is no vertebral body; name it in ``levels`` to use it); the type,
    lytic 50 %, mixed 25 %, sclerotic 25 % (``lesion_types`` restricts it, keeping the relative
    weights); destructive 50 %; size uniform in [0.35, 0.8]; a collapse in 20 % of cases, uniform
    in [0.1, 0.4] of the body height. A level whose body turns out too small is skipped for the
    next candidate.
    """
    rng = np.random.default_rng(int(seed))
    if not isinstance(labels, Volume) or labels.array.size == 0 or not labels.array.any():
        raise SpineInpaintError("the label map is empty (every voxel is 0)")
    objects = ndimage.find_objects(labels.array.astype(np.int64, copy=False))
    if levels is None:
        voxel_mm3 = float(np.prod(labels.spacing))
        candidates = []
        for lv in VERTEBRA_IDS:
            if lv == _SACRUM:
                continue
            box = objects[lv - 1] if lv <= len(objects) else None
            if box is not None and int((labels.array[box] == lv).sum()) * voxel_mm3 >= _MIN_LEVEL_VOLUME_MM3:
                candidates.append(lv)
        if not candidates:
            raise SpineInpaintError("no vertebra with at least 5 cm^3 of labelled bone in the label map")
    else:
        try:
            candidates = [vertebra_id(lv) for lv in levels]
        except ValueError as err:
            raise SpineInpaintError(str(err)) from None
        missing = [lv for lv in candidates if lv > len(objects) or objects[lv - 1] is None]
        if missing:
            raise SpineInpaintError(
                f"no vertebra {', '.join(vertebra_name(lv) for lv in missing)} in the label map"
            )
    weights = {"lytic": 0.5, "sclerotic": 0.25, "mixed": 0.25}
    types = list(LESION_TYPES) if lesion_types is None else list(lesion_types)
    unknown = [t for t in types if t not in weights]
    if unknown or not types:
        raise SpineInpaintError(
            f"unknown lesion type '{unknown[0] if unknown else ''}' "
            f"(expected one of {', '.join(LESION_TYPES)})"
        )
    p = np.array([weights[t] for t in types])
    lesion_type = str(rng.choice(types, p=p / p.sum()))
    destructive = bool(rng.random() < 0.5)
    size = float(rng.uniform(0.35, 0.8))
    collapse = float(rng.uniform(0.1, 0.4)) if rng.random() < 0.2 else 0.0
    sim_seed = int(rng.integers(0, 2**31 - 1))
    errors = []
    for level in rng.permutation(candidates):
        try:
            return simulate_lesion(ct, labels, int(level), lesion_type, destructive, size=size,
                                   collapse=collapse, seed=sim_seed)
        except SpineInpaintError as err:
            errors.append(str(err))
    raise SpineInpaintError(f"no level could hold a lesion: {errors[-1]}")
