"""io: file formats, the (z, y, x) <-> (x, y, z) convention, physical geometry and input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.data.real import load_real_case


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip_keeps_values_and_geometry(tmp_path, oblique_volume, suffix):
    path = io.write_volume(oblique_volume, tmp_path / f"vol{suffix}")
    back = io.read_volume(path)
    np.testing.assert_array_equal(back.array, oblique_volume.array)
    assert back.same_grid(oblique_volume)
    np.testing.assert_allclose(back.direction, oblique_volume.direction, atol=1e-6)


def test_array_order_is_zyx_and_sitk_order_is_xyz(oblique_volume):
    image = io.to_sitk(oblique_volume)
    assert image.GetSize() == (9, 7, 5)
    assert oblique_volume.size_xyz == (9, 7, 5)
    assert oblique_volume.spacing_zyx == (2.5, 0.8, 0.7)
    assert image.GetPixel(8, 1, 3) == pytest.approx(float(oblique_volume.array[3, 1, 8]))


def test_index_to_physical_matches_itk_and_inverts(oblique_volume):
    image = io.to_sitk(oblique_volume)
    zyx = np.array([[0, 0, 0], [4, 6, 8], [2, 3, 1]])
    lps = oblique_volume.index_to_physical(zyx)
    for row, point in zip(zyx, lps):
        expected = image.TransformIndexToPhysicalPoint([int(v) for v in row[::-1]])
        np.testing.assert_allclose(point, expected, atol=1e-9)
    np.testing.assert_allclose(oblique_volume.physical_to_index(lps), zyx, atol=1e-9)


def test_ijk_to_ras_flips_the_first_two_axes_of_lps(oblique_volume):
    ijk = np.array([8, 1, 3, 1.0])
    lps = oblique_volume.ijk_to_lps() @ ijk
    ras = oblique_volume.ijk_to_ras() @ ijk
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
    np.testing.assert_allclose(lps[:3], oblique_volume.index_to_physical([3, 1, 8])[0])


def test_with_array_rejects_another_shape(oblique_volume):
    with pytest.raises(SpineInpaintError, match="does not match the grid"):
        oblique_volume.with_array(np.zeros((2, 2, 2)))


def test_resample_keeps_a_point_at_its_physical_position():
    base = io.Volume(np.zeros((20, 30, 30), np.float32), spacing=(1.0, 1.0, 2.0), origin=(5.0, -3.0, 10.0))
    base.array[10, 12, 17] = 1000.0
    target = base.index_to_physical([10, 12, 17])[0]
    fine = io.resample_to_spacing(base, (0.5, 0.5, 1.0))
    peak = np.unravel_index(np.argmax(fine.array), fine.shape)
    np.testing.assert_allclose(fine.index_to_physical(peak)[0], target, atol=0.5 + 1e-6)
    # The extent is kept: same physical field of view (edges of first and last voxels).
    assert fine.size_xyz == (60, 60, 40)


def test_resample_like_labels_stay_integer_labels(real_case):
    ct, labels = real_case
    coarse = io.resample_to_spacing(labels, (6.0, 6.0, 6.0), labels=True)
    assert set(np.unique(coarse.array)) <= set(np.unique(labels.array))


def test_reorient_to_lps_keeps_every_voxel_at_its_position(real_case):
    ct, _ = real_case
    assert not np.allclose(ct.direction, np.eye(3))  # the scan is stored RAS-like: diag(-1, -1, 1)
    lps = io.reorient(ct, "LPS")
    np.testing.assert_allclose(lps.direction, np.eye(3))
    for zyx in ([0, 0, 0], [50, 40, 100]):
        point = ct.index_to_physical(zyx)[0]
        back = np.round(lps.physical_to_index(point)[0]).astype(int)
        assert lps.array[tuple(back)] == ct.array[tuple(zyx)]


def test_dicom_series_reads_as_a_volume(real_dir):
    ct = io.read_volume(real_dir / "totalsegmentator" / "example_ct_dicom")
    assert ct.size_xyz == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert -1100 <= ct.array.min() and ct.array.max() < 3000


def test_real_cases_load_with_labels_on_the_ct_grid():
    ct, labels = load_real_case("totalsegmentator")
    assert labels.same_grid(ct) and labels.array.dtype == np.uint8
    assert set(range(25, 34)) <= set(np.unique(labels.array).tolist())
    # The DICOM labels are stored with flipped rows: after physical resampling they sit on bone.
    dct, dlabels = load_real_case("totalsegmentator_dicom")
    assert dlabels.same_grid(dct)
    vertebra = np.isin(dlabels.array, [32, 33])
    assert vertebra.sum() > 1000
    assert dct.array[vertebra].mean() > 150  # bone; a misaligned mask would average soft tissue
    assert dct.array[vertebra].mean() > dct.array[~vertebra].mean() + 200


def test_unknown_real_case_is_a_clear_error():
    with pytest.raises(SpineInpaintError, match="unknown real case 'nope'"):
        load_real_case("nope")


# --- bad input ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(SpineInpaintError, match="file not found"):
        io.read_volume(tmp_path / "nothing.nii.gz")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not a volume")
    with pytest.raises(SpineInpaintError, match="cannot read .* as an image"):
        io.read_volume(path)


def test_2d_image_is_refused_when_3d_is_needed(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(path))
    with pytest.raises(SpineInpaintError, match="2D image .*16x16.*3D volume is needed"):
        io.read_volume(path)


def test_single_slice_volume_is_refused_when_3d_is_needed(tmp_path):
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(path))
    with pytest.raises(SpineInpaintError, match="3D volume is needed"):
        io.read_volume(path)
    assert io.read_volume(path, require_3d=False).shape == (1, 16, 16)


def test_wrong_pixel_type(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(SpineInpaintError, match="pixel type .*scalar"):
        io.read_volume(path)


def test_folder_without_dicom(tmp_path):
    with pytest.raises(SpineInpaintError, match="no DICOM series"):
        io.read_volume(tmp_path)


def test_write_refuses_an_unknown_suffix(tmp_path, oblique_volume):
    with pytest.raises(SpineInpaintError, match="use one of"):
        io.write_volume(oblique_volume, tmp_path / "vol.png")


def test_volume_rejects_non_3d_and_bad_spacing():
    with pytest.raises(SpineInpaintError, match="must be 3D"):
        io.Volume(np.zeros((4, 4)))
    with pytest.raises(SpineInpaintError, match="spacing must be positive"):
        io.Volume(np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0))


# --- damaged NIfTI files: ITK reads them as zeros, we refuse them -------------------------------------------
def _nifti(tmp_path, name, array):
    image = sitk.GetImageFromArray(array)
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def _refused(path, match):
    before = path.read_bytes()
    with pytest.raises(SpineInpaintError, match=match) as err:
        io.read_volume(path)
    assert "\n" not in str(err.value) and path.read_bytes() == before  # one line, the file untouched


def test_truncated_and_corrupted_nifti_files_are_refused(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 1500, (20, 30, 40)).astype(np.int16)
    packed = _nifti(tmp_path, "ct.nii.gz", array).read_bytes()
    raw = _nifti(tmp_path, "ct.nii", array).read_bytes()
    (tmp_path / "half.nii.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "third.nii").write_bytes(raw[: len(raw) // 3])
    flipped = bytearray(packed)
    for k in range(len(packed) // 3, len(packed) // 3 + 2000):
        flipped[k] ^= 0xFF
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(flipped))
    # what ITK alone does with a cut file: zeros where the data is missing
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "third.nii"))) == 0).mean() > 0.5
    _refused(tmp_path / "half.nii.gz", "half.nii.gz is damaged")
    _refused(tmp_path / "third.nii", r"third.nii is truncated: it holds \d+ of the 48000 data bytes")
    _refused(tmp_path / "flipped.nii.gz", "flipped.nii.gz is damaged")
    np.testing.assert_array_equal(io.read_volume(tmp_path / "ct.nii.gz").array, array)
    np.testing.assert_array_equal(io.read_volume(tmp_path / "ct.nii").array, array)


def test_nifti_with_nan_or_inf_voxels_is_refused(tmp_path):
    array = np.zeros((8, 9, 10), np.float32)
    array[2, 3, 4], array[5, 6, 7] = np.nan, -np.inf
    path = _nifti(tmp_path, "nan.nii.gz", array)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[2, 3, 4] == 0  # ITK's silent zero
    _refused(path, "nan.nii.gz holds 2 NaN or infinite voxels")
    _refused(_nifti(tmp_path, "nan.nii", array), "nan.nii holds 2 NaN or infinite voxels")


# --- direction matrices that are not orthonormal (ITK passes NRRD and MHA ones through as stored) ----------
def _sheared_text_header(tmp_path, ext: str, lean: float):
    path = tmp_path / f"sheared_{lean:g}.{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(path))
    text = path.read_bytes()
    if ext == "nrrd":
        text = text.replace(b"space directions: (1,0,0) (0,1,0) (0,0,1)",
                            f"space directions: (1,0,0) ({lean:g},1,0) (0,0,1)".encode())
    else:
        text = text.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", f"TransformMatrix = 1 0 0 {lean:g} 1 0 0 0 1".encode())
    path.write_bytes(text)
    return path


@pytest.mark.parametrize("ext", ["nrrd", "mha"])
def test_sheared_direction_is_refused_beyond_the_tolerance(tmp_path, ext):
    path = _sheared_text_header(tmp_path, ext, 0.5)
    assert not np.allclose(np.asarray(sitk.ReadImage(str(path)).GetDirection()).reshape(3, 3)[:, 1], [0, 1, 0])
    _refused(path, "off orthonormal by 0.[45].*the grid is sheared")


@pytest.mark.parametrize("ext", ["nrrd", "mha"])
def test_slightly_off_direction_is_repaired_and_outputs_share_the_read_grid(tmp_path, ext):
    from SpineInpaintLib.core import nifti

    path = _sheared_text_header(tmp_path, ext, 0.003)
    with pytest.warns(UserWarning, match="off orthonormal by 3.0e-03"):
        volume = io.read_volume(path)
    assert nifti.orthonormality_error(volume.direction) < 1e-9
    written = io.write_volume(volume, tmp_path / "out.nii.gz")
    back = io.read_volume(written)
    assert back.same_grid(volume)  # what we write keeps the (repaired) grid exactly


# --- DICOM series with a missing, damaged or duplicated slice ----------------------------------------------------
@pytest.fixture()
def dicom_files():
    from SpineInpaintLib.data.real import real_data_dir

    folder = real_data_dir() / "totalsegmentator" / "example_ct_dicom"
    if not folder.exists():
        pytest.skip("no ../shared/data/real")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def _series(tmp_path, files, name):
    import shutil

    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    return folder


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, dicom_files):
    folder = _series(tmp_path, dicom_files[:9] + dicom_files[10:], "missing")
    # ITK alone averages the gap into the spacing: 2.11 mm for this 2 mm series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    assert reader.Execute().GetSpacing()[2] == pytest.approx(38 / 18)
    with pytest.raises(SpineInpaintError, match=r"is irregular: slices 8 and 9 are 4.00 mm apart where the others "
                                                r"are 2.00 mm") as err:
        io.read_volume(folder)
    assert "\n" not in str(err.value)


def test_dicom_series_with_a_damaged_or_duplicated_slice_is_refused(tmp_path, dicom_files):
    import shutil

    damaged = _series(tmp_path, dicom_files, "damaged")
    victim = damaged / Path(dicom_files[7]).name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpineInpaintError, match="is irregular"):
        io.read_volume(damaged)
    duplicated = _series(tmp_path, dicom_files, "duplicated")
    shutil.copy(dicom_files[5], duplicated / "copy_of_slice_5.dcm")
    with pytest.raises(SpineInpaintError, match="holds two slices at the same position"):
        io.read_volume(duplicated)
    assert io.read_volume(_series(tmp_path, dicom_files, "whole")).shape == (20, 512, 512)
