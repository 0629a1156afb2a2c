"""Surface models in the scene: model nodes from polydata or a segmentation, STL export of segments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.mrml.nodes import (
    _slicer,
    _subject_hierarchy,
    subject_hierarchy_item,
)
from SpineInpaintLib.mrml.segmentations import (
    _check_segmentation_node,
    _segment_id_by_name,
    _segment_ids,
    _string_array,
)
from SpineInpaintLib.mrml.terminology import segment_color

__all__ = ["model_node_from_polydata", "models_from_segmentation", "export_segments_to_stl"]


def model_node_from_polydata(
    scene,
    polydata,
    name: str,
    folder_item: int | None = None,
    color: Sequence[float] | None = None,
    coordinate_system: str = "LPS",
):
    """Add a surface as a model node, optionally inside a subject-hierarchy folder.

    Parameters
    ----------
    polydata
        ``vtkPolyData`` in millimetres; copied.
    folder_item
        Subject-hierarchy item id of the folder (see :func:`results_folder`).
    color
        RGB in 0-1 (default: :func:`segment_color` of the name).
    coordinate_system
        'LPS' (the library's surfaces and STL files) or 'RAS' (Slicer's own).
    """
    from vtkmodules.vtkCommonDataModel import vtkPolyData
    from vtkmodules.vtkCommonTransforms import vtkTransform
    from vtkmodules.vtkFiltersGeneral import vtkTransformPolyDataFilter

    if polydata is None or polydata.GetNumberOfPoints() == 0:
        raise SpineInpaintError(f"surface '{name}' is empty")
    system = coordinate_system.upper()
    if system not in ("LPS", "RAS"):
        raise SpineInpaintError(f"coordinate_system must be 'LPS' or 'RAS', got '{coordinate_system}'")
    surface = vtkPolyData()
    if system == "LPS":
        flip = vtkTransform()
        flip.Scale(-1.0, -1.0, 1.0)
        to_ras = vtkTransformPolyDataFilter()
        to_ras.SetTransform(flip)
        to_ras.SetInputData(polydata)
        to_ras.Update()
        surface.DeepCopy(to_ras.GetOutput())
    else:
        surface.DeepCopy(polydata)
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(surface)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetColor(*(color if color is not None else segment_color(name)))
    if folder_item is not None:
        _subject_hierarchy(scene).SetItemParent(subject_hierarchy_item(scene, node), int(folder_item))
    return node


def models_from_segmentation(
    scene, segmentation_node, folder_item: int | None = None, segment_names: Sequence[str] | None = None,
    suffix: str = "",
) -> list:
    """One model node per segment, from Slicer's closed-surface representation of the segments.

    Models are named ``<segment name><suffix>`` and coloured like their segments.
    """
    _check_segmentation_node(segmentation_node)
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    ids = (_segment_ids(segmentation) if segment_names is None
           else [_segment_id_by_name(segmentation_node, n) for n in segment_names])
    segmentation_node.CreateClosedSurfaceRepresentation()
    from vtkmodules.vtkCommonDataModel import vtkPolyData

    models = []
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        surface = vtkPolyData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentClosedSurfaceRepresentation(
            segmentation_node, segment_id, surface
        )
        models.append(model_node_from_polydata(
            scene, surface, segment.GetName() + suffix, folder_item,
            color=segment.GetColor(), coordinate_system="RAS",
        ))
    return models


# --- STL -----------------------------------------------------------------------------------------
def _stl_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.stl")}


def export_segments_to_stl(
    segmentation_node,
    folder: str | os.PathLike,
    segment_names: Sequence[str] | None = None,
    merge: bool = False,
    file_name: str | None = None,
) -> list[Path]:
    """Write segments as STL through Slicer's own export (LPS millimetres, as Slicer writes STL).

    Slicer names the files ``<segmentation name>_<segment name>.stl``, or ``<segmentation name>.stl``
    when ``merge`` is set; ``file_name`` renames the merged file (e.g. 'restored_spine.stl').

    Returns
    -------
    list of Path
        The files written.
    """
    _check_segmentation_node(segmentation_node)
    if file_name is not None and not merge:
        raise SpineInpaintError("file_name needs merge=True (one file)")
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    ids = (_segment_ids(segmentation) if segment_names is None
           else [_segment_id_by_name(segmentation_node, n) for n in segment_names])
    if not ids:
        raise SpineInpaintError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = _stl_files(folder)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
        str(folder), segmentation_node, _string_array(ids), "STL", True, 1.0, bool(merge)
    )
    after = _stl_files(folder)
    written = sorted(folder / n for n, t in after.items() if before.get(n) != t)
    if not ok or not written:
        raise SpineInpaintError(
            f"Slicer could not write STL files of '{segmentation_node.GetName()}' to {folder}"
        )
    if file_name is not None:
        target = folder / file_name
        os.replace(written[0], target)
        written = [target]
    return written
