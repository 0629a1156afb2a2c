"""mrml: SpineInpaintLib <-> a real MRML scene (slicer-core), set up as the Slicer application does.

Checks geometry by hand (RAS of a voxel), labels bit for bit through a segmentation, SNOMED CT
terminology against Slicer's own (de)serializer and our terminology file, the subject-hierarchy
folder of the models, STL bounds against the mask's physical extent, and a save to .mrb and back.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from SpineInpaintLib import SpineInpaintError, mrml
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as labels_mod
from Testing.mrml_fixtures import mrml_app, mrml_app_factory, scene  # noqa: F401  (pytest fixtures)

slicer = pytest.importorskip("slicer")

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "SpineInpaint" / "SpineInpaint.py"
TERMINOLOGY_FILE = (
    REPO / "SpineInpaint" / "Resources" / "SegmentationCategoryTypeModifier-SpineInpaint.term.json"
)


# --- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spine_case(real_case):
    """The real CT and its vertebra labels only (TotalSegmentator ids 25-33 in this scan)."""
    ct, lab = real_case
    vertebrae = np.where(np.isin(lab.array, labels_mod.VERTEBRA_IDS), lab.array, 0).astype(np.uint8)
    return ct, lab.with_array(vertebrae)


def ijk_to_ras_of(node) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def deserialize(entry: str):
    out = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(entry, out)
    return out


def draw_binary_segment(scene, segmentation_node, reference_node, mask: io.Volume, name: str) -> None:
    """Paint a segment the way the Segment Editor does: a binary oriented image set to a segment."""
    labelmap = mrml.volume_to_node(scene, mask, "drawn", labelmap=True)
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment(name, name, (1.0, 0.0, 0.0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented, segmentation_node, segment_id
    )
    scene.RemoveNode(labelmap)


# --- volumes -------------------------------------------------------------------------------------
def test_volume_round_trip_real_ct_keeps_array_and_geometry(scene, spine_case):
    ct, _ = spine_case
    node = mrml.volume_to_node(scene, ct, "CT")
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    back = mrml.volume_from_node(node)
    assert back.array.dtype == ct.array.dtype
    np.testing.assert_array_equal(back.array, ct.array)
    assert back.same_grid(ct)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-12)


def test_ras_of_a_voxel_matches_hand_computation(scene, spine_case):
    ct, _ = spine_case
    node = mrml.volume_to_node(scene, ct, "CT")
    i, j, k = 10, 20, 30
    # This scan is stored RAS (NIfTI): LPS direction diag(-1, -1, 1), 3 mm voxels.
    ox, oy, oz = ct.origin
    lps = np.array([ox - 3.0 * i, oy - 3.0 * j, oz + 3.0 * k])
    expected_ras = np.array([-lps[0], -lps[1], lps[2]])
    ras = ijk_to_ras_of(node) @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(ras[:3], expected_ras, atol=1e-6)
    # The voxel there is array[k, j, i], and Slicer's image reads the same value at (i, j, k).
    image = node.GetImageData()
    assert image.GetScalarComponentAsDouble(i, j, k, 0) == ct.array[k, j, i]


def test_oblique_volume_geometry_and_voxel_order(scene, oblique_volume):
    node = mrml.volume_to_node(scene, oblique_volume, "oblique")
    c, s = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
    i, j, k = 8, 2, 3
    # LPS = origin + R @ (spacing * ijk), R the 20 degree rotation about z; RAS flips x and y.
    x, y, z = 0.7 * i, 0.8 * j, 2.5 * k
    lps = np.array([-12.5 + c * x - s * y, 40.0 + s * x + c * y, 3.0 + z])
    ras = ijk_to_ras_of(node) @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-5)
    assert node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) == pytest.approx(
        float(oblique_volume.array[k, j, i])
    )
    back = mrml.volume_from_node(node)
    assert back.same_grid(oblique_volume)
    np.testing.assert_array_equal(back.array, oblique_volume.array)


def test_volume_from_node_applies_a_linear_parent_transform(scene, oblique_volume):
    node = mrml.volume_to_node(scene, oblique_volume, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    shift = vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)  # +5 mm along RAS x (towards the patient's right)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = mrml.volume_from_node(node)
    # +5 mm in RAS x is -5 mm in LPS x.
    np.testing.assert_allclose(back.origin, np.asarray(oblique_volume.origin) + [-5.0, 0.0, 0.0], atol=1e-6)


def test_volume_from_node_reads_an_image_whose_extent_does_not_start_at_zero(scene):
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    image.SetExtent(2, 5, 3, 4, 1, 1)  # 4 x 2 x 1 voxels, first voxel at IJK (2, 3, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.arange(8, dtype=np.int16), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cropped")
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.5, 2.0, 3.0)
    node.SetOrigin(10.0, 20.0, 30.0)  # RAS of IJK (0, 0, 0); directions are the identity (RAS)
    volume = mrml.volume_from_node(node)
    assert volume.shape == (1, 2, 4)
    np.testing.assert_array_equal(volume.array.ravel(), np.arange(8))
    # RAS of IJK (2, 3, 1) = (11, 26, 33); LPS flips x and y.
    np.testing.assert_allclose(volume.origin, (-11.0, -26.0, 33.0))


def test_volume_to_node_updates_an_existing_node_and_makes_label_maps(scene, spine_case):
    _, lab = spine_case
    node = mrml.volume_to_node(scene, lab, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    again = mrml.volume_to_node(scene, lab.with_array(lab.array * 0), "cleared", node=node)
    assert again is node and node.GetName() == "cleared"
    assert not mrml.volume_from_node(node).array.any()


def test_volume_errors_are_one_line(scene, oblique_volume):
    with pytest.raises(SpineInpaintError, match="scalar volume node is needed, got nothing"):
        mrml.volume_from_node(None)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "m")
    with pytest.raises(SpineInpaintError, match="got a vtkMRMLModelNode"):
        mrml.volume_from_node(model)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(SpineInpaintError, match="'empty' holds no image"):
        mrml.volume_from_node(empty)
    with pytest.raises(SpineInpaintError, match="label map needs integer voxels"):
        mrml.volume_to_node(scene, oblique_volume, "x", labelmap=True)


# --- segmentations -------------------------------------------------------------------------------
def test_segmentation_from_labels_names_codes_and_round_trips_bit_for_bit(scene, spine_case):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node)
    assert segment_names(seg_node) == ["sacrum", "S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11"]

    segmentation = seg_node.GetSegmentation()
    l3 = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L3"))
    entry = deserialize(l3.GetTerminology())
    assert entry.GetTerminologyContextName() == mrml.TERMINOLOGY_CONTEXT
    category, type_ = entry.GetCategoryObject(), entry.GetTypeObject()
    assert (category.GetCodingSchemeDesignator(), category.GetCodeValue()) == ("SCT", "123037004")
    assert (type_.GetCodingSchemeDesignator(), type_.GetCodeValue()) == ("SCT", "36470004")
    assert type_.GetCodeMeaning() == "L3 vertebra"
    assert l3.GetColor() == pytest.approx(mrml.segment_color("L3"))
    ref = seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole())
    assert ref is ct_node

    back, names = mrml.labels_from_segmentation(seg_node, ct_node)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab.array)
    assert back.same_grid(ct)
    assert names == {v: labels_mod.vertebra_name(v) for v in range(25, 34)}


def test_labels_survive_user_renaming_through_the_label_tag(scene, spine_case):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node)
    segmentation = seg_node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L3")).SetName("tumour level")
    back, names = mrml.labels_from_segmentation(seg_node, ct_node, segment_names=["tumour level", "L2"])
    assert names == {29: "tumour level", 30: "L2"}
    np.testing.assert_array_equal(back.array, np.where(np.isin(lab.array, [29, 30]), lab.array, 0))
    # Explicit values win; a segment with neither tag nor vertebra name gets the next free value.
    segmentation.AddEmptySegment("extra", "extra")
    _, names = mrml.labels_from_segmentation(seg_node, ct_node, segment_names=["L2", "extra"],
                                             label_values={"L2": 7})
    assert names == {7: "L2", 8: "extra"}


def test_lesion_mask_from_a_segment_drawn_as_binary_labelmap(scene, spine_case):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node)
    rng = np.random.default_rng(0)
    drawn = np.zeros(ct.shape, np.uint8)
    z, y, x = np.nonzero(lab.array == 29)
    pick = rng.choice(len(z), size=len(z) // 3, replace=False)
    drawn[z[pick], y[pick], x[pick]] = 1  # scattered voxels: any resampling would show
    draw_binary_segment(scene, seg_node, ct_node, ct.with_array(drawn), "Lesion")

    mask = mrml.lesion_mask_from_segmentation(seg_node, ct_node)
    assert mask.array.dtype == np.uint8 and mask.same_grid(ct)
    np.testing.assert_array_equal(mask.array, drawn)
    # The vertebra under the lesion is still whole: segments may overlap.
    vertebrae, _ = mrml.labels_from_segmentation(seg_node, ct_node, segment_names=["L3"])
    assert (vertebrae.array == 29).sum() == (lab.array == 29).sum()


def test_lesion_errors_name_the_segments(scene, spine_case):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(scene, lab.with_array((lab.array == 29) * 29), ct_node,
                                             name="levels")
    expected = r"no segment named 'Lesion' in segmentation 'levels' \(segments: L3\)"
    with pytest.raises(SpineInpaintError, match=expected):
        mrml.lesion_mask_from_segmentation(seg_node, ct_node)
    seg_node.GetSegmentation().AddEmptySegment("Lesion", "Lesion")
    with pytest.raises(SpineInpaintError, match="segment 'Lesion' is empty"):
        mrml.lesion_mask_from_segmentation(seg_node, ct_node)
    assert not mrml.lesion_mask_from_segmentation(seg_node, ct_node, allow_empty=True).array.any()
    with pytest.raises(SpineInpaintError, match=r"labels \[29\] have no segment name"):
        mrml.segmentation_from_labels(scene, lab.with_array((lab.array == 29) * 29), ct_node,
                                      names={30: "L2"})


def test_lesion_segment_has_neoplasm_code_and_is_replaced_when_run_again(scene, spine_case):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    first = ct.with_array((lab.array == 29).astype(np.uint8))
    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node, lesion_mask=first)
    second = ct.with_array((lab.array == 30).astype(np.uint8))
    mrml.segmentation_from_labels(scene, lab, ct_node, lesion_mask=second, node=seg_node)
    names = segment_names(seg_node)
    assert names.count("Lesion") == 1 and names.count("L3") == 1 and len(names) == 10
    segmentation = seg_node.GetSegmentation()
    lesion = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Lesion"))
    entry = deserialize(lesion.GetTerminology())
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"  # Morphologically Altered Structure
    assert entry.GetTypeObject().GetCodeValue() == "108369006"  # Neoplasm
    assert entry.GetRegionObject().GetCodeValue() == "51282000"  # Vertebra
    np.testing.assert_array_equal(mrml.lesion_mask_from_segmentation(seg_node, ct_node).array, second.array)


def test_terminology_file_lists_every_code_the_segments_use():
    text = TERMINOLOGY_FILE.read_text()
    json.loads(text)  # well-formed
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE)) == mrml.TERMINOLOGY_CONTEXT
    found = {}
    type_ = slicer.vtkSlicerTerminologyType()
    for name in mrml.SEGMENT_CODES:
        entry = deserialize(mrml.terminology_entry(name))
        category = entry.GetCategoryObject()
        for i in range(logic.GetNumberOfTypesInTerminologyCategory(mrml.TERMINOLOGY_CONTEXT, category)):
            logic.GetNthTypeInTerminologyCategory(mrml.TERMINOLOGY_CONTEXT, category, i, type_)
            if type_.GetCodeValue() == entry.GetTypeObject().GetCodeValue():
                found[name] = (type_.GetCodeMeaning(), tuple(type_.GetRecommendedDisplayRGBValue()))
    assert set(found) == set(mrml.SEGMENT_CODES)
    assert found["L3"] == ("L3 vertebra", tuple(int(round(255 * c)) for c in mrml.segment_color("L3")))
    assert mrml.terminology_entry("not a structure") is None


# --- subject hierarchy, models, STL --------------------------------------------------------------
def test_models_go_into_the_results_folder(scene, spine_case):
    from vtkmodules.vtkFiltersSources import vtkCubeSource

    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    folder = mrml.results_folder(scene)
    assert mrml.results_folder(scene) == folder  # found again, not made twice
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemName(folder) == "SpineInpaint results" and sh.GetItemLevel(folder) == "Folder"

    cube = vtkCubeSource()
    cube.SetCenter(10.0, 20.0, 30.0)  # LPS
    cube.SetXLength(2.0)
    cube.SetYLength(4.0)
    cube.SetZLength(6.0)
    cube.Update()
    spine = mrml.model_node_from_polydata(scene, cube.GetOutput(), "Spine restored", folder)
    bounds = spine.GetPolyData().GetBounds()  # RAS
    np.testing.assert_allclose(bounds, [-11, -9, -22, -18, 27, 33], atol=1e-6)

    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node)
    models = mrml.models_from_segmentation(scene, seg_node, folder, ["L3", "L2"], suffix=" restored")
    children = [sh.GetItemDataNode(c) for c in _children(sh, folder)]
    assert {n.GetName() for n in children} == {"Spine restored", "L3 restored", "L2 restored"}
    assert all(sh.GetItemParent(sh.GetItemByDataNode(m)) == folder for m in models)
    # The L3 model lies where the L3 voxels are (RAS bounds of the voxel centres, within a voxel).
    z, y, x = np.nonzero(lab.array == 29)
    lps = ct.index_to_physical(np.stack([z, y, x], axis=1))
    ras = lps * [-1, -1, 1]
    got = np.array(models[0].GetPolyData().GetBounds()).reshape(3, 2)
    np.testing.assert_allclose(got[:, 0], ras.min(axis=0), atol=3.0)
    np.testing.assert_allclose(got[:, 1], ras.max(axis=0), atol=3.0)
    with pytest.raises(SpineInpaintError, match="surface 'nothing' is empty"):
        from vtkmodules.vtkCommonDataModel import vtkPolyData

        mrml.model_node_from_polydata(scene, vtkPolyData(), "nothing")


def _children(sh, item) -> list[int]:
    from vtkmodules.vtkCommonCore import vtkIdList

    ids = vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def test_stl_export_is_lps_and_spans_the_mask(scene, spine_case, tmp_path):
    from vtkmodules.vtkIOGeometry import vtkSTLReader

    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(scene, lab, ct_node, name="spine")
    files = mrml.export_segments_to_stl(seg_node, tmp_path, ["L3"])
    assert [f.name for f in files] == ["spine_L3.stl"]
    assert files[0].read_bytes()[:80].startswith(b"3D Slicer output. SPACE=LPS")
    reader = vtkSTLReader()
    reader.SetFileName(str(files[0]))
    reader.Update()
    got = np.array(reader.GetOutput().GetBounds()).reshape(3, 2)
    # Physical extent of the L3 voxels in LPS: centres +- half a voxel.
    z, y, x = np.nonzero(lab.array == 29)
    lps = ct.index_to_physical(np.stack([z, y, x], axis=1))
    low, high = lps.min(axis=0) - 1.5, lps.max(axis=0) + 1.5
    np.testing.assert_allclose(got[:, 0], low, atol=3.0)  # within one voxel
    np.testing.assert_allclose(got[:, 1], high, atol=3.0)

    merged = mrml.export_segments_to_stl(seg_node, tmp_path, merge=True, file_name="restored_spine.stl")
    assert merged == [tmp_path / "restored_spine.stl"] and merged[0].stat().st_size > 10_000
    with pytest.raises(SpineInpaintError, match="file_name needs merge=True"):
        mrml.export_segments_to_stl(seg_node, tmp_path, file_name="x.stl")


# --- the command line's outputs, the input untouched --------------------------------------------
def test_load_outputs_builds_results_and_never_touches_the_input(scene, spine_case, tmp_path):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    image_mtime = ct_node.GetImageData().GetMTime()
    before = mrml.volume_from_node(ct_node)
    lesion = ct.with_array((lab.array == 29).astype(np.uint8))
    user_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    user_seg.GetSegmentation().AddEmptySegment("note", "note")

    # The files a 'restore' run writes (contract names), from the real scan.
    restored = ct.with_array(np.where(lesion.array > 0, 400, ct.array).astype(ct.array.dtype))
    io.write_volume(restored, tmp_path / "restored_ct.nii.gz")
    io.write_volume(lab, tmp_path / "spine_seg.nii.gz")
    io.write_volume(lab, tmp_path / "restored_seg.nii.gz")
    io.write_volume(lesion, tmp_path / "lesion_seg.nii.gz")
    results = mrml.load_outputs(scene, tmp_path, ct_node, segmentation_node=user_seg)

    assert results.restored_volume is not ct_node and results.restored_volume.GetName() == "CT restored"
    np.testing.assert_array_equal(mrml.volume_from_node(results.restored_volume).array, restored.array)
    assert results.segmentation is user_seg
    vertebrae = {labels_mod.vertebra_name(v) for v in range(25, 34)}
    assert set(segment_names(user_seg)) == {"note", "Lesion"} | vertebrae
    assert [m.GetName() for m in results.models] == ["L3 restored", "Spine restored"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parents = {sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(n)))
               for n in results.models + [results.restored_volume, user_seg]}
    assert parents == {"SpineInpaint results"}

    assert ct_node.GetImageData().GetMTime() == image_mtime
    after = mrml.volume_from_node(ct_node)
    np.testing.assert_array_equal(after.array, before.array)
    assert after.same_grid(before)


def test_load_outputs_refuses_files_off_the_input_grid(scene, spine_case, tmp_path):
    ct, lab = spine_case
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    io.write_volume(io.resample_to_spacing(lab, (6.0, 6.0, 6.0), labels=True), tmp_path / "spine_seg.nii.gz")
    with pytest.raises(SpineInpaintError, match="spine_seg.nii.gz is not on the grid of the input CT"):
        mrml.load_outputs(scene, tmp_path, ct_node)


# --- parameter node and the .mrb round trip ------------------------------------------------------
def module_parameters() -> dict[str, tuple[str, str | None]]:
    """Fields of the module's parameterNodeWrapper class: name -> (annotation, default source)."""
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "SpineInpaintParameterNode":
            return {
                item.target.id: (ast.unparse(item.annotation),
                                 ast.unparse(item.value) if item.value else None)
                for item in node.body if isinstance(item, ast.AnnAssign)
            }
    raise AssertionError("SpineInpaintParameterNode not found in SpineInpaint.py")


def enum_members(class_name: str) -> list[str]:
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [t.id for item in node.body if isinstance(item, ast.Assign) for t in item.targets]
    raise AssertionError(f"enum {class_name} not found in SpineInpaint.py")


def write_like_parameter_node_wrapper(node, values: dict) -> None:
    """Store values the way slicer.parameterNodeWrapper's serializers do (it needs Qt, so it is not
    importable from slicer-core): MRML nodes as a reference plus an empty parameter of the same
    name, enums by member name, paths and strings as text."""
    for name, value in values.items():
        if hasattr(value, "GetID"):
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID())
        else:
            node.SetParameter(name, str(value))


def test_module_parameters_match_the_steps_helpers():
    import sys

    sys.path.insert(0, str(REPO / "SpineInpaint"))
    try:
        from SpineInpaintModuleLib import steps
    finally:
        sys.path.remove(str(REPO / "SpineInpaint"))
    params = module_parameters()
    assert {"inputVolume", "segmentation", "method", "device", "stlFolder", "restoredVolume"} <= set(params)
    assert params["method"][0] == "Method" and params["device"][0] == "Device"
    assert enum_members("Method") == list(steps.METHODS)
    assert enum_members("Device") == list(steps.DEVICES)


def test_parameter_node_and_scene_survive_mrb(mrml_app_factory, spine_case, tmp_path):
    ct, lab = spine_case
    app = mrml_app_factory()
    scene = app.scene
    ct_node = mrml.volume_to_node(scene, ct, "CT")
    seg_node = mrml.segmentation_from_labels(
        scene, lab, ct_node, lesion_mask=ct.with_array((lab.array == 29).astype(np.uint8)), name="spine"
    )
    folder = mrml.results_folder(scene)
    mrml.models_from_segmentation(scene, seg_node, folder, ["L3"], suffix=" restored")
    params = mrml.parameter_node(scene)
    assert mrml.parameter_node(scene) is params  # a singleton, as in Slicer
    assert params.GetAttribute("ModuleName") == "SpineInpaint"
    fields = module_parameters()
    values = {"inputVolume": ct_node, "segmentation": seg_node, "method": "PGGAN", "device": "CPU",
              "stlFolder": str(tmp_path / "stl")}
    assert set(values) <= set(fields)
    write_like_parameter_node_wrapper(params, values)

    path = tmp_path / "scene.mrb"
    scene.SetRootDirectory(str(tmp_path))
    assert scene.WriteToMRB(str(path))

    reread = mrml_app_factory().scene
    assert reread.ReadFromMRB(str(path))
    ct_back = reread.GetFirstNodeByName("CT")
    np.testing.assert_array_equal(mrml.volume_from_node(ct_back).array, ct.array)
    assert mrml.volume_from_node(ct_back).same_grid(ct)
    seg_back = reread.GetFirstNodeByName("spine")
    assert segment_names(seg_back) == segment_names(seg_node)
    segmentation = seg_back.GetSegmentation()
    l3 = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("L3"))
    assert deserialize(l3.GetTerminology()).GetTypeObject().GetCodeValue() == "36470004"
    vertebra_segments = [n for n in segment_names(seg_back) if n != "Lesion"]
    labels_back, _ = mrml.labels_from_segmentation(seg_back, ct_back, segment_names=vertebra_segments)
    np.testing.assert_array_equal(labels_back.array, lab.array)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(reread)
    model = reread.GetFirstNodeByName("L3 restored")
    assert sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(model))) == "SpineInpaint results"

    params_back = mrml.parameter_node(reread)
    assert params_back.GetParameter("method") == "PGGAN" and params_back.GetParameter("device") == "CPU"
    assert params_back.GetParameter("stlFolder") == str(tmp_path / "stl")
    assert params_back.GetNodeReference("inputVolume") is ct_back
    assert params_back.GetNodeReference("segmentation") is seg_back
    assert reread.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
