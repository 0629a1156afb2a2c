"""The bridge between SpineInpaintLib and a Slicer MRML scene.

Everything here needs only the ``slicer`` MRML libraries: the Slicer application provides them, and
so does the ``slicer-core`` package outside it. Nothing here touches Qt or ``slicer.app``, so the
module logic, Slicer batch mode and the pytest suite all run the same code.

Conventions
-----------
* A :class:`~SpineInpaintLib.io.Volume` is LPS (as ITK and every file on disk); MRML nodes are RAS.
  Geometry goes through ``Volume.ijk_to_ras()`` and its inverse, nothing else.
* Surfaces produced by the library (``surface``) are LPS millimetres, like the STL files Slicer
  writes; :func:`model_node_from_polydata` turns them into RAS model nodes.
* Segments carry the standard terminology Slicer uses (SNOMED CT codes, stored in the segment's
  ``TerminologyEntry`` tag in the string form that Slicer's own serializer writes) and the label
  value they came from (tag :data:`LABEL_VALUE_TAG`), so a label map survives a round trip through
  a segmentation bit for bit, even after the user edits segments in the Segment Editor.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib import labels as _labels
from SpineInpaintLib.io import Volume
from SpineInpaintLib.pipeline import OUTPUT_FILES  # the command line's output names: one contract

__all__ = [
    "Code",
    "LESION_NAME",
    "SPINE_NAME",
    "RESULTS_FOLDER_NAME",
    "LABEL_VALUE_TAG",
    "TERMINOLOGY_CONTEXT",
    "REGION_CONTEXT",
    "SEGMENT_CODES",
    "terminology_entry",
    "segment_color",
    "volume_to_node",
    "volume_from_node",
    "segmentation_from_labels",
    "labels_from_segmentation",
    "lesion_mask_from_segmentation",
    "results_folder",
    "subject_hierarchy_item",
    "model_node_from_polydata",
    "models_from_segmentation",
    "export_segments_to_stl",
    "parameter_node",
    "OUTPUT_FILES",
    "SceneResults",
    "load_outputs",
]

#: Name of the segment that holds the lesion (drawn by the user or found by detection).
LESION_NAME = "Lesion"
#: Name of the segment / model of the whole spine.
SPINE_NAME = "Spine"
#: Subject-hierarchy folder that receives every result model.
RESULTS_FOLDER_NAME = "SpineInpaint results"
#: Segment tag holding the label value a segment was made from (kept through save and reload).
LABEL_VALUE_TAG = "SpineInpaint.LabelValue"
#: Terminology context of our segments; the module ships it as
#: ``SpineInpaint/Resources/SegmentationCategoryTypeModifier-SpineInpaint.term.json``.
TERMINOLOGY_CONTEXT = "Segmentation category and type - SpineInpaint"
#: Anatomic region context (Slicer's default DICOM list, which holds 'Vertebra').
REGION_CONTEXT = "Anatomic codes - DICOM master list"


@dataclasses.dataclass(frozen=True)
class Code:
    """A coded concept (DICOM triplet): coding scheme, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


_SCT = "SCT"  # SNOMED CT, as DICOM designates it
ANATOMICAL_STRUCTURE = Code(_SCT, "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code(_SCT, "49755003", "Morphologically Altered Structure")
NEOPLASM = Code(_SCT, "108369006", "Neoplasm")
VERTEBRA = Code(_SCT, "51282000", "Vertebra")
SPINE = Code(_SCT, "421060004", "Spine")

# SNOMED CT concepts of the single vertebrae ("L3 vertebra" ...), as listed in the terminology
# files of Slicer's TotalSegmentator extension (totalsegmentator_snomed_mapping.csv).
_VERTEBRA_SCT = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001",
    "T1": "64864005", "T2": "53733008", "T3": "1626008", "T4": "73071006", "T5": "56401006",
    "T6": "45296009", "T7": "62487009", "T8": "11068009", "T9": "82687006", "T10": "7610001",
    "T11": "12989004", "T12": "23215003",
    "L1": "66794005", "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
    "S1": "65985001",
}

_VERTEBRA_NAMES = frozenset(_VERTEBRA_SCT) | {"sacrum"}

#: Segment name -> (category, type, anatomic region or None).
SEGMENT_CODES: dict[str, tuple[Code, Code, Code | None]] = {
    name: (ANATOMICAL_STRUCTURE, Code(_SCT, value, f"{name} vertebra"), None)
    for name, value in _VERTEBRA_SCT.items()
}
SEGMENT_CODES["sacrum"] = (ANATOMICAL_STRUCTURE, Code(_SCT, "54735007", "Sacrum"), None)
SEGMENT_CODES[SPINE_NAME] = (ANATOMICAL_STRUCTURE, SPINE, None)
# A lesion is a morphologically altered structure; its region says where it sits.
SEGMENT_CODES[LESION_NAME] = (MORPHOLOGICALLY_ALTERED_STRUCTURE, NEOPLASM, VERTEBRA)

# Alternating bone tones make neighbouring vertebrae tell apart in the 3D view.
_VERTEBRA_PALETTE = (
    (0.945, 0.839, 0.569), (0.851, 0.690, 0.431), (0.918, 0.765, 0.373),
    (0.776, 0.604, 0.400), (0.957, 0.894, 0.690), (0.831, 0.737, 0.400),
)
_LESION_COLOR = (0.862, 0.157, 0.157)
_SPINE_COLOR = (0.945, 0.839, 0.569)
_OTHER_COLOR = (0.5, 0.5, 0.5)

# RAS <-> LPS: flip the first two axes (a rotation by 180 degrees, so no mirror).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _slicer():
    """The ``slicer`` MRML namespace, imported late so that the library imports without it."""
    try:
        import slicer
    except ImportError:  # pragma: no cover - depends on the environment
        raise SpineInpaintError(
            "the MRML libraries are missing: run inside 3D Slicer or install slicer-core"
        ) from None
    return slicer


# --- terminology -----------------------------------------------------------------------------
def _canonical_name(name: str) -> str:
    """Segment name as used in :data:`SEGMENT_CODES` (vertebra names are matched without case)."""
    key = str(name).strip()
    if key.upper() in _VERTEBRA_SCT:
        return key.upper()
    if key.lower() == "sacrum":
        return "sacrum"
    return key


def terminology_entry(name: str) -> str | None:
    """The ``TerminologyEntry`` tag string Slicer stores for a segment called ``name``.

    The string is made by Slicer's own serializer
    (``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``), so it has exactly the form
    Slicer 5 writes: ``context~category~type~type modifier~region context~region~region modifier``
    with each coded item as ``scheme^value^meaning``.

    Returns
    -------
    str or None
        None for names without a standard code (vertebra names C1-S1, 'sacrum', 'Spine' and
        'Lesion' have one).
    """
    codes = SEGMENT_CODES.get(_canonical_name(name))
    if codes is None:
        return None
    category, type_, region = codes
    region = region or Code("", "", "")
    logic = _slicer().vtkSlicerTerminologiesModuleLogic
    return logic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT,
        category.value, category.scheme, category.meaning,
        type_.value, type_.scheme, type_.meaning,
        "", "", "",
        REGION_CONTEXT,
        region.value, region.scheme, region.meaning,
        "", "", "",
    )


def segment_color(name: str) -> tuple[float, float, float]:
    """Display colour (RGB in 0-1) of a segment or model called ``name``."""
    key = _canonical_name(name)
    if key == LESION_NAME:
        return _LESION_COLOR
    if key == SPINE_NAME:
        return _SPINE_COLOR
    try:
        label = _labels.vertebra_id(key)
    except ValueError:
        return _OTHER_COLOR
    return _VERTEBRA_PALETTE[label % len(_VERTEBRA_PALETTE)]


def _default_label_name(label: int) -> str:
    return _labels.vertebra_name(label) if _labels.is_vertebra(label) else f"Label {label}"


# --- numpy <-> vtkImageData (the axis-order conversion lives in io) ---------------------------------
def _image_data_from_array(array: np.ndarray, size_xyz: Sequence[int]):
    """A vtkImageData holding a copy of ``array`` (z, y, x) with identity geometry (the node holds it);
    its dimensions are ``size_xyz``, the array's shape reversed."""
    from SpineInpaintLib import io

    return io.to_vtk_image(Volume(array))


def _array_from_image_data(image) -> np.ndarray:
    """A (z, y, x) copy of the scalars of a single-component vtkImageData."""
    from SpineInpaintLib import io

    return io.from_vtk_image(image).array


def _vtk_matrix(matrix: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    out = vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(matrix[i, j]))
    return out


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


# --- volumes -----------------------------------------------------------------------------------
def volume_to_node(scene, volume: Volume, name: str, node=None, labelmap: bool = False):
    """Put a :class:`Volume` into the scene as a scalar (or label map) volume node.

    Parameters
    ----------
    scene
        The ``vtkMRMLScene``.
    volume
        Voxels ``(z, y, x)`` and LPS geometry; the array is copied, its dtype kept (bool as uint8).
    name
        Node name (a new node's name; an existing ``node`` is renamed to it).
    node
        Update this node instead of adding a new one (its image and geometry are replaced).
    labelmap
        Make a ``vtkMRMLLabelMapVolumeNode`` (integer voxels needed).

    Returns
    -------
    vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode
    """
    array = volume.array
    if labelmap and not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise SpineInpaintError(f"a label map needs integer voxels, got {array.dtype}")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise SpineInpaintError(f"cannot put voxels of type {array.dtype} into a volume node")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    else:
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise SpineInpaintError(f"node '{node.GetName()}' is a {node.GetClassName()}, not a volume node")
        node.SetName(name)
    node.SetAndObserveImageData(_image_data_from_array(array, volume.size_xyz))
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras()))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_node(node) -> Volume:
    """Read a scalar volume node (or label map node) into a :class:`Volume` (LPS, array copied).

    A linear parent transform is applied to the geometry (as hardening it would); a non-linear one
    is refused.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        what = "nothing" if node is None else f"a {node.GetClassName()}"
        raise SpineInpaintError(f"a scalar volume node is needed, got {what}")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise SpineInpaintError(f"volume node '{node.GetName()}' holds no image")
    if image.GetNumberOfScalarComponents() != 1:
        raise SpineInpaintError(
            f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
            "voxel; a scalar (grey-value) volume is needed"
        )
    if min(image.GetDimensions()) < 1:
        raise SpineInpaintError(f"volume node '{node.GetName()}' has an empty image")
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    ijk_to_ras = vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = _numpy_matrix(ijk_to_ras)
    # Voxel (0, 0, 0) of the array is the image's first extent index, not always IJK 0.
    start = np.array(image.GetExtent()[::2], dtype=float)
    if start.any():
        m[:3, 3] = m[:3, :3] @ start + m[:3, 3]
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise SpineInpaintError(
                f"volume node '{node.GetName()}' is under a non-linear transform; harden it first"
            )
        to_world = vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        m = _numpy_matrix(to_world) @ m
    ijk_to_lps = _LPS_TO_RAS @ m  # the flip is its own inverse
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return Volume(
        array=_array_from_image_data(image),
        spacing=tuple(spacing),
        origin=tuple(ijk_to_lps[:3, 3]),
        direction=axes / spacing,
    )


# --- segmentations -----------------------------------------------------------------------------
def _segment_ids(segmentation) -> list[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _string_array(values: Sequence[str]):
    from vtkmodules.vtkCommonCore import vtkStringArray

    out = vtkStringArray()
    for value in values:
        out.InsertNextValue(value)
    return out


def _segment_label_value(segment) -> int | None:
    """The label value stored on a segment by :func:`segmentation_from_labels`, if any."""
    from vtkmodules.vtkCommonCore import reference

    value = reference("")
    if segment.GetTag(LABEL_VALUE_TAG, value):
        try:
            return int(str(value))
        except ValueError:
            return None
    return None


def _style_segment(segment, name: str, label: int | None, color=None, terminology: str | None = None) -> None:
    segment.SetName(name)
    segment.SetColor(*(color if color is not None else segment_color(name)))
    entry = terminology if terminology is not None else terminology_entry(name)
    if entry:
        segment.SetTerminology(entry)
    if label is not None:
        segment.SetTag(LABEL_VALUE_TAG, str(int(label)))
    # The name and colour were chosen here: Slicer must not replace them from the terminology.
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)


def _import_label_volume(scene, volume: Volume, segmentation_node) -> dict[int, str]:
    """Import the labels of ``volume`` into ``segmentation_node``; returns label -> new segment id."""
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    before = set(_segment_ids(segmentation))
    labelmap_node = volume_to_node(scene, volume, "SpineInpaint temporary labels", labelmap=True)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node, ""
        )
    finally:
        _remove_node(scene, labelmap_node)
    if not ok:
        raise SpineInpaintError(f"Slicer could not import the label map into '{segmentation_node.GetName()}'")
    new_ids = {}
    for segment_id in _segment_ids(segmentation):
        if segment_id not in before:
            new_ids[int(segmentation.GetSegment(segment_id).GetLabelValue())] = segment_id
    return new_ids


def _remove_node(scene, node) -> None:
    display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    scene.RemoveNode(node)
    for extra in (display, storage):
        if extra is not None and extra.GetScene() is not None:
            scene.RemoveNode(extra)


def segmentation_from_labels(
    scene,
    labels: Volume,
    reference_volume_node,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, Sequence[float]] | None = None,
    terminology: Mapping[int, str] | None = None,
    lesion_mask: Volume | None = None,
    name: str = "SpineInpaint segmentation",
    node=None,
):
    """Make a segmentation node with one named, coded segment per label (plus a 'Lesion' segment).

    Parameters
    ----------
    scene
        The ``vtkMRMLScene``.
    labels
        Label map (integer voxels, 0 = background), e.g. TotalSegmentator vertebra ids.
    reference_volume_node
        The CT the segmentation belongs to: it sets the segmentation's reference geometry (the grid
        the Segment Editor paints on). May be None.
    names
        Label -> segment name. Default: vertebra names ('L3', 'T12', ...) for vertebra ids and
        'Label <n>' for other labels. When given, every label present needs a name.
    colors
        Label -> RGB in 0-1. Default: :func:`segment_color` of the name.
    terminology
        Label -> ``TerminologyEntry`` string. Default: :func:`terminology_entry` of the name.
    lesion_mask
        A binary mask added as segment 'Lesion' (it may overlap the vertebrae).

    Segments of ``node`` that have the name of a new segment are replaced (a step run again
    replaces its results); other segments, e.g. a lesion the user drew, stay.
    name
        Name of a new segmentation node.
    node
        Add the segments to this segmentation node instead of a new one.

    Returns
    -------
    vtkMRMLSegmentationNode
    """
    array = labels.array
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise SpineInpaintError(f"labels need integer voxels, got {array.dtype}")
    if array.size and array.min() < 0:
        raise SpineInpaintError(f"labels must not be negative (found {int(array.min())})")
    present = [int(v) for v in np.unique(array) if v != 0]
    if names is not None:
        missing = [v for v in present if v not in names]
        if missing:
            raise SpineInpaintError(f"labels {missing} have no segment name; add them to names")
        chosen = [names[v] for v in present]
        if len(set(chosen)) != len(chosen):
            raise SpineInpaintError(f"segment names must be unique, got {sorted(chosen)}")
    if lesion_mask is not None and lesion_mask.shape != labels.shape:
        raise SpineInpaintError(
            f"the lesion mask's grid {lesion_mask.shape} does not match the labels' grid {labels.shape}"
        )

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    elif not node.IsA("vtkMRMLSegmentationNode"):
        raise SpineInpaintError(f"node '{node.GetName()}' is a {node.GetClassName()}, not a segmentation")
    node.CreateDefaultDisplayNodes()
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = node.GetSegmentation()

    if present:
        seg_names = {v: (names[v] if names is not None else _default_label_name(v)) for v in present}
        _remove_segments(segmentation, seg_names.values())  # a step run again replaces its segments
        new_ids = _import_label_volume(scene, labels, node)
        for label in present:
            segment = segmentation.GetSegment(new_ids[label])
            seg_name = seg_names[label]
            _style_segment(
                segment, seg_name, label,
                color=None if colors is None else colors.get(label),
                terminology=None if terminology is None else terminology.get(label),
            )
    if lesion_mask is not None:
        mask = lesion_mask.with_array((np.asarray(lesion_mask.array) > 0).astype(np.uint8))
        if not mask.array.any():
            raise SpineInpaintError("the lesion mask is empty")
        _remove_segments(segmentation, [LESION_NAME])
        new_ids = _import_label_volume(scene, mask, node)
        _style_segment(segmentation.GetSegment(new_ids[1]), LESION_NAME, None)
    return node


def _remove_segments(segmentation, names) -> None:
    for name in names:
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        while segment_id:
            segmentation.RemoveSegment(segment_id)
            segment_id = segmentation.GetSegmentIdBySegmentName(name)


def _segment_id_by_name(segmentation_node, name: str) -> str:
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if not segment_id:
        have = [segmentation.GetSegment(i).GetName() for i in _segment_ids(segmentation)]
        raise SpineInpaintError(
            f"no segment named '{name}' in segmentation '{segmentation_node.GetName()}' "
            f"(segments: {', '.join(have) if have else 'none'})"
        )
    return segment_id


def _check_segmentation_node(node) -> None:
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        what = "nothing" if node is None else f"a {node.GetClassName()}"
        raise SpineInpaintError(f"a segmentation node is needed, got {what}")


def _export_labels(segmentation_node, segment_ids: Sequence[str], values: Sequence[int],
                   reference_volume_node) -> Volume:
    """Slicer's own export of segments to a label map on the reference grid, with given values."""
    slicer = _slicer()
    scene = segmentation_node.GetScene()
    # A colour table whose entry names are the segment names makes Slicer write those label values.
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(int(max(values)) + 1)
    segmentation = segmentation_node.GetSegmentation()
    for segment_id, value in zip(segment_ids, values):
        segment = segmentation.GetSegment(segment_id)
        table.SetColor(int(value), segment.GetName(), *segment.GetColor(), 1.0)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SpineInpaint temporary export")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, _string_array(segment_ids), labelmap_node, reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table,
        )
        if not ok:
            raise SpineInpaintError(f"Slicer could not export segmentation '{segmentation_node.GetName()}'")
        volume = volume_from_node(labelmap_node)
    finally:
        _remove_node(scene, labelmap_node)
    return volume


def _label_dtype(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise SpineInpaintError(f"label value {max_value} is too large")


def labels_from_segmentation(
    segmentation_node,
    reference_volume_node,
    segment_names: Sequence[str] | None = None,
    label_values: Mapping[str, int] | None = None,
) -> tuple[Volume, dict[int, str]]:
    """Export segments to a label map on the grid of ``reference_volume_node``.

    Each segment gets, in this order: ``label_values[name]``; the label it was made from
    (:data:`LABEL_VALUE_TAG`); its vertebra id for a vertebra name; else the next free value.
    Where segments overlap, the later segment in the segmentation wins (Slicer's rule).

    Parameters
    ----------
    segment_names
        Segments to export (default: all).

    Returns
    -------
    (labels, names)
        ``labels`` on the reference grid (uint8 when the values fit); ``names`` label -> segment name.
    """
    _check_segmentation_node(segmentation_node)
    if reference_volume_node is None:
        raise SpineInpaintError("a reference volume node is needed to export a segmentation")
    segmentation = segmentation_node.GetSegmentation()
    if segment_names is None:
        ids = _segment_ids(segmentation)
    else:
        ids = [_segment_id_by_name(segmentation_node, n) for n in segment_names]
    if not ids:
        raise SpineInpaintError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
    seg_names = [segmentation.GetSegment(i).GetName() for i in ids]
    if len(set(seg_names)) != len(seg_names):
        raise SpineInpaintError(f"segment names must be unique to export labels, got {sorted(seg_names)}")

    values: list[int | None] = []
    for segment_id, seg_name in zip(ids, seg_names):
        value = None
        if label_values is not None and seg_name in label_values:
            value = int(label_values[seg_name])
        if value is None:
            value = _segment_label_value(segmentation.GetSegment(segment_id))
        if value is None and _canonical_name(seg_name) in _VERTEBRA_NAMES:
            value = _labels.vertebra_id(seg_name)
        values.append(value)
    used = {v for v in values if v is not None}
    if any(v is not None and v <= 0 for v in values):
        raise SpineInpaintError(f"label values must be positive, got {sorted(used)}")
    next_free = max(used, default=0) + 1
    for i, value in enumerate(values):
        if value is None:
            values[i] = next_free
            next_free += 1
    if len(set(values)) != len(values):
        raise SpineInpaintError(
            f"two segments would get the same label value: {dict(zip(seg_names, values))}"
        )

    volume = _export_labels(segmentation_node, ids, values, reference_volume_node)
    volume.array = volume.array.astype(_label_dtype(max(values)))
    return volume, {int(v): n for v, n in zip(values, seg_names)}


def lesion_mask_from_segmentation(
    segmentation_node, reference_volume_node, segment_name: str = LESION_NAME, allow_empty: bool = False
) -> Volume:
    """The binary mask (uint8 0/1) of one segment, by default 'Lesion', on the reference grid.

    Raises
    ------
    SpineInpaintError
        When the segment is missing, or empty and ``allow_empty`` is False.
    """
    _check_segmentation_node(segmentation_node)
    if reference_volume_node is None:
        raise SpineInpaintError("a reference volume node is needed to export a segment")
    segment_id = _segment_id_by_name(segmentation_node, segment_name)
    volume = _export_labels(segmentation_node, [segment_id], [1], reference_volume_node)
    volume.array = (volume.array > 0).astype(np.uint8)
    if not allow_empty and not volume.array.any():
        raise SpineInpaintError(
            f"segment '{segment_name}' is empty: draw it in the Segment Editor first"
        )
    return volume


# --- subject hierarchy and models ----------------------------------------------------------------
def _subject_hierarchy(scene):
    sh = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise SpineInpaintError("the scene has no subject hierarchy")
    return sh


def subject_hierarchy_item(scene, node) -> int:
    """The subject-hierarchy item of a data node, made under the scene if it has none yet.

    In the Slicer application a plugin makes the item as the node is added; elsewhere (slicer-core)
    nothing does, so every function here that files a node asks for its item through this one.
    """
    sh = _subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return int(item)


def results_folder(scene, name: str = RESULTS_FOLDER_NAME) -> int:
    """The subject-hierarchy folder ``name`` under the scene (made if missing); returns its item id."""
    sh = _subject_hierarchy(scene)
    scene_item = sh.GetSceneItemID()
    item = sh.GetItemChildWithName(scene_item, name)
    if item and sh.GetItemLevel(item) == "Folder":
        return int(item)
    return int(sh.CreateFolderItem(scene_item, name))


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


# --- parameter node ------------------------------------------------------------------------------
def parameter_node(scene, module_name: str = "SpineInpaint"):
    """The module's parameter node: the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with
    ``module_name`` (made if missing), found and made the way Slicer's scripted-module logic does.
    """
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = _slicer().vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node.SetAttribute("ModuleName", module_name)
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != module_name:
        node.SetAttribute("ModuleName", module_name)
    return node


# --- the command line's outputs into the scene ---------------------------------------------------
@dataclasses.dataclass
class SceneResults:
    """What :func:`load_outputs` put into the scene."""

    restored_volume: object | None = None
    segmentation: object | None = None
    models: list = dataclasses.field(default_factory=list)
    folder_item: int = 0


def _read_on_grid(path: Path, reference: Volume) -> Volume:
    from SpineInpaintLib import io

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
