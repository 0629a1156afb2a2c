"""Training and evaluation of the segmentation networks (``train segmentation`` / ``evaluate segmentation``).

Data: phantom cases (:func:`SpineInpaintLib.datasets.phantom_case`), the real scans
(:func:`SpineInpaintLib.datasets.real_case`) and DeepLesion-format folders with our ``Masks_png/``
extension. Every case is resampled once to the network grid
(:func:`SpineInpaintLib.segmentation.to_network_grid`, ``--grid-mm``, 1.5 mm by default) and cached as
``.npy`` under the cache folder (never in git; one grid per folder); training draws 2.5D crops from
the cached volumes, and the weights record the grid they were trained on.

Splits are by case: the fixed train/val/test split of :func:`SpineInpaintLib.datasets.split_of`
(test cases are never used here), or ``--folds K --fold k``: the train and val cases together cut
into K folds by a seeded hash of the case id, fold k validating (the paper's 10-fold cross-validation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import vertebra_mask
from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.core.weights import load_weights, save_weights
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data import deeplesion
from SpineInpaintLib.segmentation import networks as seg
from SpineInpaintLib.segmentation.inference import (
    NEIGHBOUR_MM,
    WINDOWS,
    channel_stack,
    to_network_grid,
)
from SpineInpaintLib.training import augment
from SpineInpaintLib.training import loop as training
from SpineInpaintLib.training.loop import RunControl

__all__ = [
    "train_transforms", "segmentation_loss", "CachedCase", "RandomisedCase", "cache_case", "load_cache",
    "deeplesion_cases", "fold_of", "assign_splits", "CropSampler", "slice_iou", "SegmentationTrainConfig",
    "train_segmentation",
]


# --- training pieces (MONAI transforms and loss) -------------------------------------------------
def train_transforms(seed: int = 0):
    """MONAI geometric augmentation of a 2.5D crop: dict ``{'image': (4, H, W), 'label': (1, H, W)}``.

    Affine jitter (rotation +-10 deg, scale +-10 %, shear) and left-right flips (the level of a
    vertebra does not depend on the side). Intensity, kernel, noise and resolution changes come from
    the shared domain randomisation (:mod:`SpineInpaintLib.training.augment`), applied to each
    training case in 3D before crops are cut (:class:`CropSampler`).
    """
    from monai.transforms import Compose, RandAffined, RandFlipd

    keys = ("image", "label")
    transform = Compose([
        RandAffined(keys, prob=0.7, rotate_range=np.deg2rad(10.0), scale_range=0.1, shear_range=0.05,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
    ])
    transform.set_random_state(seed=int(seed) % 2**32)
    return transform


def segmentation_loss(boundary_weight: float = 0.0):
    """Dice + cross-entropy over the classes (MONAI ``DiceCELoss``) plus a Dice of the binary spine mask,
    and ``boundary_weight`` times a binary cross-entropy of the spine mask.

    The returned function takes logits (B, C, H, W) and class indices (B, H, W). The binary term
    (``1 - p(background)`` against any vertebra) weighs the spine mask, the paper's output, beside
    the harder per-level classes. Dice terms reward a mask that covers its object more than one that
    stops at its edge (the shipped U-Net's errors are a 1-2 mm rim outside the bone); the binary
    cross-entropy charges each rim pixel alike, which sharpens the boundary.
    """
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceCELoss, DiceLoss

    if boundary_weight < 0:
        raise SpineInpaintError(f"the boundary weight must be >= 0, got {boundary_weight}")
    # Smoothing 1 (not MONAI's 1e-5): a level absent from a batch and predicted absent scores ~0,
    # instead of a penalty that depends on how many 1e-9 probabilities add up.
    multi = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                       smooth_nr=1.0, smooth_dr=1.0)
    binary = DiceLoss(sigmoid=False, batch=True, smooth_nr=1.0, smooth_dr=1.0)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long().unsqueeze(1)
        spine_prob = 1.0 - torch.softmax(logits, dim=1)[:, :1]
        total = multi(logits, target) + binary(spine_prob, (target > 0).float())
        if boundary_weight:
            # log p(spine) - log p(background), stable: the spine's logit of a two-class softmax.
            spine_logit = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - logits[:, :1]
            total = total + boundary_weight * F.binary_cross_entropy_with_logits(spine_logit, (target > 0).float())
        return total

    return loss


# --- cache ---------------------------------------------------------------------------------------------
class CachedCase:
    """One case on the network grid: HU (int16, z y x), vertebra ids (uint8) and its description."""

    def __init__(self, folder: Path, info: dict):
        self.folder = Path(folder)
        self.info = info
        self.case_id = info["case_id"]
        self.source = info.get("source", "")
        self.z_spacing = float(info["z_spacing"])
        # Caches written before the grid was recorded hold the then fixed 1.5 mm grid.
        self.grid_mm = float(info.get("grid_mm", seg.GRID_MM))
        self._ct = None
        self._classes = None

    @property
    def ct(self) -> np.ndarray:
        if self._ct is None:
            self._ct = np.load(self.folder / f"{self.case_id}_ct.npy", mmap_mode="r")
        return self._ct

    @property
    def classes(self) -> np.ndarray:
        if self._classes is None:
            self._classes = seg.ids_to_classes(np.load(self.folder / f"{self.case_id}_labels.npy"))
        return self._classes

    @property
    def spine_slices(self) -> np.ndarray:
        return np.nonzero(self.classes.reshape(self.classes.shape[0], -1).any(axis=1))[0]


class RandomisedCase:
    """A cached case after one domain randomisation (:func:`augment.randomise_domain`), held in memory.

    Same reading interface as :class:`CachedCase` (``ct`` int16, ``classes``, ``z_spacing``,
    ``spine_slices``); a kept thick-slice draw changes ``z_spacing`` and the slice count.
    """

    def __init__(self, case: CachedCase, seed: int, config: augment.DomainRandomisation):
        grid = float(case.grid_mm)
        ct = io.Volume(np.asarray(case.ct), (grid, grid, case.z_spacing))
        labels = ct.with_array(np.load(case.folder / f"{case.case_id}_labels.npy"))
        out, out_labels, self.record = augment.randomise_domain(ct, labels, seed, config)
        self.case_id, self.source, self.info, self.grid_mm = case.case_id, case.source, case.info, grid
        self.z_spacing = float(out.spacing[2])
        self.ct = np.clip(np.rint(out.array), -1024, 3071).astype(np.int16)
        self.classes = seg.ids_to_classes(out_labels.array)

    @property
    def spine_slices(self) -> np.ndarray:
        return np.nonzero(self.classes.reshape(self.classes.shape[0], -1).any(axis=1))[0]


def cache_case(case: datasets.Case, folder: Path, grid_mm: float = seg.GRID_MM) -> dict:
    """Resample a case to the network grid (``grid_mm`` pixels) and write ``<id>_ct.npy`` and ``<id>_labels.npy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct = to_network_grid(case.ct, grid_mm=grid_mm)
    labels = to_network_grid(case.labels, labels=True, grid_mm=grid_mm)
    vertebrae = np.where(vertebra_mask(labels.array), labels.array, 0).astype(np.uint8)
    np.save(folder / f"{case.case_id}_ct.npy", np.clip(np.round(ct.array), -1024, 3071).astype(np.int16))
    np.save(folder / f"{case.case_id}_labels.npy", vertebrae)
    info = {"case_id": case.case_id, "source": case.source, "seed": int(case.seed),
            "split": datasets.split_of(case.case_id), "z_spacing": float(ct.spacing[2]),
            "grid_mm": float(ct.spacing[0]),
            "shape_zyx": list(ct.shape), "lesion": case.lesion is not None or bool(case.info.get("mask") is not None
                                                                                  and np.any(case.info["mask"]))}
    if case.info.get("real_case"):
        info["real_case"] = case.info["real_case"]
    if case.info.get("simulator"):
        info["simulator"] = case.info["simulator"]
    (folder / f"{case.case_id}.json").write_text(json.dumps(info))
    return info


def load_cache(folder: Path, grid_mm: float | None = None) -> list[CachedCase]:
    """Every cached case in ``folder`` (sorted by id).

    With ``grid_mm``, a folder holding cases on another grid is a one-line error (one grid per cache).
    """
    folder = Path(folder)
    cases = []
    for path in sorted(folder.glob("*.json")):
        info = json.loads(path.read_text())
        if "case_id" in info and (folder / f"{info['case_id']}_ct.npy").exists():
            cases.append(CachedCase(folder, info))
    if grid_mm is not None:
        other = sorted({c.grid_mm for c in cases if abs(c.grid_mm - float(grid_mm)) > 1e-6})
        if other:
            raise SpineInpaintError(f"{folder} holds cases on a {other[0]:g} mm grid, not {float(grid_mm):g} mm: "
                                    "use another --cache for this --grid-mm")
    return cases


def deeplesion_cases(root: Path) -> Iterable[datasets.Case]:
    """Cases from a DeepLesion-format folder: one per series with a ``DL_info.csv`` row and ``Masks_png/``.

    DeepLesion itself has no segmentations; our ``Masks_png/<series>/<slice>.png`` extension
    (:func:`SpineInpaintLib.datasets.write_deeplesion`) holds the vertebra ids of each slice.
    """
    from PIL import Image

    root = Path(root)
    info = root / "DL_info.csv"
    if not info.exists():
        raise SpineInpaintError(f"{root} is not a DeepLesion folder: DL_info.csv is missing")
    seen = set()
    for record in deeplesion.read_info(info):
        series = record.series_folder
        if series in seen:
            continue
        seen.add(series)
        mask_dir = root / "Masks_png" / series
        if not mask_dir.is_dir():
            continue
        ct = deeplesion.load_series_volume(root, record)
        first, last = record.slice_range
        masks = np.stack([np.asarray(Image.open(mask_dir / f"{n:03d}.png")) for n in range(first, last + 1)])
        labels = ct.with_array(masks.astype(np.uint8))
        case_id = f"deeplesion_{series}"
        yield datasets.Case(case_id, ct, ct, labels, None, "deeplesion", 0, {"deeplesion_series": series})


# --- splits ---------------------------------------------------------------------------------------------
def fold_of(case_id: str, folds: int, seed: int = 0) -> int:
    """Fold (0 ... folds-1) of a case: a seeded hash of its id (stable when cases are added)."""
    digest = hashlib.sha256(f"fold:{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % int(folds)


def assign_splits(cases: Sequence[CachedCase], *, folds: int = 0, fold: int = 0, seed: int = 0,
                  train_cases: Sequence[str] = ()) -> tuple[list[CachedCase], list[CachedCase]]:
    """(train, val) cases; test-split cases are always left out. ``train_cases`` are forced into training."""
    usable = [c for c in cases if c.info["split"] != "test" or c.case_id in train_cases]
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise SpineInpaintError(f"--fold must be in [0, {folds - 1}], got {fold}")
        val = [c for c in usable if fold_of(c.case_id, folds, seed) == fold and c.case_id not in train_cases]
    else:
        val = [c for c in usable if c.info["split"] == "val" and c.case_id not in train_cases]
    val_ids = {c.case_id for c in val}
    train = [c for c in usable if c.case_id not in val_ids]
    return train, val


# --- sampling -------------------------------------------------------------------------------------------
class CropSampler:
    """Random 2.5D training crops (``crop`` x ``crop`` pixels) with MONAI geometric augmentation.

    Three crops in four are centred near the spine (jittered), the rest anywhere in the slice, so
    the network also learns to leave ribs, pelvis and contrast alone on the whole slice. With
    ``domain`` (and ``augment``), each case is randomised in 3D (:mod:`SpineInpaintLib.training.augment`)
    the first time this sampler draws it, seeded by ``seed`` and the case id, and kept for the
    sampler's life: a trainer makes one sampler per epoch, so each case gets a new draw each epoch at
    the cost of one randomisation per case and epoch (well under a second on the 1.5 mm grid).
    """

    def __init__(self, cases: Sequence[CachedCase], crop: int = 160, seed: int = 0, augment: bool = True,
                 real_weight: float = 1.0, domain: augment.DomainRandomisation | None = None):
        if not cases:
            raise SpineInpaintError("no training cases")
        self.cases = list(cases)
        self.crop = int(crop)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.transform = train_transforms(seed) if augment else None
        self.domain = domain if augment else None
        self._randomised: dict[int, RandomisedCase] = {}
        # Cases are drawn in proportion to their spine slices; real scans (few, but the anatomy the
        # phantoms only approximate) can be drawn ``real_weight`` times as often.
        weights = np.array([len(c.spine_slices) * (real_weight if c.source == "real" else 1.0)
                            for c in self.cases], float)
        self.weights = weights / weights.sum()

    def _crop_at(self, case: CachedCase | RandomisedCase, z: int,
                 centre: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The 2.5D input and class target of a ``crop`` square centred at ``centre`` (padded with air)."""
        n, rows, cols = case.ct.shape
        offset = NEIGHBOUR_MM / case.z_spacing
        z0, z1 = max(0, int(np.floor(z - offset))), min(n - 1, int(np.ceil(z + offset)))
        r0, c0 = centre[0] - self.crop // 2, centre[1] - self.crop // 2
        rr = slice(max(0, r0), max(0, min(rows, r0 + self.crop)))
        cc = slice(max(0, c0), max(0, min(cols, c0 + self.crop)))
        hu = np.full((z1 - z0 + 1, self.crop, self.crop), -1024, np.int16)
        target = np.zeros((self.crop, self.crop), np.uint8)
        dst = (slice(rr.start - r0, rr.stop - r0), slice(cc.start - c0, cc.stop - c0))
        hu[(slice(None),) + dst] = case.ct[z0:z1 + 1, rr, cc]
        target[dst] = case.classes[z, rr, cc]
        return channel_stack(hu, case.z_spacing, [z - z0])[0], target

    def _case(self, index: int) -> CachedCase | RandomisedCase:
        if self.domain is None:
            return self.cases[index]
        if index not in self._randomised:
            case = self.cases[index]
            self._randomised[index] = RandomisedCase(case, augment.case_seed(self.seed, case.case_id), self.domain)
        return self._randomised[index]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        case = self._case(int(self.rng.choice(len(self.cases), p=self.weights)))
        slices = case.spine_slices
        z = int(self.rng.choice(slices)) if self.rng.random() < 0.95 or slices.size == 0 else \
            int(self.rng.integers(case.ct.shape[0]))
        target = case.classes[z]
        if self.rng.random() < 0.75 and target.any():
            rows, cols = np.nonzero(target)
            centre = (int(rows.mean() + self.rng.normal(0, 15)), int(cols.mean() + self.rng.normal(0, 15)))
        else:
            centre = (int(self.rng.integers(target.shape[0])), int(self.rng.integers(target.shape[1])))
        image, label = self._crop_at(case, z, centre)
        if self.transform is not None:
            out = self.transform({"image": image, "label": label[None]})
            image, label = np.asarray(out["image"]), np.asarray(out["label"])[0]
        return image.astype(np.float32), np.rint(label).astype(np.int64)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.sample() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def slice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, int, int]:
    """Pooled pixel counts for the IoU curves: (intersection, union, true negatives, pixels).

    The spine IoU of a set of slices is intersection / union; the paper's Keras-style 2-class mean
    IoU is the mean of that and the background IoU, tn / (pixels - intersection).
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    inter = int(np.count_nonzero(pred & truth))
    union = int(np.count_nonzero(pred | truth))
    return inter, union, int(pred.size - union), int(pred.size)


def _iou_values(counts: np.ndarray) -> tuple[float, float]:
    inter, union, tn, total = (float(v) for v in counts)
    fg = inter / union if union else 1.0
    bg = tn / (total - inter) if total - inter else 1.0
    return fg, 0.5 * (fg + bg)


def _val_batches(cases: Sequence[CachedCase], per_case: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops: ``per_case`` evenly spaced spine slices per case, centred on the spine."""
    images, targets = [], []
    for case in cases:
        slices = case.spine_slices
        if slices.size == 0:
            continue
        sampler = CropSampler([case], crop=crop, augment=False)
        for z in slices[np.linspace(0, slices.size - 1, min(per_case, slices.size)).round().astype(int)]:
            rows, cols = np.nonzero(case.classes[z])
            image, target = sampler._crop_at(case, int(z), (int(rows.mean()), int(cols.mean())))
            images.append(image)
            targets.append(target.astype(np.int64))
    if not images:
        return np.zeros((0, seg.IN_CHANNELS, crop, crop), np.float32), np.zeros((0, crop, crop), np.int64)
    return np.stack(images), np.stack(targets)


@dataclasses.dataclass(kw_only=True)
class SegmentationTrainConfig(RunControl):
    """Settings of :func:`train_segmentation`: which network (``net``), the run folder (``out``) and the
    case cache (``cache``), then the schedule, the split, the augmentations and the notes recorded in
    the weights' JSON. ``resume`` is on by default here (a run folder with a checkpoint goes on).

    ``max_steps`` stops after that many steps in all (smoke tests); ``val_per_case`` validation slices
    per validation case; ``export`` also receives the final weights, metadata and curves. ``init``
    starts a fresh run from existing weights (fine-tuning; ignored when resuming); ``real_weight``
    draws real-scan cases that many times as often as their slice count says; ``domain`` is the shared
    domain randomisation of the training cases (:mod:`SpineInpaintLib.training.augment`; ``None``: off,
    validation is never randomised); ``low_resolution`` and ``intensity``, when > 0, replace its
    in-plane resolution and gamma probabilities (the older command-line options); ``boundary_weight``
    weighs a binary cross-entropy of the spine mask in the loss (:func:`segmentation_loss`); ``grid_mm``
    is the pixel size of the cached cases (checked).
    ``data_note``, ``phantom_seeds``, ``healthy_fraction`` and ``real`` only describe the data in the
    weights' JSON; ``train_cases`` are forced into training and ``exclude`` left out of the cache.
    """

    net: str
    out: Path | str
    cache: Path | str
    resume: bool = True
    epochs: int = 30
    steps_per_epoch: int = 50
    batch_size: int = 8
    crop: int = 160
    lr: float = 2e-3
    folds: int = 0
    fold: int = 0
    train_cases: Sequence[str] = ()
    exclude: Sequence[str] = ()
    max_steps: int | None = None
    val_per_case: int = 12
    export: Path | str | None = None
    data_note: str = ""
    phantom_seeds: tuple[int, int] | None = None
    healthy_fraction: float = 0.3
    real: Sequence[str] = ()
    real_weight: float = 1.0
    init: Path | str | None = None
    domain: augment.DomainRandomisation | None = dataclasses.field(default_factory=augment.DomainRandomisation)
    low_resolution: float = 0.0
    intensity: float = 0.0
    boundary_weight: float = 0.0
    grid_mm: float = seg.GRID_MM

    def domain_config(self) -> augment.DomainRandomisation | None:
        """``domain`` with the ``low_resolution`` and ``intensity`` probabilities, where set, put in."""
        if self.domain is None:
            return None
        changes = {"in_plane_probability": self.low_resolution} if self.low_resolution > 0 else {}
        if self.intensity > 0:
            changes["gamma_probability"] = self.intensity
        return dataclasses.replace(self.domain, **changes) if changes else self.domain


def train_segmentation(config: SegmentationTrainConfig) -> dict:
    """Train one network on the cached cases; returns a summary (last epoch's metrics, paths).

    Writes ``out/checkpoint.pt`` every epoch (resumed from when present and ``resume``),
    ``out/metrics.csv`` (epoch, train/val loss, train/val spine IoU and 2-class mean IoU, lr, seconds),
    ``out/curves.png`` (the paper's Figure 4 layout: loss and IoU per epoch) and
    ``out/<net>.safetensors`` + JSON metadata at the end (also to ``export`` when given); ``grid_mm`` is
    recorded in the weights' ``preprocessing``. ``max_minutes`` stops after the epoch that passes that
    wall time. Under ``torchrun`` each process draws its own crops and DDP averages the gradients; only
    rank 0 writes.
    """
    import torch
    from tqdm import tqdm

    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    ctx = training.init_distributed(config.device)
    seed = seed_everything(config.seed)
    out = Path(config.out)
    grid_mm = seg.check_grid(config.grid_mm)
    cases = [c for c in load_cache(config.cache, grid_mm) if c.case_id not in set(config.exclude)]
    if not cases:
        raise SpineInpaintError(f"no cached cases in {config.cache} (run with --phantoms N or --deeplesion DIR)")
    train_cases_, val_cases = assign_splits(cases, folds=config.folds, fold=config.fold, seed=seed,
                                            train_cases=config.train_cases)
    if not train_cases_:
        raise SpineInpaintError("no training cases after the split (add cases or change --folds/--fold)")
    network = seg.build_network(config.net)
    if config.init is not None and not (config.resume and (out / "checkpoint.pt").exists()):
        load_weights(network, config.init)
    model = ctx.wrap(network)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    loss_fn = segmentation_loss(config.boundary_weight)
    checkpoint = out / "checkpoint.pt"
    start_epoch, resumed = 1, False
    if config.resume and checkpoint.exists():
        state = training.load_checkpoint(checkpoint, models={"net": model}, optimizers={"opt": optimizer})
        start_epoch, resumed = state["epoch"] + 1, True
        if state["seed"] != seed:
            raise SpineInpaintError(f"{checkpoint} was trained with seed {state['seed']}, not {seed}: "
                                    "use the same --seed or a new --out")
    log = training.MetricsLog(out / "metrics.csv", resume_epoch=start_epoch - 1 if resumed else 0) \
        if ctx.is_main else None
    val_x, val_y = _val_batches(val_cases, config.val_per_case, max(config.crop, 192))
    domain = config.domain_config()
    steps_done = (start_epoch - 1) * config.steps_per_epoch
    summary: dict = {}
    for epoch in range(start_epoch, config.epochs + 1):
        if config.max_steps is not None and steps_done >= config.max_steps:
            break
        # Seeds per (epoch, rank): a resumed run draws the same crops as an uninterrupted one.
        sampler = CropSampler(train_cases_, crop=config.crop, seed=seed * 100_003 + epoch * 101 + ctx.rank,
                              real_weight=config.real_weight, domain=domain)
        current_lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, config.epochs)))
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        model.train()
        t0 = time.perf_counter()
        losses, counts = [], np.zeros(4)
        steps = config.steps_per_epoch if config.max_steps is None else \
            min(config.steps_per_epoch, config.max_steps - steps_done)
        bar = tqdm(range(steps), desc=f"{config.net} epoch {epoch}/{config.epochs}", unit="step",
                   disable=not (config.progress and ctx.is_main))
        for _ in bar:
            x, y = sampler.batch(config.batch_size)
            x, y = torch.from_numpy(x).to(ctx.device), torch.from_numpy(y).to(ctx.device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
            pred = (logits.argmax(1) > 0).cpu().numpy()
            counts += slice_iou(pred, y.cpu().numpy() > 0)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            steps_done += 1
        train_loss = ctx.all_reduce_mean(float(np.mean(losses)))
        train_iou, train_miou = (ctx.all_reduce_mean(v) for v in _iou_values(counts))
        val_loss, val_iou, val_miou = float("nan"), float("nan"), float("nan")
        if len(val_x) and ctx.is_main:
            model.eval()
            vl, vcounts = [], np.zeros(4)
            with torch.inference_mode():
                for s in range(0, len(val_x), 8):
                    x = torch.from_numpy(val_x[s:s + 8]).to(ctx.device)
                    y = torch.from_numpy(val_y[s:s + 8]).to(ctx.device)
                    logits = training.unwrap(model)(x)
                    vl.append(float(loss_fn(logits, y).item()) * len(x))
                    vcounts += slice_iou((logits.argmax(1) > 0).cpu().numpy(), val_y[s:s + 8] > 0)
            val_loss = float(np.sum(vl) / len(val_x))
            val_iou, val_miou = _iou_values(vcounts)
        if ctx.is_main:
            log.append(epoch=epoch, train_loss=train_loss, val_loss=val_loss, train_iou=train_iou, val_iou=val_iou,
                       train_mean_iou_2class=train_miou, val_mean_iou_2class=val_miou, lr=current_lr,
                       seconds=time.perf_counter() - t0, steps=steps_done, seed=seed, world_size=ctx.world_size)
            training.save_checkpoint(checkpoint, epoch=epoch, models={"net": model}, optimizers={"opt": optimizer},
                                     seed=seed, extra={"net": config.net, "steps": steps_done})
            training.plot_curves(out / "metrics.csv", out / "curves.png",
                                 [("loss", ["train_loss", "val_loss"]), ("IoU (spine)", ["train_iou", "val_iou"])],
                                 title=f"{config.net}: loss and IoU per epoch (cf. Miao et al. Fig. 4)")
            summary = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "train_iou": train_iou,
                       "val_iou": val_iou, "train_mean_iou_2class": train_miou, "val_mean_iou_2class": val_miou}
        ctx.barrier()
        # Every process stops at the same epoch: the one whose wall time first passes the limit.
        late = config.max_minutes and (time.perf_counter() - started) / 60 > config.max_minutes
        if config.max_minutes and ctx.all_reduce_mean(float(late)) > 0:
            break
    if ctx.is_main:
        meta = {
            "architecture": {"net": config.net, "in_channels": seg.IN_CHANNELS, "out_channels": seg.N_CLASSES,
                             "parameters": seg.count_parameters(training.unwrap(model)),
                             "monai_class": "UNet" if config.net == "unet" else
                             "VNet (3x3 convolutions, 16-channel head)"},
            "preprocessing": {"orientation": "LPS", "grid_mm": grid_mm, "neighbour_mm": NEIGHBOUR_MM,
                              "windows_hu": [list(w) for w in WINDOWS],
                              "input": "slice below, slice, slice above (wide window), slice (bone window)"},
            "classes": {str(i): int(v) for i, v in enumerate(seg.CLASS_IDS)},
            "training": {"seed": seed, "epochs": summary.get("epoch"), "steps": steps_done,
                         "steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
                         "crop": config.crop, "lr": config.lr, "world_size": ctx.world_size,
                         "folds": config.folds, "fold": config.fold if config.folds else None,
                         "train_cases": [c.case_id for c in train_cases_], "val_cases": [c.case_id for c in val_cases],
                         "data": config.data_note,
                         "phantom_seeds": list(config.phantom_seeds) if config.phantom_seeds else None,
                         "healthy_fraction": config.healthy_fraction, "real_in_training": list(config.real),
                         "real_scans": list(config.real),
                         "real_weight": config.real_weight, "init": str(config.init) if config.init else None,
                         "low_resolution_augmentation": config.low_resolution,
                         "intensity_augmentation": config.intensity, "boundary_weight": config.boundary_weight,
                         "domain_randomisation": domain.to_dict() if domain is not None else None},
            "metrics_last_epoch": summary,
        }
        weights = save_weights(model, out / f"{config.net}.safetensors", meta)
        summary["weights"] = str(weights)
        if config.export:
            import shutil

            export = Path(config.export)
            export.mkdir(parents=True, exist_ok=True)
            for path in (weights, weights.with_suffix(".json")):
                shutil.copy2(path, export / path.name)
            for name, target in (("metrics.csv", f"{config.net}_metrics.csv"),
                                 ("curves.png", f"{config.net}_curves.png")):
                if (out / name).exists():
                    shutil.copy2(out / name, export / target)
    ctx.close()
    return summary
