"""Dataset builders: splits by case, LPS slices with boxes, GAN crops, DeepLesion folders, the phantom CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SpineInpaintLib import SpineInpaintError, cli
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data import deeplesion
from SpineInpaintLib.data.real import load_real_case
from SpineInpaintLib.inpainting.crops import crop_slice


@pytest.fixture(scope="module")
def real_lesion_case():
    return datasets.real_case("totalsegmentator", seed=1, lesion_types=("lytic",))


@pytest.fixture(scope="module")
def small_phantom_case():
    return datasets.phantom_case(5, shape_xy=(192, 192), spacing_xy=1.6, slice_thickness=3.0,
                                 lesion_types=("sclerotic",))


def test_split_is_stable_and_by_case():
    ids = [f"phantom_{k:04d}" for k in range(2000)]
    groups = datasets.split_cases(ids)
    assert sorted(sum(groups.values(), [])) == sorted(ids)
    for name, fraction in datasets.SPLITS.items():
        assert abs(len(groups[name]) / len(ids) - fraction) < 0.04
    # Adding cases never moves an existing one; a case's split depends only on its id and the seed.
    assert all(datasets.split_of(i) == name for name, members in groups.items() for i in members[:50])
    assert datasets.split_cases(ids[:10]) == {k: [i for i in v if i in ids[:10]] for k, v in groups.items()}
    assert any(datasets.split_of(i, seed=1) != datasets.split_of(i) for i in ids[:50])


def test_case_keeps_the_healthy_truth(real_lesion_case):
    case = real_lesion_case
    healthy, _ = load_real_case("totalsegmentator")
    np.testing.assert_array_equal(case.healthy_ct.array, healthy.array)
    changed = case.ct.array != case.healthy_ct.array
    assert changed.any() and not (changed & (case.lesion_mask == 0)).any()
    assert case.manifest()["lesion"]["lesion_type"] == "lytic"


def test_oriented_case_is_lps_and_keeps_physical_positions(real_lesion_case):
    case = real_lesion_case
    lps = case.oriented("LPS")
    np.testing.assert_allclose(lps.ct.direction, np.eye(3))
    z, y, x = np.argwhere(case.lesion_mask)[0]
    point = case.ct.index_to_physical([z, y, x])[0]
    k = tuple(np.round(lps.ct.physical_to_index(point)[0]).astype(int))
    assert lps.lesion_mask[k] == 1 and lps.ct.array[k] == case.ct.array[z, y, x]


def test_axial_slices_hold_spine_masks_levels_and_tight_boxes(real_lesion_case):
    samples = datasets.axial_slices(real_lesion_case)
    lps = real_lesion_case.oriented("LPS")
    spine_slices = np.nonzero(spine_mask(lps.labels.array).reshape(lps.ct.shape[0], -1).any(axis=1))[0]
    assert [s.z for s in samples] == spine_slices.tolist()
    with_box = [s for s in samples if len(s.boxes)]
    assert with_box, "the lesion must show on some slices"
    for s in samples:
        np.testing.assert_array_equal(s.spine, (s.levels > 0).astype(np.uint8))
        np.testing.assert_array_equal(s.image, lps.ct.array[s.z])
        mask = lps.lesion_mask[s.z]
        if mask.any():
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(s.boxes[0], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        else:
            assert s.boxes.shape == (0, 4)
    assert samples[0].spacing_yx == (3.0, 3.0)


def test_vertebra_crops_are_64x64_in_unit_range(real_lesion_case, small_phantom_case):
    for case in (real_lesion_case, small_phantom_case):
        binary, meta = datasets.vertebra_crops(case, binary=True)
        grey, meta_g = datasets.vertebra_crops(case, binary=False)
        assert binary.shape[1:] == (64, 64) and binary.shape == grey.shape and len(meta) == len(binary)
        assert set(np.unique(binary).tolist()) <= {0.0, 1.0}
        assert grey.min() >= 0.0 and grey.max() <= 1.0
        # Healthy-only crops skip every slice the lesion touched.
        lps = case.oriented("LPS")
        touched = set(np.nonzero(lps.lesion_mask.reshape(lps.ct.shape[0], -1).any(axis=1))[0].tolist())
        assert touched and not touched & {m["z"] for m in meta}
        # The crop centre is the vertebra itself: the centre pixel region is mostly bone.
        assert binary[:, 24:40, 24:40].mean() > 0.3


def test_crop_scaling_is_physical():
    image = np.zeros((100, 100), np.float32)
    image[40:60, 30:70] = 1.0  # 20 x 40 pixels at 2 mm = 40 x 80 mm
    crop = crop_slice(image, (49.5, 49.5), (2.0, 2.0), size=64, fov_mm=128.0) > 0.5
    rows, cols = np.nonzero(crop)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 40  # 2 mm per crop pixel


def test_deeplesion_folder_round_trip(tmp_path, real_lesion_case, small_phantom_case):
    root = datasets.write_deeplesion([small_phantom_case, real_lesion_case], tmp_path / "DL")
    records = deeplesion.read_info(root / "DL_info.csv")
    assert len(records) == 2 and all(r.coarse_lesion_type == deeplesion.BONE for r in records)
    record = records[1]
    oriented = deeplesion.to_deeplesion_orientation(real_lesion_case.ct)
    key = deeplesion.read_png_hu(record.key_slice_path(root))
    np.testing.assert_array_equal(key, oriented.array[record.key_slice_index - 1])
    mask = deeplesion.to_deeplesion_orientation(real_lesion_case.ct.with_array(real_lesion_case.lesion_mask))
    rows, cols = np.nonzero(mask.array[record.key_slice_index - 1])
    x1, y1, x2, y2 = record.bounding_box
    assert x1 <= cols.min() and cols.max() <= x2 and y1 <= rows.min() and rows.max() <= y2
    np.testing.assert_allclose(record.spacing_mm_px[:2], (3.0, 3.0))
    masks = sorted((root / "Masks_png" / record.series_folder).glob("*.png"))
    assert len(masks) == oriented.shape[0]


def test_phantom_cli_writes_cases_manifest_and_crops(tmp_path, capsys):
    out = tmp_path / "cases"
    code = cli.main(["phantom", "--out", str(out), "--cases", "1", "--seed", "7", "--size", "160",
                     "--lesions", "lytic", "--crops", "--deeplesion", str(tmp_path / "DL")])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and len(manifest["cases"]) == 1
    entry = manifest["cases"][0]
    assert entry["case_id"] == "phantom_0007" and entry["lesion"]["lesion_type"] == "lytic"
    ct = io.read_volume(out / entry["files"]["ct"])
    healthy = io.read_volume(out / entry["files"]["healthy_ct"])
    mask = io.read_volume(out / entry["files"]["lesion_mask"])
    assert ct.same_grid(healthy) and ct.size_xyz[:2] == (160, 160)
    np.testing.assert_array_equal(ct.array[mask.array == 0], healthy.array[mask.array == 0])
    crops = np.load(out / "crops.npz")
    assert crops["binary"].shape == crops["grey"].shape and crops["binary"].shape[1:] == (64, 64)
    assert int(crops["seed"]) == 7
    assert (tmp_path / "DL" / "DL_info.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lesions", "cystic"], "unknown lesion type cystic"),
    (["--cases", "-1"], "--cases must be between"),
    (["--size", "4"], "--size must be between"),
])
def test_phantom_cli_bad_requests(tmp_path, capsys, argv, message):
    assert cli.main(["phantom", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_make_cases_rejects_a_negative_count():
    with pytest.raises(SpineInpaintError, match="must be >= 0"):
        list(datasets.make_cases(-2))


def test_varied_phantoms_widen_bone_density_blur_and_field_of_view():
    from SpineInpaintLib.data.phantom import config as phantom

    draws = [datasets.varied_overrides(seed) for seed in range(2000, 2060)]
    assert datasets.varied_overrides(2000) == draws[0]  # seeded
    for d in draws:
        phantom.PhantomConfig.random(0, **d).validate()  # every draw is a valid phantom
        assert 60 <= d["cancellous_hu"] <= 170 and 500 <= d["cortical_hu"] <= 900
        assert 0.4 <= d["cortical_mm"] <= 0.9 and 0.5 <= d["blur_mm"] <= 1.2
        assert d["sacrum_plate"] is True and "sacrum_upright" not in d  # see varied_overrides
    pelvic = [d for d in draws if d["levels"][0] == "sacrum"]
    assert 15 <= len(pelvic) <= 45  # about half reach the pelvis, always with S1
    assert all(d["levels"][1] == "S1" for d in pelvic)
    assert all(len(d["levels"]) == 3 for d in draws if d not in pelvic)
    # below the young-adult range PhantomConfig.random draws (cancellous 140-280 HU) for most
    assert np.mean([d["cancellous_hu"] < 140 for d in draws]) > 0.5


def test_varied_phantom_case_is_a_seeded_phantom_with_its_own_id():
    case = datasets.varied_phantom_case(2001, lesion_types=None)  # a few seconds: 3 levels at 512 x 512
    overrides = datasets.varied_overrides(2001)
    assert case.case_id == "varied_2001" and case.source == "phantom" and case.info["variety"] == "varied"
    assert case.info["phantom_config"]["cancellous_hu"] == overrides["cancellous_hu"]
    assert case.lesion is None and np.array_equal(case.ct.array, case.healthy_ct.array)


# --- the two lesion simulators ---------------------------------------------------------------------------
def test_pick_simulator_is_seeded_and_draws_both():
    from SpineInpaintLib.data.cases import pick_simulator

    picks = [pick_simulator("both", f"phantom_{s:04d}", s) for s in range(40)]
    assert picks == [pick_simulator("both", f"phantom_{s:04d}", s) for s in range(40)]
    assert 10 <= picks.count("focal") <= 30 and set(picks) == {"classic", "focal"}
    assert pick_simulator("focal", "x", 0) == "focal" and pick_simulator("classic", "x", 0) == "classic"
    with pytest.raises(SpineInpaintError, match="unknown lesion simulator 'other'"):
        pick_simulator("other", "x", 0)


def test_cases_record_which_simulator_made_their_lesion():
    small = dict(shape_xy=(128, 128), spacing_xy=1.5, slice_thickness=2.0, levels=("L2", "L3"))
    focal = datasets.phantom_case(3, lesion_types=("lytic",), simulator="focal", **small)
    assert focal.info["simulator"] == "focal" and focal.lesion.params["simulator"] == "focal"
    assert {r["kind"] for r in focal.lesion.params["lesions"]} <= {"lytic_remnant", "soft_tissue_mass"}
    classic = datasets.phantom_case(3, lesion_types=("lytic",), **small)
    assert classic.info["simulator"] == "classic" and classic.lesion.lesion_type == "lytic"
    # the healthy truth is the same phantom whichever simulator drew the lesion
    np.testing.assert_array_equal(focal.healthy_ct.array, classic.healthy_ct.array)
    assert "simulator" not in datasets.phantom_case(3, lesion_types=None, **small).info
