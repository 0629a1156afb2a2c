"""NIfTI-1 headers whose direction cosines are slightly off orthonormal: read them as 3D Slicer does.

ITK (so SimpleITK) refuses a NIfTI file whose sform direction columns are not orthonormal ("ITK only
supports orthonormal direction cosines"). Scanners and converters write such headers, with errors
of 1e-4 from float rounding; 3D Slicer and nibabel read them. Here such a header is repaired in a
temporary copy: the voxel size is the length of each sform column and the direction is the nearest
orthonormal matrix to the normalised columns (the polar decomposition, ``U @ Vt`` of its SVD, which
is what VTK's ``vtkMath::Orthogonalize3x3`` computes); the origin is kept. The qform is cleared, so
the repaired sform is the one geometry the file states.

Beyond :data:`ORTHONORMAL_TOLERANCE` the header describes a sheared grid, and resampling it onto an
orthonormal one would move voxels by more than a rounding error: that is an error, not a warning.

ITK also reads a truncated NIfTI file without complaint (the missing voxels come back as zeros) and
turns NaN and infinite voxels into 0: :func:`check_data` reads the data once itself, through the
gzip checksum, and refuses such files before ITK sees them.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError

__all__ = ["ORTHONORMAL_TOLERANCE", "NiftiGeometry", "read_geometry", "orthonormality_error", "nearest_orthonormal",
           "sheared_grid", "repaired_note", "repaired_copy", "check_data"]

#: Largest accepted ``max |D^T D - I|`` of the normalised direction columns (0.01: about 0.6 degrees of shear).
ORTHONORMAL_TOLERANCE = 1e-2

_HEADER_SIZE = 348
_QFORM_CODE = 252  # int16 qform_code, int16 sform_code
_SROW = 280  # float32 srow_x, srow_y, srow_z (4 each)


class NiftiGeometry:
    """The sform of a NIfTI-1 header: ``matrix`` (3x3, RAS mm per voxel index), ``offset`` and codes."""

    def __init__(self, matrix: np.ndarray, offset: np.ndarray, qform_code: int, sform_code: int, endian: str):
        self.matrix = np.asarray(matrix, dtype=float)
        self.offset = np.asarray(offset, dtype=float)
        self.qform_code = int(qform_code)
        self.sform_code = int(sform_code)
        self.endian = endian

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along i, j, k: the lengths of the sform columns."""
        return np.linalg.norm(self.matrix, axis=0)

    @property
    def direction(self) -> np.ndarray:
        """The normalised sform columns (not yet orthonormalised)."""
        return self.matrix / self.spacing


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _header(path: Path) -> tuple[bytes, str]:
    try:
        with _open(path) as f:
            head = f.read(_HEADER_SIZE)
    except (OSError, EOFError) as err:
        raise SpineInpaintError(f"cannot read {path} as an image: not a NIfTI file ({err})") from None
    if len(head) < _HEADER_SIZE:
        raise SpineInpaintError(f"cannot read {path} as an image: too short for a NIfTI-1 header")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", head[:4])[0] == _HEADER_SIZE:
            return head, endian
    raise SpineInpaintError(f"cannot read {path} as an image: no NIfTI-1 header (NIfTI-2 files are not supported)")


def read_geometry(path: str | os.PathLike) -> NiftiGeometry:
    """The sform geometry stored in a NIfTI-1 file's header."""
    path = Path(path)
    head, e = _header(path)
    qcode, scode = struct.unpack(e + "2h", head[_QFORM_CODE:_QFORM_CODE + 4])
    rows = np.array(struct.unpack(e + "12f", head[_SROW:_SROW + 48]), dtype=float).reshape(3, 4)
    return NiftiGeometry(rows[:, :3], rows[:, 3], qcode, scode, e)


def orthonormality_error(direction: np.ndarray) -> float:
    """``max |D^T D - I|`` of a 3x3 direction matrix with unit columns (0 for an orthonormal one)."""
    d = np.asarray(direction, dtype=float)
    return float(np.abs(d.T @ d - np.eye(3)).max())


def nearest_orthonormal(direction: np.ndarray) -> np.ndarray:
    """The orthonormal matrix closest (Frobenius norm) to ``direction``: ``U @ Vt`` of its SVD."""
    u, _, vt = np.linalg.svd(np.asarray(direction, dtype=float))
    return u @ vt


def sheared_grid(name: str, error: float) -> SpineInpaintError:
    """The one-line error for direction cosines off orthonormal by more than :data:`ORTHONORMAL_TOLERANCE`."""
    return SpineInpaintError(f"{name}: the direction cosines are off orthonormal by {error:.2g} (accepted up to "
                             f"{ORTHONORMAL_TOLERANCE:g}); the grid is sheared: resample it to an orthonormal grid first")


def repaired_note(name: str, error: float) -> str:
    """The warning for direction cosines off orthonormal within the tolerance, read orthonormalised."""
    return (f"{name}: direction cosines off orthonormal by {error:.1e} (accepted up to {ORTHONORMAL_TOLERANCE:g}); "
            "read with the nearest orthonormal direction")


def repaired_copy(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> tuple[Path, float]:
    """Write a copy of a NIfTI-1 file whose sform is orthonormalised; return it and the error it had.

    Parameters
    ----------
    path
        A ``.nii`` or ``.nii.gz`` file whose sform is off orthonormal.
    folder
        Where to write the copy (default: a new temporary folder; the caller removes it).

    Raises
    ------
    SpineInpaintError
        When the file has no sform, or its error exceeds :data:`ORTHONORMAL_TOLERANCE`.
    """
    path = Path(path)
    geometry = read_geometry(path)
    if geometry.sform_code <= 0 or not np.all(geometry.spacing > 0):
        raise SpineInpaintError(f"{path.name}: the header holds no usable sform to repair")
    error = orthonormality_error(geometry.direction)
    if error > ORTHONORMAL_TOLERANCE:
        raise sheared_grid(path.name, error)
    matrix = nearest_orthonormal(geometry.direction) * geometry.spacing
    with _open(path) as f:
        data = bytearray(f.read())
    e = geometry.endian
    data[_QFORM_CODE:_QFORM_CODE + 2] = struct.pack(e + "h", 0)
    rows = np.concatenate([matrix, geometry.offset[:, None]], axis=1)
    data[_SROW:_SROW + 48] = struct.pack(e + "12f", *rows.ravel().tolist())
    out_dir = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="spineinpaint_nifti_"))
    out = out_dir / ("repaired" + (".nii.gz" if path.name.lower().endswith(".gz") else ".nii"))
    with (gzip.open(out, "wb", compresslevel=1) if out.name.endswith(".gz") else open(out, "wb")) as f:
        f.write(bytes(data))
    return out, error


#: NIfTI-1 datatype codes -> numpy dtypes (the scalar ones).
_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}

_CHUNK = 1 << 24


def _data_layout(head: bytes, e: str, name: str) -> tuple[int, int, np.dtype | None]:
    """(offset of the voxel data, its size in bytes, its dtype when scalar) from a NIfTI-1 header."""
    dims = struct.unpack(e + "8h", head[40:56])
    datatype, bitpix = struct.unpack(e + "2h", head[70:74])
    offset = struct.unpack(e + "f", head[108:112])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1:1 + ndim]) or bitpix <= 0 or not math.isfinite(offset):
        raise SpineInpaintError(f"{name} has a broken NIfTI header (dim {list(dims)}, bitpix {bitpix})")
    size = math.prod(max(1, d) for d in dims[1:1 + ndim]) * bitpix // 8
    dtype = np.dtype(_DTYPES[datatype]).newbyteorder(e) if datatype in _DTYPES else None
    return max(int(offset), _HEADER_SIZE), size, dtype


def check_data(path: str | os.PathLike) -> None:
    """Refuse a NIfTI-1 file that is cut short, whose gzip stream is damaged, or whose voxels hold NaN or inf.

    The data is read once in chunks (the gzip module checks the CRC at the end of the stream); nothing
    is kept in memory beyond a chunk.

    Raises
    ------
    SpineInpaintError
        With a one-line reason naming the file.
    """
    path = Path(path)
    head, e = _header(path)
    offset, size, dtype = _data_layout(head, e, path.name)
    floating = dtype is not None and dtype.kind == "f"
    total, bad, carry = 0, 0, b""
    try:
        with _open(path) as f:
            f.read(offset)
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if floating and total - len(chunk) < size:
                    data = carry + chunk[: max(0, size - (total - len(chunk)))]
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
                    carry = data[usable:]
    except (OSError, EOFError, zlib.error) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpineInpaintError(f"{path.name} is damaged and cannot be read ({reason})") from None
    if total < size:
        raise SpineInpaintError(f"{path.name} is truncated: it holds {total} of the {size} data bytes its header "
                                "promises")
    if bad:
        raise SpineInpaintError(f"{path.name} holds {bad} NaN or infinite voxels; a CT volume needs finite values")
