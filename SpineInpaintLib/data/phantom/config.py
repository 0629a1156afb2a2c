"""Procedural CT phantoms of the spine, in HU, with TotalSegmentator-style labels.

A phantom is a synthetic CT with a known ground truth (every voxel's tissue is known): by default an
abdominal CT from T10 down to the sacrum; asked for any level above T10 (``levels="C1-sacrum"``, a
region such as "neck" or "chest", see :data:`REGIONS`), the whole column from C1 to the sacrum with
the chest, neck and skull base around it. It is It is built from analytic shapes in millimetres (patient LPS coordinates)
and then rasterised on the requested grid, so any spacing gives the same anatomy. The thoracolumbar
phantom has:

- the spine: a curved chain of vertebrae T10 ... L5, S1 and the sacrum below (lordosis, kyphosis,
  scoliosis with the apical vertebrae rotated), each with a vertebral body (a cortical shell around
  a cancellous core with trabecular texture, concave endplates, a posterior wall and a waist),
  pedicles, laminae, spinous, transverse and articular processes; intervertebral discs (annulus and
  nucleus) whose wedge follows the curvature; the spinal canal with the dural sac and the cord;
- ribs 10-12 (with a costal cartilage on rib 10), the iliac wings and the sacral alae;
- paraspinal muscles (autochthon with fatty infiltration, iliopsoas, quadratus lumborum), the body
  wall (skin, subcutaneous fat, abdominal wall muscles), retroperitoneal and visceral fat, liver,
  spleen, kidneys, lung bases above the diaphragm, aorta (with calcified plaques) and inferior vena
  cava with the iliac vessels, small bowel and colon with gas and fluid;
- air and the scanner table under the patient.

The whole column adds (:mod:`.cervical`, :mod:`.ribcage`, :mod:`.thorax`), from random streams of
its own so that every thoracolumbar phantom stays voxel for voxel what it was:

- T9 ... T1 and C7 ... C1 with typical adult dimensions per level, the thoracic kyphosis and the
  cervical lordosis; C2 with its dens rising into the atlas, C1 as a ring (anterior and posterior
  arches, lateral masses, transverse processes), uncinate processes on C3-C7 and transverse foramina
  in C1-C6;
- ribs 1-12 left and right, each from its own vertebra (head at the body by the disc above,
  tubercle at the transverse process) round the chest, ribs 1-7 joined to the sternum by costal
  cartilages and 8-10 to the costal margin; the sternum, clavicles and scapulae; the skull base
  (a shell over the brain, the foramen magnum over the canal);
- the chest narrowing to the thoracic inlet, lungs in five lobes with vessel texture, the heart in
  its pericardial fat, mediastinal fat, the aortic arch with the brachiocephalic trunk, carotid and
  subclavian arteries, the superior vena cava, trachea, main bronchi and oesophagus; the neck (a
  smaller outline, pharynx, thyroid) and the head outline above C1.

Partial volume is modelled by anti-aliasing: every shape is a signed-distance-like function whose
value is ramped over one voxel; bone is evaluated on sub-slices that are averaged over the slice
thickness (the slice sensitivity profile). The scanner is a Gaussian in-plane point spread function
applied to the image together with white noise, so the noise comes out correlated like CT noise.

Grid convention: the volume's direction is the identity (LPS), so array axis 2 (x, columns) runs to
the patient's left, axis 1 (y, rows) to posterior and axis 0 (z, slices) to superior: slice 0 is
the most inferior one and an axial slice shown with ``imshow`` is in radiological orientation.
The anatomy lives in fixed patient coordinates: x = 0 is the midline, the S1 body centre is at
``y = 0, z = 0``; the grid is a window placed around it (centred on the requested levels, or at
``config.origin``).

Labels (uint8). TotalSegmentator v2 ids wherever that model has the structure (vertebrae 25 sacrum,
26 S1 ... 34 T10 ... 43 T1, 44 C7 ... 50 C1; 1 spleen, 2/3 kidneys, 5 liver, 10-14 lung lobes,
15 oesophagus, 16 trachea, 17 thyroid, 18 small bowel, 20 colon, 51 heart, 52 aorta,
54 brachiocephalic trunk, 55/56 subclavian and 57/58 common carotid arteries, 62 superior and
63 inferior vena cava, 65-68 iliac vessels, 71/72 scapulae, 73/74 clavicles, 75/76 femurs, 77/78 hips,
79 spinal cord (the whole dural sac, as TotalSegmentator labels it), 86/87 autochthon, 88/89
iliopsoas, 90 brain, 91 skull, 92-103 ribs left 1-12 and 104-115 right 1-12, 116 sternum,
117 costal cartilages) and ids from 200 up for tissues TotalSegmentator does
not label (see :data:`TISSUE_LABELS`; :func:`totalsegmentator_labels` maps them to 0). A vertebra
label covers the whole vertebra, body and posterior elements, as TotalSegmentator's do; where two
bones meet (costovertebral and sacro-iliac joints) the vertebra's label wins.

Calibration: the nominal intensities (``_HU`` and the config's defaults) are set so that the mean
HU of bone, disc, muscle and fat, measured with one definition on both (:func:`tissue_masks`), match
the real TotalSegmentator example scan on its 3 mm grid (:func:`compare_with_real`). That scan is
of an older adult (cancellous bone ~140 HU, fatty paraspinal muscles), so the defaults sit at the
low end of the healthy ranges; :meth:`PhantomConfig.random` spans younger, denser spines too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.core.labels import THORACOLUMBAR, VERTEBRA_NAMES, vertebra_id

__all__ = [
    "TISSUE_LABELS", "PHANTOM_ONLY_LABELS", "SUPPORTED_LEVELS", "UPPER_LEVELS", "FIELD_LEVELS", "REGIONS",
    "CONTRAST_PHASES", "KERNELS", "PhantomConfig", "SpineLevel", "Phantom", "parse_levels", "totalsegmentator_labels",
]

# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
#: Label ids of the phantom's tissues besides the vertebrae (26-34) and the sacrum (25).
TISSUE_LABELS: dict[str, int] = {
    # TotalSegmentator v2 ("total" task) ids
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "lung_upper_lobe_left": 10,
    "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13,
    "lung_lower_lobe_right": 14,
    "esophagus": 15,
    "trachea": 16,
    "thyroid_gland": 17,
    "small_bowel": 18,
    "colon": 20,
    "sacrum": 25,
    "heart": 51,
    "aorta": 52,
    "brachiocephalic_trunk": 54,
    "subclavian_artery_right": 55,
    "subclavian_artery_left": 56,
    "common_carotid_artery_right": 57,
    "common_carotid_artery_left": 58,
    "superior_vena_cava": 62,
    "inferior_vena_cava": 63,
    "iliac_artery_left": 65,
    "iliac_artery_right": 66,
    "iliac_vena_left": 67,
    "iliac_vena_right": 68,
    "scapula_left": 71,
    "scapula_right": 72,
    "clavicula_left": 73,
    "clavicula_right": 74,
    "femur_left": 75,
    "femur_right": 76,
    "hip_left": 77,
    "hip_right": 78,
    "spinal_cord": 79,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
    "brain": 90,
    "skull": 91,
    **{f"rib_left_{n}": 91 + n for n in range(1, 13)},
    **{f"rib_right_{n}": 103 + n for n in range(1, 13)},
    "sternum": 116,
    "costal_cartilages": 117,
    # phantom-only ids (TotalSegmentator leaves these tissues unlabelled)
    "intervertebral_disc": 200,
    "subcutaneous_fat": 201,
    "deep_fat": 202,  # retroperitoneal, visceral, intermuscular and epidural fat
    "skin": 203,
    "other_muscle": 204,
    "table": 205,
    "supernumerary_rib": 206,  # a 13th (lumbar) rib: TotalSegmentator has no id for it
}

#: Ids that only the phantom uses; TotalSegmentator would leave these voxels at 0.
PHANTOM_ONLY_LABELS: tuple[int, ...] = tuple(v for v in TISSUE_LABELS.values() if v >= 200)

#: Vertebra ids of the original thoracolumbar phantom, caudal to cranial (S1 ... T10).
SUPPORTED_LEVELS: tuple[int, ...] = THORACOLUMBAR

#: Vertebra ids the whole-column phantom adds above T10, caudal to cranial (T9 35 ... C1 50).
UPPER_LEVELS: tuple[int, ...] = tuple(range(35, 51))

#: Levels a field of view may be asked to cover: the sacrum below S1 (S2-S5, label 25, so that a scan
#: can reach into the pelvis), S1 ... T10 and the column above up to C1.
FIELD_LEVELS: tuple[int, ...] = (25,) + SUPPORTED_LEVELS + UPPER_LEVELS

#: Named fields of view: region name -> (lowest, highest) level, both included.
REGIONS: dict[str, tuple[str, str]] = {
    "neck": ("T1", "C1"),
    "chest": ("L1", "C7"),
    "abdomen": ("sacrum", "T10"),
    "thoracolumbar": ("S1", "T9"),
    "whole": ("sacrum", "C1"),
}

_L = TISSUE_LABELS

_MUSCLE_IDS = (86, 87, 88, 89)

# --------------------------------------------------------------------------------------------
# Typical adult morphometry (mm), after published CT/cadaver series (Panjabi 1991/1992,
# Zindrick 1987): body width, body depth, body height, canal width, canal depth, pedicle width,
# pedicle height, transverse-process span (tip to tip), spinous-process length, its downward
# inclination (deg), its half height, the disc height above the level.
# --------------------------------------------------------------------------------------------
_DIMS_KEYS = ("width", "depth", "height", "canal_w", "canal_d", "ped_w", "ped_h", "tp_span",
              "sp_len", "sp_incl", "sp_half", "disc_above")

_DIMS: dict[str, tuple[float, ...]] = {
    "T10": (36, 28, 21, 17, 15, 6.5, 13, 64, 28, 45, 5.0, 6),
    "T11": (38, 29, 22, 17.5, 15, 7.5, 14, 56, 26, 35, 6.0, 7),
    "T12": (40, 30, 23, 18.5, 16, 8.0, 15, 48, 25, 22, 7.0, 8),
    "L1": (42, 31, 24, 21, 17, 8.0, 15, 64, 25, 12, 8.0, 10),
    "L2": (44, 32, 25, 22, 17, 9.0, 15, 74, 25, 10, 8.5, 11),
    "L3": (47, 33, 26, 23, 16, 10.0, 14, 84, 24, 8, 8.5, 12),
    "L4": (49, 34, 26, 23, 17, 11.0, 13, 80, 22, 8, 8.0, 12.5),
    "L5": (51, 34, 25, 24, 16, 14.0, 12, 86, 18, 5, 7.0, 12.5),
    "S1": (50, 32, 27, 26, 13, 16.0, 14, 104, 12, 0, 6.0, 11.5),
    # above T10 (Panjabi 1991 thoracic, Panjabi 1991/Gilad 1986 cervical series); C2's height is its
    # body without the dens; C1 has no body (its width/depth are the dens' for the layout)
    "T9": (34, 27, 20.5, 17, 15, 6.0, 12.5, 68, 30, 55, 5.0, 5.5),
    "T8": (32, 26, 20, 16.5, 15, 5.5, 12, 70, 32, 60, 5.0, 5),
    "T7": (31, 25, 19.5, 16, 15, 5.0, 11.5, 72, 33, 62, 5.0, 4.5),
    "T6": (30, 24, 19, 16, 15, 5.0, 11, 74, 33, 60, 5.0, 4.5),
    "T5": (29, 23, 18.5, 16, 15, 5.0, 10.5, 76, 32, 55, 5.0, 4.5),
    "T4": (28, 22, 18, 16, 15, 5.0, 10, 78, 31, 50, 5.0, 4.5),
    "T3": (28, 20, 17.5, 16.5, 15, 5.0, 10, 80, 30, 45, 5.0, 4.5),
    "T2": (29, 18, 17, 17, 15, 5.5, 10, 82, 30, 35, 5.0, 4.5),
    "T1": (30, 17, 15.5, 20, 14, 7.0, 9.5, 84, 32, 25, 5.0, 5),
    "C7": (28, 16, 14.5, 23, 14, 6.0, 7.5, 72, 32, 20, 5.0, 5.5),
    "C6": (25, 16, 13.5, 24, 14, 5.5, 7, 60, 20, 15, 4.5, 5.5),
    "C5": (23, 15.5, 13, 24, 14, 5.5, 7, 58, 16, 15, 4.0, 5.5),
    "C4": (22, 15.5, 13, 24, 14, 5.5, 7, 56, 15, 15, 4.0, 5),
    "C3": (21, 15.5, 13, 23, 14.5, 5.5, 7, 54, 15, 15, 4.0, 5),
    "C2": (19, 16, 15, 23, 16, 7.0, 9, 58, 22, 15, 6.0, 4.5),
    "C1": (10, 10, 10, 28, 16, 7.0, 9, 76, 10, 0, 4.0, 3.0),
}

#: Share of the L1-S1 lordosis taken by each disc, caudal to cranial (L5/S1 ... L1/L2).
_LORDOSIS_SHARE = (0.36, 0.26, 0.17, 0.12, 0.09)


# --------------------------------------------------------------------------------------------
# Levels and regions
# --------------------------------------------------------------------------------------------
_LEVEL_HELP = "e.g. L3, T12, S1, sacrum, an id 25-50, a range 'T4-L2' or a region (" + ", ".join(REGIONS) + ")"


def _one_level(token: str | int) -> int:
    """The id of one level name or id, or a one-line :class:`SpineInpaintError`."""
    try:
        label = vertebra_id(token.strip() if isinstance(token, str) else token)
    except (ValueError, TypeError):
        raise SpineInpaintError(f"unknown level {token!r} (expected {_LEVEL_HELP})") from None
    if label not in FIELD_LEVELS:
        raise SpineInpaintError(f"level {VERTEBRA_NAMES[label]} (id {label}) is not modelled (C1 to the sacrum)")
    return label


def _level_range(a: int, b: int) -> tuple[int, ...]:
    lo, hi = min(a, b), max(a, b)
    return tuple(i for i in FIELD_LEVELS if lo <= i <= hi)


def parse_levels(spec: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """Vertebra ids (sorted) of a level request.

    ``spec`` is a region name (:data:`REGIONS`, or ``"C1-sacrum"``), a range of two levels joined by
    ``-`` (``"T4-L2"``, either order, both included), comma-separated names or ranges (``"L1,L3"``),
    one level, or a sequence of any of these.

    Raises
    ------
    SpineInpaintError
        One line naming the first token that is not a level, a range or a region.
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return (_one_level(int(spec)),)
    if isinstance(spec, str):
        tokens = [t.strip() for t in spec.split(",")]
    elif isinstance(spec, Sequence):
        tokens = list(spec)
    else:
        raise SpineInpaintError(f"levels must be names, ids, a range or a region, got {spec!r}")
    out: set[int] = set()
    for token in tokens:
        if isinstance(token, str) and token.strip().lower() in REGIONS:
            a, b = REGIONS[token.strip().lower()]
            out.update(_level_range(vertebra_id(a), vertebra_id(b)))
        elif isinstance(token, str) and "-" in token.strip():
            parts = token.split("-")
            if len(parts) != 2 or not all(x.strip() for x in parts):
                raise SpineInpaintError(f"bad level range {token!r} (expected {_LEVEL_HELP})")
            out.update(_level_range(_one_level(parts[0]), _one_level(parts[1])))
        elif isinstance(token, str) and not token.strip():
            raise SpineInpaintError(f"empty level name in {spec!r} (expected {_LEVEL_HELP})")
        else:
            out.add(_one_level(token))
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
#: Contrast phases; ``True``/``False`` (the old boolean ``contrast``) read as "portal"/"none".
CONTRAST_PHASES: tuple[str, ...] = ("none", "arterial", "portal", "myelogram")

#: Reconstruction kernels: "standard" is the Gaussian PSF alone, "sharp" adds edge enhancement.
KERNELS: tuple[str, ...] = ("standard", "sharp")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SpineInpaintError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise SpineInpaintError(f"{name} = {value} is out of range [{lo}, {hi}]")


@dataclasses.dataclass
class PhantomConfig:
    """Everything that defines a phantom; the same config always gives the same volume.

    Parameters
    ----------
    seed
        Seed of every random choice (textures, noise, small shape variations).
    shape_xy
        In-plane grid size ``(columns, rows)`` = ``(x, y)``.
    n_slices
        Number of slices; ``None`` covers the requested ``levels`` with a 10 mm margin.
    spacing_xy
        In-plane pixel size (mm); clinical range 0.5-1.0, accepted 0.25-4.
    slice_thickness
        Slice thickness = slice spacing (mm); clinical range 1-3, accepted 0.5-6.
    origin
        LPS position (mm) of voxel (0, 0, 0); ``None`` centres the grid on the requested levels
        (in y: on the body and table when the field of view holds them, else on the spinal canal).
    levels
        Vertebrae the scan must cover: ids or names from C1 to S1, ``"sacrum"`` for the sacrum below
        S1 and the pelvis around it, ranges (``"T4-L2"``, ``"C1-sacrum"``) or a region name
        (:data:`REGIONS`: neck C1-T1, chest C7-L1, abdomen T10-sacrum, thoracolumbar T9-S1, whole);
        see :func:`parse_levels`. This only places the field of view. When every level lies within
        T10 ... sacrum the phantom is the original thoracolumbar one, voxel for voxel: the column
        above T10 is then not painted (the slices of the top margin show soft tissue above T10).
        Any level above T10 switches on the whole column (T9 ... C1 with ribs 1-9, sternum,
        clavicles, scapulae, chest, neck and skull base), drawn from its own random streams.
    vertebra_scale, disc_height_scale
        Size factors of the vertebrae (0.7-1.3) and of the disc heights (0.3-1.6; thin = degenerate).
    lordosis_deg
        L1-S1 lordosis (Cobb, 0-80 deg), mostly in the lower discs.
    kyphosis_deg
        Thoracolumbar kyphosis T10-L1 (-20 to 40 deg).
    thoracic_kyphosis_deg
        Kyphosis from T10 up to T1 (0-70 deg; typical adult 20-45), shared evenly by those discs.
    cervical_lordosis_deg
        Cervical lordosis C7-C2 (-20 to 60 deg; negative is a kyphotic neck).
    scoliosis_deg
        Cobb angle of a C-shaped scoliosis (|value| <= 20 deg); positive is convex to the left.
    scoliosis_apex
        Apical vertebra of the scoliosis (id or name).
    axial_rotation_deg
        Axial rotation of the apical vertebra (|value| <= 30 deg), fading to 0 at the end
        vertebrae; positive turns the vertebral body to the patient's left.
    level_jitter
        Random per-level variation: sizes by ``level_jitter`` (fraction) and tilts and rotations by
        ``level_jitter * 20`` degrees (0-0.2).
    body_width_mm, body_depth_mm
        Lateral and antero-posterior body diameters at the waist.
    fat_mm
        Subcutaneous fat thickness (anterior/lateral; about 0.6 of it at the back).
    muscle_fat_fraction
        Fatty infiltration of the autochthon (0-0.8); the iliopsoas gets a third of it.
    cortical_hu, cortical_mm, cancellous_hu, disc_hu
        Bone and disc intensities (nominal, before partial volume, blur and noise) and the cortical
        shell thickness. The cancellous texture spans ``cancellous_hu`` +- 30 %% (at most +-70 HU).
    contrast
        Contrast phase (:data:`CONTRAST_PHASES`): "none"; "arterial" (aorta and arteries at
        ``arterial_hu``, cortical kidneys, little organ enhancement); "portal" (portal-venous
        enhancement of vessels, kidneys, liver, spleen and bowel wall, as today's ``True``);
        "myelogram" (no intravenous contrast, the dural sac at ``myelogram_hu``). ``True`` and
        ``False`` are accepted as "portal" and "none".
    arterial_hu, myelogram_hu
        Arterial blood pool HU in the arterial phase (150-700) and dural sac HU in a myelogram (150-1000).
    calcification
        Amount of calcified aortic plaque (0-1).
    noise_hu
        Standard deviation of the noise in soft tissue (HU), correlated by the point spread function.
    blur_mm
        Sigma (mm) of the in-plane Gaussian point spread function; 0 for none.
    kernel
        "standard" (the PSF alone) or "sharp" (a bone kernel: edge enhancement by an unsharp mask of
        ``sharpening`` times the image minus its 1.2 mm blur, which also raises the noise).
    sharpening
        Strength of the sharp kernel's edge enhancement (0-3).
    rib_pairs
        Transitional anatomy: 12 (normal), 11 (no rib on T12: labels rib_*_12 absent) or 13 (a
        short lumbar rib on L1, labelled ``supernumerary_rib`` 206, which TotalSegmentator does
        not label: :func:`totalsegmentator_labels` sets it to 0). Ribs 1-12 keep their ids.
    lumbarised_s1
        Transitional anatomy: S1 is a mobile, lumbar-like vertebra (transverse processes instead of
        alae, inferior articular processes) above a disc (label 200) and the sacrum below. It keeps
        the S1 id (26) and the sacrum keeps 25, as TotalSegmentator v2 labels a lumbarised S1.
    sacrum_plate
        Draw S2-S5 as one wide plate bowed forward at its sides (56-23 mm half-widths, as a real
        sacrum) instead of a row of bodies and small lateral masses. Off by default, which keeps
        every existing phantom voxel for voxel.
    sacroiliac_joint
        Give each ilium a thick posterior part that meets the sacrum (the S1 ala and S2-S3) across a
        2.5 mm joint space, as real sacro-iliac joints do, instead of ending ~10 mm short of it.
        Off by default, which keeps every existing phantom voxel for voxel.
    sacrum_upright
        Curve S2-S5 forward as a real sacrum does (the sacral kyphosis: below S1 the sacrum runs
        down, its tip turning forward) and end it in a coccyx: a sacrum ~100-115 mm tall instead of
        one ~55-75 mm tall bending back toward the horizontal. Off by default, which keeps every
        existing phantom voxel for voxel.
    """

    seed: int = 0
    shape_xy: tuple[int, int] = (512, 512)
    n_slices: int | None = None
    spacing_xy: float = 0.8
    slice_thickness: float = 2.5
    origin: tuple[float, float, float] | None = None
    levels: tuple[int | str, ...] | str = THORACOLUMBAR
    vertebra_scale: float = 1.0
    disc_height_scale: float = 1.0
    lordosis_deg: float = 45.0
    kyphosis_deg: float = 5.0
    scoliosis_deg: float = 0.0
    scoliosis_apex: int | str = 31
    axial_rotation_deg: float = 0.0
    level_jitter: float = 0.0
    body_width_mm: float = 330.0
    body_depth_mm: float = 240.0
    fat_mm: float = 20.0
    muscle_fat_fraction: float = 0.25
    cortical_hu: float = 800.0
    cortical_mm: float = 0.7
    cancellous_hu: float = 160.0
    disc_hu: float = 76.0
    contrast: bool | str = True
    calcification: float = 0.3
    noise_hu: float = 15.0
    blur_mm: float = 0.5
    sacrum_plate: bool = False
    sacroiliac_joint: bool = False
    sacrum_upright: bool = False
    thoracic_kyphosis_deg: float = 35.0
    cervical_lordosis_deg: float = 20.0
    arterial_hu: float = 380.0
    myelogram_hu: float = 450.0
    kernel: str = "standard"
    sharpening: float = 1.0
    rib_pairs: int = 12
    lumbarised_s1: bool = False

    # ---------------------------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int, extended: bool = False, **overrides) -> PhantomConfig:
        """A varied, plausible configuration drawn from ``seed``; ``overrides`` fix any field.

        Draws the grid (0.5-1.0 mm pixels, 1-3 mm slices), the anatomy (sizes, discs, lordosis
        25-65 deg, kyphosis, scoliosis up to 15 deg in a third of the cases with a matching
        rotation, body habitus, muscle fat) and the scanner (noise 8-25 HU, blur, contrast).
        Without ``extended`` the draws are those of the thoracolumbar phantom (the same config
        for a seed as before the whole column existed). ``extended`` also draws, from a stream of
        its own, the whole-column variety: a field of view cut at any levels C1 ... sacrum (or a
        region), thoracic kyphosis and cervical lordosis, bone density from osteopenic to dense
        (cancellous 80-300 HU), the contrast phase (none, arterial, portal, myelogram), noise 5-35
        HU, the kernel, slices 0.5-5 mm (at least 1.25 mm beyond 8 levels) and, in a few percent of
        draws each, transitional anatomy
        (11 or 13 rib pairs, a lumbarised S1).
        """
        rng = np.random.default_rng([int(seed), 7919])
        scoliotic = rng.random() < 1 / 3
        cobb = float(rng.uniform(5, 15) * rng.choice([-1, 1])) if scoliotic else float(rng.normal(0, 1.5))
        values = dict(
            seed=int(seed),
            spacing_xy=round(float(rng.uniform(0.5, 1.0)), 3),
            slice_thickness=float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0])),
            vertebra_scale=round(float(rng.uniform(0.88, 1.12)), 3),
            disc_height_scale=round(float(rng.uniform(0.65, 1.25)), 3),
            lordosis_deg=round(float(rng.uniform(25, 65)), 1),
            kyphosis_deg=round(float(rng.uniform(-5, 15)), 1),
            scoliosis_deg=round(cobb, 1),
            scoliosis_apex=int(rng.integers(29, 33)),
            axial_rotation_deg=round(cobb * float(rng.uniform(0.3, 0.9)) + float(rng.normal(0, 2)), 1),
            level_jitter=round(float(rng.uniform(0.0, 0.08)), 3),
            body_width_mm=(width := round(float(rng.uniform(280, 380)), 1)),
            # A body deeper than wide is not drawn (the check below refuses it); same draws otherwise.
            body_depth_mm=min(round(float(rng.uniform(200, 290)), 1), width),
            fat_mm=round(float(rng.uniform(6, 40)), 1),
            muscle_fat_fraction=round(float(rng.uniform(0.05, 0.4)), 3),
            cortical_hu=round(float(rng.uniform(700, 1200))),
            cortical_mm=round(float(rng.uniform(0.5, 1.1)), 2),
            cancellous_hu=round(float(rng.uniform(140, 280))),
            disc_hu=round(float(rng.uniform(70, 95))),
            contrast=bool(rng.random() < 0.7),
            calcification=round(float(rng.uniform(0, 1) ** 2), 3),
            noise_hu=round(float(rng.uniform(8, 25)), 1),
            blur_mm=round(float(rng.uniform(0.3, 0.8)), 2),
        )
        if extended:
            values.update(_extended_draws(int(seed)))
        values.update(overrides)
        return cls(**values)

    # ---------------------------------------------------------------------------------------
    def level_ids(self) -> tuple[int, ...]:
        """The requested levels as sorted ids (validated; see :func:`parse_levels`)."""
        if not isinstance(self.levels, str) and isinstance(self.levels, Sequence) and len(self.levels) == 0:
            raise SpineInpaintError("levels is empty: name at least one vertebra between C1 and the sacrum")
        return parse_levels(self.levels)

    @property
    def whole_column(self) -> bool:
        """True when a level above T10 is requested: the column above T10 and the chest are painted."""
        return max(self.level_ids()) > max(SUPPORTED_LEVELS)

    @property
    def phase(self) -> str:
        """The contrast phase, with the old booleans read as "portal" (True) and "none" (False)."""
        if isinstance(self.contrast, (bool, np.bool_)):
            return "portal" if self.contrast else "none"
        return str(self.contrast).lower()

    def validate(self) -> None:
        """Raise :class:`SpineInpaintError` naming the first invalid field."""
        for flag in ("sacrum_plate", "sacroiliac_joint", "sacrum_upright", "lumbarised_s1"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise SpineInpaintError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SpineInpaintError(f"seed must be a non-negative integer, got {self.seed!r}")
        if len(tuple(self.shape_xy)) != 2:
            raise SpineInpaintError(f"shape_xy needs two sizes (x, y), got {self.shape_xy!r}")
        for n in self.shape_xy:
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise SpineInpaintError(f"shape_xy must hold positive integers, got {self.shape_xy!r}")
            if n < 16 or n > 2048:
                raise SpineInpaintError(f"shape_xy sizes must be in [16, 2048], got {self.shape_xy!r}")
        if self.n_slices is not None:
            n = self.n_slices
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise SpineInpaintError(f"n_slices must be a positive integer or None, got {self.n_slices!r}")
            if self.n_slices > 2000:
                raise SpineInpaintError(f"n_slices = {self.n_slices} is too many (at most 2000)")
        _check_range("spacing_xy", self.spacing_xy, 0.25, 4.0)
        _check_range("slice_thickness", self.slice_thickness, 0.5, 6.0)
        if self.origin is not None:
            if len(tuple(self.origin)) != 3:
                raise SpineInpaintError(f"origin needs three values (x, y, z), got {self.origin!r}")
            for o in self.origin:
                _check_range("origin", o, -1e5, 1e5)
        self.level_ids()
        try:
            apex = vertebra_id(self.scoliosis_apex)
        except ValueError:
            raise SpineInpaintError(f"unknown scoliosis_apex {self.scoliosis_apex!r}") from None
        if apex not in SUPPORTED_LEVELS[1:-1]:
            raise SpineInpaintError("scoliosis_apex must lie between L5 and T11 (ids 27-33)")
        _check_range("vertebra_scale", self.vertebra_scale, 0.7, 1.3)
        _check_range("disc_height_scale", self.disc_height_scale, 0.3, 1.6)
        _check_range("lordosis_deg", self.lordosis_deg, 0.0, 80.0)
        _check_range("kyphosis_deg", self.kyphosis_deg, -20.0, 40.0)
        _check_range("scoliosis_deg", self.scoliosis_deg, -90.0, 90.0)
        if abs(self.scoliosis_deg) > 20.0:
            raise SpineInpaintError(
                f"scoliosis_deg = {self.scoliosis_deg} is beyond the modelled +-20 degrees (Cobb angle)"
            )
        _check_range("axial_rotation_deg", self.axial_rotation_deg, -30.0, 30.0)
        _check_range("level_jitter", self.level_jitter, 0.0, 0.2)
        _check_range("body_width_mm", self.body_width_mm, 220.0, 480.0)
        _check_range("body_depth_mm", self.body_depth_mm, 170.0, 360.0)
        if self.body_depth_mm > self.body_width_mm:
            raise SpineInpaintError("body_depth_mm must not exceed body_width_mm")
        _check_range("fat_mm", self.fat_mm, 2.0, 80.0)
        _check_range("muscle_fat_fraction", self.muscle_fat_fraction, 0.0, 0.8)
        _check_range("cortical_hu", self.cortical_hu, 500.0, 2000.0)
        _check_range("cortical_mm", self.cortical_mm, 0.4, 3.0)
        _check_range("cancellous_hu", self.cancellous_hu, 50.0, 500.0)
        _check_range("disc_hu", self.disc_hu, 30.0, 150.0)
        _check_range("calcification", self.calcification, 0.0, 1.0)
        _check_range("noise_hu", self.noise_hu, 0.0, 100.0)
        _check_range("blur_mm", self.blur_mm, 0.0, 3.0)
        _check_range("thoracic_kyphosis_deg", self.thoracic_kyphosis_deg, 0.0, 70.0)
        _check_range("cervical_lordosis_deg", self.cervical_lordosis_deg, -20.0, 60.0)
        _check_range("arterial_hu", self.arterial_hu, 150.0, 700.0)
        _check_range("myelogram_hu", self.myelogram_hu, 150.0, 1000.0)
        _check_range("sharpening", self.sharpening, 0.0, 3.0)
        if not isinstance(self.contrast, (bool, np.bool_, str)) or self.phase not in CONTRAST_PHASES:
            raise SpineInpaintError(f"contrast must be one of {', '.join(CONTRAST_PHASES)} (or True/False), "
                                    f"got {self.contrast!r}")
        if self.kernel not in KERNELS:
            raise SpineInpaintError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if isinstance(self.rib_pairs, bool) or self.rib_pairs not in (11, 12, 13):
            raise SpineInpaintError(f"rib_pairs must be 11, 12 or 13, got {self.rib_pairs!r}")

    def to_dict(self) -> dict:
        """JSON-ready copy of the fields."""
        d = dataclasses.asdict(self)
        d["shape_xy"] = list(self.shape_xy)
        d["levels"] = self.levels if isinstance(self.levels, str) else list(self.levels)
        d["origin"] = None if self.origin is None else list(self.origin)
        return d


@dataclasses.dataclass
class SpineLevel:
    """Pose and size of one modelled vertebra (including levels outside the field of view).

    Attributes
    ----------
    label, name
        TotalSegmentator v2 id and name (25 is the sacrum, S2-S5 fused).
    center
        LPS position (mm) of the vertebral body centre.
    frame
        3x3 matrix whose columns are the vertebra's left (u), posterior (v) and superior (w) axes
        in LPS: a point ``center + frame @ (u, v, w)`` is ``(u, v, w)`` mm from the body centre.
    width, depth, height
        Vertebral body size (mm): lateral, antero-posterior, along the spine.
    disc_above
        Height (mm) of the disc above the level, at its centre (0 for the sacrum).
    """

    label: int
    name: str
    center: np.ndarray
    frame: np.ndarray
    width: float
    depth: float
    height: float
    disc_above: float

    @property
    def tilt_deg(self) -> tuple[float, float]:
        """Sagittal and coronal tilt (deg) of the superior axis: toward posterior, toward left."""
        w = self.frame[:, 2]
        return (math.degrees(math.atan2(w[1], w[2])), math.degrees(math.atan2(w[0], w[2])))


@dataclasses.dataclass
class Phantom:
    """A phantom CT and its ground truth.

    Attributes
    ----------
    ct
        HU, int16, identity direction (LPS).
    labels
        uint8 on the same grid (ids: :data:`TISSUE_LABELS` and the vertebra ids 25-50).
    centerline
        Every modelled vertebra, caudal to cranial (sacrum, S1 ... T10, and on up to C1 when the
        whole column is painted), with its pose.
    config
        The configuration it was made from.
    """

    ct: Volume
    labels: Volume
    centerline: tuple[SpineLevel, ...]
    config: PhantomConfig

    @property
    def seed(self) -> int:
        return int(self.config.seed)

    def level(self, label: int | str) -> SpineLevel:
        """The pose of one vertebra (id or name)."""
        target = vertebra_id(label)
        for lev in self.centerline:
            if lev.label == target:
                return lev
        raise SpineInpaintError(f"level {label!r} is not modelled by the phantom")

    def levels_in_view(self) -> tuple[int, ...]:
        """Vertebra ids with at least one labelled voxel in the volume."""
        present = np.unique(self.labels.array)
        return tuple(int(v) for v in present if 25 <= v <= 50)


def _extended_draws(seed: int) -> dict:
    """The whole-column variety of :meth:`PhantomConfig.random` (``extended``), from its own stream."""
    rng = np.random.default_rng([seed, 7920])
    ids = FIELD_LEVELS
    if rng.random() < 0.35:
        levels: str | tuple[str, ...] = str(rng.choice(list(REGIONS)))
    else:
        i, j = sorted(int(v) for v in rng.integers(0, len(ids), 2))
        levels = (VERTEBRA_NAMES[ids[i]], VERTEBRA_NAMES[ids[j]])
    transition = rng.random()
    # sub-millimetre slices only for short fields of view: a whole column at 0.5 mm is ~1400 slices
    thin = len(parse_levels(levels)) <= 8
    thickness = [0.5, 0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0] if thin else [1.25, 1.5, 2.0, 2.5, 3.0, 5.0]
    return dict(
        levels=levels,
        thoracic_kyphosis_deg=round(float(rng.uniform(15, 55)), 1),
        cervical_lordosis_deg=round(float(rng.uniform(-5, 40)), 1),
        cancellous_hu=round(float(rng.uniform(80, 300))),
        contrast=str(rng.choice(CONTRAST_PHASES, p=[0.2, 0.25, 0.45, 0.1])),
        arterial_hu=round(float(rng.uniform(300, 450))),
        myelogram_hu=round(float(rng.uniform(300, 600))),
        noise_hu=round(float(rng.uniform(5, 35)), 1),
        kernel="sharp" if rng.random() < 0.3 else "standard",
        sharpening=round(float(rng.uniform(0.5, 1.5)), 2),
        slice_thickness=float(rng.choice(thickness)),
        rib_pairs=11 if transition < 0.03 else 13 if transition < 0.06 else 12,
        lumbarised_s1=bool(rng.random() < 0.04),
    )


def totalsegmentator_labels(labels: Volume) -> Volume:
    """The label map as TotalSegmentator would give it: phantom-only ids (>= 200) set to 0."""
    arr = labels.array.copy()
    arr[arr >= 200] = 0
    return labels.with_array(arr)
