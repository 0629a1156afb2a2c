"""Offscreen pictures of surface models: VTK when an OpenGL context can be had, matplotlib otherwise."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.plotting import pyplot
from SpineInpaintLib.surface import polydata_arrays

__all__ = ["RENDER_BACKENDS", "vtk_offscreen_window", "render_surfaces_to_array", "render_surfaces"]


_LESION_COLOR = (0.86, 0.16, 0.16)


#: Names drawn in the lesion colour (and half transparent) in 3D views.
_LESION_NAMES = ("lesion",)

logger = logging.getLogger(__name__)

#: ``auto``: VTK offscreen when it works here, else matplotlib; or force one of them.
RENDER_BACKENDS = ("auto", "vtk", "matplotlib")

_BONE_COLOR = (0.93, 0.85, 0.66)

_HIGHLIGHT_COLOR = (0.27, 0.56, 0.93)

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
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL implementations)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkWindowToImageFilter,
    )

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
    plt = pyplot()
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
