"""A second lesion simulator: one or several focal lesions per scan, with an appearance model of its own.

:mod:`SpineInpaintLib.data.lesions` (the *classic* simulator) paints one smooth blob per call in the
vertebral body. This *focal* simulator places ``count`` lesions (at one or several levels, two may share a
vertebra) in the body, a **pedicle** or the **posterior elements** (lamina, spinous and articular
processes), at any level C1-S1, and paints each with one of three kinds (see
:mod:`SpineInpaintLib.data.lesion_textures` for the HU models):

- ``lytic_remnant``: tumour tissue (10-70 HU) in a geographic lytic lesion where thinned trabecular
  struts of the original bone survive (10-35 % of its voxels), sometimes a 1-2 voxel sclerotic rim
  (+200 to +500 HU);
- ``soft_tissue_mass``: an ellipsoidal heterogeneous mass (30-60 HU, often a necrotic 0-20 HU centre,
  an enhancing rim) growing out of the bone into the paravertebral tissue, at most
  ``lesions._CANAL_REACH_MM`` into the canal, only into the tissue the classic simulator allows a mass
  (its ``_mass_allowed`` rule: never into organs, vessels, other bones or the cord);
- ``blastic_nodular``: 3-7 coalescing dense nodules (600-1400 HU) with fuzzy margins.

The result is one :class:`~SpineInpaintLib.data.lesions.SimulatedLesion` with the classic contract: ``mask``
is the union of every voxel any lesion (or the collapse) may have changed, every voxel outside it is
bit-identical to the input; ``lesion_mask`` the union of the lesions (tumour plus sclerotic rim);
``bone_destroyed`` the tumour inside the lesions' vertebra labels (the rim is reactive bone, not
destroyed); boxes are over ``mask``; ``level`` and ``lesion_type`` are the first (main) lesion's.
``params["simulator"] == "focal"``, ``params["levels"]`` lists the levels of all lesions (the dataclass
has no such field) and ``params["lesions"]`` one JSON-ready record per lesion (level, kind, location,
centre, semi-axes, volumes and the kind's draws).

The local frame is the classic one (lateral ``u`` towards the patient's right, anterior ``v``, superior
``w``, in mm; C1, a ring, always takes patient anterior), built from the label map and the direction
matrix, so any spacing and orientation works. The body is the vertebra anterior of its core's posterior
wall; the canal is the hole of the vertebra label on each array-z slice (estimated behind the body when
the label does not close it). Pedicle lesions sit in the bone between the canal's centre and the body,
lateral of the canal; posterior lesions behind the canal's centre. C1 has no body: ``body`` and
``pedicle`` lesions at C1 go to a lateral mass (its deepest bone), ``posterior`` ones to the posterior
arch; each record's ``part`` says where a lesion went. Sizes are fractions of the half-extents of the
body's thick part (its bone at least 0.35 of the body's largest depth, so that transverse and uncinate
processes do not count; C1: a lateral mass), so they scale with the vertebra. Tumour noise copies the
scan's (``lesions.estimate_noise_std`` near the main level). An optional pathological collapse of the
main level reuses the classic deformation (``lesion_geometry._collapse``) after all lesions are painted.

Work happens in boxes around each vertebra (6 mm margin for lesions inside the bone, up to 30 mm for a
mass, 20 mm for a collapse), so the cost hardly depends on the scan's size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.labels import VERTEBRA_IDS, vertebra_name
from SpineInpaintLib.data import lesion_textures as textures
from SpineInpaintLib.data import lesions
from SpineInpaintLib.data.lesion_geometry import (
    _MARGIN_MM,
    _boxes,
    _centroid_lps,
    _collapse,
    _Geometry,
    _local_coordinates,
    _opened_core,
    _Region,
    _spine_axis,
    _unit,
    _working_box,
)
from SpineInpaintLib.data.lesions import SimulatedLesion

__all__ = ["FOCAL_KINDS", "LOCATIONS", "SIMULATORS", "simulate_focal_lesions", "random_focal_lesion",
           "random_lesion_from"]

#: The lesion kinds :func:`simulate_focal_lesions` paints.
FOCAL_KINDS: tuple[str, ...] = ("lytic_remnant", "soft_tissue_mass", "blastic_nodular")

#: Where in the vertebra a lesion's centre sits.
LOCATIONS: tuple[str, ...] = ("body", "pedicle", "posterior")

_LOCATION_WEIGHTS = (0.6, 0.2, 0.2)
_COUNT_WEIGHTS = {1: 0.7, 2: 0.2, 3: 0.1}
_C1 = 50
#: Levels with less labelled bone than this (mm^3) are not drawn (a sliver at the scan's border).
_MIN_LEVEL_VOLUME_MM3 = 2000.0
#: Margin (mm) around the vertebra for lesions that stay in the bone (the rim and fuzzy margins).
_BONE_MARGIN_MM = 6.0
#: Margin (mm) for the collapse: it moves voxels at most 15 mm (the disc above) and 3 mm (the feather) off the body.
_COLLAPSE_MARGIN_MM = 20.0
#: How much larger than an intraosseous lesion a mass is drawn.
_MASS_SCALE = 1.5


@dataclasses.dataclass
class _Frame:
    """A vertebra's local frame and anatomy, computed once on a tight box around it (frame mm)."""

    level: int
    centre: np.ndarray  # LPS mm of the frame origin (the vertebra's centroid)
    axes: np.ndarray  # rows: lateral u, anterior v, superior w (LPS unit vectors)
    anterior_from: str
    slices: tuple[slice, slice, slice]  # the tight box
    vert: np.ndarray
    depth: np.ndarray  # mm from the voxel to the label's outside
    uvw: tuple[np.ndarray, np.ndarray, np.ndarray]
    wall: float  # v of the body's posterior wall
    canal: np.ndarray  # (u, v) of the canal's centre
    canal_radius: float
    canal_from: str
    lo: np.ndarray  # (u, v, w) minimum of the body's thick part (C1: of a lateral mass), for sizes
    hi: np.ndarray
    half: np.ndarray  # half-extents (mm) the lesion sizes are fractions of
    body_lo: np.ndarray  # (u, v, w) extremes of the whole body, for the collapse
    body_hi: np.ndarray
    atlas: bool


@dataclasses.dataclass
class _Spec:
    """What one lesion is: level, kind, location, size (a fraction of the body's half-extents)."""

    level: int
    kind: str
    location: str
    size: float


# --- checks and arguments -----------------------------------------------------------------------------
def _check_volumes(ct: Volume, labels: Volume) -> None:
    """Raise a one-line SpineInpaintError for inputs the simulator cannot use."""
    for name, volume in (("ct", ct), ("labels", labels)):
        if not isinstance(volume, Volume):
            raise SpineInpaintError(f"{name} must be a Volume, got {type(volume).__name__}")
        if volume.array.size == 0:
            raise SpineInpaintError(f"the {name} volume is empty (shape {volume.array.shape})")
    if not labels.same_grid(ct):
        raise SpineInpaintError(f"ct and labels are on different grids (shape {ct.shape} vs {labels.shape}); "
                                "resample the labels onto the CT (io.resample_like)")
    if not (np.issubdtype(labels.array.dtype, np.integer) or labels.array.dtype == bool):
        raise SpineInpaintError(f"labels must be an integer label map, got dtype {labels.array.dtype}")
    if not labels.array.any():
        raise SpineInpaintError("the label map is empty (every voxel is 0)")


def _per_lesion(name: str, value, count: int) -> list | None:
    """``value`` as a list of ``count`` items: None stays None, one item is repeated, else the lengths must match."""
    if value is None:
        return None
    items = [value] if np.ndim(value) == 0 else list(value)
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise SpineInpaintError(f"{name} has {len(items)} entries for {count} lesions (give one or {count})")
    return items


def _is_real(value) -> bool:
    """True for a real number (bools excluded), Python's or numpy's."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _eligible_levels(labels: Volume, objects) -> list[int]:
    """Vertebrae (the sacrum left out) with enough labelled bone to hold a lesion."""
    voxel_mm3 = float(np.prod(labels.spacing))
    out = []
    for level in VERTEBRA_IDS:
        if level == lesions._SACRUM or level > len(objects) or objects[level - 1] is None:
            continue
        if int((labels.array[objects[level - 1]] == level).sum()) * voxel_mm3 >= _MIN_LEVEL_VOLUME_MM3:
            out.append(level)
    return out


def _specs(rng: np.random.Generator, labels: Volume, objects, count: int, levels, kinds, locations,
           sizes) -> list[_Spec]:
    """Resolve (or draw) every lesion's level, kind, location and size; validate them all first."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise SpineInpaintError(f"count must be an integer >= 1, got {count!r}")
    level_list = _per_lesion("levels", levels, count)
    kind_list = _per_lesion("kinds", kinds, count)
    location_list = _per_lesion("locations", locations, count)
    size_list = _per_lesion("sizes", sizes, count)
    for kind in kind_list or []:
        if kind not in FOCAL_KINDS:
            raise SpineInpaintError(f"unknown focal lesion kind '{kind}' (expected one of {', '.join(FOCAL_KINDS)})")
    for location in location_list or []:
        if location not in LOCATIONS:
            raise SpineInpaintError(f"unknown lesion location '{location}' (expected one of {', '.join(LOCATIONS)})")
    for size in size_list or []:
        if not _is_real(size) or not 0.0 < float(size) <= 1.0:
            raise SpineInpaintError(f"lesion size {size!r} is outside (0, 1] (a fraction of the body's half-extents)")
    if level_list is None:
        level_list = _draw_levels(rng, _eligible_levels(labels, objects), count)
    else:
        level_list = [lesions._resolve_level(level, labels, objects) for level in level_list]
    if kind_list is None:
        kind_list = [str(k) for k in rng.choice(FOCAL_KINDS, count)]
    if location_list is None:
        location_list = [str(x) for x in rng.choice(LOCATIONS, count, p=_LOCATION_WEIGHTS)]
    if size_list is None:
        size_list = [float(s) for s in rng.uniform(0.35, 0.7, count)]
    return [_Spec(int(lv), k, loc, float(s)) for lv, k, loc, s in zip(level_list, kind_list, location_list,
                                                                      size_list)]


def _draw_levels(rng: np.random.Generator, candidates: Sequence[int], count: int) -> list[int]:
    """A main level among ``candidates``, then :func:`_further_levels`."""
    if not candidates:
        raise SpineInpaintError("no vertebra with enough labelled bone for a lesion in the label map")
    main = int(rng.choice(candidates))
    return [main] + _further_levels(rng, candidates, main, count)


def _further_levels(rng: np.random.Generator, candidates: Sequence[int], main: int, count: int) -> list[int]:
    """Levels of the lesions after the main one: the main vertebra (30 %) or another candidate within 3 levels."""
    near = [int(c) for c in candidates if c != main and abs(int(c) - main) <= 3]
    return [main if rng.random() < 0.3 or not near else int(rng.choice(near)) for _ in range(count - 1)]


# --- the frame and where a lesion sits ------------------------------------------------------------------
def _canal(vert: np.ndarray, u: np.ndarray, v: np.ndarray, wall: float, lateral: float) -> tuple:
    """Centre (u, v), radius (mm) and source of the spinal canal: the label's in-plane hole behind the wall."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    holes = ndimage.binary_fill_holes(vert, structure=in_plane) & ~vert & (v < wall + 2.0)
    if int(holes.sum()) >= 4:
        centre = np.array([float(u[holes].mean()), float(v[holes].mean())])
        radius = max(3.0, float(np.percentile(np.hypot(u[holes] - centre[0], v[holes] - centre[1]), 90)))
        return centre, radius, "label holes"
    back = float(v[vert].min())
    return np.array([lateral, wall - 0.35 * (wall - back)]), max(3.0, 0.2 * (wall - back)), "estimate"


def _frame(ct: Volume, label_array: np.ndarray, objects, level: int) -> _Frame:
    """The local frame (the classic simulator's rules), the body, the canal and the depth map of ``level``."""
    spacing = ct.spacing_zyx
    slices = _working_box(ct, objects[level - 1], 2.0 * max(spacing))
    vert = np.asarray(label_array[slices]) == level
    name = vertebra_name(level)
    if int(vert.sum()) < 27:
        raise SpineInpaintError(f"vertebra {name} holds {int(vert.sum())} voxels only: too small for a lesion")
    offset = [s.start for s in slices]
    centroid = _centroid_lps(ct, vert, offset)
    superior = _spine_axis(ct, label_array, level, objects, centroid)
    core = _opened_core(vert, spacing)
    patient = np.array([0.0, -1.0, 0.0])  # patient anterior in LPS
    patient = _unit(patient - (patient @ superior) * superior)
    atlas = level == _C1
    anterior = _centroid_lps(ct, core, offset) - centroid
    anterior -= (anterior @ superior) * superior
    # The atlas is a ring: its thickest part is a lateral mass, not a body in front, so it uses the patient axis.
    from_shape = (not atlas and np.linalg.norm(anterior) >= 1.0
                  and float(_unit(anterior) @ patient) >= math.cos(math.radians(75.0)))
    anterior = _unit(anterior) if from_shape else patient
    axes = np.stack([np.cross(anterior, superior), anterior, superior])
    u, v, w = _local_coordinates(ct, slices, centroid, axes)
    depth = ndimage.distance_transform_edt(vert, sampling=spacing)
    wall = float(np.percentile(v[core], 2.0)) if not atlas else float(v[vert].max())
    canal, radius, canal_from = _canal(vert, u, v, wall, float(u[vert].mean()))
    if atlas:
        body = _lateral_mass(vert, depth, (u, v, w), canal[0], 1.0)  # sizes at C1 follow a lateral mass
    else:
        body = vert & (v >= wall)
    if not body.any():
        raise SpineInpaintError(f"vertebra {name} has no body in the label map (nothing anterior of its canal)")
    body_lo = np.array([u[body].min(), v[body].min(), w[body].min()])
    body_hi = np.array([u[body].max(), v[body].max(), w[body].max()])
    # Sizes follow the body's thick part: thin processes (transverse, uncinate) would inflate its extents.
    thick = body & (depth >= 0.35 * float(depth[body].max()))
    lo = np.array([np.percentile(a[thick], 1.0) for a in (u, v, w)])
    hi = np.array([np.percentile(a[thick], 99.0) for a in (u, v, w)])
    half = (hi - lo) / 2.0 + 0.5 * min(spacing)
    half[0] = min(half[0], 1.6 * half[1])  # a body is at most ~1.6 times as wide as it is deep
    half = np.maximum(half, 2.0 * max(spacing))
    return _Frame(level, centroid, axes, "vertebra shape" if from_shape else "patient (LPS -y)", slices, vert,
                  depth, (u, v, w), wall, canal, radius, canal_from, lo, hi, half, body_lo, body_hi, atlas)


def _lateral_mass(vert: np.ndarray, depth: np.ndarray, uvw, canal_u: float, side: float) -> np.ndarray:
    """C1's lateral mass on ``side``: its bone within 1.5 inscribed radii (plus 1 mm) of the side's deepest voxel."""
    u, v, w = uvw
    on_side = vert & (side * (u - canal_u) > 0)
    if not on_side.any():
        on_side = vert
    deepest = np.unravel_index(int(np.argmax(np.where(on_side, depth, -1.0))), depth.shape)
    reach = 1.5 * float(depth[deepest]) + 1.0
    dist = np.sqrt((u - u[deepest]) ** 2 + (v - v[deepest]) ** 2 + (w - w[deepest]) ** 2)
    return on_side & (dist <= reach)


def _nearest(region: np.ndarray, uvw, target: np.ndarray) -> np.ndarray:
    """Frame coordinates (mm) of the voxel of ``region`` nearest to ``target``."""
    u, v, w = uvw
    dist = (u - target[0]) ** 2 + (v - target[1]) ** 2 + (w - target[2]) ** 2
    index = np.unravel_index(int(np.argmin(np.where(region, dist, np.inf))), region.shape)
    return np.array([u[index], v[index], w[index]], dtype=float)


def _deep(region: np.ndarray, depth: np.ndarray, share: float) -> np.ndarray:
    """The voxels of ``region`` at least ``share`` of its largest depth inside the bone."""
    return region & (depth >= share * float(depth[region].max()))


def _location_region(frame: _Frame, location: str, side: float) -> tuple[np.ndarray, str]:
    """The bone (tight box) a lesion's centre is drawn in, and the part it actually is (for the record)."""
    u, v, _ = frame.uvw
    vert, (cu, cv), radius = frame.vert, frame.canal, frame.canal_radius
    if frame.atlas and location in ("body", "pedicle"):
        return _lateral_mass(vert, frame.depth, frame.uvw, cu, side), "lateral mass"
    if location == "body":
        return vert & (v >= frame.wall), "body"
    if location == "pedicle":
        for region in (vert & (v >= cv - 0.5 * radius) & (v <= frame.wall + 1.0) & (side * (u - cu) > 0.5 * radius),
                       vert & (v < frame.wall) & (side * (u - cu) > 0)):
            if region.any():
                return region, "pedicle"
        return vert & (v >= frame.wall), "body"
    for region in (vert & (v < cv - 0.5 * radius), vert & (v < cv)):
        if region.any():
            return region, "posterior arch" if frame.atlas else "posterior elements"
    raise SpineInpaintError(f"vertebra {vertebra_name(frame.level)} has no posterior elements in the label map")


def _place(rng: np.random.Generator, frame: _Frame, spec: _Spec) -> tuple[np.ndarray, np.ndarray, float, float, str]:
    """Centre and semi-axes (frame mm) of a lesion, the direction a mass grows in, the side and the part hit."""
    side = float(rng.choice([-1.0, 1.0]))
    region, part = _location_region(frame, spec.location, side)
    jitter = rng.uniform(0.85, 1.15, 3)
    if part == "body":
        target = (frame.lo + frame.hi) / 2.0 + rng.uniform(-1.0, 1.0, 3) * 0.5 * (1.0 - spec.size) * frame.half
        centre = _nearest(_deep(region, frame.depth, 0.3), frame.uvw, target)
        semi = spec.size * frame.half * jitter
    elif part == "lateral mass":
        centre = _nearest(_deep(region, frame.depth, 0.999), frame.uvw, np.zeros(3))
        semi = spec.size * frame.half * jitter
    else:
        deep = _deep(region, frame.depth, 0.5)
        if part == "pedicle":
            target = np.array([float(a[region].mean()) for a in frame.uvw])
        else:  # lamina, spinous or articular process: anywhere in the deep part of the arch
            target = np.array([float(a[deep][rng.integers(0, int(deep.sum()))]) for a in frame.uvw])
        centre = _nearest(deep, frame.uvw, target)
        semi = spec.size * float(np.mean(frame.half)) * jitter
    if spec.kind == "soft_tissue_mass":
        semi = semi * _MASS_SCALE
        semi[2] = min(semi[2], 1.1 * frame.half[2])  # within about the vertebra's height, not along the spine
    if spec.location == "body":
        theta = float(rng.uniform(-1.0, 1.0)) * math.radians(120.0)
    elif spec.location == "pedicle":
        theta = side * math.radians(float(rng.uniform(60.0, 130.0)))
    else:
        theta = math.pi + math.radians(float(rng.uniform(-45.0, 45.0)))
    return centre, semi, math.atan2(math.sin(theta), math.cos(theta)), side, part


def _crop(u: np.ndarray, v: np.ndarray, w: np.ndarray, centre: np.ndarray, radius: float) -> tuple[slice, ...]:
    """The box (relative slices) of the voxels within ``radius`` mm of ``centre``."""
    near = (u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (w - centre[2]) ** 2 <= radius ** 2
    box = ndimage.find_objects(near.astype(np.uint8))
    return box[0] if box else tuple(slice(0, n) for n in u.shape)


# --- painting -----------------------------------------------------------------------------------------
def _mass_allowed(frame: _Frame, lab: np.ndarray, hu: np.ndarray, vert: np.ndarray, w: np.ndarray,
                  offset: Sequence[int], part: str, spacing) -> np.ndarray:
    """The classic simulator's rule for the tissue a mass may replace, evaluated where it matters.

    ``lesions._mass_allowed`` (labels, HU window, height, canal reach) runs on the vertebra's tight box
    grown by the canal reach, where the canal and the reach are; outside it, its rule reduces to the
    labels, the HU window and the height, and no cord.
    """
    w_lo, w_hi = ((frame.body_lo[2], frame.body_hi[2]) if part == "body"
                  else (float(frame.uvw[2][frame.vert].min()), float(frame.uvw[2][frame.vert].max())))
    top = max(int(lab.max()), max(lesions._NO_MASS_LABELS)) + 1
    permitted = np.ones(top, dtype=bool)
    permitted[list(lesions._NO_MASS_LABELS)] = False  # a lookup table: np.isin over a big box is slow
    permitted[lesions._SPINAL_CORD] = False  # off the canal the cord is never reached
    allowed = permitted[lab] & (hu >= lesions._MASS_HU[0]) & (hu <= lesions._MASS_HU[1]) & (w >= w_lo) & (w <= w_hi)
    pad = [int(math.ceil(lesions._CANAL_REACH_MM / sp)) + 1 for sp in spacing]
    near = tuple(slice(max(0, s.start - o - p), min(n, s.stop - o + p))
                 for s, o, p, n in zip(frame.slices, offset, pad, lab.shape))
    allowed[near] = lesions._mass_allowed(lab[near], hu[near], vert[near], w[near], w_lo, w_hi, spacing)
    return allowed


def _sub_site(site: textures.Site, crop: tuple[slice, ...]) -> textures.Site:
    return textures.Site(site.hu[crop], site.vert[crop], site.u[crop], site.v[crop], site.w[crop], site.spacing,
                         site.noise_std, None if site.allowed is None else site.allowed[crop])


def _paint(rng: np.random.Generator, ct: Volume, label_array: np.ndarray, objects, out: np.ndarray,
           frame: _Frame, spec: _Spec, noise_std: float):
    """Paint one lesion into ``out`` (the lesioned CT so far, in the CT's dtype) in place.

    Returns
    -------
    (box, painted, vert, record)
        The crop painted (absolute slices), the painter's result and the vertebra label on the crop, and
        the lesion's JSON-ready record.
    """
    spacing = ct.spacing_zyx
    mass = spec.kind == "soft_tissue_mass"
    centre, semi, theta, side, part = _place(rng, frame, spec)
    # A mass reaches at most 1.3 of its semi-axis (placement) plus its ragged edge beyond the bone.
    margin = min(_MARGIN_MM, 1.5 * float(semi.max()) + 2.0 * max(spacing)) if mass else _BONE_MARGIN_MM
    slices = _working_box(ct, objects[spec.level - 1], margin)
    u, v, w = _local_coordinates(ct, slices, frame.centre, frame.axes)
    hu = np.asarray(out[slices], dtype=np.float64 if out.dtype == np.float64 else np.float32)
    site = textures.Site(hu, np.asarray(label_array[slices]) == spec.level, u, v, w, spacing, noise_std)
    start = centre
    if mass:
        offset = [s.start for s in slices]
        site.allowed = _mass_allowed(frame, np.asarray(label_array[slices]), hu, site.vert, w, offset, part, spacing)
        centre, theta = textures.place_mass(site, start, semi, theta, float(rng.uniform(0.0, 0.3)))
    crop = _crop(u, v, w, centre, 1.6 * float(semi.max()) + 3.0 * max(spacing))
    site = _sub_site(site, crop)
    if mass:
        painted = textures.paint_soft_tissue_mass(rng, site, centre, semi)
    elif spec.kind == "lytic_remnant":
        painted = textures.paint_lytic_remnant(rng, site, centre, semi)
    else:
        painted = textures.paint_blastic_nodular(rng, site, centre, semi)
    box = tuple(slice(s.start + c.start, s.start + c.stop) for s, c in zip(slices, crop))
    changed = painted.tumour | painted.rim
    window = out[box]
    window[changed] = lesions._as_stored(painted.values, out.dtype)[changed]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    record = {
        "level": spec.level, "level_name": vertebra_name(spec.level), "kind": spec.kind, "location": spec.location,
        "part": part, "size": round(spec.size, 4),
        # +u = anterior x superior points to the patient's right; a body lesion has no side.
        "side": None if part == "body" else ("right" if side > 0 else "left"),
        "centre_frame_mm": [round(float(x), 3) for x in start],
        "centre_lps": [round(float(x), 3) for x in frame.centre + start @ frame.axes],
        "semi_axes_mm": [round(float(x), 3) for x in semi],
        "frame_origin_lps": [round(float(x), 4) for x in frame.centre],
        "axes_lps": {key: axis.round(6).tolist() for key, axis in zip(("lateral", "anterior", "superior"),
                                                                        frame.axes)},
        "anterior_from": frame.anterior_from, "canal_from": frame.canal_from,
        "body_wall_v_mm": round(frame.wall, 3),
        "lesion_ml": round(float(painted.tumour.sum()) * voxel_ml, 4),
        "extraosseous_ml": round(float((painted.tumour & ~site.vert).sum()) * voxel_ml, 4),
        "rim_ml": round(float(painted.rim.sum()) * voxel_ml, 4),
        **({"growth_angle_deg": round(math.degrees(theta), 1)} if mass else {}),
        **painted.params,
    }
    return box, painted, site.vert, record


def _collapse_level(ct: Volume, labels: Volume, objects, frame: _Frame, collapse: float, out: np.ndarray,
                    masks: dict[str, np.ndarray]) -> tuple[tuple[slice, ...], dict]:
    """Collapse the main level's body (the classic deformation) in ``out`` and ``masks`` in place."""
    slices = _working_box(ct, objects[frame.level - 1], _COLLAPSE_MARGIN_MM)
    lab = np.asarray(labels.array[slices])
    u, v, w = _local_coordinates(ct, slices, frame.centre, frame.axes)
    vert = lab == frame.level
    region = _Region(slices, frame.centre, frame.axes, u, v, w)
    half = (frame.body_hi - frame.body_lo) / 2.0 + 0.5 * min(ct.spacing)
    geo = _Geometry(region, vert, vert & (v >= frame.wall), frame.body_lo, frame.body_hi, half, frame.anterior_from)
    image = np.asarray(out[slices], dtype=np.float64 if out.dtype == np.float64 else np.float32)
    moved, move, params = _collapse(ct, geo, lab, frame.level, float(collapse), image)
    stored = lesions._as_stored(moved, out.dtype)
    changed = stored != out[slices]
    for key in ("tumour", "rim"):
        masks[key][slices] = move(masks[key][slices].astype(bool))
    masks["mask"][slices] |= changed | masks["tumour"][slices].astype(bool) | masks["rim"][slices].astype(bool)
    out[slices] = stored
    return slices, params


def _union(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest box holding every box of ``boxes``."""
    return tuple(slice(min(b[k].start for b in boxes), max(b[k].stop for b in boxes)) for k in range(3))


def _result(ct: Volume, labels: Volume, out: np.ndarray, masks: dict[str, np.ndarray], touched: tuple[slice, ...],
            params: dict) -> SimulatedLesion:
    """The SimulatedLesion of the painted scan: full-size masks and boxes over ``mask``.

    ``touched`` is a box holding every voxel painted (the masks are searched there only: a big scan's
    full-size passes would dominate the cost).
    """
    mask = masks["mask"]
    box = ndimage.find_objects(mask[touched].astype(np.uint8))[0]
    box = tuple(slice(t.start + b.start, t.start + b.stop) for t, b in zip(touched, box))
    boxes_2d, box_3d, box_lps = _boxes(ct, mask[box], [s.start for s in box])
    levels = sorted({record["level"] for record in params["lesions"]})
    destroyed = np.zeros(ct.shape, dtype=np.uint8)
    destroyed[touched] = masks["tumour"][touched] & np.isin(labels.array[touched], levels)
    lesion_mask = masks["tumour"]
    lesion_mask |= masks["rim"]
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    params["mask_ml"] = round(float(mask[touched].sum()) * voxel_ml, 4)
    params["bone_destroyed_ml"] = round(float(destroyed[touched].sum()) * voxel_ml, 4)
    return SimulatedLesion.from_arrays(ct, labels, out, mask.view(np.uint8), lesion_mask.view(np.uint8), destroyed,
                                       (boxes_2d, box_3d, box_lps), params)


def simulate_focal_lesions(
    ct: Volume,
    labels: Volume,
    seed: int,
    *,
    levels: int | str | Sequence[int | str] | None = None,
    count: int = 1,
    kinds: str | Sequence[str] | None = None,
    locations: str | Sequence[str] | None = None,
    sizes: float | Sequence[float] | None = None,
    collapse: float = 0.0,
) -> SimulatedLesion:
    """Simulate one or several focal spinal metastases in one scan (see the module docstring).

    Parameters
    ----------
    ct
        CT in HU (any dtype, spacing and orientation).
    labels
        Integer label map on the CT's grid, TotalSegmentator v2 ids (vertebrae 25-50; other ids keep a
        mass out of organs, vessels, bones and the cord).
    seed
        Seed of every random draw; the same inputs and seed give the same result.
    levels, kinds, locations, sizes
        Per lesion: one value for all, or ``count`` values (the first is the main lesion). None draws it:
        levels among the vertebrae with at least 2 cm^3 of bone (the sacrum left out; further lesions at
        the main level 30 %, else within 3 levels of it), kinds uniformly from :data:`FOCAL_KINDS`,
        locations from :data:`LOCATIONS` (60/20/20 %), sizes uniform in [0.35, 0.7]. A size is a fraction
        (0, 1] of the body's half-extents (C1: of a lateral mass's).
    count
        Number of lesions, >= 1.
    collapse
        Fraction [0, 0.8] of the main level's body height lost in a pathological compression (0: none;
        not at C1, which has no body).

    Returns
    -------
    SimulatedLesion
        ``level``/``lesion_type`` of the main lesion, ``destructive`` when any lesion has an extra-osseous
        part; ``params`` holds ``simulator='focal'``, ``count``, ``levels`` and ``lesions`` (one record each).

    Raises
    ------
    SpineInpaintError
        Bad volumes or an empty label map, count < 1, a level not in the labels, an unknown kind or
        location, a size outside (0, 1], a collapse outside [0, 0.8] or at C1, or a lesion that cannot be
        placed (too small a vertebra, no soft tissue for a mass).
    """
    _check_volumes(ct, labels)
    if not _is_real(collapse) or not 0.0 <= float(collapse) <= 0.8:
        raise SpineInpaintError(f"collapse {collapse!r} is outside [0, 0.8] (the fraction of body height lost)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise SpineInpaintError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    rng = np.random.default_rng(seed)
    objects = lesions._label_boxes(labels.array)
    specs = _specs(rng, labels, objects, count, levels, kinds, locations, sizes)
    if collapse > 0 and specs[0].level == _C1:
        raise SpineInpaintError("C1 has no vertebral body to collapse (use collapse=0 at C1)")
    out = ct.array.copy()
    masks = {key: np.zeros(ct.shape, dtype=bool) for key in ("mask", "tumour", "rim")}
    frames: dict[int, _Frame] = {}
    noise_box = _working_box(ct, objects[specs[0].level - 1], 10.0)
    noise_std = lesions.estimate_noise_std(np.asarray(ct.array[noise_box], dtype=np.float32))
    records, touched = [], []
    for spec in specs:
        if spec.level not in frames:
            frames[spec.level] = _frame(ct, labels.array, objects, spec.level)
        box, painted, vert, record = _paint(rng, ct, labels.array, objects, out, frames[spec.level], spec, noise_std)
        masks["tumour"][box] |= painted.tumour
        masks["rim"][box] |= painted.rim
        masks["mask"][box] |= painted.tumour | painted.rim
        records.append(record)
        touched.append(box)
    params: dict = {
        "simulator": "focal", "level": specs[0].level, "level_name": vertebra_name(specs[0].level),
        "lesion_type": specs[0].kind, "location": specs[0].location,
        "destructive": any(r["extraosseous_ml"] > 0 for r in records), "collapse": float(collapse),
        "seed": seed, "count": len(specs), "levels": [s.level for s in specs],
        "level_names": [vertebra_name(s.level) for s in specs], "kinds": [s.kind for s in specs],
        "locations": [s.location for s in specs],
        "noise_std_hu": round(noise_std, 3), "lesions": records,
    }
    if collapse > 0:
        collapse_box, collapse_params = _collapse_level(ct, labels, objects, frames[specs[0].level], collapse,
                                                        out, masks)
        params.update(collapse_params)
        touched.append(collapse_box)
    return _result(ct, labels, out, masks, _union(touched), params)


def random_focal_lesion(
    ct: Volume,
    labels: Volume,
    seed: int,
    levels: Sequence[int | str] | None = None,
    kinds: Sequence[str] | None = None,
) -> SimulatedLesion:
    """Focal lesions with randomly drawn count, levels, kinds, locations, sizes and collapse (dataset building).

    Draws: the count (1: 70 %, 2: 20 %, 3: 10 %); the main level among ``levels`` (default: every vertebra
    with at least 2 cm^3 of bone, the sacrum left out), further lesions at the main level (30 %) or another
    candidate within 3 levels; each kind uniformly among ``kinds`` (default :data:`FOCAL_KINDS`); each
    location body 60 %, pedicle 20 %, posterior 20 %; sizes uniform in [0.35, 0.7]; a collapse of the main
    level in 20 % of cases (uniform in [0.1, 0.4], not at C1). A main level that cannot hold the lesions is
    skipped for the next candidate.
    """
    _check_volumes(ct, labels)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise SpineInpaintError(f"seed must be an integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    objects = lesions._label_boxes(labels.array)
    kind_pool = list(FOCAL_KINDS) if kinds is None else [str(k) for k in kinds]
    unknown = [k for k in kind_pool if k not in FOCAL_KINDS]
    if unknown or not kind_pool:
        raise SpineInpaintError(f"unknown focal lesion kind '{unknown[0] if unknown else ''}' "
                                f"(expected one of {', '.join(FOCAL_KINDS)})")
    if levels is None:
        candidates = _eligible_levels(labels, objects)
        if not candidates:
            raise SpineInpaintError("no vertebra with at least 2 cm^3 of labelled bone in the label map")
    else:
        candidates = [lesions._resolve_level(level, labels, objects) for level in levels]
    count = int(rng.choice(list(_COUNT_WEIGHTS), p=list(_COUNT_WEIGHTS.values())))
    kind_list = [str(k) for k in rng.choice(kind_pool, count)]
    location_list = [str(x) for x in rng.choice(LOCATIONS, count, p=_LOCATION_WEIGHTS)]
    size_list = [float(s) for s in rng.uniform(0.35, 0.7, count)]
    collapse = float(rng.uniform(0.1, 0.4)) if rng.random() < 0.2 else 0.0
    sim_seed = int(rng.integers(0, 2**31 - 1))
    errors = []
    for main in rng.permutation(candidates):
        level_list = [int(main)] + _further_levels(rng, candidates, int(main), count)
        try:
            return simulate_focal_lesions(ct, labels, sim_seed, levels=level_list, count=count, kinds=kind_list,
                                          locations=location_list, sizes=size_list,
                                          collapse=collapse if int(main) != _C1 else 0.0)
        except SpineInpaintError as err:
            errors.append(str(err))
    raise SpineInpaintError(f"no level could hold the focal lesions: {errors[-1]}")


#: Random lesion simulators by name: ``simulator(ct, labels, seed, levels=None) -> SimulatedLesion``.
SIMULATORS: dict[str, Callable[..., SimulatedLesion]] = {"classic": lesions.random_lesion,
                                                         "focal": random_focal_lesion}


def random_lesion_from(simulator: str, ct: Volume, labels: Volume, seed: int,
                       levels: Sequence[int | str] | None = None) -> SimulatedLesion:
    """A random lesion from the simulator named ``simulator`` (a key of :data:`SIMULATORS`).

    ``params["simulator"]`` names the simulator in every result (set to ``'classic'`` for the classic one,
    whose own params do not say it), so that manifests and evaluations can tell them apart.

    Raises
    ------
    SpineInpaintError
        An unknown simulator name, or what the simulator raises.
    """
    if simulator not in SIMULATORS:
        raise SpineInpaintError(f"unknown lesion simulator '{simulator}' (expected one of {', '.join(SIMULATORS)})")
    result = SIMULATORS[simulator](ct, labels, seed, levels=levels)
    result.params.setdefault("simulator", simulator)
    return result
