"""Geometry of a vertebra for the lesion simulator: its local frame, spine axis, cortex, working box, the
collapse deformation and the boxes around the result."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.labels import (
    is_vertebra,
    vertebra_name,
)

#: Margin (mm) around the vertebra's bounding box inside which everything is computed.
_MARGIN_MM = 30.0


# --- the local frame and the vertebral body -------------------------------------------------------
@dataclasses.dataclass
class _Region:
    """The working box of the volume and the local frame's coordinates (mm) of its voxels."""

    slices: tuple[slice, slice, slice]
    centre: np.ndarray  # LPS mm of the frame origin (the vertebra's centroid)
    axes: np.ndarray  # rows: lateral u, anterior v, superior w (LPS unit vectors)
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _index_matrix(volume: Volume) -> np.ndarray:
    """3x3 matrix mapping an array index step ``(dz, dy, dx)`` to an LPS displacement in mm."""
    return (volume.direction @ np.diag(volume.spacing))[:, ::-1]


def _centroid_lps(volume: Volume, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    index = np.argwhere(mask).mean(axis=0) + np.asarray(offset)
    return volume.index_to_physical(index)[0]


def _local_coordinates(volume: Volume, slices, centre: np.ndarray, axes: np.ndarray):
    """Coordinates (mm) along each frame axis of every voxel in ``slices``, as float32 arrays."""
    step = _index_matrix(volume)  # columns: LPS step per array axis (z, y, x)
    start = volume.index_to_physical([[s.start for s in slices]])[0] - centre
    grids = [np.arange(s.stop - s.start, dtype=np.float32) for s in slices]
    out = []
    for axis in axes:
        per_axis = step.T @ axis  # mm along `axis` per step of z, y, x
        coordinate = (
            np.float32(start @ axis)
            + np.float32(per_axis[0]) * grids[0][:, None, None]
            + np.float32(per_axis[1]) * grids[1][None, :, None]
            + np.float32(per_axis[2]) * grids[2][None, None, :]
        )
        out.append(coordinate.astype(np.float32))
    return out


def _spine_axis(volume: Volume, labels: np.ndarray, level: int, objects, centre: np.ndarray) -> np.ndarray:
    """Unit LPS vector pointing cranially along the spine at ``level`` (ids grow cranially).

    The tangent through the centroids of the labelled neighbours; a neighbour cut by the volume's
    border is not used (its centroid is biased towards whatever part of it is in the scan), and a
    tangent more than 45 degrees off patient superior is not trusted. Patient superior (LPS +z)
    is the fallback.
    """
    patient_superior = np.array([0.0, 0.0, 1.0])

    def centroid(label: int) -> np.ndarray | None:
        if not is_vertebra(label) or label > len(objects) or objects[label - 1] is None:
            return None
        box = objects[label - 1]
        if any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape)):
            return None
        return _centroid_lps(volume, labels[box] == label, [s.start for s in box])

    above, below = centroid(level + 1), centroid(level - 1)
    if above is not None and below is not None:
        axis = above - below
    elif above is not None:
        axis = above - centre
    elif below is not None:
        axis = centre - below
    else:
        return patient_superior
    if np.linalg.norm(axis) < 1e-3 or _unit(axis) @ patient_superior < math.cos(math.radians(45.0)):
        return patient_superior
    return _unit(axis)


def _opened_core(vert: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The vertebra's thick core: the component holding the deepest voxel of its morphological
    opening by a ball of half the largest inscribed radius (pedicles and the arch are thinner)."""
    depth = ndimage.distance_transform_edt(vert, sampling=spacing_zyx)
    radius = 0.5 * float(depth.max())
    eroded = depth > radius
    if not eroded.any():
        return vert.copy()
    opened = ndimage.distance_transform_edt(~eroded, sampling=spacing_zyx) <= radius
    opened &= vert
    components, _ = ndimage.label(opened)
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return components == components[deepest]


def _working_box(volume: Volume, box, margin_mm: float) -> tuple[slice, slice, slice]:
    slices = []
    for s, spacing, n in zip(box, volume.spacing_zyx, volume.shape):
        pad = int(math.ceil(margin_mm / spacing))
        slices.append(slice(max(0, s.start - pad), min(n, s.stop + pad)))
    return tuple(slices)  # type: ignore[return-value]


def _ray_exit(vert: np.ndarray, region: _Region, volume: Volume, start: np.ndarray, direction: np.ndarray,
              max_mm: float) -> float:
    """Distance (mm) from ``start`` (local frame) along ``direction`` (local frame) to leave ``vert``."""
    step = min(volume.spacing) / 2.0
    to_index = np.linalg.inv(_index_matrix(volume))
    origin_index = np.array([s.start for s in region.slices], dtype=float)
    last_inside = 0.0
    for t in np.arange(0.0, max_mm, step):
        lps = region.centre + (start + t * direction) @ region.axes
        index = np.rint(to_index @ (lps - volume.origin) - origin_index).astype(int)
        if np.any(index < 0) or np.any(index >= vert.shape):
            break
        if vert[tuple(index)]:
            last_inside = t
    return last_inside


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _ellipsoid_erosion(mask: np.ndarray, radius_mm: float, spacing_zyx) -> np.ndarray:
    """Erode by an ellipsoid of ``radius_mm`` (at least one voxel along every axis)."""
    radii = [max(1, int(round(radius_mm / s))) for s in spacing_zyx]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    ball = sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1.0
    return ndimage.binary_erosion(mask, structure=ball, border_value=0)


@dataclasses.dataclass
class _Geometry:
    """The vertebra in its working box: mask, local frame, body and its extents in the frame (mm)."""

    region: _Region
    vert: np.ndarray
    body: np.ndarray
    lo: np.ndarray  # (u, v, w) minimum of the body
    hi: np.ndarray  # (u, v, w) maximum of the body
    half: np.ndarray  # body half-extents (mm), half a voxel added for the voxels' own size
    anterior_from: str

    @property
    def body_centre(self) -> np.ndarray:
        return (self.lo + self.hi) / 2.0


def _vertebra_geometry(ct: Volume, label_array: np.ndarray, objects, level: int, slices) -> _Geometry:
    """Local frame and vertebral body of ``level`` (see the module docstring for the choices)."""
    spacing = ct.spacing_zyx
    name = vertebra_name(level)
    vert = np.asarray(label_array[slices]) == level
    offset = [s.start for s in slices]
    centroid = _centroid_lps(ct, vert, offset)
    superior = _spine_axis(ct, label_array, level, objects, centroid)

    core = _opened_core(vert, spacing)
    patient = np.array([0.0, -1.0, 0.0])  # patient anterior in LPS
    patient = _unit(patient - (patient @ superior) * superior)
    anterior = _centroid_lps(ct, core, offset) - centroid
    anterior -= (anterior @ superior) * superior
    from_shape = np.linalg.norm(anterior) >= 1.0 and float(_unit(anterior) @ patient) >= math.cos(
        math.radians(75.0)
    )
    anterior = _unit(anterior) if from_shape else patient
    axes = np.stack([np.cross(anterior, superior), anterior, superior])
    u, v, w = _local_coordinates(ct, slices, centroid, axes)
    region = _Region(slices, centroid, axes, u, v, w)

    body = vert & (v >= float(np.percentile(v[core], 2.0)))  # anterior of the core's posterior wall
    lo = np.array([u[body].min(), v[body].min(), w[body].min()])
    hi = np.array([u[body].max(), v[body].max(), w[body].max()])
    half = (hi - lo) / 2.0 + 0.5 * min(spacing)
    # A body must span at least two voxels (and 5 mm) each way from its centre: a sliver of a
    # vertebra cut by the scan's border cannot hold a lesion with a boundary.
    if np.any(half < max(5.0, 2.0 * max(spacing))) or int(body.sum()) < 27:
        raise SpineInpaintError(
            f"vertebra {name} (id {level}) is too small in this scan for a lesion (body half-extents "
            f"{', '.join(f'{h:.1f}' for h in half)} mm, {int(body.sum())} voxels)"
        )
    return _Geometry(region, vert, body, lo, hi, half, "vertebra shape" if from_shape else "patient (LPS -y)")


def _component_at(mask: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` holding the voxel of smallest ``q`` (the blob's centre)."""
    if not mask.any():
        return mask
    components, _ = ndimage.label(mask)
    centre = np.unravel_index(int(np.argmin(np.where(mask, q, np.inf))), q.shape)
    return components == components[centre]


def _component_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Components of ``mask`` that touch ``seed`` (6-connected)."""
    if not mask.any() or not seed.any():
        return np.zeros_like(mask)
    components, _ = ndimage.label(mask)
    touching = np.unique(components[ndimage.binary_dilation(seed) & mask])
    return np.isin(components, touching[touching > 0])


# --- collapse and boxes ----------------------------------------------------------------------------
def _collapse(ct: Volume, geo: _Geometry, lab: np.ndarray, level: int, collapse: float, image: np.ndarray):
    """Compress the body along the spine axis and stretch the disc above into the freed space.

    In the body's footprint (its outline in the lateral-anterior plane, feathered over 3 mm) a
    point at height ``w`` takes the value found at ``src(w)``: the body ``[w0, w1]`` maps onto
    ``[w0, w1 - c H]`` and the disc above ``[w1, w2]`` (up to the next vertebra, at most 15 mm)
    onto ``[w1 - c H, w2]``. Returns the deformed image, a function deforming masks the same way,
    and JSON-ready parameters.
    """
    region, body = geo.region, geo.body
    u, v, w = region.u, region.v, region.w
    w0, w1 = float(geo.lo[2]), float(geo.hi[2])
    height = w1 - w0
    top = w1 - collapse * height
    above = lab == level + 1
    footprint_cell = min(ct.spacing)
    # Footprint: rasterise the body's (u, v) onto a 2D grid, close it and feather it.
    uu, vv = u[body], v[body]
    u_min, v_min = float(uu.min()) - 6.0, float(vv.min()) - 6.0
    nu = int(math.ceil((float(uu.max()) + 6.0 - u_min) / footprint_cell)) + 1
    nv = int(math.ceil((float(vv.max()) + 6.0 - v_min) / footprint_cell)) + 1
    grid = np.zeros((nu, nv), dtype=bool)
    grid[((uu - u_min) / footprint_cell).astype(int), ((vv - v_min) / footprint_cell).astype(int)] = True
    grid = ndimage.binary_fill_holes(ndimage.binary_closing(grid, iterations=2))
    feather = np.clip(1.0 - ndimage.distance_transform_edt(~grid) * footprint_cell / 3.0, 0.0, 1.0)
    cell_u = np.floor((u - u_min) / footprint_cell).astype(int)
    cell_v = np.floor((v - v_min) / footprint_cell).astype(int)
    on_grid = (cell_u >= 0) & (cell_u < nu) & (cell_v >= 0) & (cell_v < nv)
    weight = np.where(on_grid, feather[np.clip(cell_u, 0, nu - 1), np.clip(cell_v, 0, nv - 1)], 0.0)
    weight = weight.astype(np.float32)

    gap = 8.0
    if above.any():
        in_print = above & (weight > 0.5)
        if in_print.any():
            gap = float(np.clip(w[in_print].min() - w1, 2.0, 15.0))
    w2 = w1 + gap
    src = w.copy()
    lower = (w >= w0) & (w <= top)
    src[lower] = w0 + (w[lower] - w0) / (1.0 - collapse)
    upper = (w > top) & (w <= w2)
    src[upper] = w1 + (w[upper] - top) * (w2 - w1) / (w2 - top)
    shift = (src - w) * weight  # mm along the superior axis

    # Index displacement of one mm along the superior axis, in array order (z, y, x).
    per_mm = np.linalg.solve(_index_matrix(ct), region.axes[2])
    grid_index = np.indices(image.shape, dtype=np.float32)
    coords = [grid_index[k] + shift * np.float32(per_mm[k]) for k in range(3)]
    moved_image = ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(image.dtype)
    untouched = shift == 0
    moved_image[untouched] = image[untouched]

    def move(mask: np.ndarray) -> np.ndarray:
        out = ndimage.map_coordinates(mask.astype(np.float32), coords, order=0, mode="nearest") > 0.5
        out[untouched] = mask[untouched]
        return out

    params = {"collapse_height_mm": round(height, 3), "collapse_lost_mm": round(collapse * height, 3),
              "collapse_disc_span_mm": round(gap, 3)}
    return moved_image, move, params


def _boxes(volume: Volume, mask: np.ndarray, offset: Sequence[int]):
    """Per-slice 2D boxes, the 3D box and its LPS corners around ``mask`` (a window at ``offset``)."""
    if not mask.any():
        raise SpineInpaintError("the simulated lesion is empty")
    oz, oy, ox = (int(o) for o in offset)
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        rows = np.flatnonzero(mask[z].any(axis=1)) + oy
        cols = np.flatnonzero(mask[z].any(axis=0)) + ox
        boxes[int(z) + oz] = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    start = [int(s.start) + o for s, o in zip(box, offset)]
    stop = [int(s.stop) + o for s, o in zip(box, offset)]
    box_3d = tuple(start) + tuple(stop)
    # The eight corners of the box's outer voxel faces, in LPS.
    corners = np.array([[a, b, c] for a in (start[0] - 0.5, stop[0] - 0.5)
                        for b in (start[1] - 0.5, stop[1] - 0.5) for c in (start[2] - 0.5, stop[2] - 0.5)])
    lps = volume.index_to_physical(corners)
    box_lps = (tuple(float(x) for x in lps.min(axis=0)), tuple(float(x) for x in lps.max(axis=0)))
    return boxes, box_3d, box_lps  # type: ignore[return-value]
