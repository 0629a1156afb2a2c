"""Reading and writing CT volumes and label maps, and the project's one grid convention.

Arrays are ``(z, y, x)`` in numpy and ``(x, y, z)`` in SimpleITK and VTK. This module is the only
place that converts between the two: everything else in SpineInpaintLib works on :class:`Volume`,
whose ``array`` is ``(z, y, x)`` and whose geometry (``spacing``, ``origin``, ``direction``) is
kept in ITK's ``(x, y, z)`` order and LPS patient coordinates, exactly as the file stored it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import nifti
from SpineInpaintLib.core.labels import TOTALSEG_IDS, is_vertebra, verse_to_totalseg

__all__ = [
    "VOLUME_SUFFIXES", "Volume", "from_sitk", "to_sitk", "read_dicom_series", "read_volume", "write_volume",
    "resample_like", "resample_to_spacing", "reorient", "to_vtk_image", "from_vtk_image",
    "read_totalsegmentator_folder", "read_verse_labels",
]

#: File endings that :func:`write_volume` accepts (and :func:`read_volume` reads besides DICOM).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Geometry comparisons: 1e-4 mm (or relative) is far below any scanner's precision.
_GEOMETRY_TOL = 1e-4


@dataclasses.dataclass
class Volume:
    """A 3D image on a physical grid.

    Parameters
    ----------
    array
        Voxel values, shape ``(z, y, x)`` (slice, row, column).
    spacing
        Voxel size in millimetres along ``(x, y, z)``, as ITK stores it.
    origin
        LPS position in millimetres of voxel ``(0, 0, 0)``, as ITK stores it.
    direction
        3x3 matrix whose columns are the LPS directions of the i, j, k (x, y, z) index axes.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise SpineInpaintError(f"a volume must be 3D, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise SpineInpaintError("spacing and origin need three values (x, y, z)")
        if min(self.spacing) <= 0:
            raise SpineInpaintError(f"voxel spacing must be positive, got {self.spacing}")

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Grid size in ITK order ``(x, y, z)``."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in millimetres in array order ``(z, y, x)``."""
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping a homogeneous index ``(i, j, k, 1)`` = (x, y, z) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping ``(i, j, k, 1)`` to RAS mm (what Slicer's IJKToRAS holds)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps()

    def index_to_physical(self, zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS positions (N, 3) of array indices given as ``(z, y, x)`` rows."""
        zyx = np.atleast_2d(np.asarray(zyx, dtype=float))
        ijk = zyx[:, ::-1]
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, lps: np.ndarray | Sequence[float]) -> np.ndarray:
        """Continuous array indices ``(z, y, x)`` (N, 3) of LPS positions."""
        lps = np.atleast_2d(np.asarray(lps, dtype=float))
        m = self.direction @ np.diag(self.spacing)
        ijk = np.linalg.solve(m, (lps - np.asarray(self.origin)).T).T
        return ijk[:, ::-1]

    def same_grid(self, other: Volume, tol: float = _GEOMETRY_TOL) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=tol, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume on the same grid holding ``array`` (which must have the same shape)."""
        array = np.asarray(array)
        if array.shape != self.shape:
            raise SpineInpaintError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def copy(self) -> Volume:
        """A deep copy."""
        return Volume(self.array.copy(), self.spacing, self.origin, self.direction.copy())

    def geometry(self) -> dict:
        """JSON-ready geometry (for reports and manifests)."""
        return {
            "size_xyz": list(self.size_xyz),
            "spacing_xyz": list(self.spacing),
            "origin_lps": list(self.origin),
            "direction": self.direction.ravel().tolist(),
        }


# --- SimpleITK <-> Volume (the one place where axis order flips) -------------------------------
def from_sitk(image: sitk.Image) -> Volume:
    """Convert a 3D scalar SimpleITK image to a :class:`Volume` (array copied, ``(z, y, x)``)."""
    if image.GetDimension() != 3:
        raise SpineInpaintError(f"a 3D image is needed, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SpineInpaintError(
            f"a scalar image is needed, got {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"({image.GetPixelIDTypeAsString()})"
        )
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )


def to_sitk(volume: Volume) -> sitk.Image:
    """Convert a :class:`Volume` to a SimpleITK image with the same geometry."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.ravel().tolist())
    return image


# --- reading and writing ------------------------------------------------------------------------
_SCALAR_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


def read_dicom_series(directory: str | os.PathLike) -> sitk.Image:
    """Read the largest DICOM series in ``directory`` (sorted by position, as GDCM does)."""
    directory = str(directory)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(directory)
    if not series:
        raise SpineInpaintError(f"no DICOM series found in folder {directory}")
    files = max((reader.GetGDCMSeriesFileNames(directory, s) for s in series), key=len)
    _check_slice_positions(files, directory)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise SpineInpaintError(f"cannot read the DICOM series in {directory}: {_first_line(err)}") from None


#: Largest deviation of a DICOM slice gap from the series' median gap, relative (plus 0.01 mm).
_SLICE_GAP_TOLERANCE = 0.01


def _slice_positions(files: Sequence[str]) -> np.ndarray:
    """Position (mm) of each DICOM file's slice along the series' normal (ImagePositionPatient, ImageOrientationPatient)."""
    reader = sitk.ImageFileReader()
    normal, out = None, []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            if normal is None:
                cosines = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
                normal = np.cross(cosines[:3], cosines[3:6])
        except (RuntimeError, ValueError):
            raise SpineInpaintError(f"DICOM file {Path(name).name} is damaged or has no slice position") from None
        out.append(float(position @ normal))
    return np.asarray(out)


def _check_slice_positions(files: Sequence[str], directory: str) -> None:
    """Refuse a series whose slices are not evenly spaced: a missing, damaged or duplicated slice file.

    ITK would average the spacing over a gap (a 2 mm series missing one slice reads as 2.1 mm), and the
    restored CT and its surfaces would get the wrong geometry.
    """
    if len(files) < 3:
        return
    positions = np.sort(_slice_positions(files))
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 1e-3 or gaps.min() <= 1e-3:
        raise SpineInpaintError(f"the DICOM series in {directory} holds two slices at the same position "
                                "(a duplicated file?): remove the duplicate and load it again")
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > _SLICE_GAP_TOLERANCE * step + 0.01:
        raise SpineInpaintError(
            f"the DICOM series in {directory} is irregular: slices {worst} and {worst + 1} are {gaps[worst]:.2f} mm "
            f"apart where the others are {step:.2f} mm (a missing or damaged slice file?); export the series again "
            "or resample it onto a regular grid first"
        )


def read_volume(path: str | os.PathLike, *, require_3d: bool = True) -> Volume:
    """Read a CT volume or label map: NIfTI, NRRD, MHA/MHD, or a folder holding a DICOM series.

    Parameters
    ----------
    path
        A file, or a folder with one DICOM series (the largest one is taken if there are several).
    require_3d
        Refuse 2D images and single-slice volumes (a CT volume is needed for the pipeline).

    Raises
    ------
    SpineInpaintError
        With a one-line reason: missing file, not an image, 2D, or a non-scalar pixel type.
    """
    path = Path(path)
    if not path.exists():
        raise SpineInpaintError(f"file not found: {path}")
    if path.is_dir():
        image = read_dicom_series(path)
    else:
        image = _read_file(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetPixelID() not in _SCALAR_TYPES:
        raise SpineInpaintError(
            f"{path} has pixel type '{image.GetPixelIDTypeAsString()}'; a scalar (grey-value) volume is needed"
        )
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) == 1 and require_3d):
        if require_3d:
            raise SpineInpaintError(
                f"{path} is a 2D image ({'x'.join(map(str, image.GetSize()))}); a 3D volume is needed"
            )
        image = sitk.JoinSeries(image) if image.GetDimension() == 2 else image
    if image.GetDimension() != 3:
        raise SpineInpaintError(f"{path} is {image.GetDimension()}D; a 3D volume is needed")
    return _orthonormal(from_sitk(image), path)


def _orthonormal(volume: Volume, path: Path) -> Volume:
    """``volume`` with an orthonormal direction: kept, repaired with a warning within the tolerance, else refused.

    ITK hands NRRD and MHA direction matrices through as stored, sheared or not; our outputs must sit
    on a grid every writer keeps.
    """
    error = nifti.orthonormality_error(volume.direction)
    if error <= 1e-6:
        return volume
    if error > nifti.ORTHONORMAL_TOLERANCE:
        raise nifti.sheared_grid(path.name, error)
    warnings.warn(nifti.repaired_note(path.name, error), UserWarning, stacklevel=3)
    volume.direction = nifti.nearest_orthonormal(volume.direction)
    return volume


def _read_file(path: Path) -> sitk.Image:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        nifti.check_data(path)  # ITK reads truncated files and NaN voxels as zeros without a word
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        if "orthonormal" not in str(err) or not path.name.lower().endswith((".nii", ".nii.gz")):
            raise SpineInpaintError(
                f"cannot read {path} as an image (supported: NIfTI, NRRD, MHA, DICOM series)"
            ) from None
    return _read_off_orthonormal(path)


def _read_off_orthonormal(path: Path) -> sitk.Image:
    """Read a NIfTI file whose direction cosines ITK refuses, orthonormalised (see :mod:`.nifti`)."""
    copy, error = nifti.repaired_copy(path)
    try:
        image = sitk.ReadImage(str(copy))
    except RuntimeError as err:
        raise SpineInpaintError(f"cannot read {path} even with its direction repaired: {_first_line(err)}") from None
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    warnings.warn(nifti.repaired_note(path.name, error), UserWarning, stacklevel=3)
    return image


def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` to NIfTI/NRRD/MHA, keeping origin, spacing and direction.

    Bool arrays are written as uint8. The file type follows the ending of ``path``.
    """
    path = Path(path)
    if not str(path).lower().endswith(VOLUME_SUFFIXES):
        raise SpineInpaintError(f"cannot write {path.name}: use one of {', '.join(VOLUME_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(volume), str(path), useCompression=compress)
    return path


# --- label formats: one label map in TotalSegmentator v2 ids ---------------------------------------
def read_totalsegmentator_folder(folder: str | os.PathLike, *, ct_name: str = "ct.nii.gz") -> tuple[Volume, Volume]:
    """Read a subject of the TotalSegmentator dataset: ``ct.nii.gz`` and ``segmentations/<structure>.nii.gz``.

    The binary masks (one per structure, named as TotalSegmentator v2 names them) become one uint8
    label map in TotalSegmentator v2 ids on the CT's grid. Where masks overlap, a vertebra wins over
    any other structure, and otherwise the higher id wins. Mask files whose name is not a v2 class
    are skipped with one warning.

    Returns
    -------
    (ct, labels)
    """
    folder = Path(folder)
    ct_path, seg_dir = folder / ct_name, folder / "segmentations"
    if not ct_path.exists() or not seg_dir.is_dir():
        raise SpineInpaintError(
            f"{folder} is not a TotalSegmentator dataset subject (needs {ct_name} and segmentations/)"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ct = read_volume(ct_path)
    for w in caught[:1]:
        warnings.warn(str(w.message), w.category, stacklevel=2)
    masks, unknown = [], []
    for path in sorted(seg_dir.glob("*.nii*")):
        name = path.name.split(".")[0]
        if name in TOTALSEG_IDS:
            masks.append((TOTALSEG_IDS[name], path))
        else:
            unknown.append(name)
    if not masks:
        raise SpineInpaintError(f"{seg_dir} holds no TotalSegmentator v2 masks")
    # vertebrae last, so that they win where a mask overlaps them (a rib head on its vertebra)
    masks.sort(key=lambda item: (is_vertebra(item[0]), item[0]))
    labels = np.zeros(ct.shape, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CT's warning said it: the masks share its header
        for label, path in masks:
            mask = read_volume(path)
            if not mask.same_grid(ct):
                mask = resample_like(mask, ct, labels=True)
            labels[mask.array > 0] = label
    if unknown:
        warnings.warn(f"{seg_dir}: skipped {len(unknown)} masks that are no TotalSegmentator v2 class "
                      f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})", UserWarning, stacklevel=2)
    return ct, ct.with_array(labels)


def read_verse_labels(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a VerSe vertebra mask (VerSe ids 1-28) as a label map in TotalSegmentator v2 ids.

    VerSe ids without a TotalSegmentator id (28, T13) become 0 with a warning. With ``reference``
    the map is resampled onto its grid (nearest neighbour).
    """
    volume = read_volume(path)
    values = np.unique(volume.array)
    if values.min() < 0 or values.max() > 28:
        raise SpineInpaintError(
            f"{Path(path).name} holds ids {values.min()}..{values.max()}; VerSe vertebra masks hold 0-28 "
            "(sub-region masks, ids 41-50, are not vertebra labels)"
        )
    mapped, dropped = verse_to_totalseg(volume.array)
    if dropped:
        warnings.warn(f"{Path(path).name}: VerSe ids {dropped} have no TotalSegmentator id and were set to 0",
                      UserWarning, stacklevel=2)
    out = volume.with_array(mapped)
    if reference is not None and not out.same_grid(reference):
        out = resample_like(out, reference, labels=True)
        out.array = out.array.astype(np.uint8)
    return out


# --- resampling -------------------------------------------------------------------------------
def resample_like(volume: Volume, reference: Volume, *, labels: bool = False, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` through physical (LPS) space.

    Parameters
    ----------
    labels
        Nearest-neighbour interpolation (label maps); linear otherwise.
    default
        Value outside ``volume``'s extent (use -1024 for CT in air).
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    image = to_sitk(volume)
    pixel = image.GetPixelID()
    if not labels and pixel not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
        pixel = sitk.sitkFloat32
    out = sitk.Resample(image, to_sitk(reference), sitk.Transform(), interpolator, default, pixel)
    return from_sitk(out)


def resample_to_spacing(
    volume: Volume, spacing: Sequence[float], *, labels: bool = False, default: float = 0.0
) -> Volume:
    """Resample ``volume`` to a new ``(x, y, z)`` spacing covering the same physical extent."""
    spacing = tuple(float(s) for s in spacing)
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(volume.size_xyz, volume.spacing, spacing)]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    # Keep the extent centred: the first voxel centre moves by half the change of voxel size.
    shift = [(t - s) / 2.0 for s, t in zip(volume.spacing, spacing)]
    reference.SetOrigin(tuple(np.asarray(volume.origin) + volume.direction @ np.asarray(shift)))
    reference.SetDirection(volume.direction.ravel().tolist())
    return resample_like(volume, from_sitk(reference), labels=labels, default=default)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def reorient(volume: Volume, orientation: str = "LPS") -> Volume:
    """Permute/flip the array so that its axes point along ``orientation`` (ITK's DICOMOrient code).

    ``"LPS"`` gives x towards patient left, y towards posterior, z towards superior: array rows
    run anterior to posterior and slices inferior to superior, whatever the file stored.
    """
    image = sitk.DICOMOrient(to_sitk(volume), orientation)
    return from_sitk(image)


# --- Volume <-> vtkImageData (VTK's x-fastest order is numpy's C order of (z, y, x)) ---------------
def to_vtk_image(volume: Volume):
    """A ``vtkImageData`` holding a copy of the voxels, with the volume's spacing, origin and direction.

    VTK stores voxels x fastest, which is the C order of the ``(z, y, x)`` array, so the flat buffer
    is copied as it is. The direction matrix (LPS) is set on the image, but many VTK filters ignore
    it: to work in index space, pass a volume with unit spacing and identity direction.
    Bool voxels become uint8.
    """
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = vtkImageData()
    image.SetDimensions(*[int(n) for n in volume.size_xyz])
    image.SetSpacing(*volume.spacing)
    image.SetOrigin(*volume.origin)
    image.SetDirectionMatrix(*[float(v) for v in volume.direction.ravel()])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def from_vtk_image(image) -> Volume:
    """A :class:`Volume` (array copied, ``(z, y, x)``) from a single-component ``vtkImageData``.

    The origin is that of the image's first extent index, so an image whose extent does not start
    at 0 keeps its physical position.
    """
    from vtkmodules.util import numpy_support

    scalars = image.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        raise SpineInpaintError("a vtkImageData with one scalar component per voxel is needed")
    nx, ny, nz = image.GetDimensions()
    direction = np.array([image.GetDirectionMatrix().GetElement(i, j) for i in range(3) for j in range(3)])
    direction = direction.reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    start = np.asarray(image.GetExtent()[::2], dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ (spacing * start)
    array = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()
    return Volume(array, tuple(spacing), tuple(origin), direction)
