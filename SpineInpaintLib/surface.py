"""Watertight surfaces of masks and vertebra label maps, in LPS millimetres, and STL files.

The surface is made the way Slicer's closed-surface conversion of a binary label map makes it, so
that our STL and the one Slicer's segmentation export writes for the same mask agree:

1. the mask is cropped to its bounding box and padded by one empty voxel, so that the surface
   closes where the mask touches the volume's border;
2. discrete flying edges (a marching-cubes variant) runs in *index* space, which puts every vertex
   on a face of the voxel grid, i.e. exactly at the mask's boundary;
3. optional decimation (``vtkDecimatePro`` with topology preserved) in index space;
4. windowed-sinc smoothing (Taubin's low-pass filter, ``20 + 40 * smoothing`` iterations, pass band
   ``10 ** (-4 * smoothing)``, normalised coordinates, boundary and feature-edge smoothing off):
   it removes the voxel staircase while barely changing the enclosed volume. Its weights do not
   depend on the coordinates, so smoothing in index space equals smoothing in millimetres;
5. the index -> LPS matrix of the volume (``Volume.ijk_to_lps``: origin, spacing and direction)
   moves the surface into patient space;
6. normals are made consistent and pointing outwards (whatever the sign of the direction matrix's
   determinant), and triangle order follows them;
7. components enclosing less than a voxel are dropped: a voxel touching the rest only by an edge or
   a corner makes a surface of its own that smoothing shrinks to a speck (Slicer keeps those).

Defaults follow Slicer's ``vtkBinaryLabelmapToClosedSurfaceConversionRule``: smoothing 0.5, no
decimation. STL files are binary, in LPS millimetres, with ``SPACE=LPS`` in the 80-byte header,
as Slicer writes them and reads them back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as _labels
from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.io import Volume

__all__ = [
    "SPINE_NAME", "DEFAULT_SMOOTHING", "DEFAULT_DECIMATION", "transform_polydata", "polydata_arrays",
    "mask_to_polydata", "spine_surfaces", "mesh_checks", "is_watertight", "stl_header", "write_stl", "read_stl",
    "surface_report",
]

logger = logging.getLogger(__name__)

#: Key of the whole-spine surface in :func:`spine_surfaces` (the name of the model in Slicer).
SPINE_NAME = "Spine"

#: Slicer's default smoothing factor of the closed-surface conversion (0 none ... 1 strong).
DEFAULT_SMOOTHING = 0.5

#: Slicer's default decimation factor (fraction of triangles removed).
DEFAULT_DECIMATION = 0.0

#: LPS <-> RAS: flip the first two axes.
_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- helpers ---------------------------------------------------------------------------------------
def _vtk_matrix(matrix: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    out = vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(matrix[i, j]))
    return out


def transform_polydata(polydata, matrix: np.ndarray):
    """A copy of ``polydata`` moved by a 4x4 homogeneous ``matrix`` (points and normals)."""
    from vtkmodules.vtkCommonDataModel import vtkPolyData
    from vtkmodules.vtkCommonTransforms import vtkTransform
    from vtkmodules.vtkFiltersGeneral import vtkTransformPolyDataFilter

    transform = vtkTransform()
    transform.SetMatrix(_vtk_matrix(np.asarray(matrix, dtype=float)))
    moved = vtkTransformPolyDataFilter()
    moved.SetTransform(transform)
    moved.SetInputData(polydata)
    moved.Update()
    out = vtkPolyData()
    out.DeepCopy(moved.GetOutput())
    return out


def polydata_arrays(polydata) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(N, 3)`` (float64, mm) and triangles ``(M, 3)`` (point ids) of a triangle mesh.

    Raises
    ------
    SpineInpaintError
        When the polygons are not all triangles (run ``vtkTriangleFilter`` first).
    """
    from vtkmodules.util import numpy_support

    n_points = polydata.GetNumberOfPoints()
    points = (numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
              if n_points else np.zeros((0, 3)))
    polys = polydata.GetPolys()
    if polys is None or polys.GetNumberOfCells() == 0:
        return points, np.zeros((0, 3), dtype=np.int64)
    offsets = numpy_support.vtk_to_numpy(polys.GetOffsetsArray())
    if np.any(np.diff(offsets) != 3):
        raise SpineInpaintError("the surface has polygons that are not triangles")
    connectivity = numpy_support.vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64)
    return points, connectivity.reshape(-1, 3)


def _binary_mask(mask: Volume, label: int | str | Iterable[int | str] | None) -> tuple[np.ndarray, str]:
    """The boolean mask to mesh and a short description of it (for error messages)."""
    array = np.asarray(mask.array)
    if label is None:
        return array > 0, "mask"
    if isinstance(label, (int, np.integer, str)):
        values = [_label_value(label)]
    else:
        values = [_label_value(v) for v in label]
        if not values:
            raise SpineInpaintError("no label values given to make a surface of")
    desc = "label " + ", ".join(str(v) for v in values)
    return np.isin(array, values), desc


def _label_value(label: int | str) -> int:
    if isinstance(label, str) and not label.strip().isdigit():
        try:
            return _labels.vertebra_id(label)
        except ValueError as err:
            raise SpineInpaintError(str(err)) from None
    return int(label)


def _padded_crop(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's bounding box with one empty voxel all round, and the ``(z, y, x)`` index of its
    first voxel in the full array (-1 where the pad lies outside it)."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(binary.any(axis=other))
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    core = binary[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    padded = np.zeros(tuple(n + 2 for n in core.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = core
    return padded, np.asarray(lo) - 1


# --- mask -> surface ---------------------------------------------------------------------------------
def mask_to_polydata(
    mask: Volume,
    label: int | str | Iterable[int | str] | None = None,
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    decimation: float = DEFAULT_DECIMATION,
    compute_normals: bool = True,
    min_component_voxels: float = 1.0,
):
    """A closed triangle surface of a mask (or of some labels of a label map) in LPS millimetres.

    Parameters
    ----------
    mask
        Binary mask or label map on any grid (spacing, origin and direction are honoured).
    label
        None: every non-zero voxel. An id (``29``), a vertebra name (``'L3'``) or several of
        them: the union of those labels (e.g. all vertebrae for one spine surface).
    smoothing
        0 (none, the voxel staircase) ... 1 (strong); the windowed-sinc pass band is
        ``10 ** (-4 * smoothing)`` (0.5 gives 0.01, Slicer's default).
    decimation
        Fraction of triangles to remove, 0 ... <1 (topology is kept, so it may remove fewer;
        where it would leave the surface open, non-manifold or inside out, less is removed, with a
        logged warning).
    compute_normals
        Add consistent, outward point normals (for shading); triangle order follows them always.
    min_component_voxels
        Drop closed components enclosing less than this many voxels' volume. A voxel that touches
        the rest of the mask only by an edge or a corner becomes a surface of its own, which
        smoothing shrinks to a speck: it cannot be printed, and STL's float32 coordinates turn it
        into degenerate triangles that readers drop, leaving holes. 0 keeps everything (as Slicer).

    Returns
    -------
    vtkPolyData
        Triangles in LPS mm; each connected part of the mask is a closed, manifold component.

    Raises
    ------
    SpineInpaintError
        An empty mask, or smoothing / decimation out of range.
    """
    from vtkmodules.vtkCommonDataModel import vtkPolyData

    if not 0.0 <= float(smoothing) <= 1.0:
        raise SpineInpaintError(f"smoothing must lie in [0, 1], got {smoothing}")
    if not 0.0 <= float(decimation) < 1.0:
        raise SpineInpaintError(f"decimation must lie in [0, 1), got {decimation}")
    binary, desc = _binary_mask(mask, label)
    if not binary.any():
        raise SpineInpaintError(f"the {desc} is empty: there is no surface to make")

    # Work in index space (spacing 1, identity direction) on the padded crop: VTK's contouring
    # ignores image directions, and the crop keeps large scans fast.
    padded, start_zyx = _padded_crop(binary)
    image = io.to_vtk_image(Volume(padded, origin=tuple(float(s) for s in start_zyx[::-1])))
    contour = _contour(image)
    index_to_lps = Volume(binary[:1, :1, :1], mask.spacing, mask.origin, mask.direction).ijk_to_lps()
    min_volume = float(min_component_voxels) * float(np.prod(mask.spacing))

    # Strong decimation can pinch the surface into non-manifold edges or fold it inside out; the
    # surface must stay printable, so the reduction is lowered until it does (none always does).
    targets = [float(decimation) * f for f in (1.0, 0.75, 0.5, 0.25)] + [0.0] if decimation > 0 else [0.0]
    for target in targets:
        surface = _smooth(_decimate(contour, target), float(smoothing))
        surface = _orient_outwards(transform_polydata(surface, index_to_lps), compute_normals)
        if min_volume > 0:
            surface = _drop_small_components(surface, min_volume)
        if target == 0.0:
            break
        checks = mesh_checks(surface)
        if checks["watertight"] and checks["outward"]:
            break
        logger.warning("decimation %.2f left the %s surface open, non-manifold or inside out; trying less",
                       target, desc)
    if surface.GetNumberOfPolys() == 0:
        raise SpineInpaintError(
            f"the {desc} holds no part larger than {min_component_voxels:g} voxels: "
            "there is no surface to make"
        )
    out = vtkPolyData()
    out.DeepCopy(surface)
    return out


def _contour(image):
    """Discrete flying edges of the voxels equal to 1: vertices at the centres of boundary faces."""
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

    contour = vtkDiscreteFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 1)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.Update()
    return contour.GetOutput()


def _decimate(surface, target: float):
    """Remove a fraction ``target`` of the triangles, keeping the topology (Slicer's settings)."""
    from vtkmodules.vtkFiltersCore import vtkDecimatePro

    if target <= 0:
        return surface
    decimate = vtkDecimatePro()
    decimate.SetInputData(surface)
    decimate.SetTargetReduction(target)
    decimate.PreserveTopologyOn()
    decimate.SplittingOff()
    decimate.SetFeatureAngle(60.0)
    decimate.SetMaximumError(1.0)
    decimate.Update()
    return decimate.GetOutput()


def _smooth(surface, smoothing: float):
    """Windowed-sinc low-pass smoothing; ``smoothing`` in [0, 1] as in Slicer's conversion."""
    from vtkmodules.vtkFiltersCore import vtkWindowedSincPolyDataFilter

    if smoothing <= 0:
        return surface
    smooth = vtkWindowedSincPolyDataFilter()
    smooth.SetInputData(surface)
    # Stronger smoothing needs more iterations to converge (Slicer 5: 20 + 40 * factor).
    smooth.SetNumberOfIterations(int(20 + 40 * smoothing))
    smooth.SetPassBand(10.0 ** (-4.0 * smoothing))
    smooth.BoundarySmoothingOff()
    smooth.FeatureEdgeSmoothingOff()
    smooth.NonManifoldSmoothingOn()
    smooth.NormalizeCoordinatesOn()  # the pass band then means the same at any scale
    smooth.Update()
    return smooth.GetOutput()


def _orient_outwards(polydata, compute_normals: bool):
    """Consistent triangle order with normals pointing out of each closed component."""
    from vtkmodules.vtkFiltersCore import vtkPolyDataNormals

    normals = vtkPolyDataNormals()
    normals.SetInputData(polydata)
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()  # needs closed components, which the padding guarantees
    normals.SplittingOff()  # smooth shading: no sharp features survive smoothing anyway
    normals.SetComputePointNormals(bool(compute_normals))
    normals.ComputeCellNormalsOff()
    normals.Update()
    return normals.GetOutput()


def _drop_small_components(polydata, min_volume_mm3: float):
    """``polydata`` without the closed components that enclose less than ``min_volume_mm3``."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkFiltersCore import (
        vtkCleanPolyData,
        vtkPolyDataConnectivityFilter,
    )

    regions = vtkPolyDataConnectivityFilter()
    regions.SetInputData(polydata)
    regions.SetExtractionModeToAllRegions()
    regions.ColorRegionsOn()
    regions.Update()
    n_regions = regions.GetNumberOfExtractedRegions()
    if n_regions <= 1:
        return polydata
    labelled = regions.GetOutput()
    region_of_point = numpy_support.vtk_to_numpy(labelled.GetPointData().GetArray("RegionId"))
    points, tris = polydata_arrays(labelled)
    region_of_cell = region_of_point[tris[:, 0]]
    a, b, c = points[tris[:, 0]], points[tris[:, 1]], points[tris[:, 2]]
    volume = np.bincount(region_of_cell, np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0, n_regions)
    keep = np.flatnonzero(np.abs(volume) >= min_volume_mm3)
    if len(keep) == n_regions:
        return polydata
    chosen = vtkPolyDataConnectivityFilter()
    chosen.SetInputData(polydata)
    chosen.SetExtractionModeToSpecifiedRegions()
    for region in keep:
        chosen.AddSpecifiedRegion(int(region))
    clean = vtkCleanPolyData()  # drops the points only the removed components used
    clean.SetInputConnection(chosen.GetOutputPort())
    clean.PointMergingOff()
    clean.Update()
    return clean.GetOutput()


def spine_surfaces(
    labels: Volume,
    levels: Sequence[int | str] | None = None,
    *,
    whole_spine: bool = True,
    smoothing: float = DEFAULT_SMOOTHING,
    decimation: float = DEFAULT_DECIMATION,
) -> dict[str, object]:
    """Surfaces of a vertebra label map: the whole spine and one per vertebra.

    Parameters
    ----------
    labels
        Label map with TotalSegmentator v2 vertebra ids (25-50); other labels are ignored.
    levels
        Vertebrae (ids or names) that get a surface of their own; default every vertebra present.
    whole_spine
        Add :data:`SPINE_NAME`: one surface of the union of every vertebra present (touching
        vertebrae merge, so it never has intersecting parts, which a printer needs).

    Returns
    -------
    dict
        ``{'Spine': polydata, 'L3': polydata, ...}``, the spine first, then caudal to cranial.

    Raises
    ------
    SpineInpaintError
        No vertebra in the label map (no spine), or a requested level absent from it.
    """
    array = np.asarray(labels.array)
    present = [int(v) for v in np.unique(array) if _labels.is_vertebra(int(v))]
    if not present:
        raise SpineInpaintError("the label map holds no vertebra (ids 25-50): no spine to make a surface of")
    if levels is None:
        chosen = present
    else:
        chosen = []
        for level in levels:
            value = _label_value(level)
            if not _labels.is_vertebra(value):
                raise SpineInpaintError(f"{level} is not a vertebra id (25-50)")
            if value not in present:
                raise SpineInpaintError(
                    f"vertebra {_labels.vertebra_name(value)} is not in the label map "
                    f"(present: {', '.join(_labels.vertebra_name(v) for v in present)})"
                )
            chosen.append(value)
    out: dict[str, object] = {}
    if whole_spine:
        out[SPINE_NAME] = mask_to_polydata(labels, present, smoothing=smoothing, decimation=decimation)
    for value in sorted(set(chosen)):
        out[_labels.vertebra_name(value)] = mask_to_polydata(
            labels, value, smoothing=smoothing, decimation=decimation
        )
    return out


# --- checks ------------------------------------------------------------------------------------------
def _edge_count(polydata, boundary: bool) -> int:
    from vtkmodules.vtkFiltersCore import vtkFeatureEdges

    edges = vtkFeatureEdges()
    edges.SetInputData(polydata)
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.SetBoundaryEdges(boundary)
    edges.SetNonManifoldEdges(not boundary)
    edges.ColoringOff()
    edges.Update()
    return int(edges.GetOutput().GetNumberOfLines())


def _region_count(polydata) -> int:
    from vtkmodules.vtkFiltersCore import vtkPolyDataConnectivityFilter

    connectivity = vtkPolyDataConnectivityFilter()
    connectivity.SetInputData(polydata)
    connectivity.SetExtractionModeToAllRegions()
    connectivity.Update()
    return int(connectivity.GetNumberOfExtractedRegions())


def mesh_checks(polydata) -> dict:
    """What a surface is made of and whether it can be printed (closed, manifold, outward).

    Returns
    -------
    dict
        JSON-ready: ``points``, ``triangles``, ``boundary_edges`` (edges of one triangle: holes),
        ``non_manifold_edges`` (edges of three or more), ``closed``, ``manifold``, ``watertight``
        (both, and not empty), ``regions`` (connected components), ``euler_characteristic``
        (V - E + F; 2 per closed component without handles, 0 for a ring such as a vertebra with
        its canal), ``outward`` (the signed enclosed volume is positive), ``volume_ml`` and
        ``area_mm2`` (``vtkMassProperties``), ``signed_volume_ml``, ``bounds_lps``
        (``[[xmin, xmax], [ymin, ymax], [zmin, zmax]]`` in mm).
    """
    from vtkmodules.vtkFiltersCore import vtkMassProperties, vtkTriangleFilter

    if polydata is None or polydata.GetNumberOfPoints() == 0 or polydata.GetNumberOfPolys() == 0:
        return {
            "points": 0, "triangles": 0, "boundary_edges": 0, "non_manifold_edges": 0, "closed": False,
            "manifold": False, "watertight": False, "regions": 0, "euler_characteristic": 0,
            "outward": False, "volume_ml": 0.0, "signed_volume_ml": 0.0, "area_mm2": 0.0,
            "bounds_lps": None,
        }
    triangles = vtkTriangleFilter()
    triangles.SetInputData(polydata)
    triangles.PassVertsOff()
    triangles.PassLinesOff()
    triangles.Update()
    mesh = triangles.GetOutput()
    points, tris = polydata_arrays(mesh)

    boundary = _edge_count(mesh, boundary=True)
    non_manifold = _edge_count(mesh, boundary=False)
    edges = np.sort(tris[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    n_edges = len(np.unique(edges[:, 0] * (len(points) + 1) + edges[:, 1]))
    used_points = len(np.unique(tris))
    # Signed volume by the divergence theorem: positive when the triangles wind outwards.
    a, b, c = points[tris[:, 0]], points[tris[:, 1]], points[tris[:, 2]]
    signed = float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)
    mass = vtkMassProperties()
    mass.SetInputData(mesh)
    mass.Update()
    closed, manifold = boundary == 0, non_manifold == 0
    bounds = np.asarray(mesh.GetBounds()).reshape(3, 2)
    return {
        "points": int(used_points),
        "triangles": int(len(tris)),
        "boundary_edges": boundary,
        "non_manifold_edges": non_manifold,
        "closed": bool(closed),
        "manifold": bool(manifold),
        "watertight": bool(closed and manifold and len(tris) > 0),
        "regions": _region_count(mesh),
        "euler_characteristic": int(used_points - n_edges + len(tris)),
        "outward": bool(signed > 0),
        "volume_ml": float(mass.GetVolume()) / 1000.0,
        "signed_volume_ml": signed / 1000.0,
        "area_mm2": float(mass.GetSurfaceArea()),
        "bounds_lps": bounds.tolist(),
    }


def is_watertight(polydata) -> bool:
    """True for a non-empty surface without holes (boundary edges) and without non-manifold edges."""
    return bool(mesh_checks(polydata)["watertight"])


# --- STL ---------------------------------------------------------------------------------------------
def stl_header(path: str | os.PathLike) -> str:
    """The 80-byte header of a binary STL (or the first line of an ASCII one), as text."""
    with open(path, "rb") as handle:
        head = handle.read(80)
    if head.lstrip().lower().startswith(b"solid"):
        head = head.splitlines()[0] if head else head
    return head.split(b"\0")[0].decode("ascii", errors="replace").strip()


def _space_of_header(header: str) -> str | None:
    """'LPS' or 'RAS' from a ``SPACE=...`` tag in a header (Slicer's convention), else None."""
    upper = header.upper()
    at = upper.find("SPACE=")
    if at < 0:
        return None
    value = upper[at + 6:at + 9]
    return value if value in ("LPS", "RAS") else None


def write_stl(
    polydata,
    path: str | os.PathLike,
    *,
    coordinate_system: str = "LPS",
    allow_open: bool = False,
    binary: bool = True,
) -> Path:
    """Write a surface (LPS millimetres) to an STL file, as Slicer writes STL.

    The file is written next to ``path`` under a temporary name and moved into place, so a failed
    write never leaves a partial file.

    Parameters
    ----------
    polydata
        Triangle surface in LPS mm (what :func:`mask_to_polydata` makes).
    coordinate_system
        Coordinates of the file: 'LPS' (Slicer's default for STL) or 'RAS'; written in the header
        as ``SPACE=LPS`` / ``SPACE=RAS``, which Slicer reads.
    allow_open
        Write a surface that is not closed and manifold (refused by default: it cannot be printed).
    binary
        Binary STL (default) or ASCII.

    Raises
    ------
    SpineInpaintError
        An empty surface, an open or non-manifold one (unless ``allow_open``), a bad coordinate
        system or file name, or a failed write.
    """
    from vtkmodules.vtkFiltersCore import vtkTriangleFilter
    from vtkmodules.vtkIOGeometry import vtkSTLWriter

    path = Path(path)
    if path.suffix.lower() != ".stl":
        raise SpineInpaintError(f"cannot write {path.name}: an STL file name must end in .stl")
    system = str(coordinate_system).upper()
    if system not in ("LPS", "RAS"):
        raise SpineInpaintError(f"coordinate_system must be 'LPS' or 'RAS', got '{coordinate_system}'")
    checks = mesh_checks(polydata)
    if checks["triangles"] == 0:
        raise SpineInpaintError(f"refusing to write {path.name}: the surface is empty")
    if not checks["watertight"] and not allow_open:
        raise SpineInpaintError(
            f"refusing to write {path.name}: the surface is not closed and manifold "
            f"({checks['boundary_edges']} boundary edges, {checks['non_manifold_edges']} non-manifold edges)"
        )
    surface = polydata if system == "LPS" else transform_polydata(polydata, _FLIP_XY)
    triangles = vtkTriangleFilter()
    triangles.SetInputData(surface)
    triangles.PassVertsOff()
    triangles.PassLinesOff()
    writer = vtkSTLWriter()
    writer.SetInputConnection(triangles.GetOutputPort())
    writer.SetHeader(f"SpineInpaint output. SPACE={system}")
    if binary:
        writer.SetFileTypeToBinary()
    else:
        writer.SetFileTypeToASCII()

    def write(temporary: str) -> None:
        writer.SetFileName(temporary)
        if writer.Write() != 1 or os.path.getsize(temporary) < 84:
            raise SpineInpaintError(f"could not write {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def read_stl(path: str | os.PathLike, *, default_coordinate_system: str = "LPS"):
    """Read an STL file into a surface in LPS millimetres (points merged).

    The file's coordinate system comes from a ``SPACE=LPS`` / ``SPACE=RAS`` tag in its header, as
    Slicer writes it; without one, ``default_coordinate_system`` is assumed (Slicer assumes LPS).
    """
    from vtkmodules.vtkCommonDataModel import vtkPolyData
    from vtkmodules.vtkIOGeometry import vtkSTLReader

    path = Path(path)
    if not path.is_file():
        raise SpineInpaintError(f"file not found: {path}")
    default = str(default_coordinate_system).upper()
    if default not in ("LPS", "RAS"):
        raise SpineInpaintError(
            f"coordinate system must be 'LPS' or 'RAS', got '{default_coordinate_system}'"
        )
    reader = vtkSTLReader()
    reader.SetFileName(str(path))
    reader.MergingOn()
    reader.Update()
    surface = reader.GetOutput()
    if surface.GetNumberOfPolys() == 0:
        raise SpineInpaintError(f"{path} holds no triangles (not an STL file, or an empty one)")
    system = _space_of_header(stl_header(path)) or default
    if system == "RAS":
        return transform_polydata(surface, _FLIP_XY)
    out = vtkPolyData()
    out.DeepCopy(surface)
    return out


def surface_report(surfaces: Mapping[str, object]) -> dict[str, dict]:
    """:func:`mesh_checks` of every surface, by name (for ``report.json``)."""
    return {name: mesh_checks(polydata) for name, polydata in surfaces.items()}
