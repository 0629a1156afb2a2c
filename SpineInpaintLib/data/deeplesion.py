"""DeepLesion (NIH, Yan et al. 2018): 16-bit PNG slices and the ``DL_info.csv`` annotation table.

Miao et al. train on spine images chosen from DeepLesion. This module reads (and, for our simulated
CT, writes) that format exactly as it is released:

* ``ROOT/Images_png/{Patient_index:06d}_{Study_index:02d}_{Series_ID:02d}/{slice:03d}.png``: one
  16-bit grey PNG per axial slice, slice numbers 1-based; ``HU = int32(pixel) - 32768``.
* ``ROOT/DL_info.csv``: one row per lesion (several rows can share one key slice), with the
  columns of :data:`COLUMNS`. Multi-valued fields are comma-separated numbers in one quoted field,
  e.g. ``"-175, 275"``. Pixel coordinates are 0-based, with integer values at pixel centres.

The paper's preprocessing (Sec. II-A) is :func:`read_png_hu` (int32, minus 32768) followed by
:func:`window_to_uint8` with each image's own default window (``DICOM_windows``): below the
window 0, above it 255, linear in between, stored as 8 bit.

Two facts about the released table matter when selecting lesions: ``Coarse_lesion_type`` is -1
("not labelled") for the training-set lesions, the types being labelled on the validation and
test sets only; and ``Bounding_boxes`` are not drawn but derived, as the tight box around the two
RECIST diameters padded by 5 pixels on every side (:data:`BOX_PADDING`).

Geometry: DeepLesion stores spacing but no origin and no direction. We use the orientation of the
dataset authors' own PNG-to-NIfTI converter (``DL_save_nifti.py``, "suitable for 3D Slicer and
ITK-SNAP"): columns run towards the patient's left, rows towards posterior (the DICOM display
orientation of axial CT) and increasing slice numbers run inferior, i.e. the LPS direction matrix
:data:`DEEPLESION_DIRECTION` = diag(1, 1, -1) ("LPI"). :func:`load_series_volume` puts pixel (0, 0)
of slice number ``s`` at LPS ``(0, 0, -(s - 1) * spacing_z)``, so that the volumes of one series read
for different records agree. Before writing our own volumes, :func:`to_deeplesion_orientation`
flips and permutes them (no interpolation) into that orientation.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume, reorient

__all__ = [
    "COLUMNS", "COARSE_LESION_TYPES", "BONE", "SPLITS", "HU_OFFSET", "BOX_PADDING", "DEEPLESION_DIRECTION",
    "DEFAULT_WINDOW", "DeepLesionRecord", "series_folder_name", "read_info", "write_info", "read_png_hu",
    "write_png_hu", "window_to_uint8", "load_key_slice", "load_series_volume", "to_deeplesion_orientation",
]

#: The columns of ``DL_info.csv``, in the order of the released file.
COLUMNS: tuple[str, ...] = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)

#: ``Coarse_lesion_type`` codes. -1: not labelled (the training-set lesions of the release).
COARSE_LESION_TYPES: dict[int, str] = {
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft tissue",
    8: "pelvis",
    -1: "unknown",
}

#: The bone lesions, where the spinal tumours are.
BONE = 1

#: ``Train_Val_Test`` codes.
SPLITS: dict[int, str] = {1: "train", 2: "val", 3: "test"}

#: 16-bit pixel value of 0 HU.
HU_OFFSET = 32768

#: Pixels added on every side of the RECIST end points' box to make ``Bounding_boxes``.
BOX_PADDING = 5.0

#: LPS direction of a DeepLesion series: columns to the left, rows posterior, slice numbers inferior.
DEEPLESION_DIRECTION = np.diag([1.0, 1.0, -1.0])

#: The commonest default window in DeepLesion (soft tissue), in HU.
DEFAULT_WINDOW: tuple[float, float] = (-175.0, 275.0)

# Number of values of each multi-valued column.
_LIST_LENGTHS = {
    "Measurement_coordinates": 8,
    "Bounding_boxes": 4,
    "Lesion_diameters_Pixel_": 2,
    "Normalized_lesion_location": 3,
    "Slice_range": 2,
    "Spacing_mm_px_": 3,
    "Image_size": 2,
    "DICOM_windows": 2,
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_PNG_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


# --- the annotation record ----------------------------------------------------------------------
@dataclasses.dataclass
class DeepLesionRecord:
    """One row of ``DL_info.csv``: one lesion on one key slice.

    Field names follow the columns (in snake case); coordinates are pixels, 0-based.

    Parameters
    ----------
    file_name
        ``{series folder}_{key slice:03d}.png``, e.g. ``000001_01_01_109.png``.
    patient_index, study_index, series_id
        The three parts of the series folder name.
    key_slice_index
        Slice number (1-based, as in the PNG name) of the annotated slice.
    measurement_coordinates
        RECIST end points ``(x11, y11, x12, y12, x21, y21, x22, y22)``: long axis, then short axis.
    bounding_box
        ``(x1, y1, x2, y2)``; the RECIST end points' box padded by :data:`BOX_PADDING` in DeepLesion.
    lesion_diameters_pixel
        ``(long, short)`` RECIST diameters in pixels.
    normalized_lesion_location
        ``(x, y, z)`` position of the lesion centre in the body, each in [0, 1].
    coarse_lesion_type
        A key of :data:`COARSE_LESION_TYPES`.
    possibly_noisy
        The release flags some annotations as possibly noisy.
    slice_range
        ``(first, last)`` slice numbers available around the key slice.
    spacing_mm_px
        ``(x, y, z)`` pixel spacing and slice interval in millimetres.
    image_size
        ``(width, height)`` in pixels, i.e. ``(columns, rows)``.
    dicom_window
        ``(low, high)`` default display window in HU.
    patient_gender
        ``'M'``, ``'F'``, or ``''`` when not known.
    patient_age
        Years, or None when not known.
    train_val_test
        A key of :data:`SPLITS` (1 train, 2 validation, 3 test).
    """

    file_name: str
    patient_index: int
    study_index: int
    series_id: int
    key_slice_index: int
    measurement_coordinates: tuple[float, float, float, float, float, float, float, float]
    bounding_box: tuple[float, float, float, float]
    lesion_diameters_pixel: tuple[float, float]
    normalized_lesion_location: tuple[float, float, float]
    coarse_lesion_type: int
    possibly_noisy: bool
    slice_range: tuple[int, int]
    spacing_mm_px: tuple[float, float, float]
    image_size: tuple[int, int]
    dicom_window: tuple[float, float]
    patient_gender: str
    patient_age: int | None
    train_val_test: int

    @property
    def series_folder(self) -> str:
        """Folder name of the series under ``Images_png``, e.g. ``000001_01_01``."""
        return series_folder_name(self.patient_index, self.study_index, self.series_id)

    @property
    def lesion_type_name(self) -> str:
        """Name of the coarse lesion type, e.g. ``'bone'``."""
        return COARSE_LESION_TYPES[self.coarse_lesion_type]

    @property
    def split(self) -> str:
        """``'train'``, ``'val'`` or ``'test'``."""
        return SPLITS[self.train_val_test]

    @property
    def lesion_diameters_mm(self) -> tuple[float, float]:
        """``(long, short)`` RECIST diameters in millimetres (in-plane spacing of x)."""
        long, short = self.lesion_diameters_pixel
        return (long * self.spacing_mm_px[0], short * self.spacing_mm_px[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Slice array shape ``(rows, cols)``."""
        return (self.image_size[1], self.image_size[0])

    def slice_path(self, root: str | os.PathLike, slice_number: int) -> Path:
        """Path of the PNG of ``slice_number`` (1-based) in this record's series under ``root``."""
        return Path(root) / "Images_png" / self.series_folder / f"{int(slice_number):03d}.png"

    def key_slice_path(self, root: str | os.PathLike) -> Path:
        """Path of the key slice's PNG under the DeepLesion ``root`` (which holds ``Images_png``)."""
        return self.slice_path(root, self.key_slice_index)


def series_folder_name(patient: int, study: int, series: int) -> str:
    """``{patient:06d}_{study:02d}_{series:02d}``, the DeepLesion series folder name."""
    return f"{int(patient):06d}_{int(study):02d}_{int(series):02d}"


# --- DL_info.csv ---------------------------------------------------------------------------------
def read_info(csv_path: str | os.PathLike) -> list[DeepLesionRecord]:
    """Read ``DL_info.csv`` into records, checking every field.

    Columns are found by name (extra columns are ignored).

    Raises
    ------
    SpineInpaintError
        Missing file or columns (named), or a malformed value (its line and column named).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SpineInpaintError(f"DeepLesion table not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise SpineInpaintError(f"{csv_path.name} lacks the DeepLesion column(s) {', '.join(missing)}")
        records = []
        for row in reader:
            records.append(_parse_row(row, f"{csv_path.name} line {reader.line_num}"))
    return records


def _parse_row(row: dict[str, str], where: str) -> DeepLesionRecord:
    def text(column: str) -> str:
        value = row.get(column)
        return "" if value is None else value.strip()

    def bad(column: str, expected: str) -> SpineInpaintError:
        return SpineInpaintError(f"{where}: column {column}: expected {expected}, got '{text(column)}'")

    def integer(column: str, allowed: Iterable[int] | None = None) -> int:
        try:
            value = float(text(column))
        except ValueError:
            raise bad(column, "an integer") from None
        if not value.is_integer() or (allowed is not None and int(value) not in allowed):
            raise bad(column, "an integer" if allowed is None else f"one of {sorted(allowed)}")
        return int(value)

    def numbers(column: str) -> tuple[float, ...]:
        n = _LIST_LENGTHS[column]
        parts = [p.strip() for p in text(column).split(",")]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise bad(column, f"{n} comma-separated numbers") from None
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise bad(column, f"{n} comma-separated numbers")
        return values

    def integers(column: str) -> tuple[int, ...]:
        values = numbers(column)
        if not all(v.is_integer() for v in values):
            raise bad(column, f"{_LIST_LENGTHS[column]} comma-separated integers")
        return tuple(int(v) for v in values)

    age_text = text("Patient_age")
    if age_text == "" or age_text.lower() == "nan":
        age = None
    else:
        age = integer("Patient_age")
    slice_range = integers("Slice_range")
    image_size = integers("Image_size")
    window = numbers("DICOM_windows")
    spacing = numbers("Spacing_mm_px_")
    record = DeepLesionRecord(
        file_name=text("File_name"),
        patient_index=integer("Patient_index"),
        study_index=integer("Study_index"),
        series_id=integer("Series_ID"),
        key_slice_index=integer("Key_slice_index"),
        measurement_coordinates=numbers("Measurement_coordinates"),  # type: ignore[arg-type]
        bounding_box=numbers("Bounding_boxes"),  # type: ignore[arg-type]
        lesion_diameters_pixel=numbers("Lesion_diameters_Pixel_"),  # type: ignore[arg-type]
        normalized_lesion_location=numbers("Normalized_lesion_location"),  # type: ignore[arg-type]
        coarse_lesion_type=integer("Coarse_lesion_type", COARSE_LESION_TYPES),
        possibly_noisy=bool(integer("Possibly_noisy", (0, 1))),
        slice_range=slice_range,  # type: ignore[arg-type]
        spacing_mm_px=spacing,  # type: ignore[arg-type]
        image_size=image_size,  # type: ignore[arg-type]
        dicom_window=window,  # type: ignore[arg-type]
        patient_gender=text("Patient_gender"),
        patient_age=age,
        train_val_test=integer("Train_Val_Test", SPLITS),
    )
    expected_name = f"{record.series_folder}_{record.key_slice_index:03d}.png"
    if record.file_name != expected_name:
        raise bad("File_name", f"'{expected_name}' (series folder and key slice of this row)")
    if not slice_range[0] <= record.key_slice_index <= slice_range[1]:
        raise bad("Slice_range", f"a range holding the key slice {record.key_slice_index}")
    if min(image_size) <= 0:
        raise bad("Image_size", "a positive width and height")
    if min(spacing) <= 0:
        raise bad("Spacing_mm_px_", "positive spacings")
    if not window[0] < window[1]:
        raise bad("DICOM_windows", "low < high")
    return record


def write_info(records: Iterable[DeepLesionRecord], csv_path: str | os.PathLike) -> Path:
    """Write records as ``DL_info.csv``: the released column order, multi-valued fields quoted.

    Numbers are written as integers when integral and otherwise with the shortest text that reads
    back to the same float, so that :func:`read_info` returns equal records.
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow([
                r.file_name,
                r.patient_index,
                r.study_index,
                r.series_id,
                r.key_slice_index,
                _format_list(r.measurement_coordinates),
                _format_list(r.bounding_box),
                _format_list(r.lesion_diameters_pixel),
                _format_list(r.normalized_lesion_location),
                r.coarse_lesion_type,
                int(bool(r.possibly_noisy)),
                _format_list(r.slice_range),
                _format_list(r.spacing_mm_px),
                _format_list(r.image_size),
                _format_list(r.dicom_window),
                r.patient_gender,
                "" if r.patient_age is None else int(r.patient_age),
                r.train_val_test,
            ])
    return csv_path


def _format_number(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _format_list(values: Sequence[float]) -> str:
    # ", " as in the released file: "-175, 275".
    return ", ".join(_format_number(v) for v in values)


# --- 16-bit PNG slices ----------------------------------------------------------------------------
def _png_header(path: Path) -> tuple[int, int, int, int]:
    """``(width, height, bit_depth, colour_type)`` from the PNG's IHDR chunk."""
    with open(path, "rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise SpineInpaintError(f"{path} is not a PNG file")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def read_png_hu(path: str | os.PathLike) -> np.ndarray:
    """Read a DeepLesion slice: a 16-bit grey PNG, returned in HU as int32 ``(rows, cols)``.

    Raises
    ------
    SpineInpaintError
        Missing file, not a PNG, not 16-bit grey (e.g. an 8-bit or colour PNG), or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise SpineInpaintError(f"DeepLesion slice file not found: {path}")
    _, _, depth, colour = _png_header(path)
    if depth != 16 or colour != 0:
        kind = _PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        raise SpineInpaintError(
            f"{path} is a {depth}-bit {kind} PNG; DeepLesion slices are 16-bit grey PNGs"
        )
    try:
        with Image.open(path) as image:
            pixels = np.array(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise SpineInpaintError(f"cannot read {path}: {err}") from None
    # Pillow gives uint16 ('I;16') for 16-bit grey PNGs; older versions gave int32 ('I').
    if pixels.ndim != 2 or pixels.dtype.kind not in "ui":
        raise SpineInpaintError(
            f"{path} did not decode to a 2D integer image (got {pixels.dtype}, shape {pixels.shape})"
        )
    return pixels.astype(np.int32) - HU_OFFSET


def write_png_hu(hu: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 2D HU slice as a DeepLesion 16-bit PNG (pixel = HU + 32768).

    Float values are rounded to the nearest integer; values outside [-32768, 32767] HU are
    clipped to the uint16 range.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise SpineInpaintError(f"a slice must be 2D, got shape {hu.shape}")
    if hu.dtype.kind not in "uifb":
        raise SpineInpaintError(f"a slice must hold numbers, got dtype {hu.dtype}")
    values = hu.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise SpineInpaintError(f"the slice for {Path(path).name} holds NaN or infinite values")
    pixels = np.clip(np.rint(values) + HU_OFFSET, 0, 65535).astype("<u2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A little-endian uint16 array becomes Pillow mode 'I;16', which PNG stores as 16-bit grey.
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")
    return path


def window_to_uint8(
    hu: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW, *, rounding: str = "nearest"
) -> np.ndarray:
    """Window HU to 8 bit as Miao et al. describe: below ``low`` 0, above ``high`` 255, linear between.

    ``value = 255 * clip((hu - low) / (high - low), 0, 1)``, then converted to uint8.

    Parameters
    ----------
    hu
        HU values, any shape.
    window
        ``(low, high)`` in HU, e.g. a record's ``dicom_window``.
    rounding
        ``'nearest'`` (half up; the paper does not say) or ``'floor'`` (what a plain ``astype(uint8)``
        of the scaled values does).
    """
    if len(window) != 2:
        raise SpineInpaintError(f"a window is (low, high) in HU, got {tuple(window)}")
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise SpineInpaintError(f"window low must be below high, got ({low:g}, {high:g})")
    scaled = 255.0 * np.clip((np.asarray(hu, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    if rounding == "nearest":
        scaled = np.floor(scaled + 0.5)
    elif rounding == "floor":
        scaled = np.floor(scaled)
    else:
        raise SpineInpaintError(f"rounding must be 'nearest' or 'floor', got '{rounding}'")
    return scaled.astype(np.uint8)


# --- slices and volumes ---------------------------------------------------------------------------
def _read_record_slice(root: str | os.PathLike, record: DeepLesionRecord, number: int) -> np.ndarray:
    hu = read_png_hu(record.slice_path(root, number))
    if hu.shape != record.shape:
        raise SpineInpaintError(
            f"{record.slice_path(root, number)} is {hu.shape[1]}x{hu.shape[0]} pixels but "
            f"{record.file_name} says Image_size {record.image_size[0]}x{record.image_size[1]}"
        )
    return hu


def load_key_slice(
    root: str | os.PathLike,
    record: DeepLesionRecord,
    neighbours: int = 1,
    windowed: bool = True,
    window: Sequence[float] | None = None,
) -> np.ndarray:
    """Stack a record's key slice with its neighbours as channels.

    Parameters
    ----------
    root
        DeepLesion folder holding ``Images_png``.
    neighbours
        ``n``: the slices ``key - n ... key + n`` are stacked in that order, so channel ``n`` is the
        key slice. Beyond the ends of ``Slice_range`` the edge slice is repeated (no slice outside
        the annotated range is read), as for a 2.5D detector input.
    windowed
        Return uint8 windowed with ``window`` (default: the record's own ``DICOM_windows``), as in
        the paper; else int32 HU.

    Returns
    -------
    np.ndarray
        ``(2n + 1, rows, cols)``.
    """
    if neighbours < 0:
        raise SpineInpaintError(f"neighbours must be >= 0, got {neighbours}")
    first, last = record.slice_range
    key = record.key_slice_index
    numbers = [min(max(key + d, first), last) for d in range(-neighbours, neighbours + 1)]
    cache: dict[int, np.ndarray] = {}
    for number in numbers:
        if number not in cache:
            cache[number] = _read_record_slice(root, record, number)
    stack = np.stack([cache[n] for n in numbers])
    if windowed:
        return window_to_uint8(stack, record.dicom_window if window is None else window)
    return stack


def load_series_volume(root: str | os.PathLike, record: DeepLesionRecord) -> Volume:
    """Build a HU :class:`~SpineInpaintLib.io.Volume` from the slices in a record's ``Slice_range``.

    Array slice ``k`` is slice number ``first + k``. Spacing is the record's ``Spacing_mm_px_``; the
    direction is :data:`DEEPLESION_DIRECTION` and pixel (0, 0) of slice number ``s`` lies at LPS
    ``(0, 0, -(s - 1) * dz)`` (DeepLesion stores no origin; see the module notes).
    """
    first, last = record.slice_range
    slices = [_read_record_slice(root, record, n) for n in range(first, last + 1)]
    dz = record.spacing_mm_px[2]
    return Volume(
        np.stack(slices),
        spacing=record.spacing_mm_px,
        origin=(0.0, 0.0, -(first - 1) * dz),
        direction=DEEPLESION_DIRECTION.copy(),
    )


def to_deeplesion_orientation(volume: Volume) -> Volume:
    """Flip and permute the axes of ``volume`` (no interpolation) into DeepLesion's orientation.

    The result has the direction closest to :data:`DEEPLESION_DIRECTION` (exactly it for an
    axis-aligned input) and every voxel keeps its physical (LPS) position.
    """
    oriented = reorient(volume, "LPI")
    oriented.array = oriented.array.astype(volume.array.dtype, copy=False)
    return oriented


def _check_orientation(volume: Volume, what: str) -> None:
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.direction.ravel().tolist())
    if code != "LPI":
        raise SpineInpaintError(
            f"{what} needs a volume in DeepLesion's orientation (LPI: columns left, rows posterior, "
            f"slices inferior), got {code}; use deeplesion.to_deeplesion_orientation(volume) first"
        )
