"""Names, colours and DICOM/SNOMED terminology of the segments we put in a Slicer scene."""

from __future__ import annotations

import dataclasses

from SpineInpaintLib.core import labels as _labels
from SpineInpaintLib.mrml.nodes import _slicer

__all__ = [
    "LESION_NAME", "SPINE_NAME", "LABEL_VALUE_TAG", "TERMINOLOGY_CONTEXT", "REGION_CONTEXT", "Code",
    "SEGMENT_CODES", "terminology_entry", "segment_color", "ANATOMICAL_STRUCTURE",
    "MORPHOLOGICALLY_ALTERED_STRUCTURE", "NEOPLASM", "VERTEBRA", "SPINE",
]

#: Name of the segment that holds the lesion (drawn by the user or found by detection).
LESION_NAME = "Lesion"

#: Name of the segment / model of the whole spine.
SPINE_NAME = "Spine"

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
