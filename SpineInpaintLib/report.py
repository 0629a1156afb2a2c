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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib import surface as _surface
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as _labels
from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.render import _BACKGROUND, render_surfaces_to_array

__all__ = ["BONE_WINDOW", "report_figure", "plot_orthogonal_views"]

#: CT display window (min, max HU): W1400 / L300 shows cortex, trabecular bone and soft tissue.
BONE_WINDOW = (-400.0, 1000.0)




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
    plt = pyplot()

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
    plt = pyplot()

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
    return save_figure(fig, path, dpi=110)
