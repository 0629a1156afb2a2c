"""The module's Logic core (``SpineInpaintModuleLib.runner``) on a real MRML scene from slicer-core.

The steps run as the module runs them: the command line in a background process, its outputs
loaded into the scene. Checked: the Logic and the command line give the same restored arrays on a
phantom; the input node is never modified; a cancelled or failed step leaves no node behind and
the user's segmentation as it was.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from SpineInpaintLib import mrml
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as labels_mod
from SpineInpaintLib.data import lesions
from SpineInpaintLib.data.phantom import config as phantom
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.mrml import results as mrml_results
from Testing.mrml_fixtures import mrml_app, mrml_app_factory, scene  # noqa: F401  (pytest fixtures)

slicer = pytest.importorskip("slicer")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SpineInpaint"))
from SpineInpaintModuleLib import runner as runner_mod  # noqa: E402
from SpineInpaintModuleLib import steps  # noqa: E402

sys.path.remove(str(REPO / "SpineInpaint"))


@pytest.fixture(scope="module")
def phantom_lesion():
    """A small phantom (L1-L4, 1.6 x 1.6 x 3 mm) with a destructive lytic lesion in L3."""
    config = phantom.PhantomConfig(seed=5, shape_xy=(200, 200), spacing_xy=1.6, slice_thickness=3.0,
                                   levels=("L1", "L2", "L3", "L4"), body_width_mm=300, body_depth_mm=220)
    ph = make_phantom(config)
    sim = lesions.simulate_lesion(ph.ct, ph.labels, "L3", "lytic", True, size=0.7, seed=1)
    return types.SimpleNamespace(ct=sim.ct, mask=sim.mask, labels=ph.labels)


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def lesion_segmentation(scene, ct_node, mask: io.Volume):
    """A segmentation holding only a 'Lesion' segment, as a user draws it in the Segment Editor."""
    empty = mask.with_array(np.zeros(mask.shape, np.uint8))
    return mrml.segmentation_from_labels(scene, empty, ct_node, lesion_mask=mask, name="drawn")


def test_logic_and_command_line_restore_the_same_arrays(scene, phantom_lesion, tmp_path):
    sim = phantom_lesion
    ct_node = mrml.volume_to_node(scene, sim.ct, "Phantom")
    image_mtime = ct_node.GetImageData().GetMTime()
    seg_node = lesion_segmentation(scene, ct_node, sim.mask)
    runner = runner_mod.StepRunner(scene)

    results = runner.run("restore", ct_node, seg_node, timeout=600)

    # The command line on the same input, in its own process as a user runs it.
    io.write_volume(sim.ct, tmp_path / "ct.nii.gz")
    io.write_volume(sim.mask, tmp_path / "mask.nii.gz")
    cli = subprocess.run([sys.executable, "-m", "SpineInpaintLib", "restore", str(tmp_path / "ct.nii.gz"),
                          "--out", str(tmp_path / "cli"), "--lesion-mask", str(tmp_path / "mask.nii.gz"),
                          "--method", steps.METHODS[steps.DEFAULT_METHOD]],
                         capture_output=True, text=True, cwd=REPO, env=steps.process_environment(), timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]

    restored = io.read_volume(tmp_path / "cli" / "restored_ct.nii.gz")
    from_scene = mrml.volume_from_node(results.restored_volume)
    assert from_scene.same_grid(restored)
    np.testing.assert_array_equal(from_scene.array, restored.array)
    assert not np.array_equal(restored.array, sim.ct.array)  # the lesion was restored

    cli_labels = io.read_volume(tmp_path / "cli" / "restored_seg.nii.gz").array
    vertebrae = [n for n in segment_names(results.segmentation) if n != "Lesion"]
    scene_labels, _ = mrml.labels_from_segmentation(results.segmentation, ct_node, vertebrae)
    np.testing.assert_array_equal(scene_labels.array, np.where(np.isin(cli_labels, labels_mod.VERTEBRA_IDS),
                                                               cli_labels, 0))
    lesion = mrml.lesion_mask_from_segmentation(results.segmentation, ct_node)
    np.testing.assert_array_equal(lesion.array, io.read_volume(tmp_path / "cli" / "lesion_seg.nii.gz").array)
    assert [m.GetName() for m in results.models][-1] == "Spine restored"

    # The input node is untouched.
    assert ct_node.GetImageData().GetMTime() == image_mtime
    np.testing.assert_array_equal(mrml.volume_from_node(ct_node).array, sim.ct.array)


def test_cancelled_step_leaves_the_scene_as_it_was(scene, phantom_lesion):
    ct_node = mrml.volume_to_node(scene, phantom_lesion.ct, "Phantom")
    image_mtime = ct_node.GetImageData().GetMTime()
    before = node_ids(scene)
    runner = runner_mod.StepRunner(scene)
    job = runner.start("restore", ct_node)
    time.sleep(1.0)
    assert job.running
    runner.cancel(job)
    assert not job.running and job.returncode != 0
    assert runner.finish(job, ct_node) is None
    assert node_ids(scene) == before
    assert not job.workDir.exists()
    assert ct_node.GetImageData().GetMTime() == image_mtime


def test_failed_step_adds_no_node_and_says_why_in_one_line(scene, phantom_lesion):
    blank = mrml.volume_to_node(scene, phantom_lesion.ct.with_array(np.zeros(phantom_lesion.ct.shape, np.int16)),
                                "Blank")
    user_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    user_seg.GetSegmentation().AddEmptySegment("note", "note")
    before = node_ids(scene)
    runner = runner_mod.StepRunner(scene)
    job = runner.start("segment", blank, user_seg)
    job.wait(300)
    with pytest.raises(runner_mod.StepFailed, match=r"segment: error: input does not look like CT") as err:
        runner.finish(job, blank, user_seg)
    assert "\n" not in str(err.value)
    assert node_ids(scene) == before and segment_names(user_seg) == ["note"]
    assert not job.workDir.exists()


def test_a_failure_while_loading_rolls_the_scene_back(scene, phantom_lesion, tmp_path, monkeypatch):
    sim = phantom_lesion
    ct_node = mrml.volume_to_node(scene, sim.ct, "Phantom")
    user_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    user_seg.GetSegmentation().AddEmptySegment("note", "note")
    io.write_volume(sim.ct, tmp_path / "restored_ct.nii.gz")
    io.write_volume(sim.labels, tmp_path / "restored_seg.nii.gz")
    io.write_volume(sim.mask, tmp_path / "lesion_seg.nii.gz")
    before = node_ids(scene)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml_results, "models_from_segmentation", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.load_outputs(scene, tmp_path, ct_node, segmentation_node=user_seg)
    assert node_ids(scene) == before
    assert segment_names(user_seg) == ["note"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert not sh.GetItemChildWithName(sh.GetSceneItemID(), mrml.RESULTS_FOLDER_NAME)


def test_detect_reuses_the_vertebra_segments_in_the_scene(scene, phantom_lesion):
    sim = phantom_lesion
    ct_node = mrml.volume_to_node(scene, sim.ct, "Phantom")
    # Vertebrae plus other structures of the phantom (their own segments, not passed on).
    seg_node = mrml.segmentation_from_labels(scene, sim.labels, ct_node, name="spine")
    runner = runner_mod.StepRunner(scene)
    job = runner.start("detect", ct_node, seg_node)
    try:
        assert "--spine-seg" in job.command
        given = io.read_volume(job.command[job.command.index("--spine-seg") + 1])
        vertebrae = np.where(np.isin(sim.labels.array, labels_mod.VERTEBRA_IDS), sim.labels.array, 0)
        assert set(np.unique(sim.labels.array)) - set(np.unique(vertebrae))  # there was more than vertebrae
        np.testing.assert_array_equal(given.array, vertebrae)
    finally:
        runner.cancel(job)
    assert not job.workDir.exists()


def test_start_without_input_changes_nothing(scene):
    before = node_ids(scene)
    with pytest.raises(ValueError, match="Select an input CT volume first"):
        runner_mod.StepRunner(scene).start("restore", None)
    assert node_ids(scene) == before
