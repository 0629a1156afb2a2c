"""Load the outputs of a ``restore`` folder into the scene, under one subject-hierarchy folder."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core import labels as _labels
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.outputs import (
    OUTPUT_FILES,  # the command line's output names: one contract
)
from SpineInpaintLib.mrml.models import (
    model_node_from_polydata,
    models_from_segmentation,
)
from SpineInpaintLib.mrml.nodes import (
    RESULTS_FOLDER_NAME,
    _slicer,
    _subject_hierarchy,
    results_folder,
    subject_hierarchy_item,
    volume_from_node,
    volume_to_node,
)
from SpineInpaintLib.mrml.segmentations import (
    _label_dtype,
    _segment_id_by_name,
    segmentation_from_labels,
)
from SpineInpaintLib.mrml.terminology import SPINE_NAME

__all__ = ["SceneResults", "load_outputs"]



# --- the command line's outputs into the scene ---------------------------------------------------
@dataclasses.dataclass
class SceneResults:
    """What :func:`load_outputs` put into the scene."""

    restored_volume: object | None = None
    segmentation: object | None = None
    models: list = dataclasses.field(default_factory=list)
    folder_item: int = 0


def _read_on_grid(path: Path, reference: Volume) -> Volume:
    volume = io.read_volume(path, require_3d=False)
    if not volume.same_grid(reference):
        raise SpineInpaintError(
            f"{path.name} is not on the grid of the input CT ({volume.size_xyz} vs {reference.size_xyz}, "
            "or another origin, spacing or direction)"
        )
    return volume


def _read_stl(path: Path):
    from vtkmodules.vtkIOGeometry import vtkSTLReader

    reader = vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


def load_outputs(
    scene, out_dir: str | os.PathLike, input_volume_node, segmentation_node=None
) -> SceneResults:
    """Put the files a step of the command line wrote into the scene; the input node is not touched.

    * ``restored_ct.nii.gz`` -> a new volume node '<input> restored';
    * ``restored_seg.nii.gz`` (else ``spine_seg.nii.gz``) and ``lesion_seg.nii.gz`` -> named, coded
      segments of ``segmentation_node`` (a new '<input> segmentation' if None): the vertebrae and
      'Lesion'; segments of the same names are replaced, others (e.g. a lesion drawn) kept;
    * after a restoration (``restored_seg.nii.gz`` present): models '<vertebra> restored' of every
      vertebra the lesion touched (of all vertebrae when there is no lesion mask) and 'Spine restored'
      (from ``restored_spine.stl`` when written, else from the vertebra segments), in the
      subject-hierarchy folder :data:`RESULTS_FOLDER_NAME` with the restored volume and segmentation.

    Every volume must be on the input CT's grid (the command line's contract). All or nothing: the
    files are read and checked before the scene changes, and a failure while building the results
    removes the nodes added and restores ``segmentation_node``'s segments.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise SpineInpaintError(f"output folder not found: {out_dir}")
    reference = volume_from_node(input_volume_node)
    files = {key: out_dir / name for key, name in OUTPUT_FILES.items()}
    # Read and check every file before the scene changes, then build; a failure while building
    # removes what was added and restores the user's segmentation: no half-made results.
    restored = _read_on_grid(files["restored_ct"], reference) if files["restored_ct"].is_file() else None
    label_file = files["restored_seg"] if files["restored_seg"].is_file() else files["spine_seg"]
    labels = _read_on_grid(label_file, reference) if label_file.is_file() else None
    lesion = _read_on_grid(files["lesion_seg"], reference) if files["lesion_seg"].is_file() else None
    spine_stl = _read_stl(files["restored_spine"]) if files["restored_spine"].is_file() else None

    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    sh = _subject_hierarchy(scene)
    had_folder = bool(sh.GetItemChildWithName(sh.GetSceneItemID(), RESULTS_FOLDER_NAME))
    backup = None
    if segmentation_node is not None:
        slicer = _slicer()
        backup = slicer.vtkSegmentation()
        backup.DeepCopy(segmentation_node.GetSegmentation())
    try:
        return _build_results(scene, files, input_volume_node, reference, restored, labels, lesion, spine_stl,
                              segmentation_node)
    except BaseException:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if (node is not None and node.GetID() not in existing and scene.IsNodePresent(node)
                    and not node.IsA("vtkMRMLSubjectHierarchyNode")):
                scene.RemoveNode(node)
        folder = sh.GetItemChildWithName(sh.GetSceneItemID(), RESULTS_FOLDER_NAME)
        if folder and not had_folder:
            sh.RemoveItem(folder)
        if backup is not None:
            segmentation_node.GetSegmentation().DeepCopy(backup)
        raise


def _build_results(scene, files, input_volume_node, reference, restored, labels, lesion, spine_stl,
                   segmentation_node) -> SceneResults:
    prefix = input_volume_node.GetName()
    results = SceneResults()
    if restored is not None:
        results.restored_volume = volume_to_node(scene, restored, f"{prefix} restored")
    if lesion is not None and not np.asarray(lesion.array).any():
        lesion = None  # no lesion found: nothing to show
    if labels is not None:
        labels = labels.with_array(np.where(np.isin(labels.array, _labels.VERTEBRA_IDS), labels.array, 0)
                                   .astype(_label_dtype(int(labels.array.max(initial=0)))))
    if labels is not None or lesion is not None:
        if labels is None:
            labels = reference.with_array(np.zeros(reference.shape, np.uint8))
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{prefix} segmentation")
        results.segmentation = segmentation_from_labels(
            scene, labels, input_volume_node, lesion_mask=lesion, node=segmentation_node
        )

    if files["restored_seg"].is_file() and labels is not None:
        results.folder_item = results_folder(scene)
        present = [int(v) for v in np.unique(labels.array) if v]
        touched = present
        if lesion is not None:
            touched = [int(v) for v in np.unique(labels.array[lesion.array > 0]) if v]
        names = [_labels.vertebra_name(v) for v in (touched or present)]
        results.models = models_from_segmentation(
            scene, results.segmentation, results.folder_item, names, suffix=" restored"
        )
        if spine_stl is not None:
            # LPS, like every STL of the contract
            results.models.append(model_node_from_polydata(
                scene, spine_stl, f"{SPINE_NAME} restored", results.folder_item, coordinate_system="LPS"
            ))
        elif present:
            results.models.append(_merged_model(scene, results.segmentation, present, results.folder_item))
        sh = _subject_hierarchy(scene)
        for node in (results.restored_volume, results.segmentation):
            if node is not None:
                sh.SetItemParent(subject_hierarchy_item(scene, node), results.folder_item)
    return results


def _merged_model(scene, segmentation_node, labels: Sequence[int], folder_item: int):
    from vtkmodules.vtkCommonDataModel import vtkPolyData
    from vtkmodules.vtkFiltersCore import vtkAppendPolyData

    slicer = _slicer()
    segmentation_node.CreateClosedSurfaceRepresentation()
    append = vtkAppendPolyData()
    for label in labels:
        surface = vtkPolyData()
        segment_id = _segment_id_by_name(segmentation_node, _labels.vertebra_name(label))
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentClosedSurfaceRepresentation(
            segmentation_node, segment_id, surface
        )
        append.AddInputData(surface)
    append.Update()
    return model_node_from_polydata(
        scene, append.GetOutput(), f"{SPINE_NAME} restored", folder_item, coordinate_system="RAS"
    )
