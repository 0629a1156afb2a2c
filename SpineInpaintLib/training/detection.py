"""Training data, augmentation, training and evaluation of the lesion detectors (see ``detection``).

Data: 2.5D crops (3 channels, neighbour slices) around the spine, kept as HU (int16) on a
``CACHE_SIZE`` square of ``GRID_MM`` pixels, larger than the network input so that augmentation
(random rotation, flip, crop and noise, the paper's four) never samples outside it. Another input
grid (``--grid-mm``, ``--crop-size``) caches :func:`cache_size` squares of its own pixels, in a cache
folder of its own; the weights record the grid they were trained on. Each sample holds
an instance mask of its lesions (0 background, 1..K lesions) from which the boxes are recomputed
after every augmentation, so a rotated lesion keeps a tight box. Sources:

- simulated lesions (:mod:`SpineInpaintLib.lesions`) on phantoms and the real scan(s), through
  :mod:`SpineInpaintLib.datasets` cases; a slice is positive where the tumour's bone part
  (``SimulatedLesion.bone_destroyed``, the tumour inside the healthy vertebra) is at least
  ``MIN_BOX_MM`` wide and high, and the box is that part's; negative where the slice holds no tumour;
  slices with a thinner sliver of tumour in bone (the lesion's top and bottom) or with tumour outside
  bone only are left out, as neither a fair positive nor a fair negative (the extra-osseous mass of a
  destructive lesion has soft-tissue HU, nothing to see at these windows, and is not what the
  inpainter restores);
- DeepLesion-format folders (``DL_info.csv``, coarse type 1 = bone): each key slice with its
  boxes (filled rectangles as masks), centred on our ``Masks_png`` spine labels when present, else on
  the lesion with a random shift.

Splits are by case (:func:`SpineInpaintLib.datasets.split_of`) or DeepLesion's ``Train_Val_Test``.
Training is seeded, resumable (``last.pt``), logs per-epoch metrics (``csv``,
``curves.png``), keeps the best weights by validation AP@0.5 (``best.safetensors`` + JSON) and those
of the last epoch (``final.safetensors``; with ``--ema``, the moving average of the weights) and runs
unchanged under ``torchrun`` (:mod:`SpineInpaintLib.training`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.core.weights import (
    load_weights,
    read_weights_metadata,
    save_weights,
)
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data import deeplesion
from SpineInpaintLib.data.deeplesion_export import group_by_image, select
from SpineInpaintLib.detection import inference as det
from SpineInpaintLib.detection.networks import (
    ARCHITECTURES,
    FASTER_RCNN_CONFIG,
    RETINANET_PRESETS,
    check_box_loss,
)
from SpineInpaintLib.evaluation.metrics.boxes import coco_ap, froc
from SpineInpaintLib.training import augment as domain_randomisation
from SpineInpaintLib.training import loop as training
from SpineInpaintLib.training.detection_cases import (
    NEGATIVE_PHANTOM_SLICES,
    CaseSpec,
    case_specs,
    make_detection_cases,
)
from SpineInpaintLib.training.loop import RunControl

__all__ = [
    "CACHE_SIZE", "MIN_BOX_MM", "SampleSet", "boxes_from_instances", "samples_from_case", "samples_from_deeplesion",
    "case_specs", "make_detection_cases", "build_sample_set", "augment", "TrainConfig", "training_cache_paths",
    "predict_samples", "score_detections", "train_detector", "SMALL_BOX_MM", "NEGATIVE_PHANTOM_SLICES",
    "cache_size", "CaseSpec", "training_data", "positive_draw_weights", "slim_case",
]

#: Side (pixels of GRID_MM) of the cached crops: room for +-15 deg rotation, 0.9 scale and +-12 mm shifts.
CACHE_SIZE = 176

#: Smallest lesion cross-section (mm, both sides) that makes a slice a positive sample.
MIN_BOX_MM = 5.0

#: Boxes with a side under this (mm) count as small for ``--small-box-weight``.
SMALL_BOX_MM = 10.0

#: Loss columns of the metrics log (RetinaNet's and Faster R-CNN's names).
_LOSS_COLUMNS = ("loss", "classification", "box_regression", "loss_classifier", "loss_objectness")



def cache_size(crop_size: int = det.CROP_SIZE) -> int:
    """Side of the cached crops for a network input of ``crop_size`` pixels (the same margin as
    :data:`CACHE_SIZE` around :data:`detection.CROP_SIZE`, even)."""
    return 2 * int(round(crop_size * CACHE_SIZE / det.CROP_SIZE / 2.0))


# --- samples -------------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleSet:
    """Cached detector samples.

    Attributes
    ----------
    images
        int16 HU, (N, 3, CACHE_SIZE, CACHE_SIZE).
    masks
        uint8 lesion instance masks, (N, CACHE_SIZE, CACHE_SIZE).
    meta
        One dict per sample: ``case_id``, ``z``, ``source`` (phantom, real, deeplesion),
        ``lesion_type`` (lytic, sclerotic, mixed, bone, or none for a negative slice),
        ``case_lesion_type`` (the case's lesion type, none for a healthy case), ``destructive``,
        ``crop_s`` (seconds spent resampling the crop from the source slice), ``grid_mm`` (pixel size).
    """

    images: np.ndarray
    masks: np.ndarray
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.meta)

    @classmethod
    def empty(cls, size: int = CACHE_SIZE) -> SampleSet:
        return cls(np.zeros((0, 3, size, size), np.int16), np.zeros((0, size, size), np.uint8), [])

    @classmethod
    def concat(cls, sets: Iterable[SampleSet]) -> SampleSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        return cls(np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]),
                   [m for s in sets for m in s.meta])

    def subset(self, index: Sequence[int]) -> SampleSet:
        index = np.asarray(index, int)
        return SampleSet(self.images[index], self.masks[index], [self.meta[i] for i in index])

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary's name
                np.savez(f, images=self.images, masks=self.masks, meta=json.dumps(self.meta))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        with np.load(Path(path)) as data:
            return cls(data["images"], data["masks"], json.loads(str(data["meta"])))

    def centre_crops(self, size: int = det.CROP_SIZE) -> np.ndarray:
        """The network inputs without augmentation: centre ``size`` crops in [0, 1], float32."""
        a = (self.images.shape[-1] - size) // 2
        return det.normalise(self.images[:, :, a:a + size, a:a + size])

    def centre_boxes(self, size: int = det.CROP_SIZE) -> list[np.ndarray]:
        """The true boxes of :meth:`centre_crops`."""
        a = (self.masks.shape[-1] - size) // 2
        return [boxes_from_instances(m[a:a + size, a:a + size]) for m in self.masks]


def boxes_from_instances(mask: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """(K, 4) float32 boxes ``x1, y1, x2, y2`` (end exclusive) of the instances 1..K of a 2D mask."""
    boxes = []
    for k in range(1, int(mask.max()) + 1 if mask.size else 1):
        rows, cols = np.nonzero(mask == k)
        if rows.size >= min_pixels:
            boxes.append((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def _crop_pair(stack: np.ndarray, instances: np.ndarray, centre, spacing_yx,
               size: int, grid_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    image = det.crop_slices(stack, centre, spacing_yx, size=size, grid_mm=grid_mm)
    elapsed = time.perf_counter() - start
    # Nearest-neighbour for the instance labels.
    mask = det.crop_slices(instances[None].astype(np.float32), centre, spacing_yx, size=size, grid_mm=grid_mm,
                           order=0, cval=0)[0]
    return np.clip(np.round(image), -32768, 32767).astype(np.int16), mask.astype(np.uint8), elapsed


def samples_from_case(case: datasets.Case, *, rng: np.random.Generator, negatives_per_positive: float = 1.0,
                      min_negatives: int = 6, max_negatives: int | None = None,
                      max_positives: int | None = None, min_box_mm: float = MIN_BOX_MM,
                      size: int = CACHE_SIZE, grid_mm: float = det.GRID_MM) -> SampleSet:
    """Positive and negative spine slices of a case as cached 2.5D crops (see the module notes):
    ``size`` pixels of ``grid_mm``.

    ``max_positives`` keeps that many positive slices, evenly spaced through the lesion (thin
    slices would otherwise let one lesion weigh ten times another); negatives are drawn at random,
    ``negatives_per_positive`` per positive, at least ``min_negatives``, at most ``max_negatives``.
    """
    ct = io.reorient(case.ct, "LPS")
    labels = io.reorient(case.labels, "LPS").array
    lesion = case.lesion
    if lesion is not None:
        tumour = io.reorient(lesion.lesion_mask, "LPS").array > 0
        # The box is the tumour's bone part: an extra-osseous mass has soft-tissue HU and no edge to
        # see at these windows, and the inpainter restores the vertebra's part only.
        bone = io.reorient(lesion.bone_destroyed, "LPS").array > 0
    else:
        tumour = bone = np.zeros(ct.shape, bool)
    spine = spine_mask(labels) > 0
    spacing_yx = ct.spacing_zyx[1:]
    offset = det.neighbour_offset(ct.spacing_zyx[0])
    positives, negatives = [], []
    for z in np.nonzero(spine.any(axis=(1, 2)))[0]:
        if bone[z].any():  # bone_destroyed lies inside the tumour mask
            rows, cols = np.nonzero(bone[z])
            h = (rows.max() - rows.min() + 1) * spacing_yx[0]
            w = (cols.max() - cols.min() + 1) * spacing_yx[1]
            if min(h, w) >= min_box_mm:
                positives.append(int(z))
        elif not tumour[z].any():
            negatives.append(int(z))
    if max_positives is not None and len(positives) > max_positives:
        positives = [positives[int(k)] for k in np.linspace(0, len(positives) - 1, max_positives).round()]
    n_neg = max(min_negatives, int(round(negatives_per_positive * len(positives))))
    if max_negatives is not None:
        n_neg = min(n_neg, max_negatives)
    if len(negatives) > n_neg:
        negatives = sorted(rng.choice(negatives, n_neg, replace=False).tolist())
    info = {"case_id": case.case_id, "source": case.source,
            "case_lesion_type": lesion.lesion_type if lesion is not None else "none",
            "destructive": bool(lesion.destructive) if lesion is not None else None,
            "level": int(lesion.level) if lesion is not None else None,
            "simulator": case.info.get("simulator", "classic") if lesion is not None else None}
    images, masks, meta = [], [], []
    for z in positives + negatives:
        centre = det.spine_centre(spine[z])
        image, mask, elapsed = _crop_pair(det.slice_stack(ct.array, z, offset), bone[z].astype(np.uint8),
                                          centre, spacing_yx, size, grid_mm)
        images.append(image)
        masks.append(mask)
        meta.append({**info, "z": z, "lesion_type": info["case_lesion_type"] if z in positives else "none",
                     "crop_s": elapsed, "grid_mm": grid_mm})
    if not meta:
        return SampleSet.empty(size)
    return SampleSet(np.stack(images), np.stack(masks), meta)


def samples_from_deeplesion(root: str | Path, split: str | None = "train", *, rng: np.random.Generator,
                            size: int = CACHE_SIZE, grid_mm: float = det.GRID_MM,
                            max_shift_mm: float = 30.0) -> SampleSet:
    """Key slices of the bone lesions (coarse type 1) of a DeepLesion-format folder as cached crops.

    Boxes are DeepLesion's ``Bounding_boxes`` (pixel centres, inclusive; stored as filled
    rectangles). The crop is centred on the spine of our ``Masks_png`` extension where present,
    else on the lesion shifted by up to ``max_shift_mm`` (a real DeepLesion folder has no spine mask).
    """
    from PIL import Image

    root = Path(root)
    info = root / "DL_info.csv"
    if not info.exists():
        raise SpineInpaintError(f"no DL_info.csv in {root} (not a DeepLesion-format folder)")
    records = select(deeplesion.read_info(info), deeplesion.BONE, split)
    images, masks, meta = [], [], []
    for file_name, group in group_by_image(records).items():
        rec = group[0]
        sx, sy, sz = rec.spacing_mm_px
        offset = det.neighbour_offset(sz)
        stack = deeplesion.load_key_slice(root, rec, neighbours=offset, windowed=False)
        stack = stack[[0, offset, 2 * offset]].astype(np.float32)
        instances = np.zeros(stack.shape[1:], np.uint8)
        for k, r in enumerate(group, start=1):
            x1, y1, x2, y2 = r.bounding_box
            rows = slice(int(math.floor(y1)), int(math.floor(y2)) + 1)
            instances[rows, int(math.floor(x1)):int(math.floor(x2)) + 1] = k
        mask_png = root / "Masks_png" / rec.series_folder / f"{rec.key_slice_index:03d}.png"
        centre = None
        if mask_png.exists():
            centre = det.spine_centre(np.asarray(Image.open(mask_png)) > 0)
        if centre is None:
            rows, cols = np.nonzero(instances)
            shift = rng.uniform(-max_shift_mm, max_shift_mm, 2)
            centre = (rows.mean() + shift[0] / sy, cols.mean() + shift[1] / sx)
        image, mask, elapsed = _crop_pair(stack, instances, centre, (sy, sx), size, grid_mm)
        images.append(image)
        masks.append(mask)
        meta.append({"case_id": f"deeplesion_{rec.series_folder}", "z": rec.key_slice_index - 1,
                     "source": "deeplesion", "lesion_type": "bone", "case_lesion_type": "bone",
                     "destructive": None, "level": None, "crop_s": elapsed, "file_name": file_name,
                     "grid_mm": grid_mm})
    if not meta:
        return SampleSet.empty(size)
    return SampleSet(np.stack(images), np.stack(masks), meta)




def build_sample_set(specs: Sequence[CaseSpec], *, seed: int,
                     cache: str | Path | None = None, progress: bool = False,
                     domain: domain_randomisation.DomainRandomisation | None = None, **kwargs) -> SampleSet:
    """Samples of every case (see :func:`samples_from_case`; ``kwargs`` and then each spec's own
    options), seeded per case.

    With ``domain``, each case first goes through the shared domain randomisation in 3D
    (:func:`SpineInpaintLib.training.augment.randomise_case`: one draw per case, seeded by ``seed`` and
    its key; lesioned and healthy CT alike); give it for training cases only. With ``cache``, each
    case's samples are kept in ``cache/<key>.npz`` and reused (a crash or a second detector loses no
    work). Cases the generators reject are skipped with a warning.
    """
    sets = []
    iterator = specs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(specs, desc="cases", unit="case")
    for key, make, options in iterator:
        path = Path(cache) / f"{key}.npz" if cache else None
        if path is not None and path.exists():
            sets.append(SampleSet.load(path))
            continue
        try:
            case = make()
        except SpineInpaintError as err:
            warnings.warn(f"skipped case {key}: {err}", stacklevel=2)
            continue
        rng = np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)])
        if domain is not None:
            case_seed = domain_randomisation.case_seed(seed, key, "domain")
            case = domain_randomisation.randomise_case(case, case_seed, domain)
        samples = samples_from_case(case, rng=rng, **{**kwargs, **options})
        if path is not None:
            samples.save(path)
        sets.append(samples)
    return SampleSet.concat(sets)


# --- augmentation ----------------------------------------------------------------------------------
def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, size: int = det.CROP_SIZE,
            grid_mm: float = det.GRID_MM, max_rotation_deg: float = 15.0, scale: tuple[float, float] = (0.9, 1.1),
            max_shift_mm: float = 12.0, flip_probability: float = 0.5, noise_probability: float = 0.5,
            max_noise_hu: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """The paper's augmentations on one cached sample: random rotation, flip, crop (shift, scale) and noise.

    ``image`` and ``mask`` are a cached sample of ``grid_mm`` pixels; the output keeps that pixel size.
    Returns the network input (3, size, size) in [0, 1] and its boxes (K, 4). A lesion cut by the
    crop to less than half of its area is discarded as a target and the draw repeated without shift.
    """
    n = image.shape[-1]
    for attempt in range(3):
        angle = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
        s = rng.uniform(*scale)
        flip = -1.0 if rng.random() < flip_probability else 1.0
        matrix = s * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) \
            @ np.diag([1.0, flip])
        shift = rng.uniform(-max_shift_mm, max_shift_mm, 2) if attempt == 0 else np.zeros(2)
        centre = ((n - 1) / 2.0 + shift[0] / grid_mm, (n - 1) / 2.0 + shift[1] / grid_mm)
        spacing = (grid_mm, grid_mm)
        out_mask = det.crop_slices(mask[None].astype(np.float32), centre, spacing, size=size, grid_mm=grid_mm,
                                   matrix=matrix, order=0, cval=0)[0].astype(np.uint8)
        kept = [np.count_nonzero(out_mask == k) >= 0.5 * np.count_nonzero(mask == k) / s ** 2
                for k in range(1, int(mask.max()) + 1)]
        if all(kept):
            break
    out = det.crop_slices(image.astype(np.float32), centre, spacing, size=size, grid_mm=grid_mm, matrix=matrix)
    if rng.random() < noise_probability:
        out = out + rng.normal(0.0, rng.uniform(0.0, max_noise_hu), out.shape).astype(np.float32)
    return det.normalise(out), boxes_from_instances(out_mask, min_pixels=4)


# --- training ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig(RunControl):
    """Settings of :func:`train_detector` (recorded in the outputs)."""

    arch: str = "retinanet"
    backbone: str = "base"
    out: str = "runs/detection/retinanet"
    cache: str = "runs/detection/data"
    phantoms: int = 28
    healthy_phantoms: int = 4
    negative_phantoms: int = 0
    real: int = 20
    val_phantoms: int = 6
    val_real: int = 6
    #: Real scans of the registry the lesions of ``real`` / ``val_real`` are simulated on (each).
    real_scans: tuple[str, ...] = ("totalsegmentator",)
    #: Lesion simulator of the simulated lesions: classic, focal or both (one per case).
    simulator: str = "both"
    deeplesion: str | None = None
    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 8
    lr: float | None = None
    positive_fraction: float = 0.6
    init: str | None = None
    box_loss: str = "smooth_l1"
    ema: float = 0.0
    small_box_weight: float = 1.0
    grid_mm: float = det.GRID_MM
    crop_size: int = det.CROP_SIZE
    #: Shared 3D domain randomisation of the training cases (never validation); None: off.
    domain: domain_randomisation.DomainRandomisation | None = dataclasses.field(
        default_factory=domain_randomisation.DomainRandomisation)

    def default_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.arch == "retinanet" else 2e-4)


def _aggregate_path(cache: Path, name: str, specs: Sequence[CaseSpec]) -> Path:
    """``cache/<name>-<digest of the case keys>.npz``: an aggregate serves only the cases it was built
    from (the per-case files are reused by any case list, randomised or not: see :func:`_train_names`)."""
    digest = hashlib.sha256("\n".join(key for key, _, _ in specs).encode()).hexdigest()[:10]
    return cache / f"{name}-{digest}.npz"


def _training_specs(config: TrainConfig) -> tuple[list[CaseSpec], list[CaseSpec]]:
    common = dict(simulator=config.simulator)
    train = case_specs("train", phantoms=config.phantoms, real=0, healthy_phantoms=config.healthy_phantoms,
                       negative_phantoms=config.negative_phantoms, **common)
    val = case_specs("val", phantoms=config.val_phantoms, real=0, **common)
    for name in config.real_scans:
        train += case_specs("train", phantoms=0, real=config.real, real_name=name, healthy_real=True, **common)
        val += case_specs("val", phantoms=0, real=config.val_real, real_name=name, **common)
    return train, val


def _train_names(config: TrainConfig) -> tuple[str, str]:
    """Names of the training aggregate and per-case folder: randomised samples never mix with plain ones."""
    if config.domain is None:
        return "train", "cases"
    digest = domain_randomisation.domain_digest(config.domain)
    return f"train_dr{digest}", f"cases_dr{digest}"


def training_cache_paths(config: TrainConfig) -> tuple[Path, Path]:
    """Where :func:`training_data` keeps the training and validation samples of ``config``'s cases."""
    train, val = _training_specs(config)
    return (_aggregate_path(Path(config.cache), _train_names(config)[0], train),
            _aggregate_path(Path(config.cache), "val", val))


def _cached(path: Path, build, size: int, grid_mm: float) -> SampleSet:
    if path.exists():
        samples = SampleSet.load(path)
        found = (samples.images.shape[-1], samples.meta[0].get("grid_mm", det.GRID_MM) if samples.meta else grid_mm)
        if found[0] != size or not math.isclose(found[1], grid_mm):
            raise SpineInpaintError(f"{path} holds crops of {found[0]} pixels of {found[1]:g} mm, not {size} of "
                                    f"{grid_mm:g} mm: use another --cache for this input grid")
        return samples
    samples = build()
    samples.save(path)
    return samples


def training_data(config: TrainConfig,
                  ctx: training.DistributedContext | None = None) -> tuple[SampleSet, SampleSet]:
    """Train and validation samples, built once into ``config.cache`` (shared by both detectors)."""
    cache = Path(config.cache)
    main = ctx is None or ctx.is_main
    train_specs, val_specs = _training_specs(config)
    train_path, val_path = training_cache_paths(config)
    grid = {"size": cache_size(config.crop_size), "grid_mm": config.grid_mm}
    if main:
        def build_train():
            return build_sample_set(train_specs, seed=config.seed, cache=cache / _train_names(config)[1],
                                    progress=config.progress, domain=config.domain, **grid)

        def build_val():
            return build_sample_set(val_specs, seed=config.seed + 1, cache=cache / "cases_val",
                                    progress=config.progress, negatives_per_positive=1.0, max_positives=10,
                                    min_negatives=10, **grid)

        train, val = _cached(train_path, build_train, **grid), _cached(val_path, build_val, **grid)
    if ctx is not None:
        ctx.barrier()
    if not main:
        train, val = SampleSet.load(train_path), SampleSet.load(val_path)
    if config.deeplesion:
        rng = np.random.default_rng([config.seed, 17])
        train = SampleSet.concat([train, samples_from_deeplesion(config.deeplesion, "train", rng=rng, **grid)])
        val = SampleSet.concat([val, samples_from_deeplesion(config.deeplesion, "val", rng=rng, **grid)])
    if len(train) == 0:
        raise SpineInpaintError("no training samples (no case produced a spine slice)")
    return train, val


def positive_draw_weights(samples: SampleSet, positives: np.ndarray, small_box_weight: float,
                          small_mm: float = SMALL_BOX_MM, grid_mm: float = det.GRID_MM) -> np.ndarray | None:
    """Probabilities of drawing each positive sample: ``small_box_weight`` times as high for a slice
    whose smallest box has a side under ``small_mm`` (a lesion's first and last slices, where boxes
    are hardest to place); None (uniform) for a weight of 1. ``grid_mm``: the samples' pixel size."""
    if small_box_weight == 1.0 or not len(positives):
        return None
    smallest = np.array([(b[:, 2:] - b[:, :2]).min() * grid_mm if len(b) else np.inf
                         for b in (boxes_from_instances(samples.masks[i]) for i in positives)])
    weights = np.where(smallest < small_mm, small_box_weight, 1.0)
    return weights / weights.sum()


def _batch(samples: SampleSet, positives: np.ndarray, negatives: np.ndarray, batch_size: int,
           positive_fraction: float, rng: np.random.Generator, positive_p: np.ndarray | None = None, *,
           size: int = det.CROP_SIZE, grid_mm: float = det.GRID_MM) -> tuple[np.ndarray, list[np.ndarray]]:
    images, boxes = [], []
    for _ in range(batch_size):
        use_positive = (rng.random() < positive_fraction and positives.size) or not negatives.size
        if use_positive:
            i = int(rng.choice(positives, p=positive_p))
        else:
            i = int(rng.choice(negatives))
        image, b = augment(samples.images[i], samples.masks[i], rng, size=size, grid_mm=grid_mm)
        images.append(image)
        boxes.append(b)
    return np.stack(images), boxes


def predict_samples(detector: det.Detector, images: np.ndarray,
                    batch_size: int = 16) -> tuple[list, list, float]:
    """Boxes and scores per image, and the seconds the detector took (inference only)."""
    boxes, scores = [], []
    start = time.perf_counter()
    for k in range(0, len(images), batch_size):
        for b, s in detector.predict(images[k:k + batch_size]):
            boxes.append(b)
            scores.append(s)
    return boxes, scores, time.perf_counter() - start


def score_detections(boxes: list, scores: list, truth: list,
                     fps: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> dict:
    """AP@0.5, AP@0.5:0.95 and FROC sensitivities (at ``fps`` false positives per image)."""
    ap = coco_ap(boxes, scores, truth)
    out = {"images": len(truth), "lesion_boxes": int(sum(len(t) for t in truth)), "ap50": ap["ap50"],
           "ap50_95": ap["ap50_95"]}
    if out["lesion_boxes"]:
        fr = froc(boxes, scores, truth, fps_per_image=fps)
        out.update({f"froc@{f:g}": float(s) for f, s in zip(fps, fr.sensitivities)})
    return out


def train_detector(config: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train one detector (see the module notes); returns a summary (best validation AP, paths, time).

    ``on_epoch``, when given, receives each epoch's metrics row (the one written to ``metrics.csv``:
    epoch, losses, lr, train_s, val_ap50, val_ap50_95, val_froc@1) on the main process, as the epoch ends.
    """
    if config.arch not in ARCHITECTURES:
        raise SpineInpaintError(f"unknown detector '{config.arch}' (use {' or '.join(ARCHITECTURES)})")
    if config.epochs < 1 or config.steps_per_epoch < 1 or config.batch_size < 1:
        raise SpineInpaintError("epochs, steps per epoch and batch size must be >= 1")
    counts = {"--phantoms": config.phantoms, "--healthy-phantoms": config.healthy_phantoms,
              "--negative-phantoms": config.negative_phantoms, "--real": config.real,
              "--val-phantoms": config.val_phantoms, "--val-real": config.val_real}
    for flag, count in counts.items():
        if count < 0:
            raise SpineInpaintError(f"{flag} must be >= 0, got {count}")
    if config.arch == "retinanet" and config.backbone not in RETINANET_PRESETS:
        raise SpineInpaintError(f"unknown RetinaNet backbone '{config.backbone}' "
                                f"(use {' or '.join(RETINANET_PRESETS)})")
    check_box_loss(config.arch, config.box_loss)
    if config.small_box_weight <= 0:
        raise SpineInpaintError(f"--small-box-weight must be > 0, got {config.small_box_weight}")
    if not 0.0 <= config.ema < 1.0:
        raise SpineInpaintError(f"--ema must be in [0, 1) (0: off; 0.998 averages over ~500 steps), got {config.ema}")
    det.check_input_grid(config.crop_size, config.grid_mm)
    if config.init:
        _check_init(config)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    ctx = training.init_distributed(config.device)
    seed = seed_everything(config.seed + ctx.rank)
    out = Path(config.out)
    train, val = training_data(config, ctx)
    grid = {"crop_size": config.crop_size, "grid_mm": config.grid_mm}
    detector = det.Detector(config.arch, device=str(ctx.device), config=_architecture(config), **grid)
    detector.set_box_loss(config.box_loss)
    last = out / "last.pt"
    if config.init and not (config.resume and last.exists()):
        # Fine-tuning: a fresh schedule from existing weights of the same architecture.
        load_weights(detector.model, Path(config.init))
    model = ctx.wrap(detector.model, find_unused_parameters=True)
    detector.model = model
    # Validation and the saved weights use an exponential moving average of the weights when asked:
    # the validation AP of the raw weights jumps by several points from one epoch to the next.
    ema = None
    evaluated = detector
    if config.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(training.unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        evaluated = det.Detector(config.arch, model=ema.module, device=str(ctx.device), **grid)
    saved_models = {"detector": model, **({"ema": ema} if ema is not None else {})}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.default_lr(),
                                  weight_decay=1e-4)
    total_steps = config.epochs * config.steps_per_epoch
    # 100 warm-up steps, then a cosine decay to 0 at the last planned step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    start_epoch, best = 0, {"ap50": -1.0, "epoch": 0}
    if config.resume and last.exists():
        if set(torch.load(last, map_location="cpu", weights_only=True)["models"]) != set(saved_models):
            raise SpineInpaintError(f"{last} was written with another --ema setting: resume with the same "
                                    "settings, or start afresh with --no-resume")
        state = training.load_checkpoint(last, models=saved_models, optimizers={"optimiser": optimiser})
        start_epoch = state["epoch"]
        best = state["extra"].get("best", best)
        scheduler.last_epoch = start_epoch * config.steps_per_epoch
    log = None
    if ctx.is_main:
        log = training.MetricsLog(out / "metrics.csv", resume_epoch=start_epoch if config.resume else 0)
    positives = np.array([i for i, m in enumerate(train.meta) if m["lesion_type"] != "none"], int)
    negatives = np.array([i for i, m in enumerate(train.meta) if m["lesion_type"] == "none"], int)
    positive_p = positive_draw_weights(train, positives, config.small_box_weight, grid_mm=config.grid_mm)
    val_images, val_boxes = val.centre_crops(config.crop_size), val.centre_boxes(config.crop_size)
    started = time.time()
    summary = {"arch": config.arch, "seed": seed, "train_samples": len(train),
               "train_positives": int(positives.size), "val_samples": len(val), "epochs_run": 0}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        rng = np.random.default_rng([config.seed, ctx.rank, epoch])
        totals: dict[str, float] = {}
        steps = range(config.steps_per_epoch)
        if config.progress and ctx.is_main:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"{config.arch} epoch {epoch}/{config.epochs}", unit="step", leave=False)
        t0 = time.time()
        for _ in steps:
            images, boxes = _batch(train, positives, negatives, config.batch_size, config.positive_fraction, rng,
                                   positive_p, size=config.crop_size, grid_mm=config.grid_mm)
            losses = detector.loss(images, boxes)
            loss = sum(losses.values())
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimiser.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(training.unwrap(model))
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / config.steps_per_epoch
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / config.steps_per_epoch
        train_s = time.time() - t0
        row = {"epoch": epoch, **{k: ctx.all_reduce_mean(v) for k, v in totals.items()},
               "lr": optimiser.param_groups[0]["lr"], "train_s": train_s}
        if ctx.is_main:
            boxes, scores, _ = predict_samples(evaluated, val_images)
            scored = score_detections(boxes, scores, val_boxes)
            row.update({"val_ap50": scored["ap50"], "val_ap50_95": scored["ap50_95"],
                        "val_froc@1": scored.get("froc@1", float("nan"))})
            current = {"ap50": scored["ap50"], "ap50_95": scored["ap50_95"], "epoch": epoch}
            if scored["ap50"] > best["ap50"]:
                best = current
                save_weights(evaluated.model, out / "best.safetensors",
                                      _metadata(config, seed, best, train, val))
            # The weights of the last epoch too: with --ema the average at the end of the schedule,
            # which a noisy validation maximum early in fine-tuning may otherwise hide.
            save_weights(evaluated.model, out / "final.safetensors",
                                  _metadata(config, seed, current, train, val))
            log.append(**row)
            training.save_checkpoint(last, epoch=epoch, models=saved_models,
                                     optimizers={"optimiser": optimiser}, seed=seed, extra={"best": best})
            training.plot_curves(out / "metrics.csv", out / "curves.png",
                                 [("loss", [k for k in row if k in _LOSS_COLUMNS]),
                                  ("validation", ["val_ap50", "val_ap50_95", "val_froc@1"])],
                                 title=f"{config.arch} (seed {config.seed})")
            if on_epoch is not None:
                on_epoch(dict(row))
        summary["epochs_run"] = epoch
        ctx.barrier()
        if config.max_minutes and (time.time() - started) / 60 > config.max_minutes:
            break
    summary.update({"best": best, "minutes": (time.time() - started) / 60, "out": str(out)})
    ctx.close()
    return summary


def _check_init(config: TrainConfig) -> None:
    """Refuse ``--init`` weights that are missing or of another detector, before any data is built."""
    path = Path(config.init)
    if not path.is_file():
        raise SpineInpaintError(f"--init weights not found: {path}")
    meta = read_weights_metadata(path)
    wanted = json.loads(json.dumps(_recorded_architecture(config)))  # as JSON stores it: tuples become lists
    if meta.get("arch") != config.arch or meta.get("architecture") != wanted:
        raise SpineInpaintError(f"--init weights {path.name} are a {meta.get('arch', 'unknown')} with another "
                                f"architecture than --arch {config.arch} --backbone {config.backbone}")


def _architecture(config: TrainConfig) -> dict | None:
    return RETINANET_PRESETS[config.backbone] if config.arch == "retinanet" else None


def _recorded_architecture(config: TrainConfig) -> dict:
    """The architecture as the weights' JSON records it (and ``--init`` weights must match)."""
    return _architecture(config) if config.arch == "retinanet" else FASTER_RCNN_CONFIG


def _metadata(config: TrainConfig, seed: int, scored: dict, train: SampleSet, val: SampleSet) -> dict:
    """The weights' JSON: architecture, input, training settings and data, and ``scored`` (validation AP
    and epoch of these weights)."""
    sources: dict[str, int] = {}
    for m in train.meta:
        sources[m["source"]] = sources.get(m["source"], 0) + 1
    return {
        "name": f"SpineInpaint lesion detector ({config.arch})",
        "arch": config.arch,
        "architecture": _recorded_architecture(config),
        "input": {"channels": "slices z - d, z, z + d (d = max(1, round(2 mm / slice spacing)))",
                  "size": [config.crop_size, config.crop_size], "pixel_mm": config.grid_mm,
                  "centre": "centroid of the spine mask on the slice", "window_hu": list(det.WINDOW),
                  "scaling": "(HU - low) / (high - low) clipped to [0, 1]", "orientation": "LPS axial"},
        "output": "boxes x1, y1, x2, y2 (crop pixels, end exclusive), scores",
        "training": {**dataclasses.asdict(config), "seed": seed, "train_samples": len(train),
                     "val_samples": len(val), "samples_per_source": sources,
                     "augmentation": "rotation +-15 deg, left-right flip, crop shift +-12 mm, scale 0.9-1.1, "
                                     "Gaussian noise 0-25 HU"
                                     + ("; shared 3D domain randomisation of the training cases "
                                        "(training.augment, 'domain')" if config.domain is not None else "")},
        "metrics": {"val_ap50": scored["ap50"], "val_ap50_95": scored.get("ap50_95"), "epoch": scored["epoch"],
                    "weights": "moving average of the weights (--ema)" if config.ema else "the weights"},
    }


def slim_case(case: datasets.Case) -> datasets.Case:
    """A case holding only what the detection evaluation reads (dozens of 512x512 volumes stay in memory)."""
    import types

    les = case.lesion
    if les is not None:
        les = types.SimpleNamespace(lesion_type=les.lesion_type, destructive=les.destructive, level=les.level,
                                    lesion_mask=les.lesion_mask, bone_destroyed=les.bone_destroyed,
                                    healthy_labels=case.labels)
    info = {"simulator": case.info["simulator"]} if "simulator" in case.info else {}
    return datasets.Case(case.case_id, case.ct, case.ct, case.labels, les, case.source, case.seed, info)
