"""Figures for the README and the reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.plotting import pyplot, save_figure

__all__ = ["lps_oriented", "phantom_vs_real"]




def lps_oriented(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """The array of an axis-aligned volume turned to LPS order: ``a[z, y, x]`` with x to the left,
    y to posterior and z to superior, plus its spacing and origin in that order (x, y, z).

    Raises
    ------
    SpineInpaintError
        For an oblique direction matrix (resample the volume first).
    """
    d = volume.direction
    axes = np.argmax(np.abs(d), axis=0)  # LPS axis of each index axis i, j, k
    if sorted(axes.tolist()) != [0, 1, 2] or not np.allclose(np.abs(d[axes, [0, 1, 2]]), 1.0, atol=1e-3):
        raise SpineInpaintError("the figure needs an axis-aligned volume (resample oblique volumes first)")
    arr = volume.array  # (k, j, i)
    spacing, origin = [0.0] * 3, [0.0] * 3
    # reorder numpy axes so that numpy axis (2 - lps_axis) holds that LPS axis
    perm = [0, 0, 0]
    for index_axis in range(3):
        perm[2 - int(axes[index_axis])] = 2 - index_axis
    arr = np.transpose(arr, perm)
    lo = volume.index_to_physical(np.zeros(3))[0]
    hi = volume.index_to_physical(np.asarray(volume.shape, float) - 1)[0]
    for index_axis in range(3):
        lps = int(axes[index_axis])
        spacing[lps] = volume.spacing[index_axis]
        origin[lps] = min(lo[lps], hi[lps])
        if d[lps, index_axis] < 0:
            arr = np.flip(arr, axis=2 - lps)
    return arr, tuple(spacing), tuple(origin)  # type: ignore[return-value]


def _views(volume: Volume, center_lps: np.ndarray):
    """Axial, sagittal and coronal slices (display-ready) through ``center_lps`` with mm extents."""
    arr, sp, org = lps_oriented(volume)
    nz, ny, nx = arr.shape
    idx = [int(np.clip(round((center_lps[a] - org[a]) / sp[a]), 0, n - 1))
           for a, n in ((0, nx), (1, ny), (2, nz))]
    x_ext = (org[0] - sp[0] / 2, org[0] + (nx - 0.5) * sp[0])
    y_ext = (org[1] - sp[1] / 2, org[1] + (ny - 0.5) * sp[1])
    z_ext = (org[2] - sp[2] / 2, org[2] + (nz - 0.5) * sp[2])
    # imshow extent = (left, right, bottom, top); rows: y (anterior on top) or z (superior on top)
    axial = (arr[idx[2]], (x_ext[0], x_ext[1], y_ext[1], y_ext[0]))
    sagittal = (arr[::-1, :, idx[0]], (y_ext[0], y_ext[1], z_ext[0], z_ext[1]))
    coronal = (arr[::-1, idx[1], :], (x_ext[0], x_ext[1], z_ext[0], z_ext[1]))
    return axial, sagittal, coronal


def _level_center(labels: Volume | None, volume: Volume, level: int) -> np.ndarray:
    """Centre (LPS) of a vertebra label's body-ish part, or of the volume without labels."""
    if labels is not None:
        pts = np.argwhere(labels.array == level)
        if len(pts):
            center = labels.index_to_physical(pts.mean(0))[0]
            return center
    mid = (np.asarray(volume.shape, float) - 1) / 2
    return volume.index_to_physical(mid)[0]


def phantom_vs_real(path: str | os.PathLike, phantom, real_ct: Volume, real_labels: Volume | None = None,
                    level: int = 29,
                    windows: tuple[tuple[float, float], ...] = ((400.0, 40.0), (1800.0, 400.0)),
                    dpi: int = 110) -> Path:
    """Axial, sagittal and coronal views of a phantom beside a real scan, in millimetre aspect.

    Each volume is cut through the centroid of vertebra ``level`` (default L3; the real scan's
    middle when it has no labels), and shown in each window (width, level), soft tissue and bone
    by default. Orientation is radiological: the patient's right on the image's left, anterior
    on top in axial views, superior on top otherwise.

    Parameters
    ----------
    path
        PNG to write (folders are created).
    phantom
        A :class:`SpineInpaintLib.phantom.Phantom`.
    real_ct, real_labels
        The real scan and, optionally, its vertebra labels.
    """
    plt = pyplot()
    rows = []
    ph_center = _level_center(phantom.labels, phantom.ct, level)
    re_center = _level_center(real_labels, real_ct, level)
    cfg = phantom.config
    ph_name = f"phantom (seed {cfg.seed}, {cfg.spacing_xy:g} mm, {cfg.slice_thickness:g} mm slices)"
    sx, sy, sz = real_ct.spacing
    re_name = f"real CT ({sx:g} x {sy:g} x {sz:g} mm)"
    for name, vol, center in ((ph_name, phantom.ct, ph_center), (re_name, real_ct, re_center)):
        rows.append((name, _views(vol, center)))
    n_rows = len(rows) * len(windows)
    fig, axes = plt.subplots(n_rows, 3, figsize=(13.5, 4.3 * n_rows), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1.15, 1.0, 1.0]))
    r = 0
    for width, center_hu in windows:
        lo, hi = center_hu - width / 2, center_hu + width / 2
        for name, views in rows:
            for c, ((img, ext), view) in enumerate(zip(views, ("axial", "sagittal", "coronal"))):
                ax = axes[r, c]
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="bilinear")
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_facecolor("black")
                if c == 0:
                    ax.set_ylabel(f"{name}\nW{width:g} / L{center_hu:g}", fontsize=9)
                if r == 0:
                    ax.set_title(view, fontsize=11)
            r += 1
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi, facecolor="white")
