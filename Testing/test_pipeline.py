"""The main job, ``restore``: contract outputs, geometry, surfaces, and bad input that leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SpineInpaintLib import cli, pipeline, segmentation, surface
from SpineInpaintLib.core import io
from SpineInpaintLib.core.outputs import OUTPUT_FILES
from SpineInpaintLib.data import lesions
from SpineInpaintLib.data.real import load_real_case


@pytest.fixture(scope="module")
def lesion_files(tmp_path_factory):
    """The real scan with a destructive lytic L3 lesion, written to disk with its mask."""
    ct, labels = load_real_case("totalsegmentator")
    sim = lesions.simulate_lesion(ct, labels, "L3", "lytic", True, size=0.7, seed=1)
    folder = tmp_path_factory.mktemp("case")
    ct_path = io.write_volume(sim.ct, folder / "ct.nii.gz")
    mask_path = io.write_volume(sim.mask, folder / "mask.nii.gz")
    return sim, ct_path, mask_path


def _one_line_error(capsys, pattern: str) -> None:
    """Exactly one error line (progress bars may precede it on stderr) and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and pattern in errors[0], err
    assert "Traceback" not in err


def test_restore_writes_the_contract_files_on_the_input_grid(tmp_path, capsys, lesion_files):
    sim, ct_path, mask_path = lesion_files
    before = ct_path.read_bytes()
    out = tmp_path / "out"
    assert cli.main(["restore", str(ct_path), "--out", str(out), "--lesion-mask", str(mask_path),
                     "--seed", "3"]) == 0
    assert ct_path.read_bytes() == before
    for name in OUTPUT_FILES.values():
        assert (out / name).exists(), name
    ct = io.read_volume(ct_path)
    for key in ("restored_ct", "spine_seg", "lesion_seg", "restored_seg"):
        volume = io.read_volume(out / OUTPUT_FILES[key])
        assert volume.same_grid(ct), key
    restored = io.read_volume(out / "restored_ct.nii.gz")
    mask = io.read_volume(out / "lesion_seg.nii.gz").array > 0
    np.testing.assert_array_equal(mask, sim.mask.array > 0)
    np.testing.assert_array_equal(restored.array[~mask], ct.array[~mask])  # only the lesion changes
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 3 and report["lesion_source"] == "given"
    # No --seg-net: the default network, named in the report.
    assert report["settings"]["seg_net"] == report["segmentation"]["net"] == segmentation.DEFAULT_NETWORK == "vnet"
    assert [v["level"] for v in report["restored_vertebrae"]] == ["L3"]
    stages = [s["name"] for s in report["timings"]["stages"]]
    assert stages[:1] == ["segment"] and "inpaint" in stages and "surfaces" in stages


def test_restored_stl_is_watertight_and_matches_the_mask_extent(tmp_path, lesion_files):
    sim, ct_path, mask_path = lesion_files
    result = pipeline.restore(io.read_volume(ct_path), io.read_volume(mask_path), method="biharmonic")
    path = surface.write_stl(result.surfaces["Spine"], tmp_path / "spine.stl")
    checks = surface.mesh_checks(surface.read_stl(path))
    assert checks["closed"] and checks["manifold"]
    spine = (result.restored_labels.array >= 25) & (result.restored_labels.array <= 50)
    corners = result.ct.index_to_physical(np.argwhere(spine))
    lo, hi = corners.min(axis=0) - 1.5, corners.max(axis=0) + 1.5  # voxel faces, 3 mm voxels
    bounds = np.asarray(checks["bounds_lps"]).reshape(3, 2)
    np.testing.assert_allclose(bounds[:, 0], lo, atol=3.0)  # one voxel of this 3 mm scan
    np.testing.assert_allclose(bounds[:, 1], hi, atol=3.0)


# --- bad input: one line, exit 2, no outputs, input untouched ------------------------------------------
def test_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    assert cli.main(["restore", str(bad), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "cannot read")
    assert not (tmp_path / "out").exists() and bad.read_bytes() == b"not a nifti at all"


def test_non_ct_image(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mr = io.Volume(rng.uniform(0, 2000, (20, 64, 64)).astype(np.float32), spacing=(1.0, 1.0, 3.0))
    path = io.write_volume(mr, tmp_path / "mr.nii.gz")
    assert cli.main(["restore", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "does not look like CT")
    assert not (tmp_path / "out").exists()


def test_lesion_mask_on_another_grid(tmp_path, capsys, lesion_files):
    sim, ct_path, _ = lesion_files
    other = io.resample_to_spacing(sim.mask, (6.0, 6.0, 6.0), labels=True)
    mask_path = io.write_volume(other, tmp_path / "coarse_mask.nii.gz")
    assert cli.main(["restore", str(ct_path), "--out", str(tmp_path / "out"), "--lesion-mask", str(mask_path)]) == 2
    _one_line_error(capsys, "on another grid")
    assert not (tmp_path / "out").exists()


def test_volume_without_spine(tmp_path, capsys):
    # A water cylinder in air holding two bone rods (a thigh-like phantom): CT, bone, but no spine.
    z, y, x = np.mgrid[0:24, 0:96, 0:96]
    water = np.where((y - 48) ** 2 + (x - 48) ** 2 < 40**2, 0, -1000).astype(np.int16)
    for cx in (28, 68):
        rod = (y - 48) ** 2 + (x - cx) ** 2
        water[rod < 8**2] = 1200
        water[rod < 5**2] = 300
    water += np.random.default_rng(0).normal(0, 10, water.shape).astype(np.int16)
    path = io.write_volume(io.Volume(water, spacing=(2.0, 2.0, 3.0)), tmp_path / "water.nii.gz")
    assert cli.main(["restore", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "no spine")
    assert not (tmp_path / "out").exists()


def test_output_folder_must_be_new(tmp_path, capsys, lesion_files):
    _, ct_path, mask_path = lesion_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["restore", str(ct_path), "--out", str(out), "--lesion-mask", str(mask_path)]) == 2
    _one_line_error(capsys, "not empty")
    assert (out / "keep.txt").read_text() == "mine"


def test_lesion_mask_with_wrong_shape_is_refused(lesion_files):
    sim, _, _ = lesion_files
    with pytest.raises(pipeline.SpineInpaintError, match="shape"):
        pipeline._check_lesion_mask(np.zeros((2, 2, 2)), sim.ct)


# --- the Slicer module's first steps: segment and detect -------------------------------------------------
def test_segment_then_detect_write_their_contract_files(tmp_path, capsys, lesion_files):
    sim, ct_path, _ = lesion_files
    before = ct_path.read_bytes()
    ct = io.read_volume(ct_path)
    assert cli.main(["segment", str(ct_path), "--out", str(tmp_path / "seg"), "--seed", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["report.json", "spine_seg.nii.gz"]
    spine = io.read_volume(tmp_path / "seg" / "spine_seg.nii.gz")
    assert spine.same_grid(ct)
    assert {28, 29, 30} <= set(np.unique(spine.array).tolist())  # L4, L3, L2 of this scan
    report = json.loads((tmp_path / "seg" / "report.json").read_text())
    assert report["seed"] == 4 and report["command"] == "segment" and "L3" in report["segmentation"]["levels"]
    assert report["settings"]["seg_net"] == report["segmentation"]["net"] == segmentation.DEFAULT_NETWORK == "vnet"

    assert cli.main(["detect", str(ct_path), "--out", str(tmp_path / "det"),
                     "--spine-seg", str(tmp_path / "seg" / "spine_seg.nii.gz")]) == 0
    # The labels were given: only the lesion mask (and the report) is written.
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["lesion_seg.nii.gz", "report.json"]
    lesion = io.read_volume(tmp_path / "det" / "lesion_seg.nii.gz")
    assert lesion.same_grid(ct) and set(np.unique(lesion.array).tolist()) <= {0, 1}
    report = json.loads((tmp_path / "det" / "report.json").read_text())
    assert report["lesion_ml"] == pytest.approx(lesion.array.sum() * np.prod(ct.spacing) / 1000.0, abs=1e-3)
    assert ct_path.read_bytes() == before


def test_detect_refuses_spine_labels_on_another_grid(tmp_path, capsys, lesion_files):
    sim, ct_path, _ = lesion_files
    coarse = io.resample_to_spacing(io.read_volume(ct_path), (6.0, 6.0, 6.0))
    io.write_volume(coarse.with_array(np.zeros(coarse.shape, np.uint8)), tmp_path / "labels.nii.gz")
    assert cli.main(["detect", str(ct_path), "--out", str(tmp_path / "out"),
                     "--spine-seg", str(tmp_path / "labels.nii.gz")]) == 2
    _one_line_error(capsys, "spine labels are on another grid")
    assert not (tmp_path / "out").exists()


def test_segment_refuses_an_image_that_is_not_ct(tmp_path, capsys):
    blank = io.Volume(np.zeros((20, 64, 64), np.int16), spacing=(1.0, 1.0, 2.0))
    path = io.write_volume(blank, tmp_path / "blank.nii.gz")
    assert cli.main(["segment", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "does not look like CT")
    assert not (tmp_path / "out").exists()


def test_grey_method_falls_back_to_the_context_generator_only_without_grey_weights():
    from SpineInpaintLib.inpainting import networks as gan

    for method in ("dcgan", "pggan"):
        assert pipeline.grey_method_for(method) == "context"  # no grayscale weights shipped for these
    assert gan.default_weights_path("wgan-gp", "grey", "generator").exists()
    for method in ("wgan-gp", "context", "biharmonic", "nearest"):
        assert pipeline.grey_method_for(method) == method


@pytest.mark.slow
def test_the_papers_gans_restore_the_ct_with_the_grey_context_generator(lesion_files):
    # DCGAN has binary weights only: it restores the vertebra's shape, the context generator the HU.
    sim, ct_path, mask_path = lesion_files
    result = pipeline.restore(io.read_volume(ct_path), io.read_volume(mask_path), method="dcgan", seed=2)
    assert result.report["inpainting"]["method"] == "dcgan"
    assert result.report["inpainting"]["grey_method"] == pipeline.grey_method_for("dcgan") == "context"
    assert [v["level"] for v in result.report["restored_vertebrae"]] == ["L3"]
    inside = sim.mask.array > 0
    assert not np.array_equal(result.restored_ct.array[inside], sim.ct.array[inside])
