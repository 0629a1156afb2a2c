"""Write cases in the DeepLesion layout: series of 16-bit PNG slices, RECIST measurements and the info CSV rows."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.data.deeplesion import (
    BONE,
    BOX_PADDING,
    COARSE_LESION_TYPES,
    DEFAULT_WINDOW,
    SPLITS,
    DeepLesionRecord,
    _check_orientation,
    series_folder_name,
    write_png_hu,
)

__all__ = ["write_series", "recist_from_mask", "recist_from_box", "make_record", "select", "group_by_image"]


def write_series(
    root: str | os.PathLike,
    volume: Volume | np.ndarray,
    patient: int,
    study: int,
    series: int,
    first_slice: int = 1,
) -> Path:
    """Write a HU volume as a DeepLesion series folder of 16-bit PNGs.

    Array slice ``k`` (``volume.array[k]``, ``(z, y, x)``) becomes slice number ``first_slice + k``.
    Only voxel values go to disk: spacing goes into the records (:func:`make_record`), and origin
    is not representable in DeepLesion. A :class:`Volume` must be in DeepLesion's orientation
    (see :func:`to_deeplesion_orientation`); a bare ``(z, y, x)`` array is written as it is.

    Returns
    -------
    Path
        ``root/Images_png/{patient:06d}_{study:02d}_{series:02d}``.
    """
    if isinstance(volume, Volume):
        _check_orientation(volume, "write_series")
        array = volume.array
    else:
        array = np.asarray(volume)
    if array.ndim != 3:
        raise SpineInpaintError(f"a series needs a 3D (z, y, x) volume, got shape {array.shape}")
    if first_slice < 1:
        raise SpineInpaintError(f"DeepLesion slice numbers start at 1, got first_slice={first_slice}")
    for name, value in (("patient", patient), ("study", study), ("series", series)):
        if int(value) < 0:
            raise SpineInpaintError(f"{name} index must be >= 0, got {value}")
    folder = Path(root) / "Images_png" / series_folder_name(patient, study, series)
    for k, plane in enumerate(array):
        write_png_hu(plane, folder / f"{first_slice + k:03d}.png")
    return folder


# --- RECIST measurements and records ------------------------------------------------------------
def recist_from_mask(mask: np.ndarray, step: float = 0.125) -> tuple[tuple[float, ...], float, float]:
    """RECIST-like diameters of a 2D lesion mask, in pixel coordinates (x = column, y = row).

    Each pixel is the unit square around its centre. The long axis joins the two corners of the
    mask farthest apart (its largest extent, the Feret diameter). The short axis is the longest
    chord of the mask perpendicular to it, found by sampling lines every ``step`` pixels along the
    long axis and points every ``step`` pixels along each line (so it can be short by up to
    ``2 * step``).

    Returns
    -------
    (coordinates, long, short)
        ``(x11, y11, x12, y12, x21, y21, x22, y22)`` and the two diameters in pixels.
    """
    from scipy.spatial import ConvexHull

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise SpineInpaintError(f"a lesion mask on the key slice must be 2D, got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise SpineInpaintError("the lesion mask is empty on the key slice")
    centres = np.stack([cols, rows], axis=1).astype(float)
    offsets = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    corners = np.unique((centres[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)
    hull = corners[ConvexHull(corners).vertices]
    dist = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    i, j = np.unravel_index(np.argmax(dist), dist.shape)
    p1, p2 = sorted([tuple(hull[i]), tuple(hull[j])])  # deterministic order: smaller x first
    p1, p2 = np.asarray(p1), np.asarray(p2)
    long = float(np.linalg.norm(p2 - p1))
    u = (p2 - p1) / long
    v = np.array([-u[1], u[0]])
    # Sample the perpendicular chords over the hull's extent along v.
    s_hull = (hull - p1) @ v
    t = np.arange(step / 2, long, step)
    s = np.arange(s_hull.min(), s_hull.max() + step / 2, step)
    points = p1 + t[:, None, None] * u + s[None, :, None] * v  # (nt, ns, 2) as (x, y)
    col = np.floor(points[..., 0] + 0.5).astype(int)
    row = np.floor(points[..., 1] + 0.5).astype(int)
    inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    inside[inside] = mask[row[inside], col[inside]]
    if not inside.any():  # cannot happen for a non-empty mask; kept as a guard
        return (*p1, *p2, *p1, *p1), long, 0.0
    s_grid = np.broadcast_to(s[None, :], inside.shape)
    s_min = np.where(inside, s_grid, np.inf).min(axis=1)
    s_max = np.where(inside, s_grid, -np.inf).max(axis=1)
    extent = np.where(np.isfinite(s_min), s_max - s_min, -1.0)
    k = int(np.argmax(extent))
    base = p1 + t[k] * u
    q1, q2 = base + s_min[k] * v, base + s_max[k] * v
    coords = tuple(float(c) for c in (*p1, *p2, *q1, *q2))
    return coords, long, float(extent[k])


def recist_from_box(box: Sequence[float]) -> tuple[tuple[float, ...], float, float]:
    """RECIST-like diameters of a lesion known only by its tight box ``(x1, y1, x2, y2)``.

    The lesion is taken as the ellipse inscribed in the box: the long axis is the box's longer
    side through its centre, the short axis the shorter side (horizontal first on a square).
    """
    if len(box) != 4:
        raise SpineInpaintError(f"a box is (x1, y1, x2, y2), got {tuple(box)}")
    x1, y1, x2, y2 = (float(b) for b in box)
    if not (x1 < x2 and y1 < y2):
        raise SpineInpaintError(f"a box needs x1 < x2 and y1 < y2, got ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    horizontal = (x1, cy, x2, cy)
    vertical = (cx, y1, cx, y2)
    w, h = x2 - x1, y2 - y1
    if w >= h:
        return (*horizontal, *vertical), w, h
    return (*vertical, *horizontal), h, w


def make_record(
    volume: Volume,
    patient: int,
    study: int,
    series: int,
    key_slice: int,
    *,
    box: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    first_slice: int = 1,
    slice_range: tuple[int, int] | None = None,
    lesion_type: int = BONE,
    split: int = 1,
    window: Sequence[float] = DEFAULT_WINDOW,
    possibly_noisy: bool = False,
    gender: str = "",
    age: int | None = None,
    padding: float = BOX_PADDING,
) -> DeepLesionRecord:
    """Build the ``DL_info.csv`` row of a lesion in a series written by :func:`write_series`.

    Parameters
    ----------
    volume
        The series as written by :func:`write_series` (``volume.array[k]`` is slice number
        ``first_slice + k``, orientation LPI); gives the image size, the spacing and the slice count.
    key_slice
        Slice number (1-based) of the lesion's key slice.
    box, mask
        The lesion on the key slice: a 2D mask ``(rows, cols)`` (preferred; RECIST axes from
        :func:`recist_from_mask`) or its tight box ``(x1, y1, x2, y2)`` in pixel coordinates
        (axes from :func:`recist_from_box`). Exactly one is needed.
    slice_range
        ``(first, last)`` slice numbers; default: the whole written series.
    padding
        ``Bounding_boxes`` is the RECIST end points' box padded by this many pixels, as in
        DeepLesion, and clipped to the image.

    Notes
    -----
    ``Normalized_lesion_location`` is the lesion centre (middle of the end points' box) relative
    to the image grid: ``((x + 0.5) / width, (y + 0.5) / height, (k + 0.5) / slices)`` with ``k``
    the key slice's array index (growing towards the feet, as DeepLesion's z does). DeepLesion's
    own values are body-relative (z from a body-part regression model); ours are a grid-relative
    stand-in.
    """
    if not isinstance(volume, Volume):
        raise SpineInpaintError("make_record needs a Volume (array and spacing) of the written series")
    _check_orientation(volume, "make_record")
    nz, height, width = volume.shape
    last_written = first_slice + nz - 1
    if not first_slice <= key_slice <= last_written:
        raise SpineInpaintError(
            f"key slice {key_slice} is outside the series' slices {first_slice}-{last_written}"
        )
    if slice_range is None:
        slice_range = (first_slice, last_written)
    lo, hi = int(slice_range[0]), int(slice_range[1])
    if not (first_slice <= lo <= key_slice <= hi <= last_written):
        raise SpineInpaintError(
            f"slice range {lo}-{hi} must hold the key slice {key_slice} "
            f"and lie within {first_slice}-{last_written}"
        )
    if (box is None) == (mask is None):
        raise SpineInpaintError("give exactly one of a lesion box or a 2D lesion mask on the key slice")
    if mask is not None:
        if np.shape(mask) != (height, width):
            raise SpineInpaintError(
                f"lesion mask shape {np.shape(mask)} does not match the slice ({height}, {width})"
            )
        coords, long, short = recist_from_mask(mask)
    else:
        coords, long, short = recist_from_box(box)  # type: ignore[arg-type]
    if lesion_type not in COARSE_LESION_TYPES:
        raise SpineInpaintError(
            f"unknown coarse lesion type {lesion_type} (known: {sorted(COARSE_LESION_TYPES)})"
        )
    if split not in SPLITS:
        raise SpineInpaintError(f"Train_Val_Test must be 1, 2 or 3, got {split}")
    if gender not in ("M", "F", ""):
        raise SpineInpaintError(f"patient gender must be 'M', 'F' or '' (unknown), got '{gender}'")
    if len(window) != 2 or not float(window[0]) < float(window[1]):
        raise SpineInpaintError(f"window must be (low, high) with low < high, got {tuple(window)}")
    xs, ys = np.asarray(coords[0::2]), np.asarray(coords[1::2])
    bbox = (
        max(float(xs.min()) - padding, 0.0),
        max(float(ys.min()) - padding, 0.0),
        min(float(xs.max()) + padding, width - 1.0),
        min(float(ys.max()) + padding, height - 1.0),
    )
    centre_x, centre_y = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    location = (
        float((centre_x + 0.5) / width),
        float((centre_y + 0.5) / height),
        float((key_slice - first_slice + 0.5) / nz),
    )
    return DeepLesionRecord(
        file_name=f"{series_folder_name(patient, study, series)}_{key_slice:03d}.png",
        patient_index=int(patient),
        study_index=int(study),
        series_id=int(series),
        key_slice_index=int(key_slice),
        measurement_coordinates=coords,  # type: ignore[arg-type]
        bounding_box=bbox,
        lesion_diameters_pixel=(long, short),
        normalized_lesion_location=location,
        coarse_lesion_type=int(lesion_type),
        possibly_noisy=bool(possibly_noisy),
        slice_range=(lo, hi),
        spacing_mm_px=tuple(volume.spacing),  # type: ignore[arg-type]
        image_size=(width, height),
        dicom_window=(float(window[0]), float(window[1])),
        patient_gender=gender,
        patient_age=None if age is None else int(age),
        train_val_test=int(split),
    )


# --- selecting ---------------------------------------------------------------------------------
def select(
    records: Iterable[DeepLesionRecord],
    lesion_type: int | Iterable[int] | None = BONE,
    split: int | str | None = None,
) -> list[DeepLesionRecord]:
    """Records of the given coarse lesion type(s) and split (None: any).

    ``split`` is a ``Train_Val_Test`` code (1, 2, 3) or a name (``'train'``, ``'val'``, ``'test'``).
    """
    if lesion_type is None:
        types = None
    else:
        if isinstance(lesion_type, (int, np.integer)):
            types = {int(lesion_type)}
        else:
            types = {int(t) for t in lesion_type}
        unknown = types - set(COARSE_LESION_TYPES)
        if unknown:
            raise SpineInpaintError(
                f"unknown coarse lesion type(s) {sorted(unknown)} (known: {sorted(COARSE_LESION_TYPES)})"
            )
    if isinstance(split, str):
        codes = {name: code for code, name in SPLITS.items()}
        if split not in codes:
            raise SpineInpaintError(f"unknown split '{split}' (known: {', '.join(codes)})")
        split = codes[split]
    elif split is not None and split not in SPLITS:
        raise SpineInpaintError(f"unknown split {split} (known: 1 train, 2 val, 3 test)")
    return [
        r for r in records
        if (types is None or r.coarse_lesion_type in types) and (split is None or r.train_val_test == split)
    ]


def group_by_image(records: Iterable[DeepLesionRecord]) -> dict[str, list[DeepLesionRecord]]:
    """Records grouped by key slice image (``File_name``), in first-seen order: all boxes per image."""
    groups: dict[str, list[DeepLesionRecord]] = {}
    for r in records:
        groups.setdefault(r.file_name, []).append(r)
    return groups
