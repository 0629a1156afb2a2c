"""Vertebra label ids (TotalSegmentator v2) and the tissue names used across the project."""

from __future__ import annotations

import numpy as np

__all__ = [
    "VERTEBRA_NAMES", "VERTEBRA_IDS", "THORACOLUMBAR", "is_vertebra", "vertebra_name", "vertebra_id",
    "vertebra_mask", "spine_mask", "TOTALSEG_CLASSES", "TOTALSEG_IDS", "VERSE_TO_TOTALSEG", "VERSE_SUBREGIONS",
    "verse_to_totalseg", "UNLEVELLED_SPINE",
]

#: TotalSegmentator v2 ids of the vertebrae, caudal to cranial (sacrum 25 ... C1 50).
VERTEBRA_NAMES: dict[int, str] = {25: "sacrum", 26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1"}
VERTEBRA_NAMES.update({32 + i: f"T{12 - i}" for i in range(12)})  # 32 T12 ... 43 T1
VERTEBRA_NAMES.update({44 + i: f"C{7 - i}" for i in range(7)})  # 44 C7 ... 50 C1

VERTEBRA_IDS: tuple[int, ...] = tuple(sorted(VERTEBRA_NAMES))

#: Label of spine bone whose level the source does not give (a binary spine mask); no TotalSegmentator id.
UNLEVELLED_SPINE = 255

#: The levels our phantoms always hold, caudal to cranial: S1 (26) to T10 (34).
THORACOLUMBAR: tuple[int, ...] = tuple(range(26, 35))

_BY_NAME = {name.upper(): label for label, name in VERTEBRA_NAMES.items()}

# --- the TotalSegmentator v2 "total" task: 117 classes, the one label convention of the project ------------
_TOTALSEG_NAMES = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum"
).split()
_TOTALSEG_NAMES += [f"vertebrae_{VERTEBRA_NAMES[i]}" for i in range(26, 51)]
_TOTALSEG_NAMES += (
    "heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right subclavian_artery_left "
    "common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right "
    "atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left "
    "iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right "
    "clavicula_left clavicula_right femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left "
    "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
    "autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull"
).split()
_TOTALSEG_NAMES += [f"rib_{side}_{n}" for side in ("left", "right") for n in range(1, 13)]
_TOTALSEG_NAMES += ["sternum", "costal_cartilages"]

#: TotalSegmentator v2 ("total" task) id -> structure name, as its dataset names the mask files.
TOTALSEG_CLASSES: dict[int, str] = {i + 1: name for i, name in enumerate(_TOTALSEG_NAMES)}

#: Structure name -> TotalSegmentator v2 id.
TOTALSEG_IDS: dict[str, int] = {name: label for label, name in TOTALSEG_CLASSES.items()}

# --- VerSe -------------------------------------------------------------------------------------------------
#: VerSe vertebra ids -> TotalSegmentator v2 ids: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 26 sacrum; a
#: lumbarised S1 (VerSe 25, "L6") is TotalSegmentator's S1. VerSe 28 (T13) has no TotalSegmentator id.
VERSE_TO_TOTALSEG: dict[int, int] = {v: 51 - v for v in range(1, 25)}
VERSE_TO_TOTALSEG.update({25: 26, 26: 25})

#: VerSe sub-region ids (the ``seg-subreg`` masks) and their names.
VERSE_SUBREGIONS: dict[int, str] = {
    41: "arcus_vertebrae", 42: "spinous_process", 43: "transverse_process_left", 44: "transverse_process_right",
    45: "superior_articular_left", 46: "superior_articular_right", 47: "inferior_articular_left",
    48: "inferior_articular_right", 49: "vertebral_body_border", 50: "vertebral_body",
}


def is_vertebra(label: int) -> bool:
    """True for a TotalSegmentator v2 vertebra id (25-50)."""
    return int(label) in VERTEBRA_NAMES


def vertebra_name(label: int) -> str:
    """Name of a vertebra id, e.g. ``29 -> 'L3'``."""
    try:
        return VERTEBRA_NAMES[int(label)]
    except KeyError:
        raise ValueError(f"{label} is not a TotalSegmentator v2 vertebra id (25-50)") from None


def vertebra_id(name: str | int) -> int:
    """Id of a vertebra given by name (``'L3'``) or id (``29``)."""
    if isinstance(name, int) or str(name).isdigit():
        label = int(name)
        vertebra_name(label)
        return label
    try:
        return _BY_NAME[str(name).strip().upper()]
    except KeyError:
        raise ValueError(f"unknown vertebra '{name}' (expected e.g. L3, T12, S1 or an id 25-50)") from None


# --- label maps ------------------------------------------------------------------------------------
def vertebra_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the voxels that hold a vertebra id (TotalSegmentator v2 ids 25-50)."""
    labels = np.asarray(labels)
    return (labels >= VERTEBRA_IDS[0]) & (labels <= VERTEBRA_IDS[-1])


def spine_mask(labels: np.ndarray) -> np.ndarray:
    """Binary mask (uint8) of every vertebra (TotalSegmentator v2 ids 25-50)."""
    return vertebra_mask(labels).astype(np.uint8)


def verse_to_totalseg(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Map a VerSe vertebra label map to TotalSegmentator v2 ids.

    Returns
    -------
    (mapped, dropped)
        ``mapped`` uint8 of the same shape; ``dropped`` the VerSe ids without a TotalSegmentator id
        (e.g. 28, a thirteenth thoracic vertebra), whose voxels become 0.
    """
    labels = np.asarray(labels)
    lut = np.zeros(max(256, int(labels.max(initial=0)) + 1), np.uint8)
    for verse, total in VERSE_TO_TOTALSEG.items():
        lut[verse] = total
    present = [int(v) for v in np.unique(labels) if v != 0]
    dropped = [v for v in present if v not in VERSE_TO_TOTALSEG]
    return lut[labels.astype(np.int64, copy=False)], dropped
