"""Training and evaluation data built from phantoms, the real scans and the lesion simulator.

A *case* is one CT volume with its healthy truth: the (possibly lesioned) CT, the healthy CT, the
vertebra labels and, when a lesion was simulated, the :class:`~SpineInpaintLib.lesions.SimulatedLesion`.
From cases this module builds

- 2D axial slice samples (image, spine mask, per-level labels, lesion boxes), in memory;
- DeepLesion-format folders (16-bit PNG + ``DL_info.csv``), so the DeepLesion path runs end to end;
- 64x64 crops of healthy vertebrae for GAN training, binary (as the paper) and grayscale;
- fixed train/validation/test splits by case, never by slice.

Splits are decided per case id by a seeded hash, so adding cases never moves an existing case to
another split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import VERTEBRA_NAMES, spine_mask
from SpineInpaintLib.data import deeplesion, lesions, lesions_focal
from SpineInpaintLib.data.deeplesion_export import make_record, write_series
from SpineInpaintLib.data.phantom.config import PhantomConfig
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.data.real import load_real_case
from SpineInpaintLib.inpainting.crops import (
    CROP_FOV_MM,
    CROP_SIZE,
    CROP_WINDOW,
    crop_slice,
)

__all__ = [
    "SPLITS", "LESION_SIMULATORS", "pick_simulator", "Case", "phantom_case",
    "varied_overrides", "varied_phantom_case", "real_case", "make_cases",
    "split_of", "split_cases", "case_seeds", "SliceSample", "mask_boxes_2d", "axial_slices", "write_case",
    "write_deeplesion", "vertebra_crops", "write_manifest",
]


# --- cases ---------------------------------------------------------------------------------------
#: Split names and the default fractions of cases that fall in them.
SPLITS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}


@dataclasses.dataclass
class Case:
    """One CT volume with its healthy truth.

    Attributes
    ----------
    case_id
        Unique, stable name (``phantom_0007``, ``real_totalsegmentator``, ...); splits hash it.
    ct
        The CT the models see (lesioned when ``lesion`` is set), HU.
    healthy_ct
        The CT before any lesion (the truth for inpainting).
    labels
        Healthy vertebra labels (TotalSegmentator v2 ids 25-50; other tissues may carry other ids).
    lesion
        The simulated lesion, or ``None`` for a healthy case.
    source
        ``'phantom'`` or ``'real'``.
    seed
        Seed of the phantom and lesion draws.
    """

    case_id: str
    ct: io.Volume
    healthy_ct: io.Volume
    labels: io.Volume
    lesion: object | None
    source: str
    seed: int
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def lesion_mask(self) -> np.ndarray:
        """uint8 (z, y, x) mask of the voxels the lesion changed (zeros for a healthy case)."""
        if "mask" in self.info:
            return self.info["mask"]
        if self.lesion is None:
            return np.zeros(self.ct.shape, np.uint8)
        return self.lesion.mask.array

    def oriented(self, orientation: str = "LPS") -> Case:
        """The same case with every volume re-oriented (axes permuted/flipped, no interpolation).

        2D samples and crops are cut from the LPS-oriented case, so that every slice shows the
        patient the same way (anterior at the top row, patient left on the right) whatever the
        file's direction. The lesion object is dropped; its mask travels in ``info['mask']``.
        """
        mask = self.ct.with_array(self.lesion_mask)
        return Case(self.case_id, io.reorient(self.ct, orientation), io.reorient(self.healthy_ct, orientation),
                    io.reorient(self.labels, orientation), None, self.source, self.seed,
                    {**self.info, "mask": io.reorient(mask, orientation).array})

    def manifest(self) -> dict:
        """JSON-ready description (geometry, source, seed, lesion parameters)."""
        entry = {
            "case_id": self.case_id,
            "source": self.source,
            "seed": self.seed,
            "split": split_of(self.case_id),
            "geometry": self.ct.geometry(),
            "levels": [VERTEBRA_NAMES[v] for v in np.unique(self.labels.array).tolist() if v in VERTEBRA_NAMES],
            "lesion": None if self.lesion is None else self.lesion.manifest(),
        }
        entry.update({k: v for k, v in self.info.items() if k != "mask"})
        return entry


# --- case sources -------------------------------------------------------------------------------
#: Lesion simulators a case can draw from: today's (:mod:`.lesions`), the focal one (:mod:`.lesions_focal`),
#: or ``"both"``: one of the two per case, drawn from its id and seed, half and half.
LESION_SIMULATORS: tuple[str, ...] = ("classic", "focal", "both")

#: The focal simulator's kinds that stand for each lesion type of the classic one.
_FOCAL_KINDS_OF = {"lytic": ("lytic_remnant", "soft_tissue_mass"), "sclerotic": ("blastic_nodular",),
                   "mixed": lesions_focal.FOCAL_KINDS}


def pick_simulator(simulator: str, case_id: str, seed: int) -> str:
    """``"classic"`` or ``"focal"``: ``simulator`` itself, or for ``"both"`` a draw seeded by the case."""
    if simulator not in LESION_SIMULATORS:
        raise SpineInpaintError(f"unknown lesion simulator '{simulator}' (expected one of "
                                f"{', '.join(LESION_SIMULATORS)})")
    if simulator != "both":
        return simulator
    digest = hashlib.sha256(f"simulator:{case_id}:{seed}".encode()).digest()
    return "focal" if digest[0] & 1 else "classic"


def _with_lesion(case_id: str, ct: io.Volume, labels: io.Volume, source: str, seed: int,
                 lesion_types: Sequence[str] | None, info: dict, simulator: str = "classic") -> Case:
    lesion = None
    if lesion_types:
        which = pick_simulator(simulator, case_id, seed)
        if which == "classic":
            lesion = lesions.random_lesion(ct, labels, seed=seed, lesion_types=list(lesion_types))
        else:
            kinds = sorted({k for t in lesion_types for k in _FOCAL_KINDS_OF.get(t, (t,))})
            lesion = lesions_focal.random_focal_lesion(ct, labels, seed, kinds=kinds)
        lesion.params.setdefault("simulator", which)
        info = {**info, "simulator": which}
    return Case(case_id, lesion.ct if lesion else ct, ct, labels, lesion, source, seed, info)


def phantom_case(seed: int, *, lesion_types: Sequence[str] | None = ("lytic", "sclerotic", "mixed"),
                 simulator: str = "classic", **config_overrides) -> Case:
    """A random phantom (``PhantomConfig.random(seed)``) with an optional random lesion from ``simulator``."""
    config = PhantomConfig.random(seed, **config_overrides)
    ph = make_phantom(config)
    return _with_lesion(f"phantom_{seed:04d}", ph.ct, ph.labels, "phantom", seed, lesion_types,
                        {"phantom_config": config.to_dict()}, simulator)


#: Levels, caudal to cranial, from which :func:`varied_phantom_case` draws its fields of view.
_VARIED_LEVELS = ("S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10")


def varied_overrides(seed: int) -> dict:
    """Phantom config overrides that widen the training phantoms toward older patients and coarser scans.

    ``PhantomConfig.random`` draws bone as a young adult's (cancellous 140-280 HU, cortex 700-1200
    HU) and always covers T10-S1 at a sharp point spread. Real abdominal CTs also show osteopenic
    vertebrae (``example_ct``'s L3 core: median 120 HU, 10th percentile 75 HU), softer
    reconstructions, and fields of view that end in the pelvis. These draws give cancellous bone
    60-170 HU, cortex 500-900 HU and 0.4-0.9 mm thick, a point spread of 0.5-1.2 mm, a field of
    view of the sacrum plus S1 and up to two levels above it (half the cases) or any three
    neighbouring levels from S1 to T10, and the sacrum as a real one is: a wide plate bowed forward
    (``PhantomConfig.sacrum_plate``), not a row of small bodies. ``sacroiliac_joint`` and
    ``sacrum_upright`` stay off here: networks trained with them did no better on a real scan left
    out of training (README, segmentation).
    """
    rng = np.random.default_rng([int(seed), 31])
    if rng.random() < 0.5:
        levels = ("sacrum",) + _VARIED_LEVELS[: int(rng.integers(1, 4))]
    else:
        first = int(rng.integers(0, len(_VARIED_LEVELS) - 2))
        levels = _VARIED_LEVELS[first:first + 3]
    return dict(levels=levels, cancellous_hu=round(float(rng.uniform(60, 170))),
                cortical_hu=round(float(rng.uniform(500, 900))), cortical_mm=round(float(rng.uniform(0.4, 0.9)), 2),
                blur_mm=round(float(rng.uniform(0.5, 1.2)), 2), sacrum_plate=True)


def varied_phantom_case(seed: int, *, lesion_types: Sequence[str] | None = ("lytic", "sclerotic", "mixed"),
                        simulator: str = "classic") -> Case:
    """A phantom drawn as :func:`phantom_case` with the :func:`varied_overrides` of ``seed``; id ``varied_<seed>``."""
    config = PhantomConfig.random(seed, **varied_overrides(seed))
    ph = make_phantom(config)
    return _with_lesion(f"varied_{seed:04d}", ph.ct, ph.labels, "phantom", seed, lesion_types,
                        {"phantom_config": config.to_dict(), "variety": "varied"}, simulator)


def real_case(name: str = "totalsegmentator", *, seed: int = 0,
              lesion_types: Sequence[str] | None = ("lytic", "sclerotic", "mixed"), simulator: str = "classic") -> Case:
    """A real scan of the registry (its labels are model predictions) with an optional lesion from ``simulator``."""
    ct, labels = load_real_case(name)
    return _with_lesion(f"real_{name}_{seed:04d}", ct, labels, "real", seed, lesion_types,
                        {"real_case": name, "labels_note": "TotalSegmentator predictions, not manual truth"}, simulator)


def make_cases(n_phantoms: int, *, seed: int = 0, real: Sequence[str] = (),
               lesion_types: Sequence[str] | None = ("lytic", "sclerotic", "mixed"),
               healthy_fraction: float = 0.0, simulator: str = "classic", **config_overrides) -> Iterator[Case]:
    """Yield ``n_phantoms`` phantom cases (seeds ``seed``, ``seed + 1``, ...) then the named real cases.

    ``healthy_fraction`` of the phantoms (drawn per seed) carry no lesion; lesions come from
    ``simulator`` (:data:`LESION_SIMULATORS`).
    """
    if n_phantoms < 0:
        raise SpineInpaintError(f"the number of cases must be >= 0, got {n_phantoms}")
    for k in range(n_phantoms):
        case_seed = seed + k
        healthy = np.random.default_rng([case_seed, 15485863]).random() < healthy_fraction
        yield phantom_case(case_seed, lesion_types=None if healthy else lesion_types, simulator=simulator,
                           **config_overrides)
    for name in real:
        yield real_case(name, seed=seed, lesion_types=lesion_types, simulator=simulator)


# --- splits ---------------------------------------------------------------------------------------
def split_of(case_id: str, fractions: dict[str, float] = SPLITS, seed: int = 0) -> str:
    """The split of one case: a seeded hash of its id mapped onto the cumulative ``fractions``."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(fractions.values())
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction / total
        if u < edge:
            return name
    return list(fractions)[-1]


def split_cases(case_ids: Iterable[str], fractions: dict[str, float] = SPLITS, seed: int = 0) -> dict[str, list[str]]:
    """Group case ids by split (see :func:`split_of`); every split name is a key, possibly empty."""
    groups: dict[str, list[str]] = {name: [] for name in fractions}
    for case_id in case_ids:
        groups[split_of(case_id, fractions, seed)].append(case_id)
    return groups


def case_seeds(prefix: str, split: str, count: int, *, start: int = 0) -> list[int]:
    """The first ``count`` seeds >= ``start`` whose case id ``f'{prefix}_{seed:04d}'`` falls in ``split``."""
    seeds, seed = [], start
    while len(seeds) < count:
        if split_of(f"{prefix}_{seed:04d}") == split:
            seeds.append(seed)
        seed += 1
    return seeds


@dataclasses.dataclass
class SliceSample:
    """One axial slice for 2D training.

    Attributes
    ----------
    image
        HU, float32 (rows, columns).
    spine
        uint8 binary spine mask.
    levels
        uint8 vertebra ids (0 elsewhere).
    boxes
        (N, 4) float32 lesion boxes ``x1, y1, x2, y2`` (pixels, end exclusive); N = 0 without lesion.
    case_id, z
        Where the slice comes from.
    spacing_yx
        Pixel size (mm) along rows and columns.
    """

    image: np.ndarray
    spine: np.ndarray
    levels: np.ndarray
    boxes: np.ndarray
    case_id: str
    z: int
    spacing_yx: tuple[float, float]


def mask_boxes_2d(mask: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """``{z: (x1, y1, x2, y2)}`` around the mask on every slice that holds some (end exclusive)."""
    boxes = {}
    for z in np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]:
        rows, cols = np.nonzero(mask[z])
        boxes[int(z)] = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return boxes


def axial_slices(case: Case, *, spine_only: bool = True, step: int = 1) -> list[SliceSample]:
    """The axial slices of a case in LPS orientation: those with spine (or all), every ``step``-th."""
    case = case.oriented("LPS")
    labels = case.labels.array
    levels = np.where(spine_mask(labels) > 0, labels, 0).astype(np.uint8)
    boxes_2d = mask_boxes_2d(case.lesion_mask)
    spacing_yx = case.ct.spacing_zyx[1:]
    samples = []
    for z in range(0, case.ct.shape[0], step):
        if spine_only and not levels[z].any():
            continue
        box = boxes_2d.get(z)
        boxes = np.asarray([box], np.float32) if box is not None else np.zeros((0, 4), np.float32)
        samples.append(SliceSample(case.ct.array[z].astype(np.float32), (levels[z] > 0).astype(np.uint8),
                                   levels[z], boxes, case.case_id, z, spacing_yx))
    return samples


# --- writing --------------------------------------------------------------------------------------
def write_case(case: Case, root: Path) -> dict:
    """Write a case's volumes as NIfTI under ``root/<case_id>/`` and return its manifest entry."""
    folder = Path(root) / case.case_id
    files = {
        "ct": io.write_volume(case.ct, folder / "ct.nii.gz"),
        "healthy_ct": io.write_volume(case.healthy_ct, folder / "healthy_ct.nii.gz"),
        "labels": io.write_volume(case.labels, folder / "labels.nii.gz"),
        "lesion_mask": io.write_volume(case.ct.with_array(case.lesion_mask.astype(np.uint8)),
                                       folder / "lesion_mask.nii.gz"),
    }
    entry = case.manifest()
    entry["files"] = {k: str(v.relative_to(root)) for k, v in files.items()}
    return entry


_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def write_deeplesion(cases: Iterable[Case], root: Path, *, window: tuple[float, float] = (-160.0, 240.0)) -> Path:
    """Write cases as a DeepLesion-format folder: ``Images_png/``, ``DL_info.csv``, and our ``Masks_png/``.

    Each case becomes one series (patient index = position in ``cases`` + 1, study 1, series 1),
    re-oriented to DeepLesion's axis convention. Every lesion gets one ``DL_info.csv`` row on its
    key slice (the slice where the lesion mask is largest), coarse type 1 (bone), its split coded
    1/2/3 from :func:`split_of`. DeepLesion has no segmentations: ``Masks_png/<series>/<slice>.png``
    (8-bit vertebra ids) is our extension, so segmentation training can read the same folder.
    """
    from PIL import Image

    root = Path(root)
    records = []
    for index, case in enumerate(cases, start=1):
        ct = deeplesion.to_deeplesion_orientation(case.ct)
        labels = deeplesion.to_deeplesion_orientation(case.labels)
        series = write_series(root, ct, index, 1, 1)
        mask_dir = root / "Masks_png" / series.name
        mask_dir.mkdir(parents=True, exist_ok=True)
        levels = np.where(spine_mask(labels.array) > 0, labels.array, 0).astype(np.uint8)
        for z in range(levels.shape[0]):
            Image.fromarray(levels[z]).save(mask_dir / f"{z + 1:03d}.png")
        if case.lesion is None:
            continue
        mask = deeplesion.to_deeplesion_orientation(case.lesion.mask).array > 0
        key = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        records.append(make_record(
            ct, index, 1, 1, key + 1, mask=mask[key], lesion_type=deeplesion.BONE,
            split=_SPLIT_CODES[split_of(case.case_id)], window=window,
        ))
    deeplesion.write_info(records, root / "DL_info.csv")
    return root


# --- GAN crops --------------------------------------------------------------------------------------
def _crop_centre(mask: np.ndarray) -> tuple[float, float]:
    """In-plane centre (row, column) of a vertebra: the centroid of its label over all its slices."""
    rows, cols = np.nonzero(mask.any(axis=0))
    weights = mask.sum(axis=0)[rows, cols]
    return float(np.average(rows, weights=weights)), float(np.average(cols, weights=weights))


def vertebra_crops(case: Case, *, binary: bool = True, size: int = CROP_SIZE, fov_mm: float = CROP_FOV_MM,
                   min_area_fraction: float = 0.25, healthy_only: bool = True) -> tuple[np.ndarray, list[dict]]:
    """64x64 crops of the vertebrae of a case (LPS-oriented), one per axial slice of each level, in [0, 1].

    Following the paper, the 512x512 slice is cropped around the spine and scaled to 64x64; we
    cut a fixed physical square (``fov_mm``) centred on each vertebra (the same centre on every
    slice of that vertebra, so neighbouring slices stay aligned). A slice is used where the
    vertebra's area is at least ``min_area_fraction`` of its largest slice.

    Parameters
    ----------
    binary
        The spine mask (all vertebrae, as the paper's segmentation gives) instead of the CT window
        :data:`CROP_WINDOW` mapped to [0, 1].
    healthy_only
        Take slices from the healthy CT and skip slices touched by the lesion (GAN training
        data); else crop the CT as the models see it.

    Returns
    -------
    crops
        float32 (N, size, size) in [0, 1].
    meta
        One dict per crop: case id, level, z, centre (row, column), spacing.
    """
    case = case.oriented("LPS")
    labels = case.labels.array
    spine = spine_mask(labels).astype(np.float32)
    image = case.healthy_ct.array if healthy_only else case.ct.array
    lesion_slices = set(np.nonzero(case.lesion_mask.reshape(case.ct.shape[0], -1).any(axis=1))[0].tolist())
    spacing_yx = case.ct.spacing_zyx[1:]
    lo, hi = CROP_WINDOW
    crops, meta = [], []
    for level in sorted(v for v in np.unique(labels).tolist() if v in VERTEBRA_NAMES):
        mask = labels == level
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        centre = _crop_centre(mask)
        for z in np.nonzero(areas >= min_area_fraction * areas.max())[0]:
            if healthy_only and int(z) in lesion_slices:
                continue
            if binary:
                crop = crop_slice(spine[z], centre, spacing_yx, size=size, fov_mm=fov_mm) >= 0.5
            else:
                raw = crop_slice(image[z], centre, spacing_yx, size=size, fov_mm=fov_mm, cval=-1000.0)
                crop = np.clip((raw - lo) / (hi - lo), 0.0, 1.0)
            crops.append(crop.astype(np.float32))
            meta.append({"case_id": case.case_id, "level": int(level), "z": int(z),
                         "centre_rc": [round(centre[0], 2), round(centre[1], 2)],
                         "spacing_yx": list(spacing_yx), "fov_mm": fov_mm})
    if not crops:
        return np.zeros((0, size, size), np.float32), []
    return np.stack(crops), meta


def write_manifest(entries: list[dict], path: Path, **extra) -> Path:
    """Write a JSON manifest of written cases (with the splits and any ``extra`` keys)."""
    payload = {**extra, "splits": split_cases([e["case_id"] for e in entries]), "cases": entries}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
