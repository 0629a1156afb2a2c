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
Training is seeded, resumable (``last.pt``), logs per-epoch metrics (``metrics.csv``,
``curves.png``), keeps the best weights by validation AP@0.5 (``best.safetensors`` + JSON) and those
of the last epoch (``final.safetensors``; with ``--ema``, the moving average of the weights) and runs
unchanged under ``torchrun`` (:mod:`SpineInpaintLib.training`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError, datasets, io, metrics, training
from SpineInpaintLib import detection as det

__all__ = [
    "CACHE_SIZE",
    "MIN_BOX_MM",
    "SampleSet",
    "samples_from_case",
    "samples_from_deeplesion",
    "case_seeds",
    "case_specs",
    "training_cache_paths",
    "make_detection_cases",
    "build_sample_set",
    "augment",
    "boxes_from_instances",
    "TrainConfig",
    "train_detector",
    "predict_samples",
    "score_detections",
    "evaluate_detection",
    "format_evaluation",
]

#: Side (pixels of GRID_MM) of the cached crops: room for +-15 deg rotation, 0.9 scale and +-12 mm shifts.
CACHE_SIZE = 176
#: Smallest lesion cross-section (mm, both sides) that makes a slice a positive sample.
MIN_BOX_MM = 5.0
#: Boxes with a side under this (mm) count as small for ``--small-box-weight``.
SMALL_BOX_MM = 10.0
#: Loss columns of the metrics log (RetinaNet's and Faster R-CNN's names).
_LOSS_COLUMNS = ("loss", "classification", "box_regression", "loss_classifier", "loss_objectness")
#: Validation volumes the volume-level thresholds are tuned on (``evaluate detection --tune``): 30
#: volumes; 15 (6 + 6 + 3) let a single false lesion decide the minimum track length.
TUNING_VOLUMES = {"phantoms": 12, "real": 12, "healthy_phantoms": 6}
#: Levels a phantom's field of view is drawn around (3 consecutive levels between L5 and T10).
_PHANTOM_LEVELS = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10")
#: Levels of the hard-negative phantoms (``negative_phantoms``): S1 too, whose junction with the sacral
#: ala the detector took for a lesion; a window of 3 levels cuts a vertebra at each end of the field.
_NEGATIVE_LEVELS = ("S1",) + _PHANTOM_LEVELS
#: Spine slices kept as negatives from each hard-negative phantom (a healthy case gives 6 otherwise).
NEGATIVE_PHANTOM_SLICES = 30


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
    def empty(cls, size: int = CACHE_SIZE) -> "SampleSet":
        return cls(np.zeros((0, 3, size, size), np.int16), np.zeros((0, size, size), np.uint8), [])

    @classmethod
    def concat(cls, sets: Iterable["SampleSet"]) -> "SampleSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        return cls(np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]),
                   [m for s in sets for m in s.meta])

    def subset(self, index: Sequence[int]) -> "SampleSet":
        index = np.asarray(index, int)
        return SampleSet(self.images[index], self.masks[index], [self.meta[i] for i in index])

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=self.images, masks=self.masks, meta=json.dumps(self.meta))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "SampleSet":
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
    spine = datasets.spine_mask(labels) > 0
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
            "level": int(lesion.level) if lesion is not None else None}
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

    from SpineInpaintLib import deeplesion

    root = Path(root)
    info = root / "DL_info.csv"
    if not info.exists():
        raise SpineInpaintError(f"no DL_info.csv in {root} (not a DeepLesion-format folder)")
    records = deeplesion.select(deeplesion.read_info(info), deeplesion.BONE, split)
    images, masks, meta = [], [], []
    for file_name, group in deeplesion.group_by_image(records).items():
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


# --- cases ---------------------------------------------------------------------------------------
def case_seeds(prefix: str, split: str, count: int, *, start: int = 0) -> list[int]:
    """The first ``count`` seeds >= ``start`` whose case id ``f'{prefix}_{seed:04d}'`` falls in ``split``."""
    seeds, seed = [], start
    while len(seeds) < count:
        if datasets.split_of(f"{prefix}_{seed:04d}") == split:
            seeds.append(seed)
        seed += 1
    return seeds


def _phantom_levels(seed: int, levels: Sequence[str] = _PHANTOM_LEVELS) -> tuple[str, ...]:
    k = int(np.random.default_rng([seed, 31337]).integers(0, len(levels) - 2))
    return tuple(levels[k:k + 3])


#: One case of :func:`case_specs`: its cache key, its generator and options of :func:`samples_from_case`
#: that apply to it alone.
CaseSpec = tuple[str, Callable[[], datasets.Case], dict]


def case_specs(split: str, *, phantoms: int, real: int, healthy_phantoms: int = 0, healthy_real: bool = False,
               negative_phantoms: int = 0, real_name: str = "totalsegmentator",
               lesion_types: Sequence[str] = ("lytic", "sclerotic", "mixed"),
               ) -> list[CaseSpec]:
    """``(key, make_case, options)`` of one split: phantoms and real-scan seeds whose ids fall in ``split``.

    Lesion types are cycled over the cases. Lesioned phantoms use the first ``phantoms`` seeds of the
    split, healthy ones the following ``healthy_phantoms``, hard-negative ones the following
    ``negative_phantoms``. Each phantom covers 3 consecutive levels between L5 and T10 (drawn from its
    seed) to keep generation fast; hard-negative phantoms are healthy, their levels lie between S1 and
    T10 and up to ``NEGATIVE_PHANTOM_SLICES`` of their spine slices are kept (``options``). The key
    names the case and its lesion type (the same case id may carry different lesions).
    """
    specs: list[CaseSpec] = []
    seeds = case_seeds("phantom", split, phantoms + healthy_phantoms + negative_phantoms)
    for k, seed in enumerate(seeds):
        if k >= phantoms + healthy_phantoms:
            specs.append((f"phantom_{seed:04d}_negatives",
                          functools.partial(datasets.phantom_case, seed, lesion_types=None,
                                            levels=_phantom_levels(seed, _NEGATIVE_LEVELS)),
                          {"min_negatives": NEGATIVE_PHANTOM_SLICES}))
            continue
        types = [lesion_types[k % len(lesion_types)]] if k < phantoms else None
        specs.append((f"phantom_{seed:04d}_{types[0] if types else 'healthy'}",
                      functools.partial(datasets.phantom_case, seed, lesion_types=types,
                                        levels=_phantom_levels(seed)), {}))
    for k, seed in enumerate(case_seeds(f"real_{real_name}", split, real)):
        t = lesion_types[k % len(lesion_types)]
        specs.append((f"real_{real_name}_{seed:04d}_{t}",
                      functools.partial(datasets.real_case, real_name, seed=seed, lesion_types=[t]), {}))
    if healthy_real:
        specs.append((f"real_{real_name}_healthy",
                      functools.partial(datasets.real_case, real_name, seed=0, lesion_types=None), {}))
    return specs


def make_detection_cases(split: str, **kwargs) -> Iterator[datasets.Case]:
    """The cases of :func:`case_specs`, generated one by one; a case the generators reject is skipped
    with a warning (a phantom draw can be invalid)."""
    for key, make, _ in case_specs(split, **kwargs):
        try:
            yield make()
        except SpineInpaintError as err:
            warnings.warn(f"skipped case {key}: {err}")


def build_sample_set(specs: Sequence[CaseSpec], *, seed: int,
                     cache: str | Path | None = None, progress: bool = False, **kwargs) -> SampleSet:
    """Samples of every case (see :func:`samples_from_case`; ``kwargs`` and then each spec's own
    options), seeded per case.

    With ``cache``, each case's samples are kept in ``cache/<key>.npz`` and reused (a crash or a
    second detector loses no work). Cases the generators reject are skipped with a warning.
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
            warnings.warn(f"skipped case {key}: {err}")
            continue
        rng = np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)])
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
class TrainConfig:
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
    deeplesion: str | None = None
    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 8
    lr: float | None = None
    positive_fraction: float = 0.6
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    threads: int | None = None
    max_minutes: float | None = None
    progress: bool = True
    init: str | None = None
    box_loss: str = "smooth_l1"
    ema: float = 0.0
    small_box_weight: float = 1.0
    grid_mm: float = det.GRID_MM
    crop_size: int = det.CROP_SIZE

    def default_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.arch == "retinanet" else 2e-4)


def _aggregate_path(cache: Path, name: str, specs: Sequence[CaseSpec]) -> Path:
    """``cache/<name>-<digest of the case keys>.npz``: an aggregate serves only the cases it was built
    from (the per-case files are reused by any case list)."""
    digest = hashlib.sha256("\n".join(key for key, _, _ in specs).encode()).hexdigest()[:10]
    return cache / f"{name}-{digest}.npz"


def _training_specs(config: "TrainConfig") -> tuple[list[CaseSpec], list[CaseSpec]]:
    train = case_specs("train", phantoms=config.phantoms, real=config.real,
                       healthy_phantoms=config.healthy_phantoms, negative_phantoms=config.negative_phantoms,
                       healthy_real=True)
    return train, case_specs("val", phantoms=config.val_phantoms, real=config.val_real)


def training_cache_paths(config: "TrainConfig") -> tuple[Path, Path]:
    """Where :func:`training_data` keeps the training and validation samples of ``config``'s cases."""
    train, val = _training_specs(config)
    return _aggregate_path(Path(config.cache), "train", train), _aggregate_path(Path(config.cache), "val", val)


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
    train_path, val_path = _aggregate_path(cache, "train", train_specs), _aggregate_path(cache, "val", val_specs)
    grid = {"size": cache_size(config.crop_size), "grid_mm": config.grid_mm}
    if main:
        def build_train():
            return build_sample_set(train_specs, seed=config.seed, cache=cache / "cases",
                                    progress=config.progress, **grid)

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
    ap = metrics.coco_ap(boxes, scores, truth)
    out = {"images": len(truth), "lesion_boxes": int(sum(len(t) for t in truth)), "ap50": ap["ap50"],
           "ap50_95": ap["ap50_95"]}
    if out["lesion_boxes"]:
        fr = metrics.froc(boxes, scores, truth, fps_per_image=fps)
        out.update({f"froc@{f:g}": float(s) for f, s in zip(fps, fr.sensitivities)})
    return out


def train_detector(config: TrainConfig) -> dict:
    """Train one detector (see the module notes); returns a summary (best validation AP, paths, time)."""
    if config.arch not in det.ARCHITECTURES:
        raise SpineInpaintError(f"unknown detector '{config.arch}' (use {' or '.join(det.ARCHITECTURES)})")
    if config.epochs < 1 or config.steps_per_epoch < 1 or config.batch_size < 1:
        raise SpineInpaintError("epochs, steps per epoch and batch size must be >= 1")
    counts = {"--phantoms": config.phantoms, "--healthy-phantoms": config.healthy_phantoms,
              "--negative-phantoms": config.negative_phantoms, "--real": config.real,
              "--val-phantoms": config.val_phantoms, "--val-real": config.val_real}
    for flag, count in counts.items():
        if count < 0:
            raise SpineInpaintError(f"{flag} must be >= 0, got {count}")
    if config.arch == "retinanet" and config.backbone not in det.RETINANET_PRESETS:
        raise SpineInpaintError(f"unknown RetinaNet backbone '{config.backbone}' "
                                f"(use {' or '.join(det.RETINANET_PRESETS)})")
    det.check_box_loss(config.arch, config.box_loss)
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
    seed = training.seed_everything(config.seed + ctx.rank)
    out = Path(config.out)
    train, val = training_data(config, ctx)
    grid = {"crop_size": config.crop_size, "grid_mm": config.grid_mm}
    detector = det.Detector(config.arch, device=str(ctx.device), config=_architecture(config), **grid)
    detector.set_box_loss(config.box_loss)
    last = out / "last.pt"
    if config.init and not (config.resume and last.exists()):
        # Fine-tuning: a fresh schedule from existing weights of the same architecture.
        training.load_weights(detector.model, Path(config.init))
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
                training.save_weights(evaluated.model, out / "best.safetensors",
                                      _metadata(config, seed, best, train, val))
            # The weights of the last epoch too: with --ema the average at the end of the schedule,
            # which a noisy validation maximum early in fine-tuning may otherwise hide.
            training.save_weights(evaluated.model, out / "final.safetensors",
                                  _metadata(config, seed, current, train, val))
            log.append(**row)
            training.save_checkpoint(last, epoch=epoch, models=saved_models,
                                     optimizers={"optimiser": optimiser}, seed=seed, extra={"best": best})
            training.plot_curves(out / "metrics.csv", out / "curves.png",
                                 [("loss", [k for k in row if k in _LOSS_COLUMNS]),
                                  ("validation", ["val_ap50", "val_ap50_95", "val_froc@1"])],
                                 title=f"{config.arch} (seed {config.seed})")
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
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
    meta = training.read_weights_metadata(path)
    wanted = json.loads(json.dumps(_recorded_architecture(config)))  # as JSON stores it: tuples become lists
    if meta.get("arch") != config.arch or meta.get("architecture") != wanted:
        raise SpineInpaintError(f"--init weights {path.name} are a {meta.get('arch', 'unknown')} with another "
                                f"architecture than --arch {config.arch} --backbone {config.backbone}")


def _architecture(config: TrainConfig) -> dict | None:
    return det.RETINANET_PRESETS[config.backbone] if config.arch == "retinanet" else None


def _recorded_architecture(config: TrainConfig) -> dict:
    """The architecture as the weights' JSON records it (and ``--init`` weights must match)."""
    return _architecture(config) if config.arch == "retinanet" else det.FASTER_RCNN_CONFIG


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
                                     "Gaussian noise 0-25 HU"},
        "metrics": {"val_ap50": scored["ap50"], "val_ap50_95": scored.get("ap50_95"), "epoch": scored["epoch"],
                    "weights": "moving average of the weights (--ema)" if config.ema else "the weights"},
    }


# --- evaluation -----------------------------------------------------------------------------------
def _groups(meta: list[dict]) -> dict[str, np.ndarray]:
    """Image indices per reporting group: lesion type, destructive or not, source."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        keys = [f"type={m['case_lesion_type']}", f"source={m['source']}"]
        if m["destructive"] is not None:
            keys.append("destructive" if m["destructive"] else "intact cortex")
        for k in keys:
            groups.setdefault(k, []).append(i)
    return {k: np.asarray(v) for k, v in sorted(groups.items())}


def evaluate_detection(detectors: dict[str, det.Detector], *, phantoms: int = 15, real: int = 9,
                       healthy_phantoms: int = 4, max_positives: int = 10, deeplesion: str | None = None,
                       seed: int = 0, volume_level: bool = True, progress: bool = True,
                       figures: str | Path | None = None, cases: list[datasets.Case] | None = None,
                       volume_options: dict | None = None) -> dict:
    """Both detectors on the same held-out (test split) slices: AP, FROC, speed, per-group AP.

    Slices: per test case at most ``max_positives`` lesion slices (evenly spaced) and as many
    lesion-free spine slices (at least 10; healthy cases give 10).

    Volume level (the first detector only): lesions found by :func:`detection.detect_volume` on each
    test volume against the simulated lesion (a hit when the 3D boxes overlap with IoU >= 0.1),
    false positives per lesioned and per healthy volume, and the Dice of the lesion mask built by
    :func:`detection.lesion_mask_from_detections` against the simulated tumour inside the vertebra.
    With ``figures``, writes ``detection_froc.png`` and ``detection_examples.png`` there.
    ``cases`` replaces the generated test cases; ``volume_options`` go to ``detect_volume``.
    """
    if cases is None:
        cases = list(make_detection_cases("test", phantoms=phantoms, real=real,
                                          healthy_phantoms=healthy_phantoms, healthy_real=True))
    if not cases:
        raise SpineInpaintError("no test case could be generated")
    inputs: dict[tuple[int, float], tuple[SampleSet, np.ndarray, list]] = {}
    for detector in detectors.values():
        key = (detector.crop_size, detector.grid_mm)
        if key in inputs:
            continue
        # The same slices for every input grid (the draws do not depend on it); truth boxes come
        # from the lesion mask resampled onto each grid.
        rng = np.random.default_rng([seed, 8191])
        size = cache_size(key[0])
        samples = SampleSet.concat(samples_from_case(c, rng=rng, max_positives=max_positives, size=size,
                                                     grid_mm=key[1], negatives_per_positive=1.0, min_negatives=10)
                                   for c in cases)
        if deeplesion:
            samples = SampleSet.concat([samples, samples_from_deeplesion(deeplesion, "test", rng=rng, size=size,
                                                                         grid_mm=key[1])])
        inputs[key] = (samples, samples.centre_crops(key[0]), samples.centre_boxes(key[0]))
    samples, images, truth = next(iter(inputs.values()))
    result = {"seed": seed, "test_cases": [c.case_id for c in cases], "slices": len(samples),
              "positive_slices": int(sum(len(t) > 0 for t in truth)), "detectors": {}}
    groups = _groups(samples.meta)
    predictions, curves = {}, {}
    for name, detector in detectors.items():
        grid_samples, grid_images, grid_truth = inputs[(detector.crop_size, detector.grid_mm)]
        crop_s = float(np.mean([m["crop_s"] for m in grid_samples.meta]))
        detector.predict(grid_images[:2])  # warm-up: the first call allocates (not timed)
        boxes, scores, seconds = predict_samples(detector, grid_images)
        predictions[name] = (boxes, scores)
        row = score_detections(boxes, scores, grid_truth)
        if row["lesion_boxes"]:
            fr = metrics.froc(boxes, scores, grid_truth)
            curves[name] = (fr.curve_fps, fr.curve_sensitivity)
        row["images_per_s"] = len(grid_images) / (seconds + crop_s * len(grid_images))
        row["model_images_per_s"] = len(grid_images) / seconds
        row["input_grid"] = {"size": detector.crop_size, "pixel_mm": detector.grid_mm}
        row["groups"] = {}
        for g, idx in groups.items():
            if any(len(grid_truth[i]) for i in idx):
                row["groups"][g] = score_detections([boxes[i] for i in idx], [scores[i] for i in idx],
                                                    [grid_truth[i] for i in idx])
        result["detectors"][name] = row
    # The example figure draws the detectors of the first one's input grid on its crops.
    first = next(iter(detectors.values()))
    same_grid = {n: p for n, p in predictions.items()
                 if (detectors[n].crop_size, detectors[n].grid_mm) == (first.crop_size, first.grid_mm)}
    if figures and curves:
        result["figures"] = [str(plot_froc(result, curves, Path(figures) / "detection_froc.png")),
                             str(plot_examples(images, truth, same_grid, samples.meta,
                                               Path(figures) / "detection_examples.png", seed=seed))]
    if volume_level and detectors:
        result["volume_level"] = _volume_level(next(iter(detectors.values())), cases, progress,
                                               volume_options or {})
    return result


def slim_case(case: datasets.Case) -> datasets.Case:
    """A case holding only what the detection evaluation reads (dozens of 512x512 volumes stay in memory)."""
    import types

    les = case.lesion
    if les is not None:
        les = types.SimpleNamespace(lesion_type=les.lesion_type, destructive=les.destructive, level=les.level,
                                    lesion_mask=les.lesion_mask, bone_destroyed=les.bone_destroyed,
                                    healthy_labels=case.labels)
    return datasets.Case(case.case_id, case.ct, case.ct, case.labels, les, case.source, case.seed, {})


def tune_volume_level(detector: det.Detector, cases: Sequence[datasets.Case], *,
                      score_thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      slice_thresholds: Sequence[float] = (0.2, 0.3, 0.5), min_slices: Sequence[int] = (2, 3, 4),
                      fp_weight: float = 0.5) -> dict:
    """Volume-level thresholds of :func:`detection.detect_volume` for one detector, tuned on ``cases``.

    Every combination of the three thresholds (slice threshold <= score threshold) is scored on the
    cases' volumes by sensitivity minus ``fp_weight`` times the mean false lesions per volume (a hit
    as :func:`volume_hits`); the best wins, ties to the higher score threshold. The network runs once
    per volume. Returns ``{"chosen": {...}, "grid": [...], "cases": [...]}``.
    """
    if not cases:
        raise SpineInpaintError("no validation volume to tune the thresholds on")
    per = []
    for case in cases:
        ct_lps, spine = det.lps_inputs(case.ct, case.labels)
        per_slice = det.detect_slices(ct_lps, spine, detector, score_threshold=min(slice_thresholds))
        per.append((case, ct_lps, spine, per_slice, truth_box_3d(case)))
    grid = []
    for st in score_thresholds:
        for sl in slice_thresholds:
            if sl > st:
                continue
            for ms in min_slices:
                rows = []
                for case, ct_lps, spine, per_slice, truth in per:
                    found = det.lesions_from_slices(per_slice, ct_lps, spine, score_threshold=st,
                                                    slice_threshold=sl, min_slices=ms)
                    tp, fp = volume_hits(found, truth)
                    rows.append({"lesion": case.lesion.lesion_type if case.lesion else "none",
                                 "true_positive": tp, "false_positives": fp})
                summary = summarise_volume_rows(rows)
                summary.pop("cases", None)
                summary["objective"] = summary["sensitivity"] - fp_weight * float(
                    np.mean([r["false_positives"] for r in rows]))
                grid.append({"score_threshold": float(st), "slice_threshold": float(sl), "min_slices": int(ms),
                             **summary})
    best = max(grid, key=lambda g: (g["objective"], g["score_threshold"]))
    return {"chosen": best, "grid": grid, "cases": [c.case_id for c in cases], "fp_weight": fp_weight}


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def truth_box_3d(case: datasets.Case) -> np.ndarray | None:
    if case.lesion is None:
        return None
    mask = io.reorient(case.lesion.bone_destroyed, "LPS").array > 0
    if not mask.any():
        mask = io.reorient(case.lesion.lesion_mask, "LPS").array > 0
    zz, yy, xx = np.nonzero(mask)
    return np.array([[xx.min(), yy.min(), zz.min(), xx.max() + 1, yy.max() + 1, zz.max() + 1]], float)


def _volume_level(detector: det.Detector, cases: list[datasets.Case], progress: bool, options: dict) -> dict:
    rows = []
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="volumes", unit="case")
    for case in iterator:
        start = time.perf_counter()
        found = det.detect_volume(case.ct, case.labels, detector, **options)
        seconds = time.perf_counter() - start
        tp, fps = volume_hits(found, truth_box_3d(case))
        row = {"case_id": case.case_id, "lesion": case.lesion.lesion_type if case.lesion else "none",
               "found": len(found), "true_positive": tp, "false_positives": fps, "seconds": seconds}
        if case.lesion is not None and found:
            mask = det.lesion_mask_from_detections(case.ct, found, case.labels).array > 0
            vert = case.lesion.healthy_labels.array == case.lesion.level
            target = (case.lesion.lesion_mask.array > 0) & vert
            row["mask_dice_in_vertebra"] = metrics.dice(mask & vert, target)
        rows.append(row)
    return {"options": options, **summarise_volume_rows(rows)}


def volume_hits(found: list[det.Lesion3D], truth: np.ndarray | None) -> tuple[int, int]:
    """(1 if the true lesion is found else 0, false positives): a hit is a 3D box IoU >= 0.1."""
    hits, fps = 0, 0
    for les in found:
        z1, z2 = les.z_range
        b = np.array([[min(v[0] for v in les.boxes.values()), min(v[1] for v in les.boxes.values()), z1,
                       max(v[2] for v in les.boxes.values()), max(v[3] for v in les.boxes.values()), z2]])
        if truth is not None and metrics.box_iou(b, truth)[0, 0] >= 0.1:
            hits += 1
        else:
            fps += 1
    return min(hits, 1), fps + max(0, hits - 1)


def summarise_volume_rows(rows: list[dict]) -> dict:
    """Sensitivity, false positives per lesioned / healthy volume and mean mask Dice of per-case rows."""
    lesioned = [r for r in rows if r["lesion"] != "none"]
    healthy = [r for r in rows if r["lesion"] == "none"]
    dices = [r["mask_dice_in_vertebra"] for r in rows if "mask_dice_in_vertebra" in r]
    return {
        "cases": rows,
        "sensitivity": float(np.mean([r["true_positive"] for r in lesioned])) if lesioned else float("nan"),
        "fp_per_lesioned_volume": _mean([r["false_positives"] for r in lesioned]),
        "fp_per_healthy_volume": _mean([r["false_positives"] for r in healthy]),
        "healthy_volumes": len(healthy),
        "mean_mask_dice_in_vertebra": float(np.mean(dices)) if dices else float("nan"),
    }


def format_evaluation(result: dict) -> str:
    """A side-by-side text table of :func:`evaluate_detection` with the paper's row."""
    cols = ["ap50", "ap50_95", "froc@0.5", "froc@1", "froc@2", "froc@4", "images_per_s"]
    head = f"{'detector':<34}" + "".join(f"{c:>13}" for c in cols)
    lines = [f"held-out slices: {result['slices']} ({result['positive_slices']} with a lesion) from "
             f"{len(result['test_cases'])} test cases", head]
    for name, row in result["detectors"].items():
        lines.append(f"{name:<34}" + "".join(f"{row.get(c, float('nan')):>13.3f}" for c in cols))
    paper = det.PAPER_RESULT
    lines.append(f"{'paper (GPU, DeepLesion bone)':<34}{paper['ap50']:>13.4f}" + f"{'-':>13}" * 5
                 + f"{paper['images_per_s']:>13.2f}")
    lines.append("")
    lines.append("AP@0.5 per group (" + ", ".join(result["detectors"]) + "):")
    names = list(result["detectors"])
    group_names = sorted({g for row in result["detectors"].values() for g in row["groups"]})
    for g in group_names:
        values = []
        for n in names:
            grp = result["detectors"][n]["groups"].get(g)
            values.append(f"{grp['ap50']:.3f} ({grp['lesion_boxes']} boxes)" if grp else "-")
        lines.append(f"  {g:<22}" + "   ".join(values))
    vol = result.get("volume_level")
    if vol:
        lines.append("")
        lines.append(f"volume level ({names[0]}): sensitivity {vol['sensitivity']:.3f}, "
                     f"FP per lesioned volume {vol['fp_per_lesioned_volume']:.2f}, "
                     f"FP per healthy volume {vol['fp_per_healthy_volume']:.2f} "
                     f"({vol['healthy_volumes']} volumes), "
                     f"lesion-mask Dice in the vertebra {vol['mean_mask_dice_in_vertebra']:.3f}")
    return "\n".join(lines)


# --- figures ----------------------------------------------------------------------------------------
def plot_froc(result: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """FROC curves of the detectors of one evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (fps, sens) in curves.items():
        row = result["detectors"][name]
        ax.plot(fps, sens, label=f"{name} (AP@0.5 {row['ap50']:.3f})")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(0, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("sensitivity (IoU >= 0.5)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"held-out slices: {result['slices']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(images: np.ndarray, truth: list, predictions: dict[str, tuple[list, list]],
                  meta: list[dict], path: Path, *, n: int = 6, seed: int = 0, threshold: float = 0.5) -> Path:
    """Held-out slices with the true box (green) and each detector's boxes above ``threshold``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pos = [i for i, t in enumerate(truth) if len(t)]
    neg = [i for i, t in enumerate(truth) if not len(t)]
    by_type: dict[str, list[int]] = {}
    for i in pos:
        by_type.setdefault(meta[i]["case_lesion_type"] + meta[i]["source"], []).append(i)
    chosen = [int(rng.choice(v)) for _, v in sorted(by_type.items())][: n - 1]
    chosen += [int(rng.choice(neg))] if neg else []
    colours = ["red", "deepskyblue", "orange"]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3 * len(chosen), 3.3), squeeze=False)
    for ax, i in zip(axes[0], chosen):
        ax.imshow(images[i, 1], cmap="gray", vmin=0, vmax=1)
        for b in truth[i]:
            ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                       ec="lime", lw=1.5))
        for colour, (name, (boxes, scores)) in zip(colours, predictions.items()):
            for b, s in zip(boxes[i], scores[i]):
                if s >= threshold:
                    ax.add_patch(plt.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                               ec=colour, lw=1, ls="--"))
                    ax.text(b[0], b[1] - 2, f"{s:.2f}", color=colour, fontsize=7)
        m = meta[i]
        kind = m["case_lesion_type"] if len(truth[i]) else "no lesion"
        ax.set_title(f"{m['source']} {kind}" + (" destr." if m.get("destructive") and len(truth[i]) else ""),
                     fontsize=9)
        ax.axis("off")
    fig.suptitle("green: truth; " + ", ".join(f"{c}: {n}" for c, n in zip(colours, predictions)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------------
def run_train(args) -> int:
    """``python -m SpineInpaintLib train detection``."""
    import shutil

    out = args.out or f"runs/detection/{args.arch}"
    config = TrainConfig(arch=args.arch, backbone=args.backbone, out=out, cache=args.cache, phantoms=args.phantoms,
                         healthy_phantoms=args.healthy_phantoms, negative_phantoms=args.negative_phantoms,
                         real=args.real, val_phantoms=args.val_phantoms, val_real=args.val_real,
                         deeplesion=args.deeplesion,
                         epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, resume=not args.no_resume, device=args.device,
                         threads=args.threads, max_minutes=args.max_minutes, progress=not args.quiet,
                         init=args.init, box_loss=args.box_loss, ema=args.ema,
                         small_box_weight=args.small_box_weight, grid_mm=args.grid_mm, crop_size=args.crop_size)
    summary = train_detector(config)
    print(json.dumps(summary, indent=2))
    which = args.export_weights
    if args.export and (Path(out) / f"{which}.safetensors").exists():
        export = Path(args.export)
        export.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(out) / f"{which}.safetensors", export / f"{args.arch}.safetensors")
        shutil.copy(Path(out) / f"{which}.json", export / f"{args.arch}.json")
        for name in ("metrics.csv", "curves.png"):
            if (Path(out) / name).exists():
                shutil.copy(Path(out) / name, export / f"{args.arch}_{name}")
        print(f"exported the {which} weights to {export}")
    return 0


def run_evaluate(args) -> int:
    """``python -m SpineInpaintLib evaluate detection``: both detectors side by side with the paper's row."""
    if args.save_thresholds and not args.tune:
        raise SpineInpaintError("--save-thresholds needs --tune (there is nothing tuned to save)")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    training.seed_everything(args.seed)
    detectors = {"RetinaNet (MONAI, ours)": det.load_detector(args.retinanet or det.DEFAULT_WEIGHTS,
                                                              arch="retinanet")}
    if args.compare:
        detectors[f"RetinaNet ({args.compare})"] = det.load_detector(args.compare, arch="retinanet")
    baseline = Path(args.faster_rcnn)
    if baseline.exists():
        detectors["Faster R-CNN VGG-16 (baseline)"] = det.load_detector(baseline, arch="faster_rcnn")
    else:
        print(f"note: no Faster R-CNN weights at {baseline}; train them with "
              "'python -m SpineInpaintLib train detection --arch faster_rcnn' to compare")
    retinanet = detectors["RetinaNet (MONAI, ours)"]
    volume_options, tuning = None, None
    if args.tune and not args.no_volume:
        val_cases = [slim_case(c) for c in make_detection_cases("val", **TUNING_VOLUMES)]
        tuning = tune_volume_level(retinanet, val_cases)
        volume_options = {k: tuning["chosen"][k] for k in ("score_threshold", "slice_threshold", "min_slices")}
        print(f"volume-level thresholds tuned on {len(val_cases)} validation volumes: {volume_options} "
              f"(sensitivity {tuning['chosen']['sensitivity']:.2f}, "
              f"{tuning['chosen']['fp_per_lesioned_volume']:.2f} / {tuning['chosen']['fp_per_healthy_volume']:.2f} "
              "false lesions per lesioned / healthy volume)")
    cases = None if args.no_volume else [
        slim_case(c) for c in make_detection_cases("test", phantoms=args.phantoms, real=args.real,
                                                   healthy_phantoms=args.healthy_phantoms, healthy_real=True)]
    result = evaluate_detection(detectors, phantoms=args.phantoms, real=args.real,
                                healthy_phantoms=args.healthy_phantoms, deeplesion=args.deeplesion,
                                seed=args.seed, volume_level=not args.no_volume, progress=not args.quiet,
                                figures=args.figures, cases=cases, volume_options=volume_options)
    result["command"] = "evaluate detection" + (" --tune" if tuning else "")
    if tuning:
        result["volume_tuning"] = tuning
        if args.save_thresholds:
            path = Path(args.retinanet or det.DEFAULT_WEIGHTS).with_suffix(".json")
            meta = json.loads(path.read_text())
            meta["volume_level"] = {**volume_options, "tuned_on": ", ".join(tuning["cases"]),
                                    "objective": f"sensitivity - {tuning['fp_weight']} x false lesions per volume",
                                    "test": {k: result["volume_level"][k] for k in
                                             ("sensitivity", "fp_per_lesioned_volume", "fp_per_healthy_volume")}}
            path.write_text(json.dumps(meta, indent=2))
            print(f"thresholds written to {path}")
    result["threads"] = torch.get_num_threads()
    print(format_evaluation(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
        print(f"results: {args.json}")
    return 0
