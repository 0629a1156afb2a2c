"""Domain randomisation that every trainer shares: one seeded 3D draw per case, before any slice or crop.

Our networks fit the phantoms and the one real scan they were trained on and fail on other scanners'
CT: dimmer (osteopenic) or brighter bone, other kernels, thick slices, cut fields of view, and
contrast-filled aorta, kidneys or dural sac that look like bone. :func:`randomise_domain` changes a
case's HU volume in 3D the way those scans differ, so that the segmentation (2.5D crops), detection
(2D slices) and GAN/inpainting (64x64 crops) trainers all see the same variety and none writes its own.

What is drawn (each with its own probability, :class:`DomainRandomisation`), in the order applied:

1. field-of-view crop: a random z range (cut at any level, keeping a spine slice) and in-plane cuts
   (never into the spine); labels are cropped alike and the origin moves so that every kept voxel
   keeps its LPS position;
2. intensity, one monotone mapping of HU: bone scaling (HU above ``bone_pivot_hu`` scaled about the
   pivot, so soft tissue and fat keep their values), a global scale and shift of a few per cent
   (MONAI ``ScaleIntensity``/``ShiftIntensity``), a gamma on a HU window (MONAI ``AdjustContrast``);
   evaluated once on every HU value and applied as a lookup table;
3. contrast-like bright structures (150-500 HU), painted in soft tissue and never on a vertebra label:
   an aorta-like tube in front of and left of the spine, kidney-like paired blobs lateral to it, a
   renal-pelvis/ureter tube, a myelogram-like dural sac; where the label map has the aorta (52),
   kidneys (2, 3) or spinal cord (79), those are brightened instead of a drawn shape;
4. slice thickness: a slice profile along z (Gaussian of the thickness as full width at half maximum),
   sampled at the thickness, then kept on that grid (labels by nearest neighbour) or put back;
5. in-plane resolution: each slice down-sampled and up-sampled (MONAI ``RandSimulateLowResolution``);
6. an in-plane Gaussian blur (soft kernels) or an unsharp mask (bone kernels);
7. Gaussian noise.

The output CT is always float32 HU (no clipping, no rounding: a trainer that caches int16 rounds).
The same draw can be applied to several volumes of one case (:func:`apply_domain`,
:func:`apply_geometry`, :func:`randomise_pair`, :func:`randomise_case`), so a lesioned CT and its
healthy truth stay aligned. Blur and noise use scipy/numpy rather than MONAI's ``GaussianSmooth`` and
``RandGaussianNoise``, which are 3-5x slower on a 512x512x150 volume on one CPU core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import vertebra_mask

__all__ = [
    "DomainRandomisation", "draw_domain", "apply_domain", "apply_geometry", "randomise_domain", "randomise_pair",
    "randomise_case", "domain_digest", "case_seed",
]

#: Label ids brightened instead of drawn shapes where present (TotalSegmentator v2: aorta, kidneys, cord).
AORTA, KIDNEY_RIGHT, KIDNEY_LEFT, SPINAL_CORD = 52, 2, 3, 79
#: HU range that a bright structure may overwrite: soft tissue and fat, neither air nor bone.
_PAINTABLE_HU = (-300.0, 250.0)
#: Soft edge of painted shapes (mm): a sharp voxel staircase would be a tell of the simulation.
_EDGE_MM = 1.5
_RECORD_VERSION = 1


# --- configuration --------------------------------------------------------------------------------
def _range(lo: float, hi: float) -> tuple[float, float]:
    return (float(lo), float(hi))


@dataclasses.dataclass(frozen=True)
class DomainRandomisation:
    """Probabilities (``*_probability``, each in [0, 1]) and ranges (``(low, high)``) of the draws.

    The defaults span the real CT we meet (see the module notes).

    Attributes
    ----------
    fov_z_probability, fov_z_min_mm, fov_xy_probability, fov_xy_max_cut, fov_margin_mm
        A z range of at least ``fov_z_min_mm`` around a random spine slice; in-plane, up to
        ``fov_xy_max_cut`` of the width off each side, never closer than ``fov_margin_mm`` to the spine.
    bone_probability, bone_scale, bone_pivot_hu
        HU above the pivot scaled about it (0.6-1.4 about 100 HU: a 230 HU vertebral body becomes
        180-280 HU, about 150-310 with the global scale and shift); fat and muscle keep their HU.
    global_probability, global_scale, global_shift_hu
        Scanner calibration: HU times 0.97-1.03 plus -20...20 HU.
    gamma_probability, gamma, gamma_window_hu
        A gamma of 0.7-1.5 on -200...1200 HU (the ends fixed, HU outside unchanged).
    aorta_probability, kidney_probability, ureter_probability, myelogram_probability, contrast_hu
        Contrast-like structures of 150-500 HU (kidneys at most 300, ureters at least 300).
    thickness_probability, thickness_mm, keep_thick_probability
        1-5 mm slices (only thicker than the scan's), kept on that grid in half of the draws.
    in_plane_probability, in_plane_zoom
        Slices down-sampled to 40-90 % of their pixels and back.
    blur_probability, blur_sigma_mm, sharpen_probability, sharpen_amount, sharpen_sigma_mm
        A soft kernel (Gaussian blur, sigma 0.2-1.2 mm in-plane) or, if none, a bone kernel (unsharp
        mask, amount 0.3-1 of a 0.5-1.5 mm blur).
    noise_probability, noise_std_hu
        Gaussian noise of 0-30 HU standard deviation.
    """

    fov_z_probability: float = 0.3
    fov_z_min_mm: float = 40.0
    fov_xy_probability: float = 0.2
    fov_xy_max_cut: float = 0.2
    fov_margin_mm: float = 10.0
    bone_probability: float = 0.8
    bone_scale: tuple[float, float] = (0.6, 1.4)
    bone_pivot_hu: float = 100.0
    global_probability: float = 0.5
    global_scale: tuple[float, float] = (0.97, 1.03)
    global_shift_hu: tuple[float, float] = (-20.0, 20.0)
    gamma_probability: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_window_hu: tuple[float, float] = (-200.0, 1200.0)
    aorta_probability: float = 0.4
    kidney_probability: float = 0.3
    ureter_probability: float = 0.2
    myelogram_probability: float = 0.1
    contrast_hu: tuple[float, float] = (150.0, 500.0)
    thickness_probability: float = 0.3
    thickness_mm: tuple[float, float] = (1.0, 5.0)
    keep_thick_probability: float = 0.5
    in_plane_probability: float = 0.25
    in_plane_zoom: tuple[float, float] = (0.4, 0.9)
    blur_probability: float = 0.25
    blur_sigma_mm: tuple[float, float] = (0.2, 1.2)
    sharpen_probability: float = 0.2
    sharpen_amount: tuple[float, float] = (0.3, 1.0)
    sharpen_sigma_mm: tuple[float, float] = (0.5, 1.5)
    noise_probability: float = 0.6
    noise_std_hu: tuple[float, float] = (0.0, 30.0)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_probability"):
                if not 0.0 <= float(value) <= 1.0:
                    raise SpineInpaintError(f"domain randomisation: {field.name} must be in [0, 1], got {value}")
            elif isinstance(value, tuple | list):
                if len(value) != 2 or float(value[0]) > float(value[1]):
                    raise SpineInpaintError(f"domain randomisation: {field.name} must be a (low, high) range "
                                            f"with low <= high, got {value}")
                if field.name not in ("global_shift_hu", "gamma_window_hu") and float(value[0]) < 0:
                    raise SpineInpaintError(f"domain randomisation: {field.name} must not be negative, got {value}")
                object.__setattr__(self, field.name, _range(*value))
            elif field.name != "bone_pivot_hu" and float(value) < 0:
                raise SpineInpaintError(f"domain randomisation: {field.name} must not be negative, got {value}")
        if self.fov_xy_max_cut >= 0.5:
            raise SpineInpaintError(f"domain randomisation: fov_xy_max_cut must be < 0.5, got {self.fov_xy_max_cut}")
        if self.in_plane_zoom[0] <= 0 or self.in_plane_zoom[1] > 1 or self.gamma[0] <= 0:
            raise SpineInpaintError("domain randomisation: in_plane_zoom must lie in (0, 1] and gamma be > 0, got "
                                    f"{self.in_plane_zoom} and {self.gamma}")
        if self.thickness_mm[0] <= 0:
            raise SpineInpaintError(f"domain randomisation: thickness_mm must be > 0, got {self.thickness_mm}")

    @classmethod
    def off(cls, **changes) -> DomainRandomisation:
        """Every probability 0, then ``changes`` (e.g. ``off(noise_probability=1.0)`` for noise alone)."""
        zero = {f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_probability")}
        return cls(**{**zero, **changes})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def domain_digest(config: DomainRandomisation | None) -> str:
    """Short hash of a configuration (``'off'`` for ``None``): names caches of randomised samples."""
    if config is None:
        return "off"
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def case_seed(*parts: object) -> int:
    """A 31-bit seed from any labels (trainer seed, epoch, case id): stable across runs and processes."""
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _seed_of(rng_or_seed: np.random.Generator | int | Sequence[int]) -> int:
    if isinstance(rng_or_seed, np.random.Generator):
        return int(rng_or_seed.integers(0, 2**31 - 1))
    if isinstance(rng_or_seed, int | np.integer):
        return int(rng_or_seed)
    return int(np.random.SeedSequence([int(s) for s in rng_or_seed]).generate_state(1)[0] & 0x7FFFFFFF)


# --- geometry helpers ------------------------------------------------------------------------------
def _spine_slices(spine: np.ndarray) -> np.ndarray:
    return np.nonzero(spine.reshape(spine.shape[0], -1).any(axis=1))[0]


def _in_plane_axes(volume: io.Volume) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) voxel steps of 1 mm anterior and 1 mm patient-left (LPS -y and +x)."""
    sx, sy, _ = volume.spacing
    d = volume.direction
    anterior, left = np.array([0.0, -1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    return (np.array([anterior @ d[:, 1] / sy, anterior @ d[:, 0] / sx]),
            np.array([left @ d[:, 1] / sy, left @ d[:, 0] / sx]))


def _caudal_step(volume: io.Volume) -> int:
    """+1 when increasing z index goes towards the feet (LPS z down), else -1."""
    return 1 if volume.direction[2, 2] < 0 else -1


def _spine_centres(spine: np.ndarray) -> np.ndarray | None:
    """(z, 2) in-plane centroid (row, column) of the vertebra labels on every slice, interpolated between."""
    slices = _spine_slices(spine)
    if slices.size == 0:
        return None
    cents = np.array([np.argwhere(spine[z]).mean(axis=0) for z in slices])
    z = np.arange(spine.shape[0])
    return np.stack([np.interp(z, slices, cents[:, 0]), np.interp(z, slices, cents[:, 1])], axis=1)


# --- drawing --------------------------------------------------------------------------------------
def _draw_fov(rng: np.random.Generator, config: DomainRandomisation, spine: np.ndarray,
              spacing: tuple[float, float, float]) -> list[list[int]] | None:
    """``[[z0, z1], [y0, y1], [x0, x1]]`` (end exclusive) of the kept block, or None."""
    n, rows, cols = spine.shape
    fire_z, fire_xy = rng.random() < config.fov_z_probability, rng.random() < config.fov_xy_probability
    u_len, u_pos, cuts = rng.random(), rng.random(), rng.uniform(0.0, config.fov_xy_max_cut, 4)
    box = [[0, n], [0, rows], [0, cols]]
    slices = _spine_slices(spine)
    if fire_z:
        min_len = min(n, max(2, math.ceil(config.fov_z_min_mm / spacing[2])))
        length = min_len + int(u_len * (n - min_len + 1))
        keep = int(slices[int(u_pos * slices.size)]) if slices.size else n // 2
        lo, hi = max(0, keep - length + 1), min(keep, n - length)
        z0 = lo + int(rng.random() * (hi - lo + 1)) if hi >= lo else 0
        box[0] = [z0, min(n, z0 + length)]
    if fire_xy:
        if slices.size:
            rr, cc = np.nonzero(spine.any(axis=0))
            inner = [(rr.min(), rr.max() + 1), (cc.min(), cc.max() + 1)]
        else:
            inner = [(rows // 2, rows // 2 + 1), (cols // 2, cols // 2 + 1)]
        for axis, (size, (a, b), step) in enumerate(zip((rows, cols), inner, (spacing[1], spacing[0]))):
            margin = int(math.ceil(config.fov_margin_mm / step))
            start = min(int(cuts[2 * axis] * size), max(0, a - margin))
            stop = max(size - int(cuts[2 * axis + 1] * size), min(size, b + margin))
            box[axis + 1] = [start, stop]
    return box if box != [[0, n], [0, rows], [0, cols]] else None


def _draw_structures(rng: np.random.Generator, config: DomainRandomisation, labels: np.ndarray) -> list[dict]:
    """Parameters of the bright structures (positions relative to the spine, in mm)."""
    present = {v for v in (AORTA, KIDNEY_RIGHT, KIDNEY_LEFT, SPINAL_CORD) if np.any(labels == v)}
    hu = lambda: float(rng.uniform(*config.contrast_hu))  # noqa: E731
    out: list[dict] = []
    fire = rng.random(4) < np.array([config.aorta_probability, config.kidney_probability,
                                     config.ureter_probability, config.myelogram_probability])
    aorta = {"kind": "aorta", "hu": hu(), "anterior_mm": float(rng.uniform(30, 50)),
             "left_mm": float(rng.uniform(10, 25)), "radius_mm": float(rng.uniform(8, 14)),
             "wobble_mm": float(rng.uniform(0, 4)), "phase": float(rng.uniform(0, 2 * math.pi)),
             "extent_fraction": float(rng.uniform(0.5, 1.0))}
    kidney = {"kind": "kidneys", "hu": float(rng.uniform(config.contrast_hu[0], min(300.0, config.contrast_hu[1]))),
              "lateral_mm": float(rng.uniform(55, 80)), "anterior_mm": float(rng.uniform(-5, 20)),
              "semi_axes_mm": [float(rng.uniform(45, 60)), float(rng.uniform(20, 28)), float(rng.uniform(25, 35))],
              "centre_fraction": float(rng.uniform(0.2, 0.8)), "cortex_only": bool(rng.random() < 0.5),
              "offset_mm": float(rng.uniform(-15, 15))}
    ureter = {"kind": "ureter", "hu": float(rng.uniform(max(300.0, config.contrast_hu[0]), config.contrast_hu[1])),
              "side": int(rng.choice([-1, 1])), "start_lateral_mm": float(rng.uniform(35, 50)),
              "end_lateral_mm": float(rng.uniform(25, 40)), "anterior_mm": float(rng.uniform(-5, 15)),
              "radius_mm": float(rng.uniform(2, 4)), "start_fraction": float(rng.uniform(0.3, 0.9))}
    myelo = {"kind": "myelogram", "hu": hu(), "dilate_mm": float(rng.uniform(1.5, 4.0))}
    if fire[0]:
        out.append({**aorta, "from_label": AORTA in present})
    if fire[1]:
        out.append({**kidney, "from_label": bool({KIDNEY_RIGHT, KIDNEY_LEFT} & present)})
    if fire[2]:
        out.append(ureter)
    if fire[3]:
        out.append({**myelo, "from_label": SPINAL_CORD in present})
    return out


def draw_domain(ct: io.Volume, labels: io.Volume, rng_or_seed: np.random.Generator | int | Sequence[int],
                config: DomainRandomisation | None = None) -> dict:
    """Draw one randomisation for a case; JSON-ready, with its ``seed``; apply it with :func:`apply_domain`."""
    config = DomainRandomisation() if config is None else config
    if ct.shape != labels.shape:
        raise SpineInpaintError(f"CT {ct.shape} and labels {labels.shape} differ in shape")
    seed = _seed_of(rng_or_seed)
    rng = np.random.default_rng(seed)
    spine = vertebra_mask(labels.array)
    record: dict = {"version": _RECORD_VERSION, "seed": seed, "config": domain_digest(config),
                    "input_shape_zyx": list(ct.shape), "input_spacing_xyz": list(ct.spacing)}
    record["fov_zyx"] = _draw_fov(rng, config, spine, ct.spacing)
    # Every draw takes its numbers whether it fires or not: one probability changed leaves the others' draws.
    fires, value = rng.random() < config.bone_probability, float(rng.uniform(*config.bone_scale))
    record["bone_scale"] = value if fires else None
    fires, scale, shift = (rng.random() < config.global_probability, float(rng.uniform(*config.global_scale)),
                           float(rng.uniform(*config.global_shift_hu)))
    record["global_scale"], record["global_shift_hu"] = (scale, shift) if fires else (None, None)
    fires, value = rng.random() < config.gamma_probability, float(rng.uniform(*config.gamma))
    record["gamma"] = value if fires else None
    record["bone_pivot_hu"] = float(config.bone_pivot_hu)
    record["gamma_window_hu"] = list(config.gamma_window_hu)
    record["structures"] = _draw_structures(rng, config, labels.array)
    fires, t, keep = rng.random() < config.thickness_probability, rng.uniform(*config.thickness_mm), rng.random()
    record["slice_thickness_mm"] = float(t) if fires and t > 1.05 * ct.spacing[2] else None
    record["keep_thick"] = bool(record["slice_thickness_mm"] and keep < config.keep_thick_probability)
    fires, zoom = rng.random() < config.in_plane_probability, rng.uniform(*config.in_plane_zoom)
    record["in_plane_zoom"] = float(zoom) if fires else None
    record["resample_seed"] = int(rng.integers(0, 2**31 - 1))
    blur, sigma = rng.random() < config.blur_probability, rng.uniform(*config.blur_sigma_mm)
    sharpen, amount, s_sigma = (rng.random() < config.sharpen_probability, rng.uniform(*config.sharpen_amount),
                                rng.uniform(*config.sharpen_sigma_mm))
    record["blur_sigma_mm"] = float(sigma) if blur and sigma > 0 else None
    # A blurred scan is not also sharpened: one reconstruction kernel per scan.
    record["sharpen"] = {"amount": float(amount), "sigma_mm": float(s_sigma)} \
        if sharpen and not record["blur_sigma_mm"] and s_sigma > 0 else None
    fires, std = rng.random() < config.noise_probability, rng.uniform(*config.noise_std_hu)
    record["noise_std_hu"] = float(std) if fires and std > 0 else None
    record["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    return record


# --- applying: geometry ---------------------------------------------------------------------------
def _crop(volume: io.Volume, box: list[list[int]] | None) -> io.Volume:
    if box is None:
        return volume
    (z0, z1), (y0, y1), (x0, x1) = box
    origin = np.asarray(volume.index_to_physical([z0, y0, x0]), float).reshape(-1)[:3]
    return io.Volume(volume.array[z0:z1, y0:y1, x0:x1], volume.spacing, tuple(origin), volume.direction.copy())


def _thick_positions(n: int, spacing_z: float, thickness: float) -> np.ndarray:
    """Old z indices of the slices of a ``thickness`` grid starting at the first slice."""
    count = int(math.floor((n - 1) * spacing_z / thickness + 1e-6)) + 1
    return np.arange(count) * (thickness / spacing_z)


def _linear_z(n: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n) matrix of linear interpolation along z at fractional indices (clamped)."""
    positions = np.clip(positions, 0, n - 1)
    i0 = np.minimum(np.floor(positions).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = positions - i0
    m = np.zeros((len(positions), n))
    np.add.at(m, (np.arange(len(positions)), i0), 1.0 - w)
    np.add.at(m, (np.arange(len(positions)), i1), w)
    return m


def _thick_grid(volume: io.Volume, record: dict) -> io.Volume:
    """A label or mask volume on the kept thick-slice grid (nearest slice), else unchanged."""
    if not record.get("keep_thick"):
        return volume
    positions = _thick_positions(volume.shape[0], volume.spacing[2], record["slice_thickness_mm"])
    sx, sy, _ = volume.spacing
    return io.Volume(volume.array[np.rint(positions).astype(int)], (sx, sy, record["slice_thickness_mm"]),
                     volume.origin, volume.direction.copy())


def apply_geometry(volume: io.Volume, record: dict) -> io.Volume:
    """The geometric part of a draw (field-of-view crop, kept thick slices) on a label or mask volume."""
    return _thick_grid(_crop(volume, record["fov_zyx"]), record)


# --- applying: intensity --------------------------------------------------------------------------
def _intensity_curve(values: np.ndarray, record: dict) -> np.ndarray:
    """The monotone HU mapping of a draw (bone scaling, global scale/shift, gamma) at ``values``."""
    from monai.transforms import AdjustContrast, ScaleIntensity, ShiftIntensity

    y = values.astype(np.float32)
    if record["bone_scale"] is not None:
        pivot = record["bone_pivot_hu"]
        y = np.where(y > pivot, pivot + (y - pivot) * record["bone_scale"], y).astype(np.float32)
    if record["global_scale"] is not None:
        y = np.asarray(ScaleIntensity(minv=None, maxv=None, factor=record["global_scale"] - 1.0)(y[None]))[0]
        y = np.asarray(ShiftIntensity(record["global_shift_hu"])(y[None]))[0]
    if record["gamma"] is not None:
        lo, hi = record["gamma_window_hu"]
        # The window's ends travel with the values so that MONAI's min-max normalisation is the window.
        window = np.concatenate([[lo, hi], np.clip(y, lo, hi)]).astype(np.float32)
        adjusted = np.asarray(AdjustContrast(record["gamma"])(window[None]))[0][2:]
        y = y - np.clip(y, lo, hi) + adjusted
    return np.asarray(y, np.float32)


def _apply_intensity(array: np.ndarray, record: dict) -> np.ndarray:
    if record["bone_scale"] is None and record["global_scale"] is None and record["gamma"] is None:
        return array.astype(np.float32)
    lo, hi = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer) and int(hi) - int(lo) < 2**16:
        # Integer HU: the mapping evaluated once per value, applied as a lookup table.
        table = _intensity_curve(np.arange(int(lo), int(hi) + 1), record)
        return table[np.subtract(array, int(lo), dtype=np.int32)]
    knots = np.arange(math.floor(float(lo)), math.ceil(float(hi)) + 2, dtype=np.float64)
    return np.interp(array, knots, _intensity_curve(knots, record)).astype(np.float32)


# --- applying: bright structures ------------------------------------------------------------------
def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of a mask (``margin`` voxels wider, within the array), None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return tuple(box)


class _Paintable:
    """Where a bright structure may go, evaluated per box: soft tissue or fat, off the spine, unprotected."""

    def __init__(self, array: np.ndarray, spine: np.ndarray, protect: np.ndarray | None):
        self.array, self.protect = array, protect
        self.near_spine = np.zeros(spine.shape, bool)
        box = _bbox(spine, margin=1)
        if box is not None:
            # One voxel of margin around the vertebrae: partial-volume edges are bone too.
            self.near_spine[box] = ndimage.binary_dilation(spine[box], np.ones((1, 3, 3), bool))

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        lo, hi = _PAINTABLE_HU
        values = self.array[box]
        ok = (values > lo) & (values < hi) & ~self.near_spine[box]
        return ok if self.protect is None else ok & ~self.protect[box]


def _paint(array: np.ndarray, weight: np.ndarray, box: tuple[slice, ...], hu: float, allowed: _Paintable) -> None:
    """``array[box]`` moved towards ``hu`` by ``weight`` (0-1) where ``allowed``, in place."""
    w = np.where(allowed[box], weight, 0.0).astype(np.float32)
    region = array[box]
    region += w * (np.float32(hu) - region)


def _tube_weight(centres: np.ndarray, radius_mm: float, shape_yx: tuple[int, int],
                 spacing_yx: tuple[float, float]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Soft disc of ``radius_mm`` around each slice's (row, column) centre, in its in-plane bounding box."""
    reach = radius_mm + 2 * _EDGE_MM
    r0 = max(0, int(np.floor(centres[:, 0].min() - reach / spacing_yx[0])))
    r1 = min(shape_yx[0], int(np.ceil(centres[:, 0].max() + reach / spacing_yx[0])) + 1)
    c0 = max(0, int(np.floor(centres[:, 1].min() - reach / spacing_yx[1])))
    c1 = min(shape_yx[1], int(np.ceil(centres[:, 1].max() + reach / spacing_yx[1])) + 1)
    if r1 <= r0 or c1 <= c0:
        return np.zeros((len(centres), 0, 0), np.float32), (slice(0, 0), slice(0, 0))
    rows = (np.arange(r0, r1)[None, :, None] - centres[:, 0, None, None]) * spacing_yx[0]
    cols = (np.arange(c0, c1)[None, None, :] - centres[:, 1, None, None]) * spacing_yx[1]
    d = np.sqrt(rows ** 2 + cols ** 2)
    return np.clip((radius_mm - d) / _EDGE_MM + 0.5, 0.0, 1.0).astype(np.float32), (slice(r0, r1), slice(c0, c1))


def _paint_tube(array, allowed, centres, z_range, radius_mm, hu, spacing_yx) -> None:
    z0, z1 = z_range
    if z1 <= z0:
        return
    weight, (rr, cc) = _tube_weight(centres[z0:z1], radius_mm, array.shape[1:], spacing_yx)
    if weight.size:
        _paint(array, weight, (slice(z0, z1), rr, cc), hu, allowed)


def _paint_label(array, allowed: _Paintable, labels: np.ndarray, ids: tuple[int, ...], hu: float,
                 dilate: int = 0) -> None:
    """Brighten a labelled organ (``dilate`` voxels wider in-plane), with a soft one-voxel edge."""
    mask = labels == ids[0]
    for v in ids[1:]:
        mask |= labels == v
    box = _bbox(mask, margin=dilate + 1)
    if box is None:
        return
    mask = mask[box]
    if dilate:
        mask = ndimage.binary_dilation(mask, np.ones((1, 3, 3), bool), iterations=dilate)
    weight = ndimage.uniform_filter(mask.astype(np.float32), size=(1, 3, 3))
    _paint(array, np.maximum(weight, mask), box, hu, allowed)


def _paint_kidneys(array, allowed, centres, s: dict, spacing, anterior, left, caudal) -> None:
    n, rows, cols = array.shape
    sz, sy, sx = spacing
    zc = s["centre_fraction"] * (n - 1)
    az, ar, ac = s["semi_axes_mm"]
    for side in (-1, 1):
        z = zc + side * caudal * s["offset_mm"] / (2 * sz)  # the right kidney sits a little lower
        rc = centres[int(np.clip(round(z), 0, n - 1))] + anterior * s["anterior_mm"] + left * side * s["lateral_mm"]
        box = [(int(np.floor(c - (a + 2 * _EDGE_MM) / step)), int(np.ceil(c + (a + 2 * _EDGE_MM) / step)) + 1)
               for c, a, step in ((z, az, sz), (rc[0], ar, sy), (rc[1], ac, sx))]
        box = [(max(0, a), min(size, b)) for (a, b), size in zip(box, (n, rows, cols))]
        if any(b <= a for a, b in box):
            continue
        grids = np.meshgrid(*[(np.arange(a, b) - c) * step for (a, b), c, step in
                              zip(box, (z, rc[0], rc[1]), (sz, sy, sx))], indexing="ij", sparse=True)
        d = np.sqrt((grids[0] / az) ** 2 + (grids[1] / ar) ** 2 + (grids[2] / ac) ** 2)
        weight = np.clip((1.0 - d) * min(ar, ac) / _EDGE_MM + 0.5, 0.0, 1.0)
        if s["cortex_only"]:
            weight = weight * (1.0 - np.clip((0.7 - d) * min(ar, ac) / _EDGE_MM + 0.5, 0.0, 1.0))
        _paint(array, weight.astype(np.float32), tuple(slice(a, b) for a, b in box), s["hu"], allowed)


def _canal_tube(spine: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(z, 2) centres and radius (voxels) of the spinal canal: the holes of the vertebra labels."""
    found, radii = [], []
    for z in _spine_slices(spine):
        hole = ndimage.binary_fill_holes(spine[z]) & ~spine[z]
        if hole.sum() >= 4:
            found.append((z, *np.argwhere(hole).mean(axis=0)))
            radii.append(math.sqrt(hole.sum() / math.pi))
    if not found:
        return None
    f = np.array(found)
    z = np.arange(spine.shape[0])
    return np.stack([np.interp(z, f[:, 0], f[:, 1]), np.interp(z, f[:, 0], f[:, 2])], axis=1), float(np.median(radii))


def _apply_structures(array: np.ndarray, labels: np.ndarray, volume: io.Volume, structures: list[dict],
                      protect: np.ndarray | None) -> None:
    if not structures:
        return
    spine = vertebra_mask(labels)
    allowed = _Paintable(array, spine, protect)
    spine_box = _bbox(spine)
    centres = None
    if spine_box is not None:
        inner = _spine_centres(spine[:, spine_box[1], spine_box[2]])
        centres = inner + np.array([spine_box[1].start, spine_box[2].start])
    spacing_yx = (volume.spacing[1], volume.spacing[0])
    anterior, left = _in_plane_axes(volume)
    caudal = _caudal_step(volume)
    n = array.shape[0]
    for s in structures:
        kind = s["kind"]
        if s.get("from_label"):
            ids = {"aorta": (AORTA,), "kidneys": (KIDNEY_RIGHT, KIDNEY_LEFT), "myelogram": (SPINAL_CORD,)}[kind]
            # The dural sac around the cord; the vertebrae bound it (they are never painted).
            dilate = max(1, round(s["dilate_mm"] / min(spacing_yx))) if kind == "myelogram" else 0
            _paint_label(array, allowed, labels, ids, s["hu"], dilate)
            continue
        if centres is None:
            continue
        if kind == "aorta":
            z_mm = np.arange(n) * volume.spacing[2]
            wobble = s["wobble_mm"] * np.sin(z_mm / 60.0 + s["phase"])
            path = centres + anterior * s["anterior_mm"] + np.outer(s["left_mm"] + wobble, left)
            # From the cranial end down to a drawn height (where a real aorta divides, near L4).
            length = max(1, int(round(s["extent_fraction"] * n)))
            _paint_tube(array, allowed, path, (0, length) if caudal > 0 else (n - length, n), s["radius_mm"], s["hu"],
                        spacing_yx)
        elif kind == "kidneys":
            _paint_kidneys(array, allowed, centres, s, volume.spacing_zyx, anterior, left, caudal)
        elif kind == "ureter":
            # From the kidney's level towards the feet, drifting medially.
            start, idx = int(round(s["start_fraction"] * (n - 1))), np.arange(n)
            z0, z1 = (start, n) if caudal > 0 else (0, start + 1)
            t = np.clip((idx - start) / max(1, n - 1 - start) if caudal > 0 else (start - idx) / max(1, start), 0, 1)
            lateral = s["start_lateral_mm"] + (s["end_lateral_mm"] - s["start_lateral_mm"]) * t
            path = centres + anterior * s["anterior_mm"] + np.outer(s["side"] * lateral, left)
            _paint_tube(array, allowed, path, (z0, z1), s["radius_mm"], s["hu"], spacing_yx)
        elif kind == "myelogram":
            canal = _canal_tube(spine[:, spine_box[1], spine_box[2]])
            if canal is not None:
                slices = np.arange(spine_box[0].start, spine_box[0].stop)
                radius_mm = 0.8 * canal[1] * min(spacing_yx)
                path = canal[0] + np.array([spine_box[1].start, spine_box[2].start])
                _paint_tube(array, allowed, path, (int(slices[0]), int(slices[-1]) + 1), radius_mm, s["hu"], spacing_yx)


# --- applying: resolution, kernels, noise ---------------------------------------------------------
def _apply_thickness(array: np.ndarray, spacing_z: float, record: dict) -> np.ndarray:
    thickness = record["slice_thickness_mm"]
    n = array.shape[0]
    if not thickness or n < 2:
        return array
    # The scan's own slices already have about their spacing as profile.
    sigma = math.sqrt(max(thickness ** 2 - spacing_z ** 2, 0.0)) / (2 * math.sqrt(2 * math.log(2))) / spacing_z
    profile = ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="nearest") if sigma > 0.05 else np.eye(n)
    positions = _thick_positions(n, spacing_z, thickness)
    operator = _linear_z(n, positions) @ profile
    if not record["keep_thick"]:
        operator = _linear_z(len(positions), np.arange(n) * (spacing_z / thickness)) @ operator
    # Profile, sampling and return to the grid are linear along z: one matrix product (BLAS) for all three.
    out = operator.astype(np.float32) @ array.reshape(n, -1)
    return out.reshape((operator.shape[0],) + array.shape[1:])


def _apply_in_plane(array: np.ndarray, record: dict) -> np.ndarray:
    zoom = record["in_plane_zoom"]
    if zoom is None or min(array.shape[1:]) < 4:
        return array
    from monai.transforms import RandSimulateLowResolution

    # The slices are MONAI's channels: the down/up sampling is 2D, in-plane only.
    transform = RandSimulateLowResolution(prob=1.0, downsample_mode="area", upsample_mode="bilinear",
                                          zoom_range=(zoom, zoom))
    transform.set_random_state(seed=record["resample_seed"])
    return np.asarray(transform(array).detach().cpu().numpy(), np.float32)


def _apply_kernel(array: np.ndarray, spacing_yx: tuple[float, float], record: dict) -> np.ndarray:
    if record["blur_sigma_mm"]:
        s = record["blur_sigma_mm"]
        return ndimage.gaussian_filter(array, (0.0, s / spacing_yx[0], s / spacing_yx[1]), mode="nearest")
    if record["sharpen"]:
        s, amount = record["sharpen"]["sigma_mm"], record["sharpen"]["amount"]
        smooth = ndimage.gaussian_filter(array, (0.0, s / spacing_yx[0], s / spacing_yx[1]), mode="nearest")
        # array + amount * (array - smooth), in place on the blurred copy (no full-size temporaries).
        smooth -= array
        smooth *= np.float32(-amount)
        smooth += array
        return smooth
    return array


def _apply_noise(array: np.ndarray, record: dict) -> np.ndarray:
    std = record["noise_std_hu"]
    if not std:
        return array
    noise = np.random.default_rng(record["noise_seed"]).standard_normal(array.shape, dtype=np.float32)
    noise *= np.float32(std)
    array += noise
    return array


def apply_domain(ct: io.Volume, labels: io.Volume, record: dict, *,
                 protect: np.ndarray | None = None) -> tuple[io.Volume, io.Volume]:
    """Apply a draw of :func:`draw_domain` to a CT (float32 HU out) and its labels (cropped/resampled only).

    ``protect`` (bool, the CT's grid) marks voxels that no bright structure may paint (a lesion).
    Inputs are never changed.
    """
    if ct.shape != labels.shape:
        raise SpineInpaintError(f"CT {ct.shape} and labels {labels.shape} differ in shape")
    if list(ct.shape) != record["input_shape_zyx"]:
        raise SpineInpaintError(f"this draw is for a {tuple(record['input_shape_zyx'])} volume, not {ct.shape}")
    ct_c, labels_c = _crop(ct, record["fov_zyx"]), _crop(labels, record["fov_zyx"])
    protect_c = None if protect is None else _crop(ct.with_array(np.asarray(protect, bool)), record["fov_zyx"]).array
    array = _apply_intensity(ct_c.array, record)
    _apply_structures(array, labels_c.array, ct_c, record["structures"], protect_c)
    array = _apply_thickness(array, ct_c.spacing[2], record)
    array = _apply_in_plane(array, record)
    array = _apply_kernel(array, (ct_c.spacing[1], ct_c.spacing[0]), record)
    array = _apply_noise(np.ascontiguousarray(array, np.float32), record)
    out_labels = _thick_grid(labels_c, record)
    out = io.Volume(array, out_labels.spacing, out_labels.origin, out_labels.direction.copy())
    return out, io.Volume(np.ascontiguousarray(out_labels.array), out_labels.spacing, out_labels.origin,
                          out_labels.direction.copy())


# --- the entry points ------------------------------------------------------------------------------
def randomise_domain(ct: io.Volume, labels: io.Volume, rng_or_seed: np.random.Generator | int | Sequence[int],
                     config: DomainRandomisation | None = None, *,
                     protect: np.ndarray | None = None) -> tuple[io.Volume, io.Volume, dict]:
    """Draw and apply one domain randomisation: ``(ct float32 HU, labels, record)``.

    The same seed gives the same output; ``record`` (JSON-ready) holds the seed and every drawn value.
    ``protect`` marks voxels no bright structure may paint. The inputs are not changed.
    """
    record = draw_domain(ct, labels, rng_or_seed, config)
    out, out_labels = apply_domain(ct, labels, record, protect=protect)
    return out, out_labels, record


def randomise_pair(ct: io.Volume, healthy_ct: io.Volume, labels: io.Volume,
                   rng_or_seed: np.random.Generator | int | Sequence[int], config: DomainRandomisation | None = None,
                   *, protect: np.ndarray | None = None) -> tuple[io.Volume, io.Volume, io.Volume, dict]:
    """One draw applied to a case's CT and its healthy CT: ``(ct, healthy_ct, labels, record)``.

    Voxels where the two differ (the lesion) are protected from painting, so outside the lesion and
    the reach of the spatial filters (blur, slice profile, resampling) both outputs are equal.
    """
    if not ct.same_grid(healthy_ct):
        raise SpineInpaintError("the CT and its healthy CT must share one grid")
    differ = np.asarray(ct.array != healthy_ct.array)
    if protect is not None:
        differ = differ | np.asarray(protect, bool)
    protect = ndimage.binary_dilation(differ, np.ones((1, 3, 3), bool)) if differ.any() else None
    record = draw_domain(healthy_ct, labels, rng_or_seed, config)
    out, out_labels = apply_domain(ct, labels, record, protect=protect)
    healthy, _ = apply_domain(healthy_ct, labels, record, protect=protect)
    return out, healthy, out_labels, record


def randomise_case(case, rng_or_seed: np.random.Generator | int | Sequence[int],
                   config: DomainRandomisation | None = None):
    """A :class:`SpineInpaintLib.data.cases.Case` with one draw applied to its CT, healthy CT, labels and masks.

    The lesion becomes a plain namespace (type, level, ``lesion_mask``, ``bone_destroyed``, ``mask``)
    on the new grid; ``info['mask']`` is the lesion mask widened to every voxel where the two CTs now
    differ (blur spreads a lesion's edge), and ``info['domain_randomisation']`` the record.
    """
    from SpineInpaintLib.data.cases import Case, mask_boxes_2d

    mask = np.asarray(case.lesion_mask, bool)
    ct, healthy, labels, record = randomise_pair(case.ct, case.healthy_ct, case.labels, rng_or_seed, config,
                                                 protect=mask if mask.any() else None)
    new_mask = apply_geometry(case.ct.with_array(mask.astype(np.uint8)), record).array.astype(bool)
    new_mask |= np.abs(ct.array - healthy.array) > 0.5
    lesion = case.lesion
    if lesion is not None:
        lesion = types.SimpleNamespace(
            lesion_type=lesion.lesion_type, destructive=lesion.destructive, level=lesion.level,
            seed=getattr(lesion, "seed", case.seed), params=getattr(lesion, "params", {}), ct=ct, healthy_ct=healthy,
            healthy_labels=labels, mask=ct.with_array(new_mask.astype(np.uint8)),
            lesion_mask=apply_geometry(lesion.lesion_mask, record),
            bone_destroyed=apply_geometry(lesion.bone_destroyed, record), boxes_2d=mask_boxes_2d(new_mask),
            manifest=getattr(lesion, "manifest", dict))
    info = {**case.info, "mask": new_mask.astype(np.uint8), "domain_randomisation": record}
    return Case(case.case_id, ct, healthy, labels, lesion, case.source, case.seed, info)
