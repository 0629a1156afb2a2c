"""Procedural CT phantoms of the thoracolumbar spine, in HU, with TotalSegmentator-style labels.

A phantom is a synthetic abdominal CT from T10 down to the sacrum with a known ground truth: every
voxel's tissue is known. It is built from analytic shapes in millimetres (patient LPS coordinates)
and then rasterised on the requested grid, so any spacing gives the same anatomy:

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
26 S1 ... 34 T10; 1 spleen, 2/3 kidneys, 5 liver, 11/14 lung lower lobes, 18 small bowel,
20 colon, 52 aorta, 63 inferior vena cava, 65-68 iliac vessels, 77/78 hips, 79 spinal cord (the
whole dural sac, as TotalSegmentator labels it), 86/87 autochthon, 88/89 iliopsoas, 101-103 and
113-115 ribs 10-12, 117 costal cartilages) and ids from 200 up for tissues TotalSegmentator does
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
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.io import Volume, resample_to_spacing
from SpineInpaintLib.labels import THORACOLUMBAR, VERTEBRA_NAMES, vertebra_id

__all__ = [
    "TISSUE_LABELS",
    "PHANTOM_ONLY_LABELS",
    "SUPPORTED_LEVELS",
    "FIELD_LEVELS",
    "PhantomConfig",
    "SpineLevel",
    "Phantom",
    "make_phantom",
    "totalsegmentator_labels",
    "body_outline",
    "disc_mask",
    "tissue_masks",
    "tissue_hu_statistics",
    "compare_with_real",
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
    "lung_lower_lobe_left": 11,
    "lung_lower_lobe_right": 14,
    "small_bowel": 18,
    "colon": 20,
    "sacrum": 25,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "iliac_artery_left": 65,
    "iliac_artery_right": 66,
    "iliac_vena_left": 67,
    "iliac_vena_right": 68,
    "femur_left": 75,
    "femur_right": 76,
    "hip_left": 77,
    "hip_right": 78,
    "spinal_cord": 79,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
    "rib_left_10": 101,
    "rib_left_11": 102,
    "rib_left_12": 103,
    "rib_right_10": 113,
    "rib_right_11": 114,
    "rib_right_12": 115,
    "costal_cartilages": 117,
    # phantom-only ids (TotalSegmentator leaves these tissues unlabelled)
    "intervertebral_disc": 200,
    "subcutaneous_fat": 201,
    "deep_fat": 202,  # retroperitoneal, visceral, intermuscular and epidural fat
    "skin": 203,
    "other_muscle": 204,
    "table": 205,
}

#: Ids that only the phantom uses; TotalSegmentator would leave these voxels at 0.
PHANTOM_ONLY_LABELS: tuple[int, ...] = tuple(v for v in TISSUE_LABELS.values() if v >= 200)

#: Vertebra ids the phantom models, caudal to cranial (S1 ... T10).
SUPPORTED_LEVELS: tuple[int, ...] = THORACOLUMBAR

#: Levels a field of view may be asked to cover: the modelled vertebrae and the sacrum below S1
#: (S2-S5, label 25), so that a scan can reach down into the pelvis as abdominal CTs do.
FIELD_LEVELS: tuple[int, ...] = (25,) + SUPPORTED_LEVELS

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
}
#: Share of the L1-S1 lordosis taken by each disc, caudal to cranial (L5/S1 ... L1/L2).
_LORDOSIS_SHARE = (0.36, 0.26, 0.17, 0.12, 0.09)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
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
        Vertebrae the scan must cover (ids or names, within T10 ... S1, or ``"sacrum"`` for the
        sacrum below S1 and the pelvis around it). The whole column from the sacrum to T10 always
        exists; this only places the field of view.
    vertebra_scale, disc_height_scale
        Size factors of the vertebrae (0.7-1.3) and of the disc heights (0.3-1.6; thin = degenerate).
    lordosis_deg
        L1-S1 lordosis (Cobb, 0-80 deg), mostly in the lower discs.
    kyphosis_deg
        Thoracolumbar kyphosis T10-L1 (-20 to 40 deg).
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
        Portal-venous contrast enhancement of vessels, kidneys, liver, spleen and bowel wall.
    calcification
        Amount of calcified aortic plaque (0-1).
    noise_hu
        Standard deviation of the noise in soft tissue (HU), correlated by the point spread function.
    blur_mm
        Sigma (mm) of the in-plane Gaussian point spread function; 0 for none.
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
    levels: tuple[int | str, ...] = THORACOLUMBAR
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
    contrast: bool = True
    calcification: float = 0.3
    noise_hu: float = 15.0
    blur_mm: float = 0.5
    sacrum_plate: bool = False
    sacroiliac_joint: bool = False
    sacrum_upright: bool = False

    # ---------------------------------------------------------------------------------------
    @classmethod
    def random(cls, seed: int, **overrides) -> "PhantomConfig":
        """A varied, plausible configuration drawn from ``seed``; ``overrides`` fix any field.

        Draws the grid (0.5-1.0 mm pixels, 1-3 mm slices), the anatomy (sizes, discs, lordosis
        25-65 deg, kyphosis, scoliosis up to 15 deg in a third of the cases with a matching
        rotation, body habitus, muscle fat) and the scanner (noise 8-25 HU, blur, contrast).
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
        values.update(overrides)
        return cls(**values)

    # ---------------------------------------------------------------------------------------
    def level_ids(self) -> tuple[int, ...]:
        """The requested levels as sorted ids (validated)."""
        if isinstance(self.levels, (str, int)):
            raise SpineInpaintError("levels must be a sequence of vertebra ids or names, e.g. ('L1', 'L2')")
        if len(self.levels) == 0:
            raise SpineInpaintError("levels is empty: name at least one vertebra between T10 and the sacrum")
        out = set()
        for level in self.levels:
            try:
                label = vertebra_id(level)
            except ValueError:
                raise SpineInpaintError(
                    f"unknown level {level!r} (expected e.g. L3, T12, S1, sacrum or an id 25-34)"
                ) from None
            if label not in FIELD_LEVELS:
                raise SpineInpaintError(
                    f"level {VERTEBRA_NAMES[label]} (id {label}) is not modelled: "
                    "the phantom covers T10 to the sacrum (ids 25-34)"
                )
            out.add(label)
        return tuple(sorted(out))

    def validate(self) -> None:
        """Raise :class:`SpineInpaintError` naming the first invalid field."""
        for flag in ("sacrum_plate", "sacroiliac_joint", "sacrum_upright"):
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

    def to_dict(self) -> dict:
        """JSON-ready copy of the fields."""
        d = dataclasses.asdict(self)
        d["shape_xy"] = list(self.shape_xy)
        d["levels"] = list(self.levels)
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
        uint8 on the same grid (ids: :data:`TISSUE_LABELS` and the vertebra ids 25-34).
    centerline
        Every modelled vertebra, caudal to cranial (sacrum, S1 ... T10), with its pose.
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
        return tuple(int(v) for v in present if 25 <= v <= 34)


def totalsegmentator_labels(labels: Volume) -> Volume:
    """The label map as TotalSegmentator would give it: phantom-only ids (>= 200) set to 0."""
    arr = labels.array.copy()
    arr[arr >= 200] = 0
    return labels.with_array(arr)


# --------------------------------------------------------------------------------------------
# Grid and rasterisation
# --------------------------------------------------------------------------------------------
_F = np.float32


@dataclasses.dataclass
class _Grid:
    """An identity-direction grid: voxel (k, j, i) sits at origin + (i dx, j dy, k dz)."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z)
    origin: tuple[float, float, float]  # (x, y, z)

    def axis(self, dim: int, i0: int, i1: int) -> np.ndarray:
        """Physical coordinates of voxel centres i0..i1-1 along x (0), y (1) or z (2)."""
        return (self.origin[dim] + self.spacing[dim] * np.arange(i0, i1)).astype(_F)

    def zsub(self, k0: int, k1: int, k: int) -> np.ndarray:
        """z of ``k`` equally spaced sub-slices in each slice k0..k1-1 (centred in the slice)."""
        idx = np.arange(k0 * k, k1 * k, dtype=np.float64)
        return (self.origin[2] + self.spacing[2] * ((idx + 0.5) / k - 0.5)).astype(_F)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
        """Index box (z0, z1, y0, y1, x0, x1) of the voxels whose centres may lie in [lo, hi] (LPS)."""
        nz, ny, nx = self.shape
        out = []
        for dim, n in ((2, nz), (1, ny), (0, nx)):
            a = math.floor((lo[dim] - self.origin[dim]) / self.spacing[dim])
            b = math.ceil((hi[dim] - self.origin[dim]) / self.spacing[dim]) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            out += [a, b]
        return tuple(out)  # type: ignore[return-value]


@dataclasses.dataclass
class _Prim:
    """A shape in a local frame: ``sdf(u, v, w)`` < 0 inside, with a local bounding box."""

    center: np.ndarray
    frame: np.ndarray  # columns u, v, w in LPS
    lo: np.ndarray
    hi: np.ndarray
    sdf: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def world_box(self) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[x, y, z] for x in (self.lo[0], self.hi[0]) for y in (self.lo[1], self.hi[1])
                            for z in (self.lo[2], self.hi[2])])
        pts = corners @ self.frame.T + self.center
        return pts.min(0), pts.max(0)

    def local(self, z: np.ndarray, y: np.ndarray, x: np.ndarray):
        """Local (u, v, w) of the grid points z[:, None, None], y[None, :, None], x[None, None, :]."""
        dx = (x - _F(self.center[0]))[None, None, :]
        dy = (y - _F(self.center[1]))[None, :, None]
        dz = (z - _F(self.center[2]))[:, None, None]
        f = self.frame.astype(_F)
        return tuple(dx * f[0, c] + dy * f[1, c] + dz * f[2, c] for c in range(3))


def _ramp(d: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy of a voxel of width ``h`` at signed distance ``d`` (box filter)."""
    out = _F(0.5) - d * _F(1.0 / h)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _rasterise(grid: _Grid, prims: Sequence[_Prim], cuts: Sequence[_Prim], offsets: Sequence[float],
               k: int, h: float):
    """Occupancy of the union of ``prims`` minus ``cuts`` on ``grid``, eroded by each offset (mm).

    The signed distance is evaluated on ``k`` sub-slices per slice and the occupancies averaged,
    which models the slice sensitivity profile; ``h`` is the in-plane ramp width. Each primitive is
    evaluated only inside its own box. Returns ``(box, [occupancy per offset])`` or ``None``.
    """
    boxes = []
    for p in prims:
        b = grid.box(*p.world_box())
        if b is not None:
            boxes.append((p, b))
    if not boxes:
        return None
    z0 = min(b[0] for _, b in boxes); z1 = max(b[1] for _, b in boxes)  # noqa: E702
    y0 = min(b[2] for _, b in boxes); y1 = max(b[3] for _, b in boxes)  # noqa: E702
    x0 = min(b[4] for _, b in boxes); x1 = max(b[5] for _, b in boxes)  # noqa: E702
    zc, yc, xc = grid.zsub(z0, z1, k), grid.axis(1, y0, y1), grid.axis(0, x0, x1)
    dist = np.full(((z1 - z0) * k, y1 - y0, x1 - x0), 1e4, dtype=_F)

    def apply(p: _Prim, b, combine) -> None:
        zs = slice((b[0] - z0) * k, (b[1] - z0) * k)
        ys, xs = slice(b[2] - y0, b[3] - y0), slice(b[4] - x0, b[5] - x0)
        u, v, w = p.local(zc[zs], yc[ys], xc[xs])
        view = dist[zs, ys, xs]
        combine(view, p.sdf(u, v, w), out=view)

    for p, b in boxes:
        apply(p, b, np.minimum)
    for c in cuts:
        b = grid.box(*c.world_box())
        if b is None:
            continue
        b = (max(b[0], z0), min(b[1], z1), max(b[2], y0), min(b[3], y1), max(b[4], x0), min(b[5], x1))
        if b[0] >= b[1] or b[2] >= b[3] or b[4] >= b[5]:
            continue
        apply(_Prim(c.center, c.frame, c.lo, c.hi, lambda u, v, w, f=c.sdf: -f(u, v, w)), b, np.maximum)
    shape = (z1 - z0, k, y1 - y0, x1 - x0)
    fracs = [_ramp(dist + _F(o), h).reshape(shape).mean(axis=1) for o in offsets]
    return (z0, z1, y0, y1, x0, x1), fracs


def _paint(ct: np.ndarray, lab: np.ndarray, box, frac: np.ndarray, hu, label: int | None,
           label_mask: np.ndarray | None = None) -> None:
    """Composite ``hu`` with occupancy ``frac`` over the image in ``box``; label where frac >= 0.5."""
    z0, z1, y0, y1, x0, x1 = box
    sub = ct[z0:z1, y0:y1, x0:x1]
    sub += frac * (hu - sub)
    if label is not None:
        mask = frac >= 0.5 if label_mask is None else label_mask
        lab[z0:z1, y0:y1, x0:x1][mask] = label


# --------------------------------------------------------------------------------------------
# Signed-distance-like primitives (float32, first order accurate near the surface)
# --------------------------------------------------------------------------------------------
def _sd_ellipse(x: np.ndarray, y: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance to the ellipse x^2/a^2 + y^2/b^2 = 1 (a, b scalars or arrays)."""
    # d = (rho - 1) / |grad rho|; the tiny shift keeps the centre (0/0) finite at about -a.
    xa, yb = x / a + _F(1e-4), y / b
    rho2 = xa * xa + yb * yb
    grad2 = (xa / a) ** 2 + (yb / b) ** 2
    return (np.sqrt(rho2) - _F(1.0)) * np.sqrt(rho2 / grad2)


def _sd_segment2(x, y, ax, ay, bx, by) -> np.ndarray:
    """Distance in a plane to the segment (ax, ay)-(bx, by)."""
    ex, ey = bx - ax, by - ay
    px, py = x - ax, y - ay
    t = np.clip((px * ex + py * ey) / max(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
    qx, qy = px - t * ex, py - t * ey
    return np.sqrt(qx * qx + qy * qy)


def _capsule_prim(center, frame, a, b, r, scale=(1.0, 1.0, 1.0)) -> _Prim:
    """A capsule of radius r from a to b (local coordinates), optionally squashed per axis."""
    a, b, s = np.asarray(a, float), np.asarray(b, float), np.asarray(scale, float)
    e = b - a
    ee = max(float(e @ e), 1e-9)

    def sdf(u, v, w):
        pu, pv, pw = u - _F(a[0]), v - _F(a[1]), w - _F(a[2])
        t = np.clip((pu * _F(e[0]) + pv * _F(e[1]) + pw * _F(e[2])) * _F(1.0 / ee), 0.0, 1.0)
        qu = (pu - t * _F(e[0])) * _F(s[0])
        qv = (pv - t * _F(e[1])) * _F(s[1])
        qw = (pw - t * _F(e[2])) * _F(s[2])
        return np.sqrt(qu * qu + qv * qv + qw * qw) - _F(r)

    pad = r / s.min() + 0.5
    return _Prim(np.asarray(center, float), np.asarray(frame, float), np.minimum(a, b) - pad,
                 np.maximum(a, b) + pad, sdf)


def _ellipsoid_prim(center, frame, semi) -> _Prim:
    a, b, c = (float(s) for s in semi)

    def sdf(u, v, w):
        ua, vb, wc = u / _F(a) + _F(1e-4), v / _F(b), w / _F(c)
        rho2 = ua * ua + vb * vb + wc * wc
        grad2 = (ua / _F(a)) ** 2 + (vb / _F(b)) ** 2 + (wc / _F(c)) ** 2
        return (np.sqrt(rho2) - _F(1.0)) * np.sqrt(rho2 / grad2)

    semi = np.array([a, b, c]) + 1.0
    return _Prim(np.asarray(center, float), np.asarray(frame, float), -semi, semi, sdf)


# --------------------------------------------------------------------------------------------
# The spine: poses of the vertebrae
# --------------------------------------------------------------------------------------------
def _frame(theta: float, phi: float, psi: float) -> np.ndarray:
    """Frame (columns u left, v posterior, w superior) of a vertebra tilted by theta (toward
    posterior) and phi (toward left) and rotated axially by psi (body toward the left), degrees."""
    t = np.array([math.tan(math.radians(phi)), math.tan(math.radians(theta)), 1.0])
    t /= np.linalg.norm(t)
    p = np.array([0.0, 1.0, 0.0])
    v0 = p - (p @ t) * t
    v0 /= np.linalg.norm(v0)
    u0 = np.cross(v0, t)
    c, s = math.cos(math.radians(psi)), math.sin(math.radians(psi))
    u = c * u0 + s * v0
    v = -s * u0 + c * v0
    return np.stack([u, v, t], axis=1)


@dataclasses.dataclass
class _Vert:
    label: int
    name: str
    dims: dict
    center: np.ndarray
    frame: np.ndarray
    cortical_hu: float
    cancellous_hu: float


def _build_spine(cfg: PhantomConfig, rng: np.random.Generator) -> tuple[list[_Vert], list[_Vert]]:
    """Poses of S1 ... T10 and of the sacral segments S2 ... S5 (S1 body centre at the origin)."""
    names = [VERTEBRA_NAMES[i] for i in SUPPORTED_LEVELS]
    n = len(names)
    jit = cfg.level_jitter
    dims = []
    for name in names:
        d = dict(zip(_DIMS_KEYS, (float(x) for x in _DIMS[name])))
        f = cfg.vertebra_scale * (1.0 + jit * float(rng.normal()))
        for key in ("width", "depth", "height", "canal_w", "canal_d", "ped_w", "ped_h", "tp_span", "sp_len",
                    "sp_half"):
            d[key] *= f
        d["disc_above"] *= cfg.disc_height_scale * (1.0 + jit * float(rng.normal()))
        dims.append(d)
    # sagittal tilt: the lordosis is shared by the lumbar discs, the kyphosis by T10-L1
    theta = np.zeros(n)
    theta[0] = -(0.6 * cfg.lordosis_deg + 8.0)
    for j in range(1, n):
        step = cfg.lordosis_deg * _LORDOSIS_SHARE[j - 1] if j <= 5 else -cfg.kyphosis_deg / 3.0
        theta[j] = theta[j - 1] + step
    # coronal tilt: a C-curve with end vertebrae n_s levels from the apex, tapering outside
    apex = SUPPORTED_LEVELS.index(vertebra_id(cfg.scoliosis_apex))
    n_s = max(1, min(3, apex, n - 1 - apex))
    half = cfg.scoliosis_deg / 2.0
    phi = np.zeros(n)
    psi = np.zeros(n)
    for j in range(n):
        if abs(j - apex) <= n_s:
            phi[j] = half * math.cos(math.pi * (j - apex + n_s) / (2 * n_s))
            psi[j] = cfg.axial_rotation_deg * math.cos(math.pi * (j - apex) / (2 * n_s))
        elif j < apex:
            phi[j] = half * max(0.0, 1.0 - (apex - n_s - j) / 3.0)
        else:
            phi[j] = -half * max(0.0, 1.0 - (j - apex - n_s) / 3.0)
    theta += rng.normal(0, 20 * jit, n)
    phi += rng.normal(0, 10 * jit, n)
    psi += rng.normal(0, 10 * jit, n)

    verts: list[_Vert] = []
    center = np.zeros(3)
    for j, name in enumerate(names):
        if j > 0:
            prev = dims[j - 1]
            step = prev["height"] / 2 + prev["disc_above"] + dims[j]["height"] / 2
            mid = _frame((theta[j - 1] + theta[j]) / 2, (phi[j - 1] + phi[j]) / 2, 0.0)[:, 2]
            center = center + step * mid
        verts.append(_Vert(SUPPORTED_LEVELS[j], name, dims[j], center.copy(),
                           _frame(theta[j], phi[j], psi[j]),
                           cfg.cortical_hu * float(rng.uniform(0.94, 1.06)),
                           cfg.cancellous_hu * float(rng.uniform(0.94, 1.06))))
    # the sacrum below S1: S2 ... S5, fused; with sacrum_upright curving forward (the sacral
    # kyphosis) and ending in a coccyx (Co1, Co2-4 fused), else bending back toward the horizontal
    sacral = []
    s1 = verts[0]
    center, prev_h, prev_theta = s1.center.copy(), s1.dims["height"], theta[0]
    segments = [(44, 27, 23, 10), (36, 22, 19, 12), (28, 17, 15, 13), (20, 13, 11, 13)]
    if cfg.sacrum_upright:  # taller segments and a stronger curve (a real sacrum: ~110 mm, 50-60 deg)
        segments = [(44, 27, 25, 10), (36, 22, 22, 14), (28, 17, 18, 16), (20, 13, 14, 16),
                    (14, 10, 12, 14), (9, 7, 16, 12)]
    for i, (w, dep, hgt, dtheta) in enumerate(segments):
        sc = cfg.vertebra_scale
        th = prev_theta + dtheta if cfg.sacrum_upright else prev_theta - dtheta
        step = prev_h / 2 + hgt * sc / 2 - 0.5
        mid = _frame((prev_theta + th) / 2, phi[0], 0.0)[:, 2]
        center = center - step * mid
        d = dict(s1.dims, width=w * sc, depth=dep * sc, height=hgt * sc, disc_above=0.0, scale=sc,
                 canal_w=(22 - 3 * i) * sc, canal_d=(9 - 1.5 * i) * sc)
        name = f"S{i + 2}" if i < 4 else f"Co{i - 3}"
        sacral.append(_Vert(25, name, d, center.copy(), _frame(th, phi[0], 0.0), s1.cortical_hu,
                            s1.cancellous_hu * 0.85))
        prev_h, prev_theta = hgt * sc, th
    return verts, sacral


# --------------------------------------------------------------------------------------------
# Vertebra shapes (local frame: u left, v posterior, w superior; body centre at 0)
# --------------------------------------------------------------------------------------------
_ENDPLATE_CUP = 1.2  # mm: depth of the endplates' central concavity
_ENDPLATE_THIN = 1.5  # the endplate cortex is 1/1.5 of the wall's thickness


def _body_top(u, v, a: float, b: float, hc: float):
    """Height of the (concave) superior endplate above the body centre at (u, v)."""
    r2 = np.minimum((u / _F(a)) ** 2 + (v / _F(b)) ** 2, 1.0)
    return _F(hc) - _F(_ENDPLATE_CUP) * (_F(1.0) - r2)


def _body_sdf(a: float, b: float, hc: float, post: float = 0.80):
    """Vertebral body: an elliptic cylinder with a waist, a flat slightly concave posterior wall
    (at ``post * b``) and concave endplates."""

    def sdf(u, v, w):
        t = np.minimum((w * _F(1.0 / hc)) ** 2, 1.0)
        waist = _F(1.0) - _F(0.06) * (_F(1.0) - t)
        d = _sd_ellipse(u, v, a * waist, b * (_F(1.0) - _F(0.025) * (_F(1.0) - t)))
        np.maximum(d, v - _F(post * b) - _F(0.12 * b) * (u / _F(a)) ** 2, out=d)
        # endplates: the distance is stretched so that their cortex is thinner than the walls'
        np.maximum(d, (np.abs(w) - _body_top(u, v, a, b, hc)) * _F(_ENDPLATE_THIN), out=d)
        return d

    return sdf


def _slab_capsule2(axis_pair: str, p0, p1, r: float, half: float, mid: float = 0.0):
    """A capsule in one coordinate plane ('uv' or 'vw') extruded +-half along the third axis."""

    def sdf(u, v, w):
        if axis_pair == "uv":
            d = _sd_segment2(u, v, p0[0], p0[1], p1[0], p1[1]) - _F(r)
            return np.maximum(d, np.abs(w - _F(mid)) - _F(half))
        d = _sd_segment2(v, w, p0[0], p0[1], p1[0], p1[1]) - _F(r)
        return np.maximum(d, np.abs(u - _F(mid)) - _F(half))

    return sdf


def _vertebra_prims(vt: _Vert, upper: _Vert | None) -> tuple[list[_Prim], list[_Prim]]:
    """Primitives of one vertebra (T10 ... S1) and the canal that is cut out of it."""
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, h = d["width"] / 2, d["depth"] / 2, d["height"]
    hc = h / 2
    cw, cd = d["canal_w"] / 2, d["canal_d"] / 2
    thoracic = vt.name.startswith("T")
    sacral = vt.name == "S1"
    disc = d["disc_above"] if upper is not None else 6.0
    v_c = 0.80 * b + cd + 0.5  # canal centre
    prims = [_Prim(c, fr, np.array([-a - 1, -b - 1, -hc - 1]), np.array([a + 1, 0.85 * b + 1, hc + 1]),
                   _body_sdf(a, b, hc))]
    pw, ph = d["ped_w"] / 2, d["ped_h"] / 2
    angle = {"T10": 4, "T11": 5, "T12": 7, "L1": 9, "L2": 11, "L3": 14, "L4": 17, "L5": 24, "S1": 30}[vt.name]
    tan_a = math.tan(math.radians(angle))
    u_p = cw + pw - 0.5
    w_p = 0.14 * h
    v0, v1 = 0.45 * b, v_c + 0.2 * cd
    for s in (-1.0, 1.0):
        def ped(u, v, w, s=s):
            up = _F(u_p) + (v - _F(v_c)) * _F(tan_a)
            dd = _sd_ellipse(u * _F(s) - up, w - _F(w_p), pw, ph)
            return np.maximum(dd, np.maximum(_F(v0) - v, v - _F(v1)))
        ext = u_p + pw + abs(tan_a) * (v1 - v0) + 1
        prims.append(_Prim(c, fr, np.array([min(0, s * ext), v0 - 1, w_p - ph - 1]),
                           np.array([max(0, s * ext), v1 + 1, w_p + ph + 1]), ped))
    # laminae: plates from the pedicles to the midline behind the canal
    lt = 3.2 if thoracic else 4.0
    v_lm = v_c + cd + lt
    w_lo, w_hi = -hc - 0.35 * disc, 0.55 * hc
    mid = (w_lo + w_hi) / 2
    for s in (-1.0, 1.0):
        p0, p1 = (s * (u_p + 0.3 * pw), v1 - 1.0), (0.0, v_lm)
        prims.append(_Prim(c, fr, np.array([min(p0[0], 0) - lt - 1, p0[1] - lt - 1, w_lo - 1]),
                           np.array([max(p0[0], 0) + lt + 1, v_lm + lt + 1, w_hi + 1]),
                           _slab_capsule2("uv", p0, p1, lt, (w_hi - w_lo) / 2, mid)))
    # spinous process in the mid-sagittal plane, pointing back and down
    incl = math.radians(d["sp_incl"])
    base = (v_lm - 1.0, mid)
    tip = (base[0] + d["sp_len"] * math.cos(incl), base[1] - d["sp_len"] * math.sin(incl))
    sp_t = 3.0 if thoracic else 3.8
    r_sp = d["sp_half"]
    prims.append(_Prim(c, fr, np.array([-sp_t - 1, base[0] - r_sp - 1, min(base[1], tip[1]) - r_sp - 1]),
                       np.array([sp_t + 1, tip[0] + r_sp + 1, max(base[1], tip[1]) + r_sp + 1]),
                       _slab_capsule2("vw", base, tip, r_sp, sp_t)))
    # transverse processes (lumbar: lateral; thoracic: postero-lateral, holding the ribs)
    if sacral:
        # the alae: wide lateral masses reaching the sacro-iliac joints
        half_span = d["tp_span"] / 2
        for s in (-1.0, 1.0):
            ala_c = c + fr @ np.array([s * (a + 0.5 * (half_span - a)), 0.25 * b, -0.05 * h])
            prims.append(_ellipsoid_prim(ala_c, fr, (0.5 * (half_span - a) + 6, 0.75 * b + 4, 0.42 * h + 2)))
    else:
        tp_back = {"T10": 16, "T11": 12, "T12": 8}.get(vt.name, 2.0)
        tp_r = 4.5 if thoracic else 4.3
        for s in (-1.0, 1.0):
            a3 = np.array([s * (cw + pw), v_c - 1.0, w_p])
            b3 = np.array([s * d["tp_span"] / 2, v_c + tp_back, w_p + (1.0 if thoracic else 0.0)])
            prims.append(_capsule_prim(c, fr, a3, b3, tp_r, scale=(1.0, 1.0, 0.75)))
    # articular processes: the superior ones rise to the disc above, the inferior ones hang below
    r_f = 3.6 if thoracic else 4.5
    squash = (1.0, 1.0, 1.0) if thoracic else (1.2, 1.0, 1.0)  # lumbar facets: flat, sagittal plates
    u_s = cw + pw + 1.0
    for s in (-1.0, 1.0):
        a3 = np.array([s * u_s, v_c + 0.2 * cd, 0.3 * hc])
        b3 = np.array([s * (u_s + 1.5), v_c + 0.6 * cd + (2 if thoracic else 4), hc + 0.8 * disc])
        prims.append(_capsule_prim(c, fr, a3, b3, r_f, scale=squash))
        if not sacral:
            u_i = u_s - (0.5 if thoracic else 2 * r_f + 1.5)
            v_i = v_c + cd + (6 if thoracic else 3)
            a3 = np.array([s * u_i, v_i - 2, -0.1 * hc])
            b3 = np.array([s * u_i, v_i + (1 if thoracic else 3), -hc - 0.75 * disc])
            prims.append(_capsule_prim(c, fr, a3, b3, r_f - 0.5, scale=squash))
    canal = _Prim(c, fr, np.array([-cw - 1, v_c - cd - 1, -hc - disc - 12]),
                  np.array([cw + 1, v_c + cd + 1, hc + disc + 12]),
                  lambda u, v, w: _sd_ellipse(u, v - _F(v_c), cw, cd))
    return prims, [canal]


#: Half-widths (mm, before ``vertebra_scale``) of the sacral plate at S2 ... S5: a real adult sacrum is
#: about 120 mm wide at S1-S2, 100 mm lower down and 45 mm near its tip.
_SACRAL_PLATE_HALF_WIDTH = (56.0, 48.0, 36.0, 23.0)


def _sacral_plate_sdf(half_width: float, t_mid: float, v_mid: float, bow: float, hc: float):
    """A transverse plate bowed forward at its sides: its mid-surface at ``v = v_mid - bow (u / W)^2``,
    ``t_mid`` thick at the mid-line and 65 % of that at its lateral ends, ``2 hc`` tall."""

    def sdf(u, v, w):
        r2 = np.minimum((u * _F(1.0 / half_width)) ** 2, _F(1.0))
        half_t = _F(t_mid / 2) * (_F(1.0) - _F(0.35) * r2)
        d = np.abs(v - (_F(v_mid) - _F(bow) * r2)) - half_t
        np.maximum(d, np.abs(u) - _F(half_width), out=d)
        np.maximum(d, np.abs(w) - _F(hc), out=d)
        return d

    return sdf


def _sacral_plate_shape(i: int, sv: _Vert) -> tuple[float, float, float, float]:
    """``(half_width, t_mid, v_mid, bow)`` of the sacral plate of segment ``i`` (S2 = 0), for
    :func:`_sacral_plate_sdf`."""
    b, scale = sv.dims["depth"] / 2, sv.dims["scale"]  # the phantom's vertebra_scale
    return _SACRAL_PLATE_HALF_WIDTH[i] * scale, b + 3.0, 0.2 * b, 15.0 * scale


def _lateral_mass_span(s1: _Vert, i: int) -> float:
    """Lateral offset (mm) that sets the size of the lateral masses of S2 (``i`` 0) and S3 (1)."""
    return s1.dims["tp_span"] / 2 - 6.0 - 12.0 * i


def _sacrum_prims(segments: list[_Vert], s1: _Vert, plate: bool = False) -> tuple[list[_Prim], list[_Prim]]:
    """S2-S5: fused bodies, a posterior plate and crest, and either lateral masses (S2-S3, under the
    alae) or, with ``plate``, one wide bowed plate per segment that joins body and lateral masses
    (the thin curved sacrum of real scans, 100 mm wide below the sacro-iliac joints)."""
    prims, cuts = [], []
    for i, sv in enumerate(segments):
        d, c, fr = sv.dims, sv.center, sv.frame
        a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2 + 0.8
        # in the plate the bodies are flatter (a real S3 body is ~12 mm deep, not 22)
        b_body = 0.75 * b if plate else b
        prims.append(_Prim(c, fr, np.array([-a - 1, -b - 1, -hc - 1]), np.array([a + 1, b + 1, hc + 1]),
                           _body_sdf(a, b_body, hc, post=0.85)))
        if sv.name.startswith("Co"):  # the coccyx: small bodies, no canal or arches
            continue
        if plate:
            w_half, t_mid, v_mid, bow = _sacral_plate_shape(i, sv)
            prims.append(_Prim(c, fr, np.array([-w_half - 1, v_mid - bow - t_mid / 2 - 1, -hc - 1]),
                               np.array([w_half + 1, v_mid + t_mid / 2 + 1, hc + 1]),
                               _sacral_plate_sdf(w_half, t_mid, v_mid, bow, hc)))
        cw, cd = d["canal_w"] / 2, max(d["canal_d"] / 2, 2.0)
        v_c = 0.85 * b + cd + 0.5
        # posterior plate (fused laminae) over the sacral canal, with the median crest
        lt = 3.0
        def laminae(u, v, w, cw=cw, cd=cd, v_c=v_c, hc=hc, lt=lt):
            d = _sd_ellipse(u, v - _F(v_c - 0.3 * cd), cw + lt + 2, cd + lt + 0.3 * cd)
            return np.maximum(d, np.abs(w) - _F(hc))

        prims.append(_Prim(c, fr, np.array([-cw - 6, v_c - 2, -hc - 1]),
                           np.array([cw + 6, v_c + cd + lt + 6, hc + 1]), laminae))
        prims.append(_capsule_prim(c, fr, (0, v_c + cd + 2, hc * 0.6), (0, v_c + cd + 7, -hc * 0.6),
                                   2.8 - 0.3 * i))
        if i < 2 and not plate:
            span = _lateral_mass_span(s1, i)
            for s in (-1.0, 1.0):
                mass_c = c + fr @ np.array([s * (a + 0.5 * (span - a)), 0.35 * b, 0.0])
                prims.append(_ellipsoid_prim(mass_c, fr, (0.5 * (span - a) + 5, 0.8 * b + 3, hc + 2)))
        cuts.append(_Prim(c, fr, np.array([-cw - 1, v_c - cd - 1, -hc - 3]),
                          np.array([cw + 1, v_c + cd + 1, hc + 3]),
                          lambda u, v, w, cw=cw, cd=cd, v_c=v_c: _sd_ellipse(u, v - _F(v_c), cw, cd)))
    return prims, cuts


def _disc_prims(lo: _Vert, up: _Vert, nucleus: bool = False) -> list[_Prim]:
    """The disc between ``lo`` and the vertebra above it: the space between the two endplates,
    inside a footprint interpolated between the two bodies, bulging 1 mm; or its nucleus (60 %
    of the footprint, shifted back)."""
    a = (lo.dims["width"] + up.dims["width"]) / 4 + 1.0
    b = (lo.dims["depth"] + up.dims["depth"]) / 4 + 0.8
    c = (lo.center + up.center) / 2
    shift = 0.0
    if nucleus:
        shift = 0.15 * b
        a, b = 0.6 * a, 0.55 * b
    fr = _frame_mean(lo.frame, up.frame)
    lo_c, lo_f, up_c, up_f = (x.astype(_F) for x in (lo.center, lo.frame, up.center, up.frame))
    a_lo, b_lo, hc_lo = lo.dims["width"] / 2, lo.dims["depth"] / 2, lo.dims["height"] / 2
    a_up, b_up, hc_up = up.dims["width"] / 2, up.dims["depth"] / 2, up.dims["height"] / 2

    def sdf(u, v, w):
        d = _sd_ellipse(u, v - _F(shift), a, b)
        np.maximum(d, v - _F(0.80 * b) - _F(0.12 * b) * (u / _F(a)) ** 2, out=d)
        # back to LPS offsets from the disc centre, then into each vertebra's frame
        f = fr.astype(_F)
        px, py, pz = (u * f[i, 0] + v * f[i, 1] + w * f[i, 2] for i in range(3))
        for vc, vf, aa, bb, hh, sign in ((lo_c, lo_f, a_lo, b_lo, hc_lo, 1.0),
                                         (up_c, up_f, a_up, b_up, hc_up, -1.0)):
            off = (_F(c[0]) - vc[0], _F(c[1]) - vc[1], _F(c[2]) - vc[2])
            lu = (px + off[0]) * vf[0, 0] + (py + off[1]) * vf[1, 0] + (pz + off[2]) * vf[2, 0]
            lv = (px + off[0]) * vf[0, 1] + (py + off[1]) * vf[1, 1] + (pz + off[2]) * vf[2, 1]
            lw = (px + off[0]) * vf[0, 2] + (py + off[1]) * vf[1, 2] + (pz + off[2]) * vf[2, 2]
            # inside the disc: above the lower body's top (sign +1), below the upper body's bottom
            np.maximum(d, _body_top(lu, lv, aa, bb, hh) - _F(sign) * lw, out=d)
        return d

    hz = (lo.dims["height"] + up.dims["height"]) / 4 + lo.dims["disc_above"] / 2 + 6
    return [_Prim(c, fr, np.array([-a - 1, -b - 1, -hz]), np.array([a + 1, b + 1, hz]), sdf)]


def _frame_mean(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """An orthonormal frame halfway between two frames."""
    m = f1 + f2
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    return r if np.linalg.det(r) > 0 else f1


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------
def _lerp_axis(a: np.ndarray, axis: int, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``t``."""
    i0 = np.clip(np.floor(t).astype(np.intp), 0, a.shape[axis] - 2)
    w = (t - i0).astype(_F)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    lo, hi = np.take(a, i0, axis=axis), np.take(a, i0 + 1, axis=axis)
    return lo + w * (hi - lo)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing_zyx: Sequence[float],
                  sigma_mm: Sequence[float]) -> np.ndarray:
    """Gaussian random field with correlation lengths ``sigma_mm`` (z, y, x), unit variance, float32.

    White noise on a grid of step ~sigma, smoothed by one step and interpolated linearly: cheap
    for any box size because the work is on the coarse grid and one interpolation per axis.
    """
    steps = [max(sp, s) for sp, s in zip(spacing_zyx, sigma_mm)]
    coarse = [int(math.ceil(n * sp / st)) + 3 for n, sp, st in zip(shape, spacing_zyx, steps)]
    field = rng.standard_normal(coarse, dtype=_F)
    sig = [1.0 if s >= sp else s / sp for s, sp in zip(sigma_mm, spacing_zyx)]
    field = ndimage.gaussian_filter(field, sig, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    for axis, (n, sp, st) in enumerate(zip(shape, spacing_zyx, steps)):
        t = np.arange(n) * (sp / st) + 1.0
        field = _lerp_axis(field, axis, t)
    return field


def _trabecular(rng: np.random.Generator, shape, spacing_zyx) -> np.ndarray:
    """Band-passed noise (0.45-1.5 mm), unit variance: the grain of cancellous bone at CT resolution."""
    white = rng.standard_normal(shape, dtype=_F)
    fine = ndimage.gaussian_filter(white, [0.45 / s for s in spacing_zyx], truncate=3.0)
    coarse = ndimage.gaussian_filter(fine, [1.5 / s for s in spacing_zyx], truncate=2.5)
    band = fine - 0.7 * coarse
    band /= max(float(band.std()), 1e-6)
    return band


# --------------------------------------------------------------------------------------------
# Layout: the body outline and the grid around the anatomy
# --------------------------------------------------------------------------------------------
#: Radius (mm) of the table top's cross curvature.
_CRADLE_RADIUS = 1800.0


def _gauss(x, mu, sigma):
    return np.exp(-(((x - mu) / sigma) ** 2))


@dataclasses.dataclass
class _Layout:
    """Per-slice anatomy curves (functions of z) and the body outline model."""

    z_knots: np.ndarray  # z of the vertebral centres, ascending (sacral segments, S1 ... T10)
    x_knots: np.ndarray
    y_knots: np.ndarray
    a_knots: np.ndarray  # body half width
    b_knots: np.ndarray  # body half depth
    canal: np.ndarray  # (n, 5): x, y, half width, half depth (in the axial plane), z
    z_s1: float
    z_t10: float
    y_back: float  # skin of the back (flat on the table)
    width: float
    depth: float
    fat: float
    wobble: np.ndarray  # (3,) random phase and amplitude of the outline

    def spine(self, z: np.ndarray):
        """Vertebral-body centre line (x, y) and body half width and depth at each z."""
        knots = (self.x_knots, self.y_knots, self.a_knots, self.b_knots)
        return tuple(np.interp(z, self.z_knots, k) for k in knots)

    def zeta(self, z):
        return (np.asarray(z, float) - self.z_s1) / (self.z_t10 - self.z_s1)

    def outline(self, z: np.ndarray):
        """Half width A, posterior and anterior half depths Bp, Ba and centre y for each z."""
        t = self.zeta(z)
        wob = 1.0 + self.wobble[1] * np.sin(2 * np.pi * (1.3 * t + self.wobble[0]))
        A = self.width / 2 * (1.0 + 0.07 * _gauss(t, 1.05, 0.3) + 0.12 * _gauss(t, -0.15, 0.22)
                              - 0.03 * _gauss(t, 0.45, 0.25)) * wob
        D = self.depth * (1.0 + 0.05 * _gauss(t, 1.0, 0.3) + 0.04 * _gauss(t, 0.3, 0.25)) * (
            1 + self.wobble[2] * np.cos(2 * np.pi * (0.9 * t + self.wobble[0])))
        flat = 22.0
        Bp = 0.42 * D + flat
        Ba = D - 0.42 * D
        yc = self.y_back + flat - Bp
        return A, Bp, Ba, yc

    def sdf(self, z, y, x, layer: str = "outer"):
        """Approximate signed distance (mm) to a body layer, arrays shaped (nz,1,1), (1,ny,1), (1,1,nx).

        ``outer``: the skin surface; ``deep``: the inner face of the subcutaneous fat; ``cavity``:
        the inner face of the body-wall muscles (the abdominal and thoracic cavity)."""
        A, Bp, Ba, yc = (np.asarray(v, dtype=_F).reshape(-1, 1, 1) for v in self.outline(z))
        dy = y - yc
        B = np.where(dy > 0, Bp, Ba)
        # superellipse of exponent 2.5 (a rounded box): |t|^2.5 = t^2 sqrt|t| avoids two powers
        ax_, ay_ = np.abs(x) / A, np.abs(dy) / B
        rho = (ax_ * ax_ * np.sqrt(ax_) + ay_ * ay_ * np.sqrt(ay_)) ** _F(0.4)
        r = np.sqrt(x * x + dy * dy)
        d = r * (_F(1.0) - _F(1.0) / np.maximum(rho, _F(1e-3)))
        # the back rests in the table's cradle
        np.maximum(d, y - _F(self.y_back) + x * x * _F(0.5 / _CRADLE_RADIUS), out=d)
        if layer == "outer":
            return d
        ny = dy / np.maximum(r, _F(1e-3))
        tf = _F(self.fat) * (_F(0.9) - _F(0.3) * ny)
        d = d + _F(2.0) + tf
        if layer == "deep":
            return d
        return d + _F(12.0) - _F(6.0) * np.maximum(ny, _F(0.0))

    def canal_at(self, z: np.ndarray):
        return tuple(np.interp(z, self.canal[:, 4], self.canal[:, i]) for i in range(4))


def _vertebra_extent(prims: Sequence[_Prim]) -> tuple[np.ndarray, np.ndarray]:
    boxes = [p.world_box() for p in prims]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def _make_layout(cfg: PhantomConfig, verts: list[_Vert], sacral: list[_Vert], tips_y: float,
                 rng: np.random.Generator) -> _Layout:
    chain = [v for v in reversed(sacral) if not v.name.startswith("Co")] + verts
    zk = np.array([v.center[2] for v in chain])
    canal = []
    for v in chain:
        b = v.dims["depth"] / 2
        cd = v.dims["canal_d"] / 2 if v.label != 25 else max(v.dims["canal_d"] / 2, 2.0)
        v_c = (0.80 if v.label != 25 else 0.85) * b + cd + 0.5
        p = v.center + v.frame[:, 1] * v_c
        cos_t = max(abs(v.frame[2, 2]), 0.3)
        canal.append((p[0], p[1], v.dims["canal_w"] / 2, cd / cos_t, p[2]))
    canal = np.array(sorted(canal, key=lambda r: r[4]))
    order = np.argsort(zk)
    return _Layout(
        z_knots=zk[order],
        x_knots=np.array([v.center[0] for v in chain])[order],
        y_knots=np.array([v.center[1] for v in chain])[order],
        a_knots=np.array([v.dims["width"] / 2 for v in chain])[order],
        b_knots=np.array([v.dims["depth"] / 2 for v in chain])[order],
        canal=canal,
        z_s1=float(verts[0].center[2]),
        z_t10=float(verts[-1].center[2]),
        y_back=float(tips_y + 7.0 + 0.55 * cfg.fat_mm),
        width=cfg.body_width_mm,
        depth=cfg.body_depth_mm,
        fat=cfg.fat_mm,
        wobble=np.array([rng.random(), rng.uniform(0, 0.025), rng.uniform(0, 0.025)]),
    )


# --------------------------------------------------------------------------------------------
# Nominal intensities (HU) before partial volume, blur and noise
# --------------------------------------------------------------------------------------------
_HU = {
    "air": -1000.0, "skin": 35.0, "subcutaneous_fat": -105.0, "deep_fat": -95.0, "muscle": 55.0,
    "wall_muscle": 48.0, "table_shell": 250.0, "table_core": -920.0, "csf": 8.0, "cord": 35.0,
    "annulus": 88.0, "nucleus": 72.0, "lung": -860.0, "bowel_fluid": 12.0, "gas": -980.0,
    "cartilage": 130.0,
}
#: (unenhanced, portal venous) HU of the enhancing organs.
_HU_ORGAN = {
    "liver": (58.0, 108.0), "spleen": (46.0, 118.0), "kidney": (32.0, 165.0), "aorta": (42.0, 160.0),
    "ivc": (40.0, 135.0), "bowel_wall": (42.0, 85.0),
}


def _organ_hu(cfg: PhantomConfig, name: str) -> float:
    return _HU_ORGAN[name][1 if cfg.contrast else 0]


class _Painter:
    """Holds the image, the labels and the grid while the anatomy is painted back to front."""

    def __init__(self, cfg: PhantomConfig, grid: _Grid, layout: _Layout, rng: np.random.Generator):
        self.cfg, self.grid, self.layout, self.rng = cfg, grid, layout, rng
        self.ct = np.full(grid.shape, _HU["air"], dtype=_F)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)
        self.h = float(grid.spacing[0])  # in-plane ramp width
        self.k = int(np.clip(round(grid.spacing[2] / grid.spacing[0]), 1, 4))
        self.zc = grid.axis(2, 0, grid.shape[0])

    # --- helpers ----------------------------------------------------------------------------
    def xy_box(self, xlo, xhi, ylo, yhi, zlo=-1e9, zhi=1e9):
        return self.grid.box(np.array([xlo, ylo, zlo]), np.array([xhi, yhi, zhi]))

    def coords(self, box):
        z0, z1, y0, y1, x0, x1 = box
        g = self.grid
        return (g.axis(2, z0, z1)[:, None, None], g.axis(1, y0, y1)[None, :, None],
                g.axis(0, x0, x1)[None, None, :])

    def noise(self, box, sigma_mm) -> np.ndarray:
        z0, z1, y0, y1, x0, x1 = box
        return _smooth_noise(self.rng, (z1 - z0, y1 - y0, x1 - x0), self.grid.spacing[::-1], sigma_mm)

    # --- table and body wall ----------------------------------------------------------------
    def table(self, gap: float) -> None:
        g = self.grid
        y = g.axis(1, 0, g.shape[1])[:, None]
        x = g.axis(0, 0, g.shape[2])[None, :]
        top = _F(self.layout.y_back + gap) - x * x * _F(0.5 / _CRADLE_RADIUS)  # a shallow cradle
        inside = _F(235.0) - np.abs(x)  # > 0 within the table's width
        hu = np.full((g.shape[1], g.shape[2]), _HU["air"], dtype=_F)
        lab2 = np.zeros(hu.shape, dtype=np.uint8)
        side = _ramp(-inside, self.h)
        for d0, d1, val in ((0.0, 42.0, _HU["table_core"]), (0.0, 1.8, _HU["table_shell"]),
                            (40.0, 42.0, _HU["table_shell"])):
            dist = np.maximum(top + _F(d0) - y, y - top - _F(d1))
            f = _ramp(dist, self.h) * side
            hu += f * (_F(val) - hu)
            lab2[f >= 0.5] = _L["table"]
        self.ct[:] = hu[None]
        self.lab[:] = lab2[None]

    def body(self) -> None:
        lay, cfg = self.layout, self.cfg
        A, _, Ba, yc = lay.outline(self.zc)
        box = self.xy_box(-A.max() - 3, A.max() + 3, float((yc - Ba).min()) - 3, lay.y_back + 3)
        if box is None:
            return
        z, y, x = self.coords(box)
        d = lay.sdf(z, y, x, "outer")
        dy = y - np.asarray(yc, dtype=_F)[box[0]:box[1], None, None]
        ny = dy / np.maximum(np.sqrt(x * x + dy * dy), _F(1e-3))
        tf = _F(cfg.fat_mm) * (_F(0.9) - _F(0.3) * ny)
        tm = _F(12.0) - _F(6.0) * np.maximum(ny, _F(0.0))
        # the inner faces of the fat and of the wall muscles, kept for clipping organs and muscles
        self.body_box = box
        self.body_deep = d + _F(2.0) + tf
        self.body_cavity = self.body_deep + tm
        sub = self.ct[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        lab = self.lab[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        layers = (
            (d, _HU["skin"], _L["skin"]),
            (d + _F(2.0), _HU["subcutaneous_fat"], _L["subcutaneous_fat"]),
            (self.body_deep, _HU["wall_muscle"], _L["other_muscle"]),
            (self.body_cavity, _HU["deep_fat"], _L["deep_fat"]),
        )
        for dist, val, label in layers:
            f = _ramp(dist, self.h)
            sub += f * (_F(val) - sub)
            lab[f >= 0.5] = label

    def layer(self, box, which: str) -> np.ndarray:
        """Signed distance to a body layer ('deep' or 'cavity') on ``box``, from the cache when
        the box lies inside the body's box."""
        bb = getattr(self, "body_box", None)
        if bb is not None and all(box[2 * i] >= bb[2 * i] and box[2 * i + 1] <= bb[2 * i + 1]
                                  for i in range(3)):
            arr = self.body_deep if which == "deep" else self.body_cavity
            return arr[box[0] - bb[0]:box[1] - bb[0], box[2] - bb[2]:box[3] - bb[2],
                       box[4] - bb[4]:box[5] - bb[4]]
        z, y, x = self.coords(box)
        return self.layout.sdf(z, y, x, which)

    def drop_cache(self) -> None:
        self.body_box = None
        self.body_deep = self.body_cavity = None

    # --- per-slice tubes (vessels, muscles, canal) ------------------------------------------
    def tube(self, zlo, zhi, cx, cy, ax, ay, hu, label, clip: str | None = "cavity", extra=None,
             power: float = 2.0):
        """Paint an ellipse (or a superellipse of exponent ``power``) per slice for the slices with
        zlo <= z <= zhi; ``cx, cy, ax, ay`` are functions of z; ``hu`` a value or ``hu(box, d)``."""
        zsel = np.nonzero((self.zc >= zlo) & (self.zc <= zhi))[0]
        if zsel.size == 0:
            return None
        zz = self.zc[zsel]
        CX, CY, AX, AY = (np.asarray(f(zz), dtype=_F) for f in (cx, cy, ax, ay))
        box = self.xy_box(float((CX - AX).min()) - 2, float((CX + AX).max()) + 2,
                          float((CY - AY).min()) - 2, float((CY + AY).max()) + 2)
        if box is None:
            return None
        box = (int(zsel[0]), int(zsel[-1]) + 1) + box[2:]
        z, y, x = self.coords(box)
        CX, CY, AX, AY = (v[:, None, None] for v in (CX, CY, AX, AY))
        dx, dy = x - CX, y - CY
        if power == 2.0:
            d = _sd_ellipse(dx, dy, AX, AY)
        else:
            pw = _F(power)
            rho = (np.abs(dx / AX) ** pw + np.abs(dy / AY) ** pw) ** (_F(1.0) / pw)
            d = np.sqrt(dx * dx + dy * dy) * (_F(1.0) - _F(1.0) / np.maximum(rho, _F(1e-3)))
        if clip is not None:
            np.maximum(d, self.layer(box, clip), out=d)
        if extra is not None:
            np.maximum(d, extra(z, y, x), out=d)
        f = _ramp(d, self.h)
        val = hu(box, d) if callable(hu) else hu
        _paint(self.ct, self.lab, box, f, val, label)
        return box, d

    # --- bones ----------------------------------------------------------------------------
    def bone(self, prims, cuts, label, cort_hu, canc_hu, cort_mm=None) -> None:
        cort_mm = self.cfg.cortical_mm if cort_mm is None else cort_mm
        res = _rasterise(self.grid, prims, cuts, (0.0, cort_mm), self.k, self.h)
        if res is None:
            return
        box, (f_all, f_core) = res
        z0, z1, y0, y1, x0, x1 = box
        tex = _trabecular(self.rng, f_all.shape, self.grid.spacing[::-1])
        amp = min(70.0, 0.3 * canc_hu)
        canc = _F(canc_hu) + _F(amp) * np.tanh(_F(0.9) * tex)
        sub = self.ct[z0:z1, y0:y1, x0:x1]
        # sub <- (1 - f_all) sub + f_core canc + (f_all - f_core) cort
        sub *= _F(1.0) - f_all
        sub += f_core * canc + (f_all - f_core) * _F(cort_hu)
        self.lab[z0:z1, y0:y1, x0:x1][f_all >= 0.5] = label

    def soft(self, prims, cuts, hu, label, clip: str | None = "cavity", k: int = 1):
        """A soft-tissue organ from primitives, clipped to a body layer; returns (box, occupancy)."""
        res = _rasterise(self.grid, prims, cuts, (0.0,), k, self.h)
        if res is None:
            return None
        box, (f,) = res
        if clip is not None:
            f *= _ramp(self.layer(box, clip), self.h)
        val = hu(box) if callable(hu) else hu
        _paint(self.ct, self.lab, box, f, val, label)
        return box, f


# --------------------------------------------------------------------------------------------
# Anatomy painters
# --------------------------------------------------------------------------------------------
def _z_of(verts: list[_Vert], name: str) -> float:
    return float(next(v.center[2] for v in verts if v.name == name))


def _paint_viscera(p: _Painter, verts: list[_Vert]) -> None:
    """Bowel, liver, spleen, kidneys, then the lung bases and the diaphragm above them."""
    cfg, lay, rng = p.cfg, p.layout, p.rng
    z_t11, z_t12, z_l1, z_l2 = (_z_of(verts, n) for n in ("T11", "T12", "L1", "L2"))
    sc = cfg.vertebra_scale

    # bowel: loops of a random field in the anterior cavity and the flanks, below T12
    A, _, Ba, yc = lay.outline(p.zc)
    box = p.xy_box(-A.max(), A.max(), float((yc - Ba).min()), lay.y_back, -1e9, z_t12 - 10)
    if box is not None:
        z, y, x = p.coords(box)
        xs, ys, a_s, b_s = (np.asarray(v, _F).reshape(-1, 1, 1) for v in lay.spine(z.ravel()))
        # the peritoneal cavity: the body cavity less the retroperitoneum around the spine
        # (psoas, kidneys, great vessels)
        region = -_sd_ellipse(x - xs, y - ys - _F(10.0), a_s + _F(85.0), b_s + _F(30.0))
        np.maximum(region, p.layer(box, "cavity") + _F(2.0), out=region)
        np.maximum(region, z - _F(z_t12 - 10), out=region)
        f_reg = _ramp(region, p.h)
        # loops: where two independent smooth fields are both near zero, i.e. around the curves
        # where their zero surfaces cross, which wind through the volume like bowel
        n1 = p.noise(box, (12.0, 9.0, 9.0))
        n2 = p.noise(box, (12.0, 9.0, 9.0))
        d_loop = np.sqrt(n1 * n1 + n2 * n2) * _F(10.0) - _F(15.0)  # ~mm; loops ~20-30 mm wide
        del n1
        f_bowel = f_reg * _ramp(d_loop, p.h)
        f_lumen = f_reg * _ramp(d_loop + _F(2.5), p.h)
        anterior = np.clip((ys - b_s - y) / _F(120.0), 0.0, 1.0)
        # contents: fluid to chyme (10-50 HU), gas in the upper (anterior) part of some loops
        contents = _F(_HU["bowel_fluid"]) + _F(20.0) * (n2 + _F(1.0))
        n3 = p.noise(box, (10.0, 6.0, 6.0))
        f_gas = f_lumen * _ramp((_F(1.9) - n3 - _F(0.9) * anterior) * _F(8.0), p.h)
        _paint(p.ct, p.lab, box, f_bowel, _organ_hu(cfg, "bowel_wall"), _L["small_bowel"])
        _paint(p.ct, p.lab, box, f_lumen, contents, None)
        _paint(p.ct, p.lab, box, f_gas, _HU["gas"], None)
        del n2, n3, f_bowel, f_lumen, f_gas, region, d_loop, contents
    # colon: ascending (right) and descending (left) in the flanks, transverse across the front
    for s in (-1.0, 1.0):
        def cx(z, s=s):
            A_, _, _, _ = lay.outline(z)
            return s * (A_ - cfg.fat_mm * 0.9 - 2 - 12 - 30)

        def cy(z):
            _, ys_, _, _ = lay.spine(z)
            return ys_ - 25.0

        def stool(box, d, p=p):
            n = p.noise(box, (3.0, 2.5, 2.5))
            val = _F(-20.0) + _F(70.0) * n
            gas = _ramp((_F(1.3) - n) * _F(3.0), p.h)
            return val + gas * (_F(_HU["gas"]) - val)

        p.tube(z_l2 - 130, z_l1 + 10, cx, cy, _const(24.0), _const(22.0), stool, _L["colon"])
    # liver: a large ellipsoid on the right under the diaphragm
    ys0 = float(lay.spine(np.array([z_t11]))[1][0])
    liver = _ellipsoid_prim(np.array([-75.0, ys0 - 35.0, z_t11 + 20.0]), _rot_z(-10), (105.0, 95.0, 105.0))
    p.soft([liver], [], lambda b: _organ_hu(cfg, "liver") + 5.0 * p.noise(b, (6.0, 6.0, 6.0)), _L["liver"])
    spleen = _ellipsoid_prim(np.array([88.0, ys0 + 18.0, z_t11 - 5.0]), _rot_z(35), (32.0, 60.0, 55.0))
    p.soft([spleen], [], lambda b: _organ_hu(cfg, "spleen") + 5.0 * p.noise(b, (6.0, 6.0, 6.0)), _L["spleen"])
    # kidneys: long axis tilted (upper pole medial and posterior), hilum facing antero-medially
    for s, label, dz in ((1.0, _L["kidney_left"], 0.0), (-1.0, _L["kidney_right"], -18.0)):
        zk = z_l1 - 8.0 + dz
        xk, yk, ak, _ = (float(v[0]) for v in lay.spine(np.array([zk])))
        fr = _rot_z(s * 35.0) @ _rot_y(-s * 12.0) @ _rot_x(-10.0)
        ck = np.array([xk + s * (ak + 52.0) * sc, yk + 12.0, zk])
        kid = _ellipsoid_prim(ck, fr, (25.0 * sc, 20.0 * sc, 52.0 * sc))
        p.soft([kid], [], lambda b: _organ_hu(cfg, "kidney") + 6.0 * p.noise(b, (3.0, 3.0, 3.0)), label)
        # renal sinus fat and the (urine-filled) pelvis at the hilum; the label stays kidney
        hilum = ck + fr @ np.array([-s * 14.0 * sc, -6.0, 0.0])
        p.soft([_ellipsoid_prim(hilum, fr, (11.0 * sc, 9.0 * sc, 30.0 * sc))], [], _HU["deep_fat"], None)
        p.soft([_ellipsoid_prim(hilum, fr, (6.0 * sc, 5.0 * sc, 14.0 * sc))], [], 10.0, None)
    # lung bases: a rim inside the thoracic wall that deepens with height above the posterior
    # recess and is pushed back anteriorly by the diaphragm's domes; the diaphragm is the 5 mm
    # muscle sheet just inside the rim
    z_rec = z_t12 + float(rng.uniform(-12.0, 8.0))
    box = p.xy_box(-A.max(), A.max(), float((yc - Ba).min()), lay.y_back, z_rec - 5, 1e9)
    if box is not None:
        z, y, x = p.coords(box)
        xs, ys, a_s, b_s = (np.asarray(v, _F).reshape(-1, 1, 1) for v in lay.spine(z.ravel()))
        yc_z = np.asarray(lay.outline(z.ravel())[3], _F).reshape(-1, 1, 1)
        cav = p.layer(box, "cavity")
        rim = _F(1.4) * (z - _F(z_rec)) - _F(0.55) * np.maximum(yc_z + _F(20.0) - y, _F(0.0))
        para = (a_s + _F(6.0)) - np.abs(x - xs)  # the vertebral bodies and the mediastinum
        d_dia = np.maximum(np.maximum(cav, para), -cav - rim - _F(5.0))
        _paint(p.ct, p.lab, box, _ramp(d_dia, p.h), _HU["wall_muscle"], _L["other_muscle"])
        d_lung = np.maximum(np.maximum(cav + _F(1.0), para + _F(1.0)), -cav - rim)
        f_lung = _ramp(d_lung, p.h)
        vessels = p.noise(box, (2.0, 1.6, 1.6))
        lung_hu = _F(_HU["lung"]) + _F(25.0) * vessels + _F(800.0) * _ramp((_F(2.3) - vessels) * _F(2.0), p.h)
        _paint(p.ct, p.lab, box, f_lung, lung_hu, None)
        zz, yy, xx = np.nonzero(f_lung >= 0.5)
        left = x[0, 0, xx] > xs[zz, 0, 0]
        p.lab[box[0]:box[1], box[2]:box[3], box[4]:box[5]][zz, yy, xx] = np.where(
            left, _L["lung_lower_lobe_left"], _L["lung_lower_lobe_right"]).astype(np.uint8)


def _const(value: float):
    """A function of z returning ``value`` in every slice."""
    return lambda z: np.full(np.shape(z), value, dtype=float)


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _paint_vessels(p: _Painter, verts: list[_Vert]) -> None:
    """Aorta (bifurcating at L4) with calcified plaques, inferior vena cava and iliac vessels."""
    cfg, lay = p.cfg, p.layout
    z_l4, z_l5 = _z_of(verts, "L4"), _z_of(verts, "L5")
    sc = cfg.vertebra_scale
    r_ao = 11.0 * sc

    def spine(z):
        return lay.spine(np.asarray(z, float))

    ao_x = lambda z: spine(z)[0] + 16.0 * sc  # noqa: E731
    ao_y = lambda z: spine(z)[1] - spine(z)[3] - r_ao - 3.0  # noqa: E731
    cav_x = lambda z: spine(z)[0] - 22.0 * sc  # noqa: E731
    cav_y = lambda z: spine(z)[1] - spine(z)[3] - 10.0  # noqa: E731
    hu_ao, hu_cv = _organ_hu(cfg, "aorta"), _organ_hu(cfg, "ivc")
    p.tube(z_l5 + 10, 1e9, cav_x, cav_y, _const(13.0 * sc), _const(9.0 * sc), hu_cv, _L["inferior_vena_cava"])
    for s, label in ((1.0, _L["iliac_vena_left"]), (-1.0, _L["iliac_vena_right"])):
        p.tube(-1e9, z_l5 + 12, lambda z, s=s: cav_x(z_l5 + 10) + 22 * sc + s * (10 + 0.45 * (z_l5 + 10 - z)),
               lambda z: cav_y(z) + 8.0, _const(7.5 * sc), _const(7.0 * sc), hu_cv, label)
    ao = p.tube(z_l4, 1e9, ao_x, ao_y, _const(r_ao), _const(r_ao),
                hu_ao, _L["aorta"])
    tubes = [ao]
    for s, label in ((1.0, _L["iliac_artery_left"]), (-1.0, _L["iliac_artery_right"])):
        tubes.append(p.tube(-1e9, z_l4 + 2, lambda z, s=s: ao_x(z_l4) + s * (6 + 0.45 * (z_l4 - z)),
                            lambda z: ao_y(z) + 0.15 * (z_l4 - z), _const(6.5 * sc),
                            _const(6.5 * sc), hu_ao, label))
    # calcified plaques: bright patches on the vessel wall where a random field is high
    if cfg.calcification > 0:
        thr = 2.6 - 1.4 * cfg.calcification
        for t in tubes:
            if t is None:
                continue
            box, d = t
            n = p.noise(box, (3.0, 1.5, 1.5))
            f = _ramp(np.abs(d + _F(0.8)) - _F(0.9), p.h) * _ramp((_F(thr) - n) * _F(4.0), p.h)
            _paint(p.ct, p.lab, box, f, 750.0, None)


def _paint_muscles(p: _Painter, verts: list[_Vert]) -> None:
    """Iliopsoas, quadratus lumborum and the autochthon, with fatty infiltration."""
    cfg, lay = p.cfg, p.layout
    z_t12, z_l4, z_l5 = (_z_of(verts, n) for n in ("T12", "L4", "L5"))
    sc = cfg.vertebra_scale
    fat = cfg.muscle_fat_fraction

    def muscle_hu(fraction):
        # fat streaks along the fibres (long in z): the local fat fraction varies around ``fraction``
        def hu(box, d):
            n = p.noise(box, (14.0, 1.3, 1.3))
            ff = np.clip(_F(fraction) * (_F(1.0) + _F(0.55) * n), 0.0, 1.0)
            return _F(_HU["muscle"]) + ff * _F(_HU["deep_fat"] - _HU["muscle"])

        return hu

    def spine(z):
        return lay.spine(np.asarray(z, float))

    # psoas from T12/L1, growing to L5, then running antero-laterally with the iliacus
    z_top = z_t12 - 8.0
    r_max = 22.0 * sc

    def r_ps(z):
        t = np.clip((z_top - z) / max(z_top - z_l4, 1.0), 0.0, 1.0)
        return 4.0 + (r_max - 4.0) * t ** 0.7

    def below(z):
        return np.maximum(z_l5 - z, 0.0)

    for s, label in ((1.0, _L["iliopsoas_left"]), (-1.0, _L["iliopsoas_right"])):
        p.tube(-1e9, z_top, lambda z, s=s: spine(z)[0] + s * (spine(z)[2] + 0.8 * r_ps(z) + 0.8 * below(z)),
               lambda z: spine(z)[1] + 0.1 * spine(z)[3] - 0.9 * below(z),
               lambda z: 0.9 * r_ps(z) + 0.35 * below(z), lambda z: 1.05 * r_ps(z),
               muscle_hu(fat / 3.0), label)
    # quadratus lumborum lateral of the transverse processes
    for s in (1.0, -1.0):
        p.tube(z_l4 - 10, z_t12, lambda z, s=s: spine(z)[0] + s * (spine(z)[2] + 30.0 * sc),
               lambda z: spine(z)[1] + spine(z)[3] + 8.0, _const(15.0 * sc),
               _const(8.0 * sc), muscle_hu(fat / 2.0), _L["other_muscle"])
    # autochthon: fills the gutter between the spinous processes and the transverse processes
    zeta = lambda z: lay.zeta(z)  # noqa: E731

    def half_w(z):
        t = zeta(z)
        return sc * (28.0 + 8.0 * _gauss(t, 0.45, 0.4) - 10.0 * np.clip(-t * 3.0, 0.0, 1.0))

    def front(z):
        return lay.canal_at(np.asarray(z, float))[1]

    y_in = lay.y_back - 2.0 - 0.6 * cfg.fat_mm
    for s, label in ((1.0, _L["autochthon_left"]), (-1.0, _L["autochthon_right"])):
        p.tube(-1e9, 1e9, lambda z, s=s: spine(z)[0] + s * (half_w(z) + 3.0),
               lambda z: (front(z) + y_in) / 2 + 4.0, half_w,
               lambda z: (y_in - front(z)) / 2 + 6.0, muscle_hu(fat), label, clip="deep", power=2.7)


def _paint_canal(p: _Painter, verts: list[_Vert]) -> None:
    """Spinal canal: epidural fat around the dural sac (CSF), the cord above the conus (L1)."""
    lay = p.layout
    z_conus = _z_of(verts, "L1") - 5.0
    c_at = lambda i: (lambda z: lay.canal_at(np.asarray(z, float))[i])  # noqa: E731
    p.tube(-1e9, 1e9, c_at(0), c_at(1), c_at(2), c_at(3), _HU["deep_fat"], _L["deep_fat"], clip=None)
    sac = lambda i, f: (lambda z: f * lay.canal_at(np.asarray(z, float))[i])  # noqa: E731
    p.tube(_z_of(verts, "S1") - 25, 1e9, c_at(0), lambda z: c_at(1)(z) - 0.5, sac(2, 0.82), sac(3, 0.78),
           _HU["csf"], _L["spinal_cord"], clip=None)
    p.tube(z_conus, 1e9, c_at(0), lambda z: c_at(1)(z) - 0.8, _const(4.5),
           _const(3.8), _HU["cord"], _L["spinal_cord"], clip=None)


def _rib_prims(p: _Painter, vt: _Vert, side: float, number: int) -> tuple[list[_Prim], list[_Prim]]:
    """A rib as a chain of capsules: head at the body, tubercle at the transverse process, then
    around the body wall just inside the muscle layer, descending; rib 10 ends in cartilage."""
    lay, cfg = p.layout, p.cfg
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    v_c = 0.80 * b + d["canal_d"] / 2 + 0.5
    head = c + fr @ np.array([side * (a + 1.5), 0.45 * b, hc - 3.0])
    tub = c + fr @ np.array([side * (d["tp_span"] / 2 - 2.0), v_c + 10.0, 0.14 * d["height"] - 5.0])
    end_deg, drop, r0 = {10: (150.0, 95.0, 4.3), 11: (118.0, 55.0, 4.0), 12: (85.0, 28.0, 3.6)}[number]
    end_deg += float(p.rng.uniform(-8, 8))
    A, Bp, Ba, yc = (float(v[0]) for v in lay.outline(np.array([tub[2]])))
    pts, radii = [head, tub], [r0 + 0.6, r0 + 0.3]
    phis = np.arange(38.0, end_deg + 1e-6, 3.0)
    for i, phi in enumerate(phis):
        ex, ey = side * math.sin(math.radians(phi)), math.cos(math.radians(phi))
        B = Bp if ey > 0 else Ba
        rho = (abs(ex / A) ** 2.5 + abs(ey / B) ** 2.5) ** 0.4
        rb = 1.0 / rho
        if ey > 0:
            rb = min(rb, (lay.y_back - yc) / ey)
        r = rb - (2.0 + cfg.fat_mm * (0.9 - 0.3 * ey) + 7.0)
        t = (phi - phis[0]) / max(end_deg - phis[0], 1.0)
        pts.append(np.array([r * ex, yc + r * ey, tub[2] - 4.0 - drop * t ** 1.2]))
        radii.append(r0 - 0.8 * t)
    prims = []
    for i in range(len(pts) - 1):
        prims.append(_capsule_prim(np.zeros(3), np.eye(3), pts[i], pts[i + 1], min(radii[i], radii[i + 1])))
    cart = []
    if number == 10:
        # costal cartilage: on toward the front and up, to the costal margin
        last = pts[-1]
        tgt = np.array([side * 0.55 * abs(last[0]), last[1] - 35.0, last[2] + 25.0])
        cart.append(_capsule_prim(np.zeros(3), np.eye(3), last, tgt, 4.0))
    return prims, cart


def _ilium_prim(p: _Painter, s1: _Vert, side: float, z_crest: float, z_bottom: float) -> _Prim:
    """An iliac wing: a curved plate from the sacro-iliac joint round to the anterior spine,
    thick at the back, topped by the crest."""
    d, c, fr = s1.dims, s1.center, s1.frame
    half_span = d["tp_span"] / 2
    joint = c + fr @ np.array([side * (half_span + 9.0), 0.25 * d["depth"] / 2, 0.0])
    sc = p.cfg.vertebra_scale
    rx, ry = 42.0 * sc, 60.0 * sc
    a_post, a_ant = math.radians(150.0), math.radians(-70.0)
    cx = abs(joint[0]) - rx * math.cos(a_post)
    cy = joint[1] - ry * math.sin(a_post)
    r_mean = (rx + ry) / 2
    z_j = float(joint[2])

    def sdf(u, v, w):
        x, y, z = u, v, w  # world offsets from the prim centre (0, 0, 0): plain LPS
        lx = x * _F(side) - _F(cx)
        ly = y - _F(cy)
        rxz = np.maximum(_F(rx) + _F(0.25) * (z - _F(z_j)), _F(28.0))
        d_rad = _sd_ellipse(lx, ly, rxz, _F(ry))
        alpha = np.arctan2(ly / _F(ry), lx / rxz)
        crest = _F(z_crest) - _F(38.0) * ((alpha - _F(math.radians(45.0))) / _F(math.radians(115.0))) ** 2
        # thick at the back (sacro-iliac joint), thin in the iliac fossa, a rim at the crest
        back = np.clip((alpha - _F(math.radians(100.0))) / _F(math.radians(50.0)), 0, 1)
        rim = np.clip(_F(1.0) - (crest - z) / _F(15.0), 0, 1)
        thick = (_F(5.0) + _F(16.0) * back * back + _F(4.0) * rim) * _F(sc)
        dist = np.abs(d_rad) - thick / 2
        cap = np.maximum(alpha - _F(a_post), _F(a_ant) - alpha) * _F(r_mean)
        np.maximum(dist, cap, out=dist)
        np.maximum(dist, z - crest, out=dist)
        np.maximum(dist, _F(z_bottom) - z, out=dist)
        return dist

    lo = np.array([min(side * (cx - rx - 40), side * (cx + rx + 40)), cy - ry - 20, z_bottom - 2])
    hi = np.array([max(side * (cx - rx - 40), side * (cx + rx + 40)), cy + ry + 20, z_crest + 2])
    return _Prim(np.zeros(3), np.eye(3), lo, hi, sdf)


#: Width (mm) of the sacro-iliac joint space between the ilium and the sacrum.
_SI_JOINT_GAP = 2.5


def _dilated(prim: _Prim, mm: float) -> _Prim:
    """``prim`` grown by ``mm`` (its distance lowered, its box widened)."""
    return _Prim(prim.center, prim.frame, prim.lo - mm, prim.hi + mm,
                 lambda u, v, w, f=prim.sdf: f(u, v, w) - _F(mm))


def _sacroiliac_prims(s1: _Vert, sacral: list[_Vert], side: float, plate: bool, sc: float) -> list[_Prim]:
    """The posterior ilium beside S1-S3: two capsules of radius 12 mm across and 20 mm front to back
    (times the vertebra scale) through points just outside the lateral edges of the S1 ala, of S2 and
    of upper S3, so that once the dilated sacrum is cut from them they hug it across the joint space."""
    b1 = s1.dims["depth"] / 2
    ala_tip = s1.dims["tp_span"] / 2 + 6.0  # lateral end of the ala ellipsoid in _vertebra_prims
    pts = [s1.center + s1.frame @ np.array([side * (ala_tip + 6.0 * sc), 0.25 * b1 + 4.0, 0.0])]
    for i, sv in enumerate(sacral[:2]):
        if plate:
            edge, _, v_mid, bow = _sacral_plate_shape(i, sv)
            v_edge = v_mid - bow + 4.0
        else:  # the lateral end of the lateral masses drawn by _sacrum_prims
            edge, v_edge = _lateral_mass_span(s1, i) + 5.0, 0.35 * sv.dims["depth"] / 2
        w = 0.0 if i == 0 else 0.3 * sv.dims["height"] / 2
        pts.append(sv.center + sv.frame @ np.array([side * (edge + 6.0 * sc), v_edge, w]))
    r = 12.0 * sc
    return [_capsule_prim(np.zeros(3), np.eye(3), a, b, r, scale=(1.0, 0.6, 1.0))
            for a, b in zip(pts[:-1], pts[1:])]


def _hip_joint_prims(s1: _Vert, z_sacrum_low: float, z_top: float, side: float,
                     scale: float) -> tuple[list[_Prim], _Prim]:
    """A femoral head with the start of its neck, and the acetabular cup of the hip bone over it.

    Placed as in an adult pelvis (about 88 mm from the mid-line, a little anterior to the S1 body,
    the head's centre just below the sacrum's lowest point, the cup's roof no higher than
    ``z_top``), so only a field of view that reaches into the pelvis shows them. Returns
    ``(femur primitives, acetabulum primitive)``.
    """
    r = 23.0 * scale
    z = min(z_sacrum_low - 5.0, z_top - (r + 7.0))
    c = np.array([side * 88.0 * scale, float(s1.center[1]) - 10.0 * scale, z])
    head = _ellipsoid_prim(c, np.eye(3), (r, r, r))
    neck = _capsule_prim(c, np.eye(3), (0.0, 0.0, 0.0), (side * 32.0 * scale, 4.0, -22.0 * scale), 14.0 * scale)
    normal = np.array([side * 0.8, 0.0, 0.6])  # the cup opens down and toward the mid-line

    def cup(u, v, w):
        dist = np.sqrt(u * u + v * v + w * w)
        shell = np.maximum(dist - _F(r + 7.0), _F(r + 1.5) - dist)
        return np.maximum(shell, -(u * _F(normal[0]) + w * _F(normal[2])) - _F(0.2 * r))

    reach = r + 8.0
    return [head, neck], _Prim(c, np.eye(3), np.full(3, -reach), np.full(3, reach), cup)


# --------------------------------------------------------------------------------------------
# The scanner: point spread function and noise
# --------------------------------------------------------------------------------------------
def _scanner(img: np.ndarray, cfg: PhantomConfig, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """In-plane Gaussian PSF applied to image + white noise, scaled so the noise std is
    ``cfg.noise_hu`` after blurring; rounded to int16 HU."""
    sigma = cfg.blur_mm / grid.spacing[0]
    if cfg.noise_hu > 0:
        gain = 1.0
        if sigma > 0.05:
            # std of blurred unit white noise = sum of the squared 1D kernel (2D separable kernel)
            delta = np.zeros(65, dtype=np.float64)
            delta[32] = 1.0
            k1 = ndimage.gaussian_filter1d(delta, sigma)
            gain = float((k1 ** 2).sum())
        scale = _F(cfg.noise_hu / gain)
        for z in range(img.shape[0]):  # per slice: keeps the temporary small
            img[z] += scale * rng.standard_normal(img.shape[1:], dtype=_F)
    if sigma > 0.05:
        ndimage.gaussian_filter1d(img, sigma, axis=2, output=img, truncate=3.0)
        ndimage.gaussian_filter1d(img, sigma, axis=1, output=img, truncate=3.0)
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16)


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------
_Z_MARGIN = 10.0  # mm of context above and below the requested levels


def _place_grid(cfg: PhantomConfig, lay: _Layout, ext: dict[int, tuple[np.ndarray, np.ndarray]],
                z_model: tuple[float, float], table_bottom: float) -> _Grid:
    levels = cfg.level_ids()
    lo = min(ext[i][0][2] for i in levels) - _Z_MARGIN
    hi = max(ext[i][1][2] for i in levels) + _Z_MARGIN
    dz, dxy = float(cfg.slice_thickness), float(cfg.spacing_xy)
    nx, ny = (int(n) for n in cfg.shape_xy)
    nz = int(cfg.n_slices) if cfg.n_slices is not None else int(math.ceil((hi - lo) / dz)) + 1
    if cfg.origin is not None:
        origin = tuple(float(o) for o in cfg.origin)
    else:
        zc = (lo + hi) / 2
        z_mid = np.linspace(lo, hi, 9)
        _, _, Ba, yc = lay.outline(z_mid)
        front = float((yc - Ba).min())
        span = table_bottom - front
        if ny * dxy >= span + 10.0:
            ycen = (front + table_bottom) / 2
        else:
            ycen = float(np.mean(lay.canal_at(z_mid)[1]))
        origin = (-(nx - 1) / 2 * dxy, ycen - (ny - 1) / 2 * dxy, zc - (nz - 1) / 2 * dz)
    z_first, z_last = origin[2] - dz / 2, origin[2] + (nz - 0.5) * dz
    if z_first < z_model[0] - 30.0 or z_last > z_model[1] + 30.0:
        raise SpineInpaintError(
            f"the grid spans z = {z_first:.0f} to {z_last:.0f} mm but the phantom models only "
            f"{z_model[0]:.0f} to {z_model[1]:.0f} mm (hip joints to T10): use fewer or thinner slices"
        )
    if not any(ext[i][1][2] >= z_first and ext[i][0][2] <= z_last for i in levels):
        raise SpineInpaintError("the grid holds none of the requested levels (check origin and n_slices)")
    return _Grid((nz, ny, nx), (dxy, dxy, dz), origin)


def make_phantom(config: PhantomConfig | None = None, **overrides) -> Phantom:
    """Make a phantom CT of the thoracolumbar spine with its label map.

    Parameters
    ----------
    config
        The configuration (default :class:`PhantomConfig()`); ``overrides`` replace fields of it,
        e.g. ``make_phantom(seed=3, n_slices=40)``.

    Returns
    -------
    Phantom
        ``ct`` (int16 HU) and ``labels`` (uint8) on the same identity-direction grid, the pose of
        every vertebra and the config.

    Raises
    ------
    SpineInpaintError
        For an invalid config: empty or oversize grid, spacing out of range, unknown level,
        scoliosis beyond 20 degrees, a z extent the anatomy does not cover, ...
    """
    cfg = config if config is not None else PhantomConfig()
    if not isinstance(cfg, PhantomConfig):
        raise SpineInpaintError(f"config must be a PhantomConfig, got {type(cfg).__name__}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(PhantomConfig)}
        if unknown:
            raise SpineInpaintError(f"unknown phantom option(s): {', '.join(sorted(unknown))}")
        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    seeds = np.random.SeedSequence([int(cfg.seed), 20240611]).spawn(3)
    rng_geo, rng_tex, rng_noise = (np.random.default_rng(s) for s in seeds)

    verts, sacral = _build_spine(cfg, rng_geo)
    vprims = [_vertebra_prims(v, verts[i + 1] if i + 1 < len(verts) else None) for i, v in enumerate(verts)]
    sprims = _sacrum_prims(sacral, verts[0], plate=cfg.sacrum_plate)
    ext = {v.label: _vertebra_extent(pr[0]) for v, pr in zip(verts, vprims)}
    sac_lo, sac_hi = _vertebra_extent(sprims[0])
    # The "sacrum" level's field of view reaches 20 mm below the sacrum: the hip joints beside it.
    ext[25] = (sac_lo - np.array([0.0, 0.0, 20.0]), sac_hi)
    tips_y = max(max(e[1][1] for e in ext.values()), float(sac_hi[1]))
    layout = _make_layout(cfg, verts, sacral, tips_y, rng_geo)
    gap = float(rng_geo.uniform(4.0, 12.0))
    z_model = (float(sac_lo[2]) - 20.0, float(ext[verts[-1].label][1][2]))
    grid = _place_grid(cfg, layout, ext, z_model, layout.y_back + gap + 42.0)

    p = _Painter(cfg, grid, layout, rng_tex)
    p.table(gap)
    p.body()
    _paint_viscera(p, verts)
    _paint_vessels(p, verts)
    _paint_muscles(p, verts)
    _paint_canal(p, verts)
    p.drop_cache()
    for lo, up in zip(verts[:-1], verts[1:]):
        # annulus fibrosus, then the nucleus pulposus (a smaller, posterior footprint) inside it
        dhu = cfg.disc_hu - 0.5 * (_HU["annulus"] + _HU["nucleus"])
        for nucleus in (False, True):
            res = _rasterise(grid, _disc_prims(lo, up, nucleus), [], (0.0,), p.k, p.h)
            if res is not None:
                box, (f_disc,) = res
                _paint(p.ct, p.lab, box, f_disc, _HU["nucleus" if nucleus else "annulus"] + dhu,
                       None if nucleus else _L["intervertebral_disc"])
    # bones, the vertebrae last so that their labels win at the joints (sacro-iliac, costovertebral)
    z_crest = (_z_of(verts, "L4") + _z_of(verts, "L5")) / 2  # the intercristal line
    si_cuts = [_dilated(q, _SI_JOINT_GAP) for q in sprims[0] + vprims[0][0]] if cfg.sacroiliac_joint else []
    for side, label in ((1.0, _L["hip_left"]), (-1.0, _L["hip_right"])):
        il = [_ilium_prim(p, verts[0], side, z_crest, float(sac_lo[2]) - 20.0)]
        if cfg.sacroiliac_joint:
            il += _sacroiliac_prims(verts[0], sacral, side, cfg.sacrum_plate, cfg.vertebra_scale)
        p.bone(il, si_cuts, label, cfg.cortical_hu * 0.95, cfg.cancellous_hu * 0.9,
               cort_mm=max(cfg.cortical_mm, 1.2))
    # Hip joints below the sacrum, textured from their own random stream and kept below the lowest
    # slice (of at most 6 mm) a field of view ending at S1 can have: those phantoms, drawn before the
    # joints existed, keep every voxel.
    z_hip_top = float(ext[verts[0].label][0][2]) - _Z_MARGIN - 8.0
    shared_rng, p.rng = p.rng, np.random.default_rng([int(cfg.seed), 20261202])
    for side, femur, hip in ((1.0, _L["femur_left"], _L["hip_left"]), (-1.0, _L["femur_right"], _L["hip_right"])):
        head, cup = _hip_joint_prims(verts[0], float(sac_lo[2]), z_hip_top, side, cfg.vertebra_scale)
        p.bone([cup], [], hip, cfg.cortical_hu * 0.95, cfg.cancellous_hu * 0.9, cort_mm=max(cfg.cortical_mm, 1.2))
        p.bone(head, [], femur, cfg.cortical_hu * 0.9, cfg.cancellous_hu * 0.9, cort_mm=max(cfg.cortical_mm, 1.2))
    p.rng = shared_rng
    for v in verts:
        if v.name in ("T10", "T11", "T12"):
            number = int(v.name[1:])
            for side, base in ((1.0, 91), (-1.0, 103)):  # rib_left_n = 91 + n, rib_right_n = 103 + n
                rib, cart = _rib_prims(p, v, side, number)
                p.bone(rib, [], base + number, v.cortical_hu * 0.9, v.cancellous_hu, cort_mm=1.1)
                if cart:
                    p.soft(cart, [], _HU["cartilage"], _L["costal_cartilages"], clip=None, k=p.k)
    p.bone(sprims[0], sprims[1], _L["sacrum"], sacral[0].cortical_hu, sacral[0].cancellous_hu)
    for v, (prims, cuts) in zip(verts, vprims):
        p.bone(prims, cuts, v.label, v.cortical_hu, v.cancellous_hu)

    labels = p.lab
    ct = _scanner(p.ct, cfg, grid, rng_noise)
    del p
    geom = dict(spacing=grid.spacing, origin=grid.origin, direction=np.eye(3))
    centerline = tuple(
        SpineLevel(v.label, v.name, v.center.copy(), v.frame.copy(), v.dims["width"], v.dims["depth"],
                   v.dims["height"], v.dims["disc_above"] if i + 1 < len(verts) else 0.0)
        for i, v in enumerate(verts)
    )
    s2 = sacral[0]
    sacrum = SpineLevel(25, "sacrum", s2.center.copy(), s2.frame.copy(), s2.dims["width"], s2.dims["depth"],
                        s2.dims["height"], 0.0)
    centerline = (sacrum,) + centerline
    return Phantom(Volume(ct, **geom), Volume(labels, **geom), centerline, cfg)


# --------------------------------------------------------------------------------------------
# Tissue HU statistics (the same definitions on a real scan and on a phantom)
# --------------------------------------------------------------------------------------------
#: Fat window (HU) inside the body outline.
FAT_HU = (-190.0, -30.0)
#: Longest gap (mm) between two adjacent vertebra labels still counted as disc.
DISC_MAX_GAP_MM = 20.0


def _si_axis(volume: Volume) -> tuple[int, bool]:
    """Array axis (0 z, 1 y, 2 x) closest to the patient's S-I axis, and whether its index grows
    toward superior."""
    # direction columns are the LPS directions of the i, j, k (x, y, z) index axes
    s_component = volume.direction[2, :]
    ijk = int(np.argmax(np.abs(s_component)))
    return 2 - ijk, bool(s_component[ijk] > 0)


def body_outline(ct: Volume, threshold: float = -500.0) -> np.ndarray:
    """The patient's body: voxels above ``threshold`` HU in the largest connected component, with
    the holes (lungs, bowel gas) filled slice by slice across the S-I axis."""
    mask = ct.array > threshold
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    axis, _ = _si_axis(ct)
    body = np.moveaxis(body, axis, 0)
    for i in range(body.shape[0]):
        body[i] = ndimage.binary_fill_holes(body[i])
    return np.moveaxis(body, 0, axis)


def disc_mask(labels: Volume, max_gap_mm: float = DISC_MAX_GAP_MM) -> np.ndarray:
    """Intervertebral disc voxels defined from vertebra labels alone.

    For each pair of adjacent vertebrae (TotalSegmentator ids ``i`` and ``i + 1``, the latter
    cranial), walk along the array axis closest to the S-I axis: in each line that crosses both,
    the voxels strictly between the top of the lower vertebra and the bottom of the upper one are
    disc, when that gap is at most ``max_gap_mm`` and the voxel lies anterior to both vertebrae's
    centroids (which keeps the vertebral-body footprint and drops the gaps between laminae and
    spinous processes).
    """
    arr = labels.array
    axis, up = _si_axis(labels)
    step = labels.spacing_zyx[axis]
    out = np.zeros(arr.shape, dtype=bool)
    # LPS P coordinate of every voxel, as a broadcastable sum over the three index axes
    m = labels.direction @ np.diag(labels.spacing)
    p_parts = [(np.arange(n) * m[1, 2 - ax]).reshape([-1 if a == ax else 1 for a in range(3)])
               for ax, n in enumerate(arr.shape)]
    present = set(int(v) for v in np.unique(arr))
    for lo in range(25, 50):
        hi = lo + 1
        if lo not in present or hi not in present:
            continue
        m_lo, m_hi = arr == lo, arr == hi
        p_lo = labels.index_to_physical(np.argwhere(m_lo).mean(0))[0, 1]
        p_hi = labels.index_to_physical(np.argwhere(m_hi).mean(0))[0, 1]
        p_cut = min(p_lo, p_hi) - labels.origin[1]
        a_lo, a_hi = np.moveaxis(m_lo, axis, 0), np.moveaxis(m_hi, axis, 0)
        if not up:
            a_lo, a_hi = a_lo[::-1], a_hi[::-1]
        n = a_lo.shape[0]
        idx = np.arange(n).reshape(-1, 1, 1)
        top_lo = np.where(a_lo, idx, -1).max(0)
        bot_hi = np.where(a_hi, idx, n).min(0)
        gap = bot_hi - top_lo - 1
        ok = (top_lo >= 0) & (bot_hi < n) & (gap >= 1) & (gap * step <= max_gap_mm)
        sel = ok[None] & (idx > top_lo[None]) & (idx < bot_hi[None])
        if not up:
            sel = sel[::-1]
        sel = np.moveaxis(sel, 0, axis)
        p_rel = p_parts[0] + p_parts[1] + p_parts[2]
        out |= sel & (p_rel < p_cut)
    return out


def tissue_masks(ct: Volume, labels: Volume) -> dict[str, np.ndarray]:
    """Masks of the four reference tissues, defined the same way on any labelled CT.

    - ``bone``: the vertebra labels (TotalSegmentator ids 25-50, sacrum included);
    - ``disc``: :func:`disc_mask`;
    - ``muscle``: autochthon (86, 87) and iliopsoas (88, 89);
    - ``fat``: -190 to -30 HU inside :func:`body_outline`.
    """
    if not ct.same_grid(labels):
        raise SpineInpaintError("the CT and the label map must share one grid")
    lab = labels.array
    body = body_outline(ct)
    return {
        "bone": (lab >= 25) & (lab <= 50),
        "disc": disc_mask(labels),
        "muscle": np.isin(lab, _MUSCLE_IDS),
        "fat": body & (ct.array >= FAT_HU[0]) & (ct.array <= FAT_HU[1]),
    }


def tissue_hu_statistics(ct: Volume, labels: Volume) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and voxel count of HU in bone, disc, muscle and fat.

    See :func:`tissue_masks` for the definitions. Tissues with no voxel get NaN statistics.
    """
    values = ct.array
    out = {}
    for name, mask in tissue_masks(ct, labels).items():
        v = values[mask].astype(np.float64)
        out[name] = {"mean": float(v.mean()) if v.size else float("nan"),
                     "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}
    return out


def compare_with_real(phantom: Phantom, real_ct: Volume, real_labels: Volume) -> dict[str, dict[str, float]]:
    """HU statistics of a real scan and of a phantom resampled to the real scan's spacing.

    The phantom's CT is resampled linearly and its labels by nearest neighbour (``io.resample_to_spacing``),
    so both are measured at the same resolution with :func:`tissue_hu_statistics`.

    Returns
    -------
    dict
        ``{tissue: {"real_mean", "real_std", "phantom_mean", "phantom_std", "difference",
        "tolerance"}}`` where the tolerance is max(25 %% of the real mean, 25 HU).
    """
    ct_r = resample_to_spacing(phantom.ct, real_ct.spacing, default=-1000.0)
    lab_r = resample_to_spacing(phantom.labels, real_ct.spacing, labels=True)
    ct_r = ct_r.with_array(np.rint(ct_r.array).astype(np.int16))
    real = tissue_hu_statistics(real_ct, real_labels)
    phan = tissue_hu_statistics(ct_r, lab_r)
    out = {}
    for name in real:
        rm, pm = real[name]["mean"], phan[name]["mean"]
        out[name] = {"real_mean": rm, "real_std": real[name]["std"], "real_n": real[name]["n"],
                     "phantom_mean": pm, "phantom_std": phan[name]["std"], "phantom_n": phan[name]["n"],
                     "difference": pm - rm, "tolerance": max(0.25 * abs(rm), 25.0)}
    return out
