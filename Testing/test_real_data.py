"""The real-scan registry, its label formats, off-orthonormal NIfTI headers and the leave-one-scan-out splits."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io, nifti
from SpineInpaintLib.core.labels import (
    TOTALSEG_CLASSES,
    TOTALSEG_IDS,
    UNLEVELLED_SPINE,
    VERSE_SUBREGIONS,
    VERTEBRA_NAMES,
    verse_to_totalseg,
)
from SpineInpaintLib.data import real
from SpineInpaintLib.data.real import (
    REAL_SCANS,
    check_left_out,
    leave_one_out,
    load_real_case,
    load_real_ct,
    load_verse_subregions,
    real_data_dir,
    trained_scans,
    training_scans,
)

pytestmark = pytest.mark.skipif(not real_data_dir().exists(), reason="no ../shared/data/real")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the label conventions ---------------------------------------------------------------------------
def test_totalsegmentator_classes_hold_the_v2_ids():
    assert len(TOTALSEG_CLASSES) == 117
    assert TOTALSEG_IDS["sacrum"] == 25 and TOTALSEG_IDS["vertebrae_S1"] == 26 and TOTALSEG_IDS["vertebrae_C1"] == 50
    assert TOTALSEG_IDS["heart"] == 51 and TOTALSEG_IDS["spinal_cord"] == 79 and TOTALSEG_IDS["skull"] == 91
    assert TOTALSEG_IDS["rib_left_1"] == 92 and TOTALSEG_IDS["rib_right_12"] == 115
    assert TOTALSEG_IDS["sternum"] == 116 and TOTALSEG_IDS["costal_cartilages"] == 117


def test_verse_ids_map_to_totalsegmentator_ids():
    mapped, dropped = verse_to_totalseg(np.array([0, 1, 7, 8, 19, 20, 24, 25, 26, 28]))
    # C1 50, C7 44, T1 43, T12 32, L1 31, L5 27, L6 (lumbarised S1) 26, sacrum 25, T13 dropped
    assert mapped.tolist() == [0, 50, 44, 43, 32, 31, 27, 26, 25, 0]
    assert dropped == [28]


# --- the registry ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [s.name for s in REAL_SCANS.values() if s.label_format != "none"])
def test_every_labelled_scan_loads_in_totalsegmentator_ids_with_the_levels_it_registers(name):
    scan = REAL_SCANS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct, labels = load_real_case(name)
    assert labels.same_grid(ct) and labels.array.dtype == np.uint8
    values = set(np.unique(labels.array).tolist()) - {0}
    assert values <= set(TOTALSEG_CLASSES) | {UNLEVELLED_SPINE}
    vertebrae = {v for v in values if v in VERTEBRA_NAMES}
    assert vertebrae == set(scan.levels) | set(scan.partial)
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    for level in scan.levels:
        volume = (labels.array == level).sum() * voxel_ml
        assert volume > 5.0, f"{name} {VERTEBRA_NAMES[level]}: {volume:.1f} mL is no whole vertebra"
        assert ct.array[labels.array == level].mean() > 100  # the label sits on bone
    if scan.label_format == "binary_spine":
        assert not scan.labelled and values == {UNLEVELLED_SPINE}


@pytest.mark.parametrize("name", [s.name for s in REAL_SCANS.values() if s.label_format == "none"])
def test_unlabelled_scans_give_their_ct_and_refuse_labels(name):
    ct = load_real_ct(name)
    assert ct.array.ndim == 3 and ct.array.min() < -500 and ct.array.max() > 500
    assert not REAL_SCANS[name].labelled
    with pytest.raises(SpineInpaintError, match=f"real case '{name}' has no labels"):
        load_real_case(name)


def test_loaded_cases_are_copies_the_caller_may_change():
    ct, labels = load_real_case("s0003")
    ct.array[:] = 0
    labels.array[:] = 0
    again_ct, again_labels = load_real_case("s0003")
    assert again_ct.array.any() and again_labels.array.any()


def test_the_registry_describes_each_scan():
    for scan in REAL_SCANS.values():
        assert scan.region in real.REGIONS and scan.label_format in real.LABEL_FORMATS
        assert scan.licence and scan.description and scan.label_source
        summary = scan.summary()
        assert summary["labelled"] == scan.labelled and all(isinstance(v, str) for v in summary["levels"])
    assert {s.name for s in real.real_scans(region="neck")} == {"s0002", "s0003"}
    assert "s0009" in {s.name for s in real.real_scans(level="L3")}
    with pytest.raises(SpineInpaintError, match="unknown region 'leg'"):
        real.real_scans(region="leg")
    with pytest.raises(SpineInpaintError, match="unknown real case 'nope'"):
        load_real_case("nope")


def test_verse_scan_labels_and_subregions_agree():
    ct, labels = load_real_case("verse_tptbox")
    sub = load_verse_subregions("verse_tptbox")
    assert sub.same_grid(ct) and set(np.unique(sub.array).tolist()) - {0} <= set(VERSE_SUBREGIONS)
    l3 = labels.array == 29
    body = sub.array == 50
    # the L3 vertebral body holds most of the sub-region body voxels inside L3
    assert (body & l3).sum() > 0.25 * l3.sum()
    border = (sub.array == 49) & l3
    assert ct.array[border].mean() > ct.array[body & l3].mean() + 100  # the cortex around the cancellous core
    with pytest.raises(SpineInpaintError, match="has no VerSe sub-region mask"):
        load_verse_subregions("s0003")


# --- label formats on synthetic files ----------------------------------------------------------------------
def _write(array: np.ndarray, path, spacing=(2.0, 2.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_totalsegmentator_folder_merges_masks_vertebrae_winning(tmp_path):
    ct = np.full((6, 8, 8), -1000, np.int16)
    _write(ct, tmp_path / "ct.nii.gz")
    seg = tmp_path / "segmentations"
    seg.mkdir()
    rib = np.zeros(ct.shape, np.uint8)
    rib[2:4, 2:6, 2:6] = 1
    vert = np.zeros(ct.shape, np.uint8)
    vert[3:5, 3:5, 3:5] = 1
    _write(rib, seg / "rib_left_5.nii.gz")
    _write(vert, seg / "vertebrae_T5.nii.gz")
    _write(vert, seg / "not_a_class.nii.gz")
    before = _digest(seg / "rib_left_5.nii.gz")
    with pytest.warns(UserWarning, match="skipped 1 masks"):
        _, labels = io.read_totalsegmentator_folder(tmp_path)
    assert labels.array[3, 3, 3] == 39  # T5 wins over the rib where they overlap
    assert labels.array[2, 2, 2] == 96  # rib_left_5
    assert int((labels.array == 39).sum()) == 8 and int((labels.array == 96).sum()) == 2 * 16 - 4
    assert _digest(seg / "rib_left_5.nii.gz") == before
    with pytest.raises(SpineInpaintError, match="is not a TotalSegmentator dataset subject"):
        io.read_totalsegmentator_folder(seg)


def test_verse_reader_warns_for_ids_without_a_totalsegmentator_id(tmp_path):
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[0], mask[1], mask[2] = 20, 26, 28
    path = _write(mask, tmp_path / "vert.nii.gz")
    with pytest.warns(UserWarning, match=r"VerSe ids \[28\]"):
        labels = io.read_verse_labels(path)
    assert labels.array[0].max() == 31 and labels.array[1].max() == 25 and labels.array[2].max() == 0
    sub = np.full((4, 4, 4), 50, np.uint8)
    with pytest.raises(SpineInpaintError, match="sub-region masks"):
        io.read_verse_labels(_write(sub, tmp_path / "subreg.nii.gz"))


# --- off-orthonormal NIfTI headers ----------------------------------------------------------------------------
def _sheared_nifti(tmp_path, shear: float):
    """A NIfTI file whose sform's second column leans ``shear`` towards the first (qform cleared)."""
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _write(array, tmp_path / "plain.nii.gz", spacing=(1.5, 1.5, 3.0))
    data = bytearray(gzip.open(path).read())
    rows = np.array(struct.unpack("<12f", data[280:328]), dtype=float).reshape(3, 4)
    rows[0, 1] += shear * 1.5
    data[252:254] = struct.pack("<h", 0)
    data[280:328] = struct.pack("<12f", *rows.ravel().tolist())
    out = tmp_path / f"sheared_{shear:g}.nii.gz"
    out.write_bytes(gzip.compress(bytes(data)))
    return out, array


def test_slightly_off_orthonormal_header_reads_with_a_warning(tmp_path):
    path, array = _sheared_nifti(tmp_path, 2e-3)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))  # what ITK does with it
    before = _digest(path)
    with pytest.warns(UserWarning, match=r"off orthonormal by 2\.0e-03"):
        volume = io.read_volume(path)
    assert _digest(path) == before
    np.testing.assert_array_equal(volume.array, array)
    assert nifti.orthonormality_error(volume.direction) < 1e-6
    np.testing.assert_allclose(volume.spacing, (1.5, 1.5, 3.0), atol=1e-3)
    # every voxel centre moves by far less than a voxel against the stated (sheared) geometry
    geometry = nifti.read_geometry(path)
    far = np.array([[3, 4, 5]], float)
    stated_ras = geometry.matrix @ far[0, ::-1] + geometry.offset
    read_lps = volume.index_to_physical(far)[0]
    assert np.abs(read_lps * [-1, -1, 1] - stated_ras).max() < 0.05


def test_sheared_header_beyond_the_tolerance_is_a_one_line_error(tmp_path):
    path, _ = _sheared_nifti(tmp_path, 0.05)
    with pytest.raises(SpineInpaintError, match="off orthonormal by 0.05") as err:
        io.read_volume(path)
    assert "\n" not in str(err.value)


def test_s0002_reads_with_a_warning_within_the_tolerance():
    with pytest.warns(UserWarning, match=r"off orthonormal by 1\.9e-04") as caught:
        ct, labels = real._load.__wrapped__("s0002", str(real_data_dir()))  # uncached: the warning is seen
    assert len([w for w in caught if "orthonormal" in str(w.message)]) == 1  # once, not once per mask
    assert nifti.orthonormality_error(ct.direction) < 1e-6 and labels.same_grid(ct)
    assert ct.shape == (101, 128, 185)


# --- leave-one-scan-out ---------------------------------------------------------------------------------------
def test_leave_one_out_never_trains_on_the_left_out_scan():
    folds = leave_one_out()
    assert {test for test, _ in folds} == {s.name for s in REAL_SCANS.values() if s.labelled}
    for test, train in folds:
        assert test not in train and train
        assert all(REAL_SCANS[t].labelled for t in train)


def test_scans_of_one_patient_are_left_out_together(monkeypatch):
    twin = dataclasses.replace(REAL_SCANS["s0003"], name="s0003_bis", patient="s0003")
    monkeypatch.setitem(REAL_SCANS, "s0003_bis", twin)
    assert "s0003_bis" not in training_scans(["s0003"])
    fold = dict(leave_one_out())["s0003_bis"]
    assert "s0003" not in fold
    with pytest.raises(SpineInpaintError, match="trained on real scan s0003"):
        check_left_out("s0003_bis", ["s0003", "s0009"], "segmenter")


def test_check_left_out_and_trained_scans():
    check_left_out("s0009", ["totalsegmentator"])
    with pytest.raises(SpineInpaintError, match="not a left-out evaluation") as err:
        check_left_out("totalsegmentator", trained_scans({}), "the shipped detector")
    assert "--leave-out totalsegmentator" in str(err.value)
    assert trained_scans({"training": {"real_scans": ["s0003"]}}) == ("s0003",)
    assert trained_scans({"training": {"real_in_training": []}}) == ()
    assert trained_scans({}) == real.LEGACY_TRAINING_SCANS


def test_evaluation_scans_are_the_left_out_ones_or_checked_names():
    left = real.evaluation_scans("left-out", ["totalsegmentator"])
    assert "totalsegmentator" not in left and {"s0002", "s0003", "s0009", "verse_tptbox"} <= set(left)
    assert real.evaluation_scans("left-out", ["totalsegmentator"], level="L3") == ["s0009", "verse_tptbox"]
    assert real.evaluation_scans("s0009, s0003", ["totalsegmentator"]) == ["s0009", "s0003"]
    assert real.evaluation_scans("", ["totalsegmentator"]) == []
    with pytest.raises(SpineInpaintError, match="not a left-out evaluation"):
        real.evaluation_scans("s0009,totalsegmentator", ["totalsegmentator"], "unet")
    with pytest.raises(SpineInpaintError, match="unknown real case 'x'"):
        real.evaluation_scans("x", [])
    # a fit measurement must be asked for by name
    assert real.evaluation_scans("totalsegmentator", ["totalsegmentator"], allow_seen=True) == ["totalsegmentator"]
    assert "totalsegmentator" not in real.evaluation_scans("left-out", ["totalsegmentator"], allow_seen=True)


def test_shipped_models_name_the_scans_they_learned_from():
    import json

    from SpineInpaintLib.core.weights import weights_dir

    for stage, name in (("segmentation", "unet"), ("segmentation", "vnet"), ("detection", "retinanet"),
                        ("gan", "context_generator")):
        meta = json.loads((weights_dir(stage) / f"{name}.json").read_text())
        assert trained_scans(meta) == ("totalsegmentator",), name


# --- trainers and evaluators keep to the folds ------------------------------------------------------------------
def _fake_real_case(calls):
    def make(name, *, seed=0, lesion_types=None, **_):
        calls.append(name)
        raise SpineInpaintError("not built in this test")
    return make


def test_segmentation_trainer_never_builds_a_left_out_scan(monkeypatch, tmp_path):
    from SpineInpaintLib import cli
    from SpineInpaintLib.cli import train_run
    from SpineInpaintLib.data import cases

    calls: list[str] = []
    monkeypatch.setattr(cases, "real_case", _fake_real_case(calls))
    base = ["train", "segmentation", "--phantoms", "0", "--cache", str(tmp_path / "cache")]
    assert cli.main(base + ["--real", "all", "--leave-out", "s0009"]) == 2  # the fake builder's error
    assert calls and "s0009" not in calls and set(calls) <= set(training_scans(["s0009"]))
    captured = {}
    monkeypatch.setattr(train_run, "cache_case", lambda *a, **k: None)
    monkeypatch.setattr(cases, "real_case", lambda name, **k: name)
    monkeypatch.setattr(train_run, "train_segmentation", lambda config: captured.setdefault("config", config) and {})
    assert cli.main(base + ["--real", "all", "--leave-out", "s0009,verse_tptbox"]) == 0
    config = captured["config"]
    assert "s0009" not in config.real and "verse_tptbox" not in config.real and "s0003" in config.real
    assert not any("s0009" in c or "verse_tptbox" in c for c in config.train_cases)


def test_trainers_refuse_to_train_on_a_left_out_scan(tmp_path, capsys):
    from SpineInpaintLib import cli

    assert cli.main(["train", "segmentation", "--real", "s0003", "--leave-out", "s0003"]) == 2
    assert "real scan 's0003' is left out" in capsys.readouterr().err
    assert cli.main(["train", "gan", "--real", "s0009", "--leave-out", "s0009", "--data", str(tmp_path)]) == 2
    assert "is left out" in capsys.readouterr().err
    (tmp_path / "real_s0009_0000.npz").write_bytes(b"")
    assert cli.main(["train", "gan", "--real", "", "--leave-out", "s0009", "--data", str(tmp_path)]) == 2
    assert "holds crops of left-out scans (real_s0009_0000.npz)" in capsys.readouterr().err


def test_evaluators_refuse_a_scan_the_model_was_trained_on(capsys):
    from SpineInpaintLib import cli

    assert cli.main(["evaluate", "segmentation", "--real", "totalsegmentator", "--cases", "0"]) == 2
    assert "not a left-out evaluation" in capsys.readouterr().err
    assert cli.main(["evaluate", "detection", "--real-scans", "totalsegmentator", "--quiet"]) == 2
    assert "not a left-out evaluation" in capsys.readouterr().err
    assert cli.main(["evaluate", "inpainting", "--real-scans", "totalsegmentator", "--quiet"]) == 2
    assert "not a left-out evaluation" in capsys.readouterr().err
    assert cli.main(["evaluate", "restore", "--case", "totalsegmentator"]) == 2
    assert "not a left-out evaluation" in capsys.readouterr().err


# --- trainers draw from both lesion simulators -------------------------------------------------------------------
def test_detection_cases_draw_from_both_simulators_and_keep_classic_keys():
    from SpineInpaintLib.training import detection_cases as dc
    from SpineInpaintLib.training.detection import TrainConfig, _training_specs

    classic = [key for key, _, _ in dc.case_specs("train", phantoms=12, real=4, simulator="classic")]
    both = [key for key, _, _ in dc.case_specs("train", phantoms=12, real=4, simulator="both")]
    assert len(classic) == len(both) and not any(k.endswith("_focal") for k in classic)
    focal = [k for k in both if k.endswith("_focal")]
    assert 2 <= len(focal) <= 14
    # a case drawn with the classic simulator keeps its key, so caches built before stay valid
    assert {k for k in both if not k.endswith("_focal")} <= set(classic)
    config = TrainConfig(real_scans=("s0009", "s0003"), real=2, val_real=1)
    train, val = _training_specs(config)
    assert {k.split("_")[1] for k, _, _ in train if k.startswith("real_")} == {"s0009", "s0003"}
    assert dataclasses.asdict(config)["real_scans"] == ("s0009", "s0003") and config.simulator == "both"


def test_gan_holes_come_from_the_focal_simulator_too():
    from SpineInpaintLib.data import cases
    from SpineInpaintLib.training.holes import case_training_arrays

    case = cases.phantom_case(5, lesion_types=None, shape_xy=(128, 128), spacing_xy=1.5, slice_thickness=2.0,
                              levels=("L2", "L3"))
    focal = case_training_arrays(case, lesions_per_level=1, seed=0, simulator="focal")
    classic = case_training_arrays(case, lesions_per_level=1, seed=0)
    assert len(focal["holes"]) > 0 and len(classic["holes"]) > 0
    np.testing.assert_array_equal(focal["binary"], classic["binary"])  # the same crops, other holes
    assert focal["holes"].shape[1:] == classic["holes"].shape[1:]
    assert not np.array_equal(focal["holes"][:1], classic["holes"][:1]) or len(focal["holes"]) != len(classic["holes"])


def test_detection_evaluation_reports_each_simulator_apart():
    from SpineInpaintLib.evaluation.detection import _groups
    from SpineInpaintLib.training.detection import slim_case

    meta = [{"case_lesion_type": "lytic", "source": "phantom", "destructive": True, "simulator": "classic"},
            {"case_lesion_type": "soft_tissue_mass", "source": "real", "destructive": True, "simulator": "focal"},
            {"case_lesion_type": "none", "source": "phantom", "destructive": None, "simulator": None}]
    groups = _groups(meta)
    assert groups["simulator=classic"].tolist() == [0] and groups["simulator=focal"].tolist() == [1]
    assert "simulator=None" not in groups
    from SpineInpaintLib.data import cases

    case = cases.phantom_case(3, lesion_types=("lytic",), simulator="focal", shape_xy=(96, 96), spacing_xy=2.0,
                              slice_thickness=3.0, levels=("L3",))
    assert slim_case(case).info == {"simulator": "focal"}
