"""surface: closed, manifold surfaces in LPS millimetres, STL files as Slicer writes them.

Checked against hand-computed geometry (a voxelised sphere on an oblique, anisotropic, offset
grid; a blob at a known LPS position), against Slicer's own closed-surface export of the same mask
(slicer-core), and on the real scan's vertebrae.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError, surface
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as labels_mod
from SpineInpaintLib.data.real import load_real_case

RADIUS = 12.0


# --- helpers -------------------------------------------------------------------------------------
def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def sphere_mask(direction: np.ndarray) -> tuple[io.Volume, np.ndarray]:
    """A ball of radius RADIUS mm voxelised on an anisotropic, offset grid; returns it and its LPS centre."""
    grid = io.Volume(np.zeros((40, 50, 60), np.uint8), spacing=(0.8, 1.1, 1.6), origin=(-30.0, 120.0, -400.0),
                     direction=direction)
    centre = grid.index_to_physical([20.0, 24.0, 30.3])[0]  # off the voxel centres on purpose
    zyx = np.indices(grid.shape).reshape(3, -1).T
    inside = np.linalg.norm(grid.index_to_physical(zyx) - centre, axis=1) <= RADIUS
    return grid.with_array(inside.reshape(grid.shape).astype(np.uint8)), centre


def face_extent(mask: io.Volume, where: np.ndarray) -> np.ndarray:
    """LPS bounding box [[min, max] x 3] of the centres of the outer faces of the voxels in ``where``:
    voxel centres +- half a voxel along each direction axis."""
    zyx = np.argwhere(where).astype(float)
    corners = []
    for axis in range(3):  # array axis; ITK axis 2 - axis
        for sign in (-0.5, 0.5):
            shifted = zyx.copy()
            shifted[:, axis] += sign
            corners.append(mask.index_to_physical(shifted))
    lps = np.concatenate(corners)
    return np.stack([lps.min(axis=0), lps.max(axis=0)], axis=1)


def polydata_from_arrays(points: np.ndarray, triangles: np.ndarray):
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData

    pts = vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    cells = vtkCellArray()
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)
    conn = np.ascontiguousarray(triangles, dtype=np.int64).ravel()
    offsets = numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True)
    conn = numpy_support.numpy_to_vtkIdTypeArray(conn, deep=True)
    cells.SetData(offsets, conn)
    out = vtkPolyData()
    out.SetPoints(pts)
    out.SetPolys(cells)
    return out


def edge_use_counts(triangles: np.ndarray) -> np.ndarray:
    """How many triangles use each undirected edge (an independent check of vtkFeatureEdges)."""
    edges = np.sort(triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return counts


def raw_stl_points(path) -> np.ndarray:
    """Points of an STL file exactly as stored (no coordinate conversion)."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkIOGeometry import vtkSTLReader

    reader = vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    return numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData()).astype(float)


@pytest.fixture(scope="module")
def oblique_sphere():
    """The ball on an oblique grid (rotated about two axes) and its surface with default settings."""
    mask, centre = sphere_mask(rotation(2, 25.0) @ rotation(0, 15.0))
    return mask, centre, surface.mask_to_polydata(mask)


@pytest.fixture(scope="module")
def spine_labels(real_case):
    _, lab = real_case
    vertebrae = np.where(np.isin(lab.array, labels_mod.VERTEBRA_IDS), lab.array, 0)
    return lab.with_array(vertebrae.astype(np.uint8))


# --- geometry of a voxelised ball ------------------------------------------------------------------
def test_sphere_surface_is_closed_manifold_outward_and_keeps_volume(oblique_sphere):
    mask, centre, polydata = oblique_sphere
    checks = surface.mesh_checks(polydata)
    assert checks["closed"] and checks["manifold"] and checks["watertight"]
    assert checks["regions"] == 1 and checks["euler_characteristic"] == 2  # one sphere
    assert checks["outward"] and checks["signed_volume_ml"] > 0
    exact = 4.0 / 3.0 * np.pi * RADIUS**3 / 1000.0
    voxels = mask.array.sum() * np.prod(mask.spacing) / 1000.0
    assert checks["volume_ml"] == pytest.approx(exact, rel=0.03)
    assert checks["volume_ml"] == pytest.approx(voxels, rel=0.02)
    # Windowed sinc is a low-pass filter that barely changes the enclosed volume.
    staircase = surface.mesh_checks(surface.mask_to_polydata(mask, smoothing=0.0))["volume_ml"]
    assert checks["volume_ml"] == pytest.approx(staircase, rel=0.01)
    assert checks["area_mm2"] == pytest.approx(4.0 * np.pi * RADIUS**2, rel=0.05)
    points, _ = surface.polydata_arrays(polydata)
    np.testing.assert_allclose(points.mean(axis=0), centre, atol=0.25)
    np.testing.assert_allclose(np.linalg.norm(points - centre, axis=1), RADIUS, atol=1.2)


def test_sphere_bounds_match_the_mask_extent(oblique_sphere):
    mask, _, polydata = oblique_sphere
    expected = face_extent(mask, mask.array > 0)
    got = np.asarray(surface.mesh_checks(polydata)["bounds_lps"])
    np.testing.assert_allclose(got, expected, atol=max(mask.spacing))  # within one voxel
    # Without smoothing every vertex is the centre of a boundary voxel face: the extent is exact.
    staircase = surface.mask_to_polydata(mask, smoothing=0.0)
    np.testing.assert_allclose(np.asarray(staircase.GetBounds()).reshape(3, 2), expected, atol=1e-4)


def test_mirrored_grid_still_gives_outward_normals():
    # A direction with determinant -1 (e.g. an LAS file) mirrors the index space.
    mask, centre = sphere_mask(np.diag([-1.0, 1.0, 1.0]) @ rotation(1, 10.0))
    checks = surface.mesh_checks(surface.mask_to_polydata(mask))
    assert checks["watertight"] and checks["outward"]
    assert checks["volume_ml"] == pytest.approx(4.0 / 3.0 * np.pi * RADIUS**3 / 1000.0, rel=0.03)


def test_mesh_checks_agree_with_hand_counts_on_rings_and_separate_parts():
    array = np.zeros((16, 30, 30), np.uint8)
    zz, yy, xx = np.indices(array.shape)
    r = np.hypot(yy - 14.5, xx - 14.5)
    array[(zz >= 4) & (zz < 12) & (r >= 5) & (r <= 11)] = 1  # a ring: genus 1
    mask = io.Volume(array, spacing=(0.5, 0.5, 1.0))
    ring = surface.mesh_checks(surface.mask_to_polydata(mask))
    assert ring["watertight"] and ring["regions"] == 1 and ring["euler_characteristic"] == 0

    balls = np.zeros((20, 20, 40), np.uint8)
    zz, yy, xx = np.indices(balls.shape)
    for cx in (10, 30):
        balls[(zz - 10) ** 2 + (yy - 10) ** 2 + (xx - cx) ** 2 <= 36] = 1
    two = surface.mask_to_polydata(io.Volume(balls))
    checks = surface.mesh_checks(two)
    assert checks["regions"] == 2 and checks["euler_characteristic"] == 4 and checks["watertight"]
    counts = edge_use_counts(surface.polydata_arrays(two)[1])
    assert np.all(counts == 2)  # every edge shared by exactly two triangles


def test_touching_specks_are_dropped_but_kept_on_request():
    array = np.zeros((12, 12, 12), np.uint8)
    array[2:8, 2:8, 2:8] = 1
    array[8, 8, 8] = 1  # touches the cube by a corner only: a separate, collapsing surface
    mask = io.Volume(array)
    assert surface.mesh_checks(surface.mask_to_polydata(mask))["regions"] == 1
    assert surface.mesh_checks(surface.mask_to_polydata(mask, min_component_voxels=0))["regions"] == 2
    only_speck = mask.with_array((np.indices(array.shape).sum(axis=0) == 24).astype(np.uint8))
    with pytest.raises(SpineInpaintError, match="no part larger than 1 voxels"):
        surface.mask_to_polydata(only_speck)


def test_decimation_removes_triangles_and_stays_printable(oblique_sphere, caplog):
    mask, _, full = oblique_sphere
    decimated = surface.mask_to_polydata(mask, decimation=0.5)
    full_checks, checks = surface.mesh_checks(full), surface.mesh_checks(decimated)
    assert checks["watertight"] and checks["outward"]
    assert checks["triangles"] <= 0.6 * full_checks["triangles"]
    assert checks["volume_ml"] == pytest.approx(full_checks["volume_ml"], rel=0.03)

    # A ragged mask where VTK's decimation pinches the surface: less is removed, with a warning.
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(size=(20, 22, 24)), 1.0 + rng.random())
    ragged = (field > np.quantile(field, 0.6 + 0.3 * rng.random())).astype(np.uint8)
    ragged[rng.random(ragged.shape) < 0.05] = 1
    with caplog.at_level(logging.WARNING, logger="SpineInpaintLib.surface"):
        result = surface.mask_to_polydata(io.Volume(ragged), decimation=0.5)
    assert surface.mesh_checks(result)["watertight"]
    assert "trying less" in caplog.text


# --- labels, errors --------------------------------------------------------------------------------
def test_labels_by_id_name_and_union(spine_labels):
    by_id = surface.mesh_checks(surface.mask_to_polydata(spine_labels, 29))
    by_name = surface.mesh_checks(surface.mask_to_polydata(spine_labels, "L3"))
    assert by_id == by_name
    pair = surface.mesh_checks(surface.mask_to_polydata(spine_labels, [29, "L2"]))
    l2 = surface.mesh_checks(surface.mask_to_polydata(spine_labels, 30))
    assert pair["volume_ml"] == pytest.approx(by_id["volume_ml"] + l2["volume_ml"], rel=0.03)


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    empty = io.Volume(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(SpineInpaintError, match="the mask is empty"):
        surface.mask_to_polydata(empty)
    labels = empty.with_array(np.full((5, 6, 7), 29, np.uint8))
    with pytest.raises(SpineInpaintError, match="label 40 is empty"):
        surface.mask_to_polydata(labels, 40)
    with pytest.raises(SpineInpaintError, match="unknown vertebra 'X9'"):
        surface.mask_to_polydata(labels, "X9")
    with pytest.raises(SpineInpaintError, match=r"smoothing must lie in \[0, 1\]"):
        surface.mask_to_polydata(labels, smoothing=1.5)
    with pytest.raises(SpineInpaintError, match=r"decimation must lie in \[0, 1\)"):
        surface.mask_to_polydata(labels, decimation=1.0)
    with pytest.raises(SpineInpaintError, match="no vertebra"):
        surface.spine_surfaces(empty.with_array(np.full((5, 6, 7), 5, np.uint8)))
    with pytest.raises(SpineInpaintError, match="vertebra L4 is not in the label map"):
        surface.spine_surfaces(labels, ["L4"])
    with pytest.raises(SpineInpaintError, match="file not found"):
        surface.read_stl(tmp_path / "missing.stl")
    not_stl = tmp_path / "notes.stl"
    not_stl.write_text("hello")
    with pytest.raises(SpineInpaintError, match="holds no triangles"):
        surface.read_stl(not_stl)


# --- STL ---------------------------------------------------------------------------------------------
def test_stl_round_trip_keeps_the_surface(oblique_sphere, tmp_path):
    _, _, polydata = oblique_sphere
    path = surface.write_stl(polydata, tmp_path / "ball.stl")
    assert path.stat().st_size == 84 + 50 * polydata.GetNumberOfPolys()  # binary STL
    assert surface.stl_header(path) == "SpineInpaint output. SPACE=LPS"
    assert [p.name for p in tmp_path.iterdir()] == ["ball.stl"]  # no temporary file left
    back = surface.read_stl(path)
    before, after = surface.mesh_checks(polydata), surface.mesh_checks(back)
    assert after["watertight"] and after["outward"]
    assert after["triangles"] == before["triangles"] and after["points"] == before["points"]
    assert after["volume_ml"] == pytest.approx(before["volume_ml"], rel=1e-5)
    np.testing.assert_allclose(after["bounds_lps"], before["bounds_lps"], atol=1e-4)  # float32 in STL

    # A RAS file holds x and y negated; read_stl turns it back into LPS.
    ras = surface.write_stl(polydata, tmp_path / "ball_ras.stl", coordinate_system="RAS", binary=False)
    assert "SPACE=RAS" in surface.stl_header(ras)
    raw = raw_stl_points(ras)
    lps_bounds = np.asarray(before["bounds_lps"])
    np.testing.assert_allclose(raw[:, 0].max(), -lps_bounds[0, 0], atol=1e-3)
    np.testing.assert_allclose(surface.read_stl(ras).GetBounds(), back.GetBounds(), atol=1e-3)


def test_stl_is_lps_not_ras_at_a_known_position(tmp_path):
    # A RAS-stored grid (direction diag(-1, -1, 1)), a ball around voxel (i, j, k) = (10, 12, 8):
    # LPS = origin + direction @ (spacing * ijk) = (100 - 10, 50 - 12, -20 + 2 * 8) = (90, 38, -4).
    grid = io.Volume(np.zeros((16, 24, 20), np.uint8), spacing=(1.0, 1.0, 2.0), origin=(100.0, 50.0, -20.0),
                     direction=np.diag([-1.0, -1.0, 1.0]))
    zz, yy, xx = np.indices(grid.shape)
    grid.array[((xx - 10) ** 2 + (yy - 12) ** 2 + (2 * (zz - 8)) ** 2) <= 25] = 1
    path = surface.write_stl(surface.mask_to_polydata(grid), tmp_path / "blob.stl")
    np.testing.assert_allclose(raw_stl_points(path).mean(axis=0), [90.0, 38.0, -4.0], atol=0.2)


def test_open_surface_is_refused(oblique_sphere, tmp_path):
    _, _, polydata = oblique_sphere
    points, triangles = surface.polydata_arrays(polydata)
    holed = polydata_from_arrays(points, triangles[1:])
    checks = surface.mesh_checks(holed)
    assert not checks["closed"] and checks["boundary_edges"] == 3
    assert np.sum(edge_use_counts(triangles[1:]) == 1) == 3
    with pytest.raises(SpineInpaintError, match=r"not closed and manifold \(3 boundary edges, 0 non-manif"):
        surface.write_stl(holed, tmp_path / "holed.stl")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file
    path = surface.write_stl(holed, tmp_path / "holed.stl", allow_open=True)
    assert surface.mesh_checks(surface.read_stl(path))["boundary_edges"] == 3
    with pytest.raises(SpineInpaintError, match="must end in .stl"):
        surface.write_stl(polydata, tmp_path / "ball.ply")
    with pytest.raises(SpineInpaintError, match="coordinate_system must be 'LPS' or 'RAS'"):
        surface.write_stl(polydata, tmp_path / "ball.stl", coordinate_system="XYZ")


# --- the real scan --------------------------------------------------------------------------------
def test_real_spine_surfaces_are_printable(spine_labels, tmp_path):
    surfaces = surface.spine_surfaces(spine_labels)
    present = [int(v) for v in np.unique(spine_labels.array) if v]
    assert list(surfaces) == ["Spine"] + [labels_mod.vertebra_name(v) for v in sorted(present)]
    checks = {name: surface.mesh_checks(s) for name, s in surfaces.items()}
    assert all(c["watertight"] and c["outward"] for c in checks.values())
    # A lumbar vertebra is one ring around its canal: one closed surface of genus 1.
    assert checks["L3"]["regions"] == 1 and checks["L3"]["euler_characteristic"] == 0
    expected = face_extent(spine_labels, spine_labels.array == 29)
    np.testing.assert_allclose(checks["L3"]["bounds_lps"], expected, atol=3.0)  # within one 3 mm voxel
    parts = sum(c["volume_ml"] for name, c in checks.items() if name != "Spine")
    assert checks["Spine"]["volume_ml"] == pytest.approx(parts, rel=0.03)  # touching parts merge
    path = surface.write_stl(surfaces["Spine"], tmp_path / "restored_spine.stl")
    assert surface.is_watertight(surface.read_stl(path))


# --- against Slicer ----------------------------------------------------------------------------------
def test_matches_slicer_closed_surface_export(spine_labels, tmp_path):
    pytest.importorskip("slicer")
    from SpineInpaintLib import mrml
    from Testing.mrml_fixtures import make_mrml_application

    ct, _ = load_real_case("totalsegmentator")
    app = make_mrml_application()
    try:
        scene = app.scene
        ct_node = mrml.volume_to_node(scene, ct, "CT")
        seg_node = mrml.segmentation_from_labels(scene, spine_labels, ct_node, name="spine")
        [slicer_file] = mrml.export_segments_to_stl(seg_node, tmp_path, ["L3"])
        theirs = surface.mesh_checks(surface.read_stl(slicer_file))
        ours = surface.mesh_checks(surface.mask_to_polydata(spine_labels, "L3"))
        np.testing.assert_allclose(ours["bounds_lps"], theirs["bounds_lps"], atol=3.0)  # one voxel
        assert ours["volume_ml"] == pytest.approx(theirs["volume_ml"], rel=0.02)
        assert ours["area_mm2"] == pytest.approx(theirs["area_mm2"], rel=0.02)

        # Slicer reads our STL as LPS (from the header) and shows it in RAS.
        ours_file = surface.write_stl(surface.mask_to_polydata(spine_labels, "L3"), tmp_path / "ours_L3.stl")
        model = scene.AddNewNodeByClass("vtkMRMLModelNode", "ours")
        storage = scene.AddNewNodeByClass("vtkMRMLModelStorageNode")
        storage.SetFileName(str(ours_file))
        assert storage.ReadData(model)
        ras = np.asarray(model.GetPolyData().GetBounds()).reshape(3, 2)
        lps = np.asarray(ours["bounds_lps"])
        np.testing.assert_allclose(ras[:2], -lps[:2, ::-1], atol=1e-3)
        np.testing.assert_allclose(ras[2], lps[2], atol=1e-3)
    finally:
        app.close()
