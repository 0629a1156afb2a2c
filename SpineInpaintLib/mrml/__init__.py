"""Slicer scene <-> SpineInpaintLib: volumes, segmentations, models and the outputs of restore, on the MRML libraries only."""

from SpineInpaintLib.mrml.models import (
    export_segments_to_stl,
    model_node_from_polydata,
    models_from_segmentation,
)
from SpineInpaintLib.mrml.nodes import (
    RESULTS_FOLDER_NAME,
    parameter_node,
    results_folder,
    subject_hierarchy_item,
    volume_from_node,
    volume_to_node,
)
from SpineInpaintLib.mrml.results import SceneResults, load_outputs
from SpineInpaintLib.mrml.segmentations import (
    labels_from_segmentation,
    lesion_mask_from_segmentation,
    segmentation_from_labels,
)
from SpineInpaintLib.mrml.terminology import (
    ANATOMICAL_STRUCTURE,
    LABEL_VALUE_TAG,
    LESION_NAME,
    MORPHOLOGICALLY_ALTERED_STRUCTURE,
    NEOPLASM,
    REGION_CONTEXT,
    SEGMENT_CODES,
    SPINE,
    SPINE_NAME,
    TERMINOLOGY_CONTEXT,
    VERTEBRA,
    Code,
    segment_color,
    terminology_entry,
)

__all__ = [
    "model_node_from_polydata",
    "models_from_segmentation",
    "export_segments_to_stl",
    "volume_to_node",
    "volume_from_node",
    "subject_hierarchy_item",
    "results_folder",
    "parameter_node",
    "RESULTS_FOLDER_NAME",
    "SceneResults",
    "load_outputs",
    "segmentation_from_labels",
    "labels_from_segmentation",
    "lesion_mask_from_segmentation",
    "LESION_NAME",
    "SPINE_NAME",
    "LABEL_VALUE_TAG",
    "TERMINOLOGY_CONTEXT",
    "REGION_CONTEXT",
    "Code",
    "SEGMENT_CODES",
    "terminology_entry",
    "segment_color",
    "ANATOMICAL_STRUCTURE",
    "MORPHOLOGICALLY_ALTERED_STRUCTURE",
    "NEOPLASM",
    "VERTEBRA",
    "SPINE",
]
