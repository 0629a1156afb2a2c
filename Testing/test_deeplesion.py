"""deeplesion: 16-bit PNG slices, DL_info.csv, the paper's windowing, neighbour stacks and the writer.

DeepLesion itself is not reachable here: every test writes a small DeepLesion-format folder.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.data import deeplesion as dl
from SpineInpaintLib.data.deeplesion_export import (
    group_by_image,
    make_record,
    recist_from_box,
    recist_from_mask,
    select,
    write_series,
)

HEADER = ",".join(dl.COLUMNS)
# Three lesions: two on one image of series 000001_01_01 (a bone one and a liver one), one in series
# 000002_01_02 whose slices are numbered 10-13. Formatted as the released file is.
ROWS = [
    '000001_01_01_003.png,1,1,1,3,"30.5, 20, 40.5, 30, 33, 28, 37, 22","25.5, 15, 45.5, 35",'
    '"14.1421, 7.2111","0.55, 0.4, 0.5",1,0,"1, 5","0.8, 0.8, 2.5","64, 64","-175, 275",F,63,3',
    '000001_01_01_003.png,1,1,1,3,"10, 40, 20, 40, 15, 37, 15, 43","5, 32, 25, 48",'
    '"10, 6","0.2, 0.6, 0.5",4,1,"1, 5","0.8, 0.8, 2.5","64, 64","-175, 275",F,63,3',
    '000002_01_02_011.png,2,1,2,11,"5.25, 6, 9.75, 6, 7.5, 4, 7.5, 8","0.25, 0, 14.75, 13",'
    '"4.5, 4","0.1, 0.1, 0.3",-1,0,"10, 13","0.703125, 0.703125, 1","64, 64","-1500, 500",M,,1',
]
SERIES = {"000001_01_01": range(1, 6), "000002_01_02": range(10, 14)}


def _slice_hu(folder: str, number: int) -> np.ndarray:
    """A 64x64 HU slice, random but reproducible, with a marker and the extreme HU values."""
    rng = np.random.default_rng([number, int(folder[:6])])
    hu = rng.integers(-1024, 3072, size=(64, 64)).astype(np.int32)
    hu[0, 0] = 100 * number  # identifies the slice in stacks
    hu[0, 1] = -32768  # pixel 0
    hu[0, 2] = 32767  # pixel 65535
    return hu


def _write_dataset(root: Path, rows: list[str] = ROWS, header: str = HEADER) -> Path:
    for folder, numbers in SERIES.items():
        (root / "Images_png" / folder).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            pixels = (_slice_hu(folder, n) + 32768).astype("<u2")
            Image.fromarray(pixels).save(root / "Images_png" / folder / f"{n:03d}.png")
    (root / "DL_info.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _write_dataset(tmp_path / "DeepLesion")


# --- PNG ------------------------------------------------------------------------------------------
def test_png_round_trip_is_bit_exact_for_the_whole_uint16_range(tmp_path):
    pixels = np.array([[0, 1, 255, 256, 32767], [32768, 32769, 40000, 65534, 65535]], dtype=np.uint16)
    path = dl.write_png_hu(pixels.astype(np.int32) - 32768, tmp_path / "s.png")
    # The file really is a 16-bit grey PNG (IHDR bit depth 16, colour type 0) ...
    with open(path, "rb") as f:
        head = f.read(26)
    assert struct.unpack(">IIBB", head[16:26]) == (5, 2, 16, 0)
    # ... which an independent decoder (ITK's PNG reader) reads to the same uint16 values ...
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), pixels)
    # ... and read_png_hu turns into int32 HU = pixel - 32768.
    hu = dl.read_png_hu(path)
    assert hu.dtype == np.int32 and hu.shape == (2, 5)
    np.testing.assert_array_equal(hu, pixels.astype(np.int64) - 32768)
    assert hu[0, 0] == -32768 and hu[1, 0] == 0 and hu[1, 4] == 32767


def test_write_png_rounds_and_clips_to_the_uint16_range(tmp_path):
    hu = np.array([[-40000.0, -32768.0, -0.4, 1.6], [99.5001, 32767.0, 40000.0, -1024.0]])
    back = dl.read_png_hu(dl.write_png_hu(hu, tmp_path / "c.png"))
    np.testing.assert_array_equal(back, [[-32768, -32768, 0, 2], [100, 32767, 32767, -1024]])


def test_write_png_refuses_bad_slices(tmp_path):
    with pytest.raises(SpineInpaintError, match="must be 2D"):
        dl.write_png_hu(np.zeros((2, 3, 4)), tmp_path / "a.png")
    with pytest.raises(SpineInpaintError, match="NaN"):
        dl.write_png_hu(np.array([[0.0, np.nan]]), tmp_path / "b.png")


def test_read_png_refuses_8_bit_colour_non_png_and_missing_files(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "8bit.png")
    with pytest.raises(SpineInpaintError, match="8-bit grey PNG; DeepLesion slices are 16-bit"):
        dl.read_png_hu(tmp_path / "8bit.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SpineInpaintError, match="8-bit RGB PNG"):
        dl.read_png_hu(tmp_path / "rgb.png")
    (tmp_path / "text.png").write_text("not an image at all, but long enough to hold a header")
    with pytest.raises(SpineInpaintError, match="is not a PNG file"):
        dl.read_png_hu(tmp_path / "text.png")
    with pytest.raises(SpineInpaintError, match="slice file not found"):
        dl.read_png_hu(tmp_path / "nothing.png")


# --- windowing ------------------------------------------------------------------------------------
def test_window_is_zero_below_255_above_and_linear_between():
    # Window (-175, 275): width 450, so 1 HU is 255/450 = 0.5667 grey levels.
    hu = np.array([-3000, -176, -175, -174, 49, 50, 274, 275, 276, 3000])
    nearest = dl.window_to_uint8(hu, (-175, 275))
    floor = dl.window_to_uint8(hu, (-175, 275), rounding="floor")
    assert nearest.dtype == np.uint8 and floor.dtype == np.uint8
    # -174: 0.567; 49: 126.93; 50: 127.5 (middle); 274: 254.43.
    np.testing.assert_array_equal(nearest, [0, 0, 0, 1, 127, 128, 254, 255, 255, 255])
    np.testing.assert_array_equal(floor, [0, 0, 0, 0, 126, 127, 254, 255, 255, 255])


def test_window_keeps_shape_and_refuses_bad_windows():
    assert dl.window_to_uint8(np.zeros((3, 4, 5)), (-1500, 500)).shape == (3, 4, 5)
    # -1500..500: 0 HU is 1500/2000 of the way: 191.25 -> 191.
    assert dl.window_to_uint8(np.array([0]), (-1500, 500))[0] == 191
    with pytest.raises(SpineInpaintError, match="low must be below high"):
        dl.window_to_uint8(np.zeros(3), (275, -175))
    with pytest.raises(SpineInpaintError, match="rounding"):
        dl.window_to_uint8(np.zeros(3), (0, 1), rounding="ceil")


# --- DL_info.csv ----------------------------------------------------------------------------------
def test_read_info_parses_every_field(dataset):
    records = dl.read_info(dataset / "DL_info.csv")
    assert len(records) == 3
    bone, liver, lung = records
    assert bone == dl.DeepLesionRecord(
        file_name="000001_01_01_003.png",
        patient_index=1,
        study_index=1,
        series_id=1,
        key_slice_index=3,
        measurement_coordinates=(30.5, 20.0, 40.5, 30.0, 33.0, 28.0, 37.0, 22.0),
        bounding_box=(25.5, 15.0, 45.5, 35.0),
        lesion_diameters_pixel=(14.1421, 7.2111),
        normalized_lesion_location=(0.55, 0.4, 0.5),
        coarse_lesion_type=1,
        possibly_noisy=False,
        slice_range=(1, 5),
        spacing_mm_px=(0.8, 0.8, 2.5),
        image_size=(64, 64),
        dicom_window=(-175.0, 275.0),
        patient_gender="F",
        patient_age=63,
        train_val_test=3,
    )
    assert bone.lesion_type_name == "bone" and bone.split == "test"
    assert bone.lesion_diameters_mm == pytest.approx((14.1421 * 0.8, 7.2111 * 0.8))
    assert bone.series_folder == "000001_01_01"
    assert bone.key_slice_path(dataset) == dataset / "Images_png" / "000001_01_01" / "003.png"
    assert liver.coarse_lesion_type == 4 and liver.possibly_noisy is True
    assert lung.coarse_lesion_type == -1 and lung.lesion_type_name == "unknown"
    assert lung.patient_age is None and lung.patient_gender == "M" and lung.split == "train"
    assert lung.slice_range == (10, 13) and lung.dicom_window == (-1500.0, 500.0)
    assert lung.spacing_mm_px == (0.703125, 0.703125, 1.0)


def test_write_info_round_trips_and_quotes_multi_valued_fields(dataset, tmp_path):
    records = dl.read_info(dataset / "DL_info.csv")
    path = dl.write_info(records, tmp_path / "out" / "DL_info.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    assert '"-175, 275"' in lines[1] and '"0.703125, 0.703125, 1"' in lines[3]
    assert lines[3].endswith(",M,,1")  # unknown age stays empty
    assert dl.read_info(path) == records


def test_read_info_names_missing_columns(dataset):
    header = HEADER.replace(",DICOM_windows", "").replace("Spacing_mm_px_", "Spacing")
    (dataset / "DL_info.csv").write_text(header + "\n")
    match = r"lacks the DeepLesion column\(s\) Spacing_mm_px_, DICOM_windows"
    with pytest.raises(SpineInpaintError, match=match):
        dl.read_info(dataset / "DL_info.csv")


@pytest.mark.parametrize(
    "old, new, match",
    [
        ('"25.5, 15, 45.5, 35"', '"25.5, 15, 45.5"', r"line 2: column Bounding_boxes: expected 4 comma-sep"),
        ('"-175, 275"', '"-175; 275"', r"line 2: column DICOM_windows: expected 2 comma-separated numbers"),
        ('"64, 64"', '"64.5, 64"', r"line 2: column Image_size: expected 2 comma-separated integers"),
        (",1,0,", ",9,0,", r"line 2: column Coarse_lesion_type: expected one of \[-1, 1, 2"),
        (",F,63,3", ",F,63,4", r"line 2: column Train_Val_Test: expected one of \[1, 2, 3\]"),
        ("000001_01_01_003.png,", "000001_01_01_3.png,", r"File_name: expected '000001_01_01_003.png'"),
        ('"1, 5"', '"4, 5"', r"Slice_range: expected a range holding the key slice 3"),
        ('"-175, 275"', '"275, -175"', r"DICOM_windows: expected low < high"),
    ],
)
def test_read_info_names_line_and_column_of_a_bad_value(dataset, old, new, match):
    rows = [ROWS[0].replace(old, new, 1), *ROWS[1:]]
    assert rows[0] != ROWS[0]
    _write_dataset(dataset, rows)
    with pytest.raises(SpineInpaintError, match=match):
        dl.read_info(dataset / "DL_info.csv")


def test_read_info_refuses_a_missing_table(tmp_path):
    with pytest.raises(SpineInpaintError, match="DeepLesion table not found"):
        dl.read_info(tmp_path / "DL_info.csv")


# --- slices, stacks, volumes ----------------------------------------------------------------------
def test_key_slice_holds_the_exact_hu_values(dataset):
    bone = dl.read_info(dataset / "DL_info.csv")[0]
    hu = dl.load_key_slice(dataset, bone, neighbours=0, windowed=False)
    assert hu.shape == (1, 64, 64) and hu.dtype == np.int32
    np.testing.assert_array_equal(hu[0], _slice_hu("000001_01_01", 3))


def test_neighbour_stack_order_and_windowing(dataset):
    bone = dl.read_info(dataset / "DL_info.csv")[0]  # key 3 in 1..5
    hu = dl.load_key_slice(dataset, bone, neighbours=1, windowed=False)
    assert hu.shape == (3, 64, 64)
    assert list(hu[:, 0, 0]) == [200, 300, 400]  # slices 2, 3, 4: channel 1 is the key
    for channel, number in enumerate([2, 3, 4]):
        np.testing.assert_array_equal(hu[channel], _slice_hu("000001_01_01", number))
    grey = dl.load_key_slice(dataset, bone, neighbours=1)  # the record's own window (-175, 275)
    assert grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, dl.window_to_uint8(hu, (-175, 275)))
    # Marker 200 HU: (200 + 175) / 450 * 255 = 212.5 -> 213 (half up); -32768 HU -> 0; 32767 HU -> 255.
    assert grey[0, 0, 0] == 213 and grey[0, 0, 1] == 0 and grey[0, 0, 2] == 255
    lung = dl.load_key_slice(dataset, bone, neighbours=0, window=(-1500, 500))
    np.testing.assert_array_equal(lung[0], dl.window_to_uint8(hu[1], (-1500, 500)))


def test_neighbour_stack_repeats_the_edge_slices_of_the_range(dataset):
    records = dl.read_info(dataset / "DL_info.csv")
    bone, other = records[0], records[2]  # keys 3 in 1..5 and 11 in 10..13
    wide = dl.load_key_slice(dataset, bone, neighbours=3, windowed=False)
    assert list(wide[:, 0, 0] // 100) == [1, 1, 2, 3, 4, 5, 5]
    edge = dl.load_key_slice(dataset, other, neighbours=2, windowed=False)
    assert list(edge[:, 0, 0] // 100) == [10, 10, 11, 12, 13]
    np.testing.assert_array_equal(edge[0], _slice_hu("000002_01_02", 10))


def test_series_volume_has_the_slices_and_the_csv_spacing(dataset):
    lung = dl.read_info(dataset / "DL_info.csv")[2]
    volume = dl.load_series_volume(dataset, lung)
    assert volume.shape == (4, 64, 64)
    expected = np.stack([_slice_hu("000002_01_02", n) for n in range(10, 14)])
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.spacing == (0.703125, 0.703125, 1.0)
    # DeepLesion's orientation (LPI): slice number s at LPS z = -(s - 1) * dz, so slice 10 at -9 mm,
    # and voxel (z=2, y=5, x=7), slice 12, at (7 * 0.703125, 5 * 0.703125, -11) mm.
    np.testing.assert_array_equal(volume.direction, np.diag([1.0, 1.0, -1.0]))
    assert volume.origin == (0.0, 0.0, -9.0)
    np.testing.assert_allclose(volume.index_to_physical([2, 5, 7]), [[7 * 0.703125, 5 * 0.703125, -11.0]])


def test_missing_and_8_bit_slices_are_reported(dataset):
    bone = dl.read_info(dataset / "DL_info.csv")[0]
    (dataset / "Images_png" / "000001_01_01" / "005.png").unlink()
    dl.load_key_slice(dataset, bone, neighbours=1)  # slices 2-4 only: still fine
    with pytest.raises(SpineInpaintError, match=r"slice file not found: .*000001_01_01.005\.png"):
        dl.load_key_slice(dataset, bone, neighbours=2)
    with pytest.raises(SpineInpaintError, match="005.png"):
        dl.load_series_volume(dataset, bone)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(dataset / "Images_png" / "000001_01_01" / "002.png")
    with pytest.raises(SpineInpaintError, match="002.png is a 8-bit grey PNG"):
        dl.load_key_slice(dataset, bone, neighbours=1)


def test_slice_size_must_match_the_table(dataset):
    bone = dl.read_info(dataset / "DL_info.csv")[0]
    dl.write_png_hu(np.zeros((64, 32)), bone.key_slice_path(dataset))
    with pytest.raises(SpineInpaintError, match="is 32x64 pixels but .* says Image_size 64x64"):
        dl.load_key_slice(dataset, bone, neighbours=0)


def test_negative_neighbours_are_refused(dataset):
    bone = dl.read_info(dataset / "DL_info.csv")[0]
    with pytest.raises(SpineInpaintError, match="neighbours must be >= 0"):
        dl.load_key_slice(dataset, bone, neighbours=-1)


# --- selecting ------------------------------------------------------------------------------------
def test_select_by_type_and_split(dataset):
    records = dl.read_info(dataset / "DL_info.csv")
    assert [r.coarse_lesion_type for r in select(records)] == [dl.BONE]
    assert select(records, None, "train") == [records[2]]
    assert select(records, 4, 3) == [records[1]]
    assert select(records, [1, 4], "test") == records[:2]
    assert select(records, dl.BONE, "val") == []
    assert len(select(records, None, None)) == 3
    with pytest.raises(SpineInpaintError, match="unknown split 'validation'"):
        select(records, split="validation")
    with pytest.raises(SpineInpaintError, match=r"unknown coarse lesion type\(s\) \[12\]"):
        select(records, 12)


def test_group_by_image_collects_the_lesions_of_one_key_slice(dataset):
    groups = group_by_image(dl.read_info(dataset / "DL_info.csv"))
    assert list(groups) == ["000001_01_01_003.png", "000002_01_02_011.png"]
    assert [r.coarse_lesion_type for r in groups["000001_01_01_003.png"]] == [1, 4]


# --- RECIST axes and the writer -------------------------------------------------------------------
def test_recist_of_a_rectangle_mask():
    mask = np.zeros((48, 64), bool)
    mask[20:24, 10:20] = True  # 4 rows x 10 columns: pixel squares span x 9.5..19.5, y 19.5..23.5
    coords, long, short = recist_from_mask(mask)
    assert long == pytest.approx(np.hypot(10, 4))  # the diagonal
    ends = {coords[0:2], coords[2:4]}
    assert ends in ({(9.5, 19.5), (19.5, 23.5)}, {(9.5, 23.5), (19.5, 19.5)})
    # A chord perpendicular to the diagonal (direction (10, 4) / L) that ends on both long sides is
    # 4 / (10 / L) = 0.4 L long, the longest such chord.
    assert short == pytest.approx(0.4 * np.hypot(10, 4), abs=0.25)
    long_vec = np.subtract(coords[2:4], coords[0:2])
    short_vec = np.subtract(coords[6:8], coords[4:6])
    assert np.dot(long_vec, short_vec) == pytest.approx(0.0, abs=1e-9)
    assert np.linalg.norm(short_vec) == pytest.approx(short)


def test_recist_long_axis_is_the_largest_corner_distance_of_a_blob():
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:40, :40]
    mask = ((yy - 20) ** 2 / 81 + (xx - 18) ** 2 / 196 <= 1) & (rng.random((40, 40)) > 0.1)
    coords, long, short = recist_from_mask(mask)
    # Brute force over every corner of every pixel, independent of the convex hull.
    rows, cols = np.nonzero(mask)
    offsets = [(dx, dy) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)]
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx, dy in offsets])
    brute = np.max(np.linalg.norm(corners[:, None] - corners[None], axis=-1))
    assert long == pytest.approx(brute)
    assert np.hypot(coords[2] - coords[0], coords[3] - coords[1]) == pytest.approx(long)
    assert 14 < short < long  # semi-axes 14 and 9 pixels: about 29 by 19 across


def test_recist_from_box_uses_the_inscribed_ellipse():
    coords, long, short = recist_from_box((10, 20, 30, 26))
    assert coords == (10, 23, 30, 23, 20, 20, 20, 26) and (long, short) == (20, 6)
    coords, long, short = recist_from_box((0, 0, 4, 10))
    assert coords == (2, 0, 2, 10, 0, 5, 4, 5) and (long, short) == (10, 4)
    with pytest.raises(SpineInpaintError, match="x1 < x2"):
        recist_from_box((5, 0, 5, 3))
    with pytest.raises(SpineInpaintError, match="lesion mask is empty"):
        recist_from_mask(np.zeros((4, 4)))


def test_written_series_and_records_read_back_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    array = rng.uniform(-1000, 2000, size=(6, 48, 64))  # float HU, 48 rows x 64 columns
    # Our volumes are LPS with z superior; DeepLesion numbers slices from the head down.
    lps = Volume(array[::-1], spacing=(0.75, 0.75, 2.5), origin=(-30.0, 12.0, 100.0))
    volume = dl.to_deeplesion_orientation(lps)
    np.testing.assert_array_equal(volume.array, array)
    folder = write_series(tmp_path, volume, patient=7, study=2, series=3, first_slice=21)
    assert folder == tmp_path / "Images_png" / "000007_02_03"
    assert sorted(p.name for p in folder.iterdir()) == [f"{n:03d}.png" for n in range(21, 27)]
    mask = np.zeros((48, 64), bool)
    mask[1:4, 50:62] = True  # near the top edge: the padded box is clipped at y = 0
    bone = make_record(volume, 7, 2, 3, key_slice=23, mask=mask, first_slice=21, split=2,
                          age=58, gender="F")
    liver = make_record(volume, 7, 2, 3, key_slice=24, box=(10, 20, 30, 26), first_slice=21,
                           slice_range=(22, 26), lesion_type=4, window=(-160, 240))
    assert bone.file_name == "000007_02_03_023.png" and bone.key_slice_index == 23
    assert bone.image_size == (64, 48) and bone.slice_range == (21, 26)
    assert bone.spacing_mm_px == (0.75, 0.75, 2.5) and bone.dicom_window == dl.DEFAULT_WINDOW
    assert bone.lesion_diameters_pixel[0] == pytest.approx(np.hypot(12, 3))
    xs, ys = bone.measurement_coordinates[0::2], bone.measurement_coordinates[1::2]
    assert bone.bounding_box == pytest.approx((min(xs) - 5, 0.0, min(max(xs) + 5, 63.0), max(ys) + 5))
    assert liver.bounding_box == (5, 15, 35, 31)
    assert liver.measurement_coordinates == (10, 23, 30, 23, 20, 20, 20, 26)
    assert liver.lesion_diameters_pixel == (20, 6)
    # Centre (20, 23) of 64 x 48 pixels; key 24 is array index 3 of 6 slices.
    assert liver.normalized_lesion_location == pytest.approx((20.5 / 64, 23.5 / 48, 3.5 / 6))

    dl.write_info([bone, liver], tmp_path / "DL_info.csv")
    back = dl.read_info(tmp_path / "DL_info.csv")
    assert back == [bone, liver]
    key = dl.load_key_slice(tmp_path, back[0], neighbours=1, windowed=False)
    np.testing.assert_array_equal(key, np.rint(array[1:4]).astype(np.int32))
    series = dl.load_series_volume(tmp_path, back[1])  # slices 22-26
    np.testing.assert_array_equal(series.array, np.rint(array[1:]).astype(np.int32))
    assert series.spacing == (0.75, 0.75, 2.5) and series.origin == (0.0, 0.0, -21 * 2.5)
    np.testing.assert_array_equal(series.direction, volume.direction)


def test_deeplesion_orientation_flips_axes_and_keeps_physical_positions():
    rng = np.random.default_rng(5)
    ras = np.diag([-1.0, -1.0, 1.0])  # a NIfTI-style RAS grid, as LPS directions
    volume = Volume(rng.normal(size=(3, 4, 5)).astype(np.float32), (0.5, 0.6, 2.0), (10.0, 20.0, 30.0), ras)
    oriented = dl.to_deeplesion_orientation(volume)
    np.testing.assert_array_equal(oriented.direction, dl.DEEPLESION_DIRECTION)
    np.testing.assert_array_equal(oriented.array, volume.array[::-1, ::-1, ::-1])
    assert oriented.array.dtype == np.float32 and oriented.spacing == volume.spacing
    np.testing.assert_allclose(oriented.index_to_physical([0, 0, 0]), volume.index_to_physical([2, 3, 4]))
    np.testing.assert_allclose(oriented.index_to_physical([1, 2, 3]), volume.index_to_physical([1, 1, 1]))


def test_writer_refuses_bad_requests(tmp_path):
    match = r"orientation \(LPI.*got LPS; use deeplesion.to_deeplesion_orientation"
    with pytest.raises(SpineInpaintError, match=match):
        write_series(tmp_path, Volume(np.zeros((3, 8, 8))), 1, 1, 1)
    with pytest.raises(SpineInpaintError, match="make_record needs a volume in DeepLesion's orientation"):
        make_record(Volume(np.zeros((3, 8, 8))), 1, 1, 1, key_slice=2, box=(1, 1, 3, 3))
    volume = Volume(np.zeros((3, 8, 8)), direction=dl.DEEPLESION_DIRECTION)
    with pytest.raises(SpineInpaintError, match="3D"):
        write_series(tmp_path, np.zeros((8, 8)), 1, 1, 1)
    with pytest.raises(SpineInpaintError, match="start at 1"):
        write_series(tmp_path, volume, 1, 1, 1, first_slice=0)
    with pytest.raises(SpineInpaintError, match="outside the series' slices 1-3"):
        make_record(volume, 1, 1, 1, key_slice=4, box=(1, 1, 3, 3))
    with pytest.raises(SpineInpaintError, match="exactly one of a lesion box or a 2D lesion mask"):
        make_record(volume, 1, 1, 1, key_slice=2)
    with pytest.raises(SpineInpaintError, match=r"mask shape \(4, 4\) does not match the slice \(8, 8\)"):
        make_record(volume, 1, 1, 1, key_slice=2, mask=np.ones((4, 4)))
    with pytest.raises(SpineInpaintError, match="unknown coarse lesion type 9"):
        make_record(volume, 1, 1, 1, key_slice=2, box=(1, 1, 3, 3), lesion_type=9)
    with pytest.raises(SpineInpaintError, match="slice range 2-3 must hold the key slice 1"):
        make_record(volume, 1, 1, 1, key_slice=1, box=(1, 1, 3, 3), slice_range=(2, 3))
