"""report: offscreen 3D views (VTK through EGL, matplotlib fallback), report.png, report.json, timings."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from SpineInpaintLib import SpineInpaintError, render, surface
from SpineInpaintLib.core import io
from SpineInpaintLib.core.files import to_jsonable, write_report_json
from SpineInpaintLib.core.runtime import StageTimer, Timer
from SpineInpaintLib.report import plot_orthogonal_views, report_figure

BACKGROUND = np.array([255, 255, 255])


def ball(centre_x: float) -> object:
    """A ball of radius 6 mm centred at LPS (centre_x, 0, 0)."""
    array = np.zeros((20, 20, 60), np.uint8)
    zz, yy, xx = np.indices(array.shape)
    array[(zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 30 - centre_x) ** 2 <= 36] = 1
    return surface.mask_to_polydata(io.Volume(array, origin=(-30.0, -10.0, -10.0)))


@pytest.fixture(scope="module")
def two_balls():
    """Balls at patient right (x = -15) and patient left (x = +15)."""
    return {"right": ball(-15.0), "left": ball(15.0)}


def blob_columns(pixels: np.ndarray) -> tuple[float, float]:
    """Mean column of the blue (highlighted) and of the other non-background pixels."""
    rgb = pixels.astype(int)
    drawn = np.abs(rgb - BACKGROUND).max(axis=2) > 30
    blue = drawn & (rgb[:, :, 2] > rgb[:, :, 0] + 30)
    other = drawn & ~blue
    return float(np.argwhere(blue)[:, 1].mean()), float(np.argwhere(other)[:, 1].mean())


@pytest.fixture
def crashing_vtk(monkeypatch):
    """Make the offscreen probe die the way a broken OpenGL set-up does."""
    # Exit code 139 without a word, as a segfault gives, minus the core file.
    monkeypatch.setattr(render, "_PROBE", "import os; os._exit(139)")
    render.vtk_offscreen_window.cache_clear()
    yield
    render.vtk_offscreen_window.cache_clear()


# --- 3D rendering -----------------------------------------------------------------------------------
def test_vtk_offscreen_renders_through_egl_here(two_balls, tmp_path):
    window = render.vtk_offscreen_window()
    if window is None:
        pytest.skip("no offscreen OpenGL window on this machine (the matplotlib fallback is tested below)")
    # No X server is needed: on Linux the probe and the renders use EGL.
    assert window == "vtkEGLRenderWindow" or not sys.platform.startswith("linux")
    path = render.render_surfaces(two_balls, tmp_path / "view.png", size=(300, 200), highlight="left")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (200, 300, 3)
    assert (pixels != pixels[0, 0]).any(axis=2).mean() > 0.05  # not a blank picture
    np.testing.assert_array_equal(pixels[0, 0], BACKGROUND)
    # Anterior view: the patient's left ball (highlighted, blue) is on the image's right.
    blue, other = blob_columns(pixels)
    assert blue > 150 > other


@pytest.mark.parametrize("backend", ["vtk", "matplotlib"])
def test_views_put_the_patient_where_expected(two_balls, backend):
    if backend == "vtk" and render.vtk_offscreen_window() is None:
        pytest.skip("no offscreen OpenGL window on this machine")
    pixels, renderer = render.render_surfaces_to_array(two_balls, (240, 160), ["left"], backend=backend)
    assert renderer.startswith(backend)
    assert pixels.shape == (160, 240, 3) and pixels.dtype == np.uint8
    blue, other = blob_columns(pixels)
    assert blue > other  # anterior: patient left on the right
    pixels, _ = render.render_surfaces_to_array(two_balls, (240, 160), ["left"], view="posterior",
                                                backend=backend)
    blue, other = blob_columns(pixels)
    assert blue < other  # posterior: patient left on the left


def test_broken_opengl_falls_back_to_matplotlib(two_balls, crashing_vtk, tmp_path, caplog):
    assert render.vtk_offscreen_window() is None
    with caplog.at_level(logging.WARNING, logger="SpineInpaintLib.report"):
        pixels, renderer = render.render_surfaces_to_array(two_balls, (200, 200), "left")
    assert renderer == "matplotlib" and "drawing the 3D view with matplotlib" in caplog.text
    assert (np.abs(pixels.astype(int) - BACKGROUND).max(axis=2) > 30).mean() > 0.02
    with pytest.raises(SpineInpaintError, match="VTK cannot render offscreen here"):
        render.render_surfaces_to_array(two_balls, (200, 200), backend="vtk")


def test_render_refuses_bad_requests(two_balls):
    with pytest.raises(SpineInpaintError, match="cannot highlight \\['L3'\\]"):
        render.render_surfaces_to_array(two_balls, highlight="L3", backend="matplotlib")
    with pytest.raises(SpineInpaintError, match="unknown view 'top'"):
        render.render_surfaces_to_array(two_balls, view="top")
    with pytest.raises(SpineInpaintError, match="unknown render backend 'povray'"):
        render.render_surfaces_to_array(two_balls, backend="povray")
    with pytest.raises(SpineInpaintError, match="no surfaces to render"):
        render.render_surfaces_to_array({})


# --- report.png -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lesion_case(real_case):
    from SpineInpaintLib.data.lesions import simulate_lesion

    ct, labels = real_case
    return simulate_lesion(ct, labels, "L3", "lytic", True, seed=1)


def test_report_figure_of_a_simulated_lesion(lesion_case, tmp_path):
    sim = lesion_case
    path = report_figure(sim.ct, sim.healthy_ct, sim.lesion_mask, sim.healthy_labels, None,
                                tmp_path / "report.png", title="L3 lytic (after = healthy truth)")
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left
    assert path.stat().st_size > 100_000
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.std() > 20  # slices and a 3D view, not a blank page
    red = (pixels[:, :, 0] > 180) & (pixels[:, :, 1] < 80) & (pixels[:, :, 2] < 80)
    blue = (pixels[:, :, 2] > pixels[:, :, 0] + 60) & (pixels[:, :, 2] > 150)
    assert red.sum() > 200  # the lesion outlines
    assert blue.sum() > 2000  # the restored L3 in the 3D view


def test_report_figure_refuses_volumes_on_another_grid(lesion_case, tmp_path):
    sim = lesion_case
    shifted = io.Volume(sim.lesion_mask.array, sim.lesion_mask.spacing,
                        tuple(np.add(sim.lesion_mask.origin, (3.0, 0.0, 0.0))), sim.lesion_mask.direction)
    with pytest.raises(SpineInpaintError, match="the lesion mask is not on the grid of the input CT"):
        report_figure(sim.ct, sim.healthy_ct, shifted, None, None, tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


def test_orthogonal_views_are_drawn(real_case, tmp_path):
    ct, labels = real_case
    path = plot_orthogonal_views(ct, labels, tmp_path / "views.png", title="real case")
    pixels = np.asarray(Image.open(path).convert("L"))
    assert path.stat().st_size > 30_000 and pixels.std() > 20


# --- report.json -------------------------------------------------------------------------------------
def test_report_json_converts_numpy_and_writes_valid_json(tmp_path):
    data = {
        "seed": np.int64(7),
        "volume_ml": np.float32(61.25),
        "ok": np.bool_(True),
        "bounds": np.array([[1.5, 2.0], [3.0, 4.0]]),
        "levels": (np.uint8(29), 30),
        "missing": float("nan"),
        "input": Path("/data/ct.nii.gz"),
        "names": {"L3", "L2"},
        3: "int key",
    }
    path = write_report_json(tmp_path / "report.json", data)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not the 0o600 of a temporary file
    back = json.loads(path.read_text())
    assert back == {
        "seed": 7, "volume_ml": 61.25, "ok": True, "bounds": [[1.5, 2.0], [3.0, 4.0]], "levels": [29, 30],
        "missing": None, "input": "/data/ct.nii.gz", "names": ["L2", "L3"], "3": "int key",
    }
    assert type(back["seed"]) is int and type(back["ok"]) is bool
    with pytest.raises(TypeError, match="cannot put a object into report.json"):
        to_jsonable({"x": object()})


def test_stage_timer_records_stages_in_order(tmp_path):
    timer = StageTimer()
    with timer.stage("segmentation"):
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="boom"):
        with timer.stage("inpainting"):
            raise RuntimeError("boom")
    with timer.stage("segmentation"):
        time.sleep(0.02)
    assert [(s["name"], s["status"]) for s in timer.stages] == [
        ("segmentation", "ok"), ("inpainting", "failed"), ("segmentation", "ok")]
    assert timer.stages[0]["seconds"] >= 0.05 and timer.stages[1]["seconds"] < 0.05
    both = timer.stages[0]["seconds"] + timer.stages[2]["seconds"]
    assert timer.seconds()["segmentation"] == pytest.approx(both)
    summary = timer.to_dict()
    assert summary["total_seconds"] == pytest.approx(sum(s["seconds"] for s in timer.stages))
    assert summary["wall_seconds"] >= summary["total_seconds"]
    if not math.isnan(summary["peak_rss_mb"] or math.nan):
        assert summary["peak_rss_mb"] > 10  # this Python process holds numpy and VTK
    back = json.loads(write_report_json(tmp_path / "t.json", summary).read_text())
    assert [s["name"] for s in back["stages"]] == ["segmentation", "inpainting", "segmentation"]
    with Timer() as t:
        time.sleep(0.01)
    assert t.seconds >= 0.01
