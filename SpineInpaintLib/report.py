"""The restoration report: ``report.png`` (the paper's Figure 6 made real) and ``report.json``.

``report.png`` shows axial and sagittal CT slices through the lesion centre before and after the
restoration (bone window, lesion outlined in red) and 3D views of the spine surfaces: the restored
spine with the restored vertebrae in another colour, and, when the labels before restoration are
given, the damaged spine with the lesion (Miao et al., Figure 6 (a)-(d)).

3D views are rendered offscreen with VTK. On Linux the render window is an EGL one
(``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``, set only while the window is made unless the user
set it), which needs no X server; a GPU is used when there is one, Mesa's software rasteriser
otherwise. A failing OpenGL set-up can kill a process instead of raising, so the set-up is first
tried once in a child process; when no window works, the surfaces are drawn with matplotlib
instead (with a logged warning), so a report never fails for want of OpenGL.

``report.json`` is written by :func:`write_report_json`, which turns numpy values into JSON, and
:class:`StageTimer` records the seconds (and peak memory) of each stage for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib import io
from SpineInpaintLib import labels as _labels
from SpineInpaintLib.io import Volume

__all__ = [
    "BONE_WINDOW",
    "RENDER_BACKENDS",
    "render_surfaces",
    "render_surfaces_to_array",
    "vtk_offscreen_window",
    "report_figure",
    "plot_orthogonal_views",
    "write_report_json",
    "to_jsonable",
    "atomic_write",
    "Timer",
    "StageTimer",
]

logger = logging.getLogger(__name__)

#: CT display window (min, max HU): W1400 / L300 shows cortex, trabecular bone and soft tissue.
BONE_WINDOW = (-400.0, 1000.0)
#: ``auto``: VTK offscreen when it works here, else matplotlib; or force one of them.
RENDER_BACKENDS = ("auto", "vtk", "matplotlib")

_BONE_COLOR = (0.93, 0.85, 0.66)
_HIGHLIGHT_COLOR = (0.27, 0.56, 0.93)
_LESION_COLOR = (0.86, 0.16, 0.16)
_BACKGROUND = (1.0, 1.0, 1.0)
#: Camera directions (from the centre towards the camera, LPS) and view-up of the named views.
_VIEWS = {
    "anterior": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    "posterior": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "left": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "right": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
}
#: Triangles drawn at most by the matplotlib fallback (it sorts and draws every one in Python).
_MATPLOTLIB_TRIANGLES = 30_000
#: Names drawn in the lesion colour (and half transparent) in 3D views.
_LESION_NAMES = ("lesion",)


# --- offscreen VTK -----------------------------------------------------------------------------
_PROBE = """
import sys
from vtkmodules.vtkFiltersSources import vtkSphereSource
from vtkmodules.vtkRenderingCore import (vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                         vtkWindowToImageFilter)
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (the OpenGL implementations)
from vtkmodules.util.numpy_support import vtk_to_numpy
sphere = vtkSphereSource()
mapper = vtkPolyDataMapper()
mapper.SetInputConnection(sphere.GetOutputPort())
actor = vtkActor()
actor.SetMapper(mapper)
renderer = vtkRenderer()
renderer.AddActor(actor)
window = vtkRenderWindow()
window.SetOffScreenRendering(1)
window.AddRenderer(renderer)
window.SetSize(32, 32)
window.Render()
grab = vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
pixels = vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
print("window=" + window.GetClassName() + " spread=" + str(int(pixels.max()) - int(pixels.min())))
"""


def _window_candidates() -> list[str | None]:
    """Render-window classes to try (None: VTK's own default for this platform)."""
    chosen = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
    if chosen:
        return [chosen]
    if sys.platform.startswith("linux"):
        # EGL needs no X server; the default (X) window is the second choice on a desktop.
        return ["vtkEGLRenderWindow", None] if os.environ.get("DISPLAY") else ["vtkEGLRenderWindow"]
    return [None]


@contextlib.contextmanager
def _window_class(name: str | None) -> Iterator[None]:
    """Make VTK's render-window factory give ``name`` while the block runs (the environment is
    restored after, so nothing else in the process, e.g. Slicer's own views, is affected)."""
    key = "VTK_DEFAULT_OPENGL_WINDOW"
    before = os.environ.get(key)
    if name is not None:
        os.environ[key] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@functools.lru_cache(maxsize=1)
def vtk_offscreen_window() -> str | None:
    """The render-window class that renders offscreen here, or None when none does.

    Each candidate draws a sphere in a child process (a broken OpenGL set-up may crash rather
    than raise); the answer is cached for the process.
    """
    if not sys.executable:
        return None
    for name in _window_candidates():
        env = dict(os.environ)
        if name is not None:
            env["VTK_DEFAULT_OPENGL_WINDOW"] = name
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            logger.info("offscreen VTK probe (%s) failed: %s", name or "default window", err)
            continue
        line = next((x for x in done.stdout.splitlines() if x.startswith("window=")), "")
        if done.returncode == 0 and line and int(line.rsplit("spread=", 1)[1]) > 0:
            return line.split()[0].split("=", 1)[1]
        logger.info("offscreen VTK probe (%s) failed: exit %s, %s", name or "default window",
                    done.returncode, (done.stderr.strip().splitlines() or [""])[-1][:200])
    return None


# --- surfaces -> pixels -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Item:
    name: str
    polydata: object
    color: tuple[float, float, float]
    opacity: float


def _items(surfaces, highlight, colors) -> list[_Item]:
    if isinstance(surfaces, Mapping):
        named = list(surfaces.items())
    else:
        named = [(f"surface {i}", s) for i, s in enumerate(surfaces)]
    if not named:
        raise SpineInpaintError("no surfaces to render")
    wanted = {highlight} if isinstance(highlight, str) else set(highlight or ())
    unknown = wanted - {name for name, _ in named}
    if unknown:
        raise SpineInpaintError(f"cannot highlight {sorted(unknown)}: no surface of that name")
    items = []
    for name, polydata in named:
        if polydata is None or polydata.GetNumberOfPolys() == 0:
            raise SpineInpaintError(f"surface '{name}' is empty")
        lesion = name.lower() in _LESION_NAMES
        if colors is not None and name in colors:
            color = tuple(float(c) for c in colors[name])
        else:
            color = _LESION_COLOR if lesion else _HIGHLIGHT_COLOR if name in wanted else _BONE_COLOR
        items.append(_Item(name, polydata, color, 0.6 if lesion else 1.0))
    return items


def _bounds(items: Sequence[_Item]) -> np.ndarray:
    b = np.array([item.polydata.GetBounds() for item in items]).reshape(-1, 3, 2)
    return np.stack([b[:, :, 0].min(axis=0), b[:, :, 1].max(axis=0)], axis=1)


def _render_vtk(
    items: Sequence[_Item], size: tuple[int, int], view: str, window_class: str | None
) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import (vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                             vtkWindowToImageFilter)
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL implementations)

    renderer = vtkRenderer()
    renderer.SetBackground(*_BACKGROUND)
    for item in items:
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(item.polydata)
        mapper.ScalarVisibilityOff()
        actor = vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*item.color)
        prop.SetOpacity(item.opacity)
        prop.SetAmbient(0.15)
        prop.SetDiffuse(0.8)
        prop.SetSpecular(0.15)
        prop.SetSpecularPower(20.0)
        renderer.AddActor(actor)
    _place_camera(renderer.GetActiveCamera(), _bounds(items), view)
    renderer.ResetCamera()
    renderer.GetActiveCamera().Zoom(1.15)
    renderer.ResetCameraClippingRange()
    renderer.UseFXAAOn()

    with _window_class(window_class):
        window = vtkRenderWindow()
    try:
        window.SetOffScreenRendering(1)
        window.SetMultiSamples(0)
        window.AddRenderer(renderer)
        window.SetSize(int(size[0]), int(size[1]))
        window.Render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    finally:
        window.Finalize()
    return np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one


def _place_camera(camera, bounds: np.ndarray, view: str) -> None:
    direction, up = (np.asarray(v) for v in _VIEWS[view])
    centre = bounds.mean(axis=1)
    distance = 3.0 * float(np.linalg.norm(bounds[:, 1] - bounds[:, 0]) + 1.0)
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + distance * direction))
    camera.SetViewUp(*up)


def _triangle_arrays(polydata, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and triangles of ``polydata``, decimated to about ``budget`` triangles for drawing."""
    from vtkmodules.vtkFiltersCore import vtkQuadricDecimation, vtkTriangleFilter

    from SpineInpaintLib.surface import polydata_arrays

    triangles = vtkTriangleFilter()
    triangles.SetInputData(polydata)
    triangles.Update()
    mesh = triangles.GetOutput()
    n = mesh.GetNumberOfPolys()
    if n > budget:
        decimate = vtkQuadricDecimation()
        decimate.SetInputData(mesh)
        decimate.SetTargetReduction(1.0 - budget / n)
        decimate.Update()
        mesh = decimate.GetOutput()
    return polydata_arrays(mesh)


def _render_matplotlib(items: Sequence[_Item], size: tuple[int, int], view: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    total = sum(item.polydata.GetNumberOfPolys() for item in items)
    direction, _ = _VIEWS[view]
    light = np.asarray(direction, dtype=float)  # a headlight, as VTK's default light
    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, facecolor=_BACKGROUND)
    ax = fig.add_axes((0, 0, 1, 1), projection="3d", facecolor=_BACKGROUND)
    for item in items:
        budget = max(200, int(_MATPLOTLIB_TRIANGLES * item.polydata.GetNumberOfPolys() / total))
        points, tris = _triangle_arrays(item.polydata, budget)
        faces = points[tris]
        normals = np.cross(faces[:, 1] - faces[:, 0], faces[:, 2] - faces[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        shade = 0.25 + 0.75 * np.abs(normals @ light)
        rgba = np.empty((len(faces), 4))
        rgba[:, :3] = np.clip(np.outer(shade, item.color), 0, 1)
        rgba[:, 3] = item.opacity
        ax.add_collection3d(Poly3DCollection(faces, facecolors=rgba, edgecolors="none", linewidths=0))
    bounds = _bounds(items)
    centre, half = bounds.mean(axis=1), (bounds[:, 1] - bounds[:, 0]).max() / 2.0
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1))
    # matplotlib's azimuth is measured in the x-y plane from +x; elevation 0 looks horizontally.
    ax.view_init(elev=0.0, azim=math.degrees(math.atan2(direction[1], direction[0])), roll=0.0)
    ax.set_proj_type("ortho")
    ax.set_axis_off()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return pixels


def render_surfaces_to_array(
    surfaces: Mapping[str, object] | Sequence[object],
    size: tuple[int, int] = (600, 600),
    highlight: str | Iterable[str] | None = None,
    *,
    view: str = "anterior",
    colors: Mapping[str, Sequence[float]] | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, str]:
    """Render surfaces (LPS mm) offscreen and return the RGB pixels and the renderer used.

    Parameters
    ----------
    surfaces
        ``{name: vtkPolyData}`` or a list of them. A surface named 'Lesion' is drawn red and half
        transparent.
    size
        ``(width, height)`` in pixels.
    highlight
        Names drawn in blue (e.g. the restored vertebra); the others are bone coloured.
    view
        'anterior' (patient's left on the image's right, superior up), 'posterior', 'left'
        (left lateral: anterior on the image's left) or 'right'.
    colors
        Explicit RGB (0-1) per name, overriding the above.
    backend
        'auto' (VTK when an offscreen window works here, else matplotlib), 'vtk' or 'matplotlib'.

    Returns
    -------
    (pixels, renderer)
        ``uint8`` array ``(height, width, 3)``; ``renderer`` is ``'vtk:<window class>'`` or
        ``'matplotlib'``.
    """
    if backend not in RENDER_BACKENDS:
        raise SpineInpaintError(
            f"unknown render backend '{backend}' (use one of {', '.join(RENDER_BACKENDS)})"
        )
    if view not in _VIEWS:
        raise SpineInpaintError(f"unknown view '{view}' (use one of {', '.join(_VIEWS)})")
    if len(size) != 2 or min(int(s) for s in size) < 16:
        raise SpineInpaintError(f"image size must be (width, height) of at least 16 pixels, got {size}")
    size = (int(size[0]), int(size[1]))
    items = _items(surfaces, highlight, colors)
    if backend in ("auto", "vtk"):
        window = vtk_offscreen_window()
        if window is not None:
            return _render_vtk(items, size, view, window), f"vtk:{window}"
        if backend == "vtk":
            raise SpineInpaintError("VTK cannot render offscreen here (no working EGL or OpenGL window)")
        logger.warning("VTK cannot render offscreen here (no working EGL or OpenGL window); "
                       "drawing the 3D view with matplotlib instead")
    return _render_matplotlib(items, size, view), "matplotlib"


def render_surfaces(
    surfaces: Mapping[str, object] | Sequence[object],
    png_path: str | os.PathLike,
    size: tuple[int, int] = (600, 600),
    highlight: str | Iterable[str] | None = None,
    **kwargs,
) -> Path:
    """Render surfaces offscreen to a PNG file; see :func:`render_surfaces_to_array` for the options.

    Returns
    -------
    Path
        ``png_path``.
    """
    from PIL import Image

    pixels, renderer = render_surfaces_to_array(surfaces, size, highlight, **kwargs)
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    logger.info("rendered %s with %s", path, renderer)
    return path


# --- slices --------------------------------------------------------------------------------------
def _bone_slices(volume: Volume, centre_zyx: Sequence[int], fov_mm: float | None):
    """Axial and sagittal slices (and their physical aspect) of an LPS-oriented volume, cropped to a
    square field of view around ``centre_zyx``: anterior up in axial (patient left on the right),
    superior up in sagittal (anterior on the left)."""
    array = volume.array
    cz, cy, cx = (int(c) for c in centre_zyx)
    sz, sy, sx = volume.spacing_zyx

    def window(n: int, c: int, spacing: float) -> slice:
        if fov_mm is None:
            return slice(0, n)
        half = int(round(fov_mm / 2.0 / spacing))
        lo = max(0, min(c - half, n - 2 * half))
        return slice(lo, min(n, lo + 2 * half))

    ys, xs = window(array.shape[1], cy, sy), window(array.shape[2], cx, sx)
    zs = window(array.shape[0], cz, sz)
    axial = array[cz, ys, xs]
    sagittal = array[zs, ys, cx][::-1]  # superior (high z) at the top
    return (axial, sy / sx), (sagittal, sz / sy), (ys, xs, zs)


def _slice_centre(shape: Sequence[int], *masks: np.ndarray | None) -> np.ndarray:
    """``(z, y, x)`` index of the centroid of the first non-empty mask, else of the volume centre."""
    for mask in masks:
        if mask is not None and mask.any():
            return np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    return np.asarray(shape) // 2


def _restored_levels(labels_after: Volume | None, lesion: Volume) -> list[int]:
    """Vertebra ids under the lesion (most voxels first): the vertebrae the restoration rebuilt."""
    if labels_after is None:
        return []
    under = np.asarray(labels_after.array)[np.asarray(lesion.array) > 0]
    values, counts = np.unique(under[np.isin(under, _labels.VERTEBRA_IDS)], return_counts=True)
    return [int(v) for v in values[np.argsort(-counts)]]


def _trim(pixels: np.ndarray, margin: int = 8) -> np.ndarray:
    """The rendered picture cropped to what differs from the background (plus a margin)."""
    background = np.asarray(_BACKGROUND) * 255
    content = np.argwhere(np.abs(pixels.astype(float) - background).max(axis=2) > 8)
    if len(content) == 0:
        return pixels
    (r0, c0), (r1, c1) = content.min(axis=0), content.max(axis=0)
    return pixels[max(0, r0 - margin):r1 + margin + 1, max(0, c0 - margin):c1 + margin + 1]


def _display_surfaces(
    surfaces: Mapping[str, object] | None, labels: Volume | None, lesion: Volume | None
) -> dict[str, object] | None:
    """Surfaces to draw in one 3D view: one per vertebra (the whole-spine surface only when no
    vertebra has its own, as both drawn would overlap), plus the lesion when given."""
    from SpineInpaintLib import surface as _surface

    if surfaces is None and labels is not None and np.isin(labels.array, _labels.VERTEBRA_IDS).any():
        # Display only: a little decimation keeps large scans quick to draw.
        surfaces = _surface.spine_surfaces(labels, whole_spine=False, decimation=0.3)
    if surfaces is None:
        return None
    shown = dict(surfaces)
    if len(shown) > 1:
        shown.pop(_surface.SPINE_NAME, None)
    if lesion is not None and np.asarray(lesion.array).any():
        shown["Lesion"] = _surface.mask_to_polydata(lesion, smoothing=0.5)
    return shown


def report_figure(
    before_ct: Volume,
    after_ct: Volume,
    lesion_mask: Volume,
    labels_after: Volume | None,
    surfaces: Mapping[str, object] | None,
    png_path: str | os.PathLike,
    title: str = "",
    *,
    labels_before: Volume | None = None,
    surfaces_before: Mapping[str, object] | None = None,
    field_of_view_mm: float | None = 160.0,
    window: tuple[float, float] = BONE_WINDOW,
    view: str = "anterior",
    backend: str = "auto",
    dpi: int = 110,
) -> Path:
    """``report.png``: the paper's Figure 6 on the real volumes.

    Axial and sagittal slices through the lesion centre before and after (bone window W1400/L300,
    radiological display: anterior up, patient left on the right; superior up), the lesion
    outlined in red on both, and the 3D view of the restored spine with the restored vertebrae
    (those under the lesion) in blue. With ``labels_before`` or ``surfaces_before``, a second 3D
    view shows the spine before restoration with the lesion in red (Figure 6 (c)).

    Parameters
    ----------
    before_ct, after_ct
        The input CT and the restored CT (same grid).
    lesion_mask
        The lesion that was inpainted (same grid; may be empty: then the slices go through the
        spine's centre).
    labels_after
        Vertebra labels after restoration (same grid), or None.
    surfaces
        Surfaces of the restored spine (``surface.spine_surfaces``); None: made from
        ``labels_after``; no 3D view when both are None.
    png_path
        Where to write the PNG.
    field_of_view_mm
        Side of the square shown around the lesion (None: the whole slice).
    window
        Display range (min, max) in HU; default W1400/L300.
    view, backend
        3D view and renderer, as in :func:`render_surfaces_to_array`.

    Raises
    ------
    SpineInpaintError
        Volumes on different grids.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, other in (("restored CT", after_ct), ("lesion mask", lesion_mask),
                        ("labels after", labels_after), ("labels before", labels_before)):
        if other is not None and not other.same_grid(before_ct):
            raise SpineInpaintError(
                f"the {name} is not on the grid of the input CT ({other.size_xyz} vs {before_ct.size_xyz}, "
                "or another origin, spacing or direction)"
            )
    restored = _restored_levels(labels_after, lesion_mask)
    highlight = [_labels.vertebra_name(v) for v in restored]
    after_3d = _display_surfaces(surfaces, labels_after, None)
    if after_3d is not None:
        highlight = [h for h in highlight if h in after_3d]
    before_3d = _display_surfaces(surfaces_before, labels_before, lesion_mask)

    # Display orientation: LPS whatever the files stored.
    before = io.reorient(before_ct, "LPS")
    after = io.reorient(after_ct, "LPS")
    lesion = io.reorient(lesion_mask.with_array((np.asarray(lesion_mask.array) > 0).astype(np.uint8)), "LPS")
    spine = None
    if labels_after is not None:
        spine = np.isin(io.reorient(labels_after, "LPS").array, _labels.VERTEBRA_IDS)
    centre = _slice_centre(lesion.shape, lesion.array > 0, spine)

    n_3d = (after_3d is not None) + (before_3d is not None)
    fig = plt.figure(figsize=(8.0 + 4.0 * n_3d, 8.4))
    try:
        _draw_report(fig, before, after, lesion, centre, before_3d, after_3d, highlight, title,
                     field_of_view_mm, window, view, backend)
        path = Path(png_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path


def _draw_report(fig, before: Volume, after: Volume, lesion: Volume, centre: np.ndarray, before_3d, after_3d,
                 highlight: list[str], title: str, field_of_view_mm: float | None,
                 window: tuple[float, float], view: str, backend: str) -> None:
    """The panels of :func:`report_figure`: two columns of slices, then one column per 3D view."""
    n_3d = (after_3d is not None) + (before_3d is not None)
    grid = fig.add_gridspec(2, 2 + n_3d)
    for col, (label, volume) in enumerate((("before", before), ("after", after))):
        (axial, a_aspect), (sagittal, s_aspect), (ys, xs, zs) = _bone_slices(volume, centre, field_of_view_mm)
        lesion_axial = lesion.array[centre[0], ys, xs]
        lesion_sagittal = lesion.array[zs, ys, centre[2]][::-1]
        for row, (name, image, mask, aspect) in enumerate(
            (("axial", axial, lesion_axial, a_aspect), ("sagittal", sagittal, lesion_sagittal, s_aspect))
        ):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect,
                      interpolation="bilinear")
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="red", linewidths=1.2)
            ax.set_title(f"{label}: {name}", fontsize=11)
            ax.axis("off")
    renderer = None
    size = (500, 800)
    next_col = 2
    for title_3d, shown, marked in (
        ("3D before: lesion in red", before_3d, None),
        ("3D after: " + (f"restored {', '.join(highlight)} in blue" if highlight else "restored spine"),
         after_3d, highlight),
    ):
        if shown is None:
            continue
        pixels, renderer = render_surfaces_to_array(shown, size, marked, view=view, backend=backend)
        ax = fig.add_subplot(grid[:, next_col])
        ax.imshow(_trim(pixels))
        ax.set_title(title_3d, fontsize=11)
        ax.axis("off")
        next_col += 1
    heading = title or "SpineInpaint restoration"
    width, level = window[1] - window[0], (window[1] + window[0]) / 2.0
    fig.suptitle(f"{heading}\nCT W{width:g}/L{level:g}, lesion outlined in red"
                 + (f"; 3D view: {view}, rendered by {renderer}" if renderer else ""), fontsize=12)
    fig.tight_layout()


def plot_orthogonal_views(ct: Volume, labels: Volume | None, path: Path, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the spine centre (bone window), labels outlined.

    Slices go through the centroid of the vertebra labels, or the volume centre without labels;
    each view is drawn with its physical aspect ratio (the demo's picture).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Radiological display whatever the file's orientation: anterior up, patient left on the right.
    ct = io.reorient(ct, "LPS")
    array = ct.array.astype(np.float32)
    spine = None
    if labels is not None:
        spine = np.isin(io.reorient(labels, "LPS").array, _labels.VERTEBRA_IDS)
    cz, cy, cx = _slice_centre(array.shape, spine)
    sz, sy, sx = ct.spacing_zyx
    views = [
        ("axial", array[cz], None if spine is None else spine[cz], sy / sx),
        ("coronal", array[:, cy, :], None if spine is None else spine[:, cy, :], sz / sx),
        ("sagittal", array[:, :, cx], None if spine is None else spine[:, :, cx], sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, image, mask, aspect) in zip(axes, views):
        if name != "axial":  # superior (high z) at the top
            image, mask = image[::-1], None if mask is None else mask[::-1]
        ax.imshow(image, cmap="gray", vmin=BONE_WINDOW[0], vmax=BONE_WINDOW[1], aspect=aspect)
        if mask is not None and mask.any():
            ax.contour(mask, levels=[0.5], colors="orange", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title or "CT (W1400/L300) with vertebra labels")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- report.json -----------------------------------------------------------------------------------
def to_jsonable(value):
    """``value`` with numpy scalars and arrays, paths, tuples, sets and dataclasses turned into JSON
    types; non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    raise TypeError(f"cannot put a {type(value).__name__} into report.json")


def write_report_json(path: str | os.PathLike, report: Mapping) -> Path:
    """Write ``report`` as indented JSON (numpy values converted), replacing the file in one step."""
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_path)`` beside ``path``, then move the file into place in one step.

    A failed or interrupted write leaves no partial output (only the old file, if any). The file
    gets the usual permissions (``0o666`` less the umask), not the private ones of a temporary.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _umask() -> int:
    """The process's umask; from /proc where there is one (setting it to read it is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- timings -------------------------------------------------------------------------------------
def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 ** (2 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...`` then ``t.seconds``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float | None = None

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


class StageTimer:
    """Seconds and peak memory of each stage of a run, in the order the stages ran.

    Examples
    --------
    >>> timer = StageTimer()
    >>> with timer.stage("segmentation"):
    ...     pass
    >>> [s["name"] for s in timer.stages]
    ['segmentation']

    A stage that raises is recorded with ``status`` 'failed' and the error goes on.
    """

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self._created = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (recorded even when the block raises)."""
        start = time.perf_counter()
        status = "failed"
        try:
            yield
            status = "ok"
        finally:
            self._record(name, time.perf_counter() - start, status)

    def _record(self, name: str, seconds: float, status: str) -> None:
        self.stages.append({"name": str(name), "seconds": float(seconds), "status": status,
                            "peak_rss_mb": _peak_rss_mb()})

    @property
    def total_seconds(self) -> float:
        """Sum of the stages' seconds."""
        return float(sum(s["seconds"] for s in self.stages))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage name (a name timed more than once is summed)."""
        out: dict[str, float] = {}
        for s in self.stages:
            out[s["name"]] = out.get(s["name"], 0.0) + s["seconds"]
        return out

    def to_dict(self) -> dict:
        """JSON-ready: the stages in order, their total, and the process's peak memory."""
        return {
            "stages": [dict(s) for s in self.stages],
            "total_seconds": self.total_seconds,
            "wall_seconds": time.perf_counter() - self._created,
            "peak_rss_mb": _peak_rss_mb(),
        }
