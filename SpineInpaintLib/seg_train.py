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

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError, datasets, io
from SpineInpaintLib import segmentation as seg

__all__ = [
    "PAPER_TABLE_I",
    "CachedCase",
    "cache_case",
    "load_cache",
    "deeplesion_cases",
    "fold_of",
    "assign_splits",
    "CropSampler",
    "slice_iou",
    "train_segmentation",
    "evaluate_cases",
    "run_train",
    "run_evaluate",
]

#: Table I of Miao et al.: loss and IoU on the training and validation sets.
PAPER_TABLE_I = {
    "unet": {"train_loss": 0.0404, "val_loss": 0.0400, "train_iou": 0.9582, "val_iou": 0.9584},
    "vnet": {"train_loss": 0.0158, "val_loss": 0.0157, "train_iou": 0.9829, "val_iou": 0.9831},
}


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


def cache_case(case: datasets.Case, folder: Path, grid_mm: float = seg.GRID_MM) -> dict:
    """Resample a case to the network grid (``grid_mm`` pixels) and write ``<id>_ct.npy`` and ``<id>_labels.npy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct = seg.to_network_grid(case.ct, grid_mm=grid_mm)
    labels = seg.to_network_grid(case.labels, labels=True, grid_mm=grid_mm)
    vertebrae = np.where((labels.array >= 25) & (labels.array <= 50), labels.array, 0).astype(np.uint8)
    np.save(folder / f"{case.case_id}_ct.npy", np.clip(np.round(ct.array), -1024, 3071).astype(np.int16))
    np.save(folder / f"{case.case_id}_labels.npy", vertebrae)
    info = {"case_id": case.case_id, "source": case.source, "seed": int(case.seed),
            "split": datasets.split_of(case.case_id), "z_spacing": float(ct.spacing[2]),
            "grid_mm": float(ct.spacing[0]),
            "shape_zyx": list(ct.shape), "lesion": case.lesion is not None or bool(case.info.get("mask") is not None
                                                                                  and np.any(case.info["mask"]))}
    if case.info.get("real_case"):
        info["real_case"] = case.info["real_case"]
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

    from SpineInpaintLib import deeplesion

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
    """Random 2.5D training crops (``crop`` x ``crop`` pixels) with MONAI augmentation.

    Three crops in four are centred near the spine (jittered), the rest anywhere in the slice, so
    the network also learns to leave ribs, pelvis and contrast alone on the whole slice.
    """

    def __init__(self, cases: Sequence[CachedCase], crop: int = 160, seed: int = 0, augment: bool = True,
                 real_weight: float = 1.0, low_resolution: float = 0.0, intensity: float = 0.0):
        if not cases:
            raise SpineInpaintError("no training cases")
        self.cases = list(cases)
        self.crop = int(crop)
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.transform = seg.train_transforms(seed, low_resolution, intensity) if augment else None
        # Cases are drawn in proportion to their spine slices; real scans (few, but the anatomy the
        # phantoms only approximate) can be drawn ``real_weight`` times as often.
        weights = np.array([len(c.spine_slices) * (real_weight if c.source == "real" else 1.0)
                            for c in self.cases], float)
        self.weights = weights / weights.sum()

    def _crop_at(self, case: CachedCase, z: int, centre: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The 2.5D input and class target of a ``crop`` square centred at ``centre`` (padded with air)."""
        n, rows, cols = case.ct.shape
        offset = seg.NEIGHBOUR_MM / case.z_spacing
        z0, z1 = max(0, int(np.floor(z - offset))), min(n - 1, int(np.ceil(z + offset)))
        r0, c0 = centre[0] - self.crop // 2, centre[1] - self.crop // 2
        rr = slice(max(0, r0), max(0, min(rows, r0 + self.crop)))
        cc = slice(max(0, c0), max(0, min(cols, c0 + self.crop)))
        hu = np.full((z1 - z0 + 1, self.crop, self.crop), -1024, np.int16)
        target = np.zeros((self.crop, self.crop), np.uint8)
        dst = (slice(rr.start - r0, rr.stop - r0), slice(cc.start - c0, cc.stop - c0))
        hu[(slice(None),) + dst] = case.ct[z0:z1 + 1, rr, cc]
        target[dst] = case.classes[z, rr, cc]
        return seg.channel_stack(hu, case.z_spacing, [z - z0])[0], target

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[self.rng.choice(len(self.cases), p=self.weights)]
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


def train_segmentation(net: str, out: Path, cache: Path, *, epochs: int = 30, steps_per_epoch: int = 50,
                       batch_size: int = 8, crop: int = 160, lr: float = 2e-3, seed: int = 0, folds: int = 0,
                       fold: int = 0, train_cases: Sequence[str] = (), exclude: Sequence[str] = (),
                       max_steps: int | None = None, device: str = "auto", resume: bool = True,
                       val_per_case: int = 12, export: Path | None = None, threads: int | None = None,
                       progress: bool = True, data_note: str = "", phantom_seeds: tuple[int, int] | None = None,
                       healthy_fraction: float = 0.3, real: Sequence[str] = (), real_weight: float = 1.0,
                       init: Path | None = None, low_resolution: float = 0.0, intensity: float = 0.0,
                       boundary_weight: float = 0.0, grid_mm: float = seg.GRID_MM) -> dict:
    """Train one network on the cached cases; returns a summary (last epoch's metrics, paths).

    Writes ``out/checkpoint.pt`` every epoch (resumed from when present and ``resume``),
    ``out/metrics.csv`` (epoch, train/val loss, train/val spine IoU and 2-class mean IoU, lr, seconds),
    ``out/curves.png`` (the paper's Figure 4 layout: loss and IoU per epoch) and
    ``out/<net>.safetensors`` + JSON metadata at the end (also to ``export`` when given).
    ``init`` starts a fresh run from existing weights (fine-tuning; ignored when resuming), and
    ``real_weight`` draws real-scan cases that many times as often as their slice count says, and
    ``low_resolution`` and ``intensity`` are the probabilities of the coarse-scan and the strong intensity
    augmentations (:func:`seg.train_transforms`);
    ``boundary_weight`` weighs a binary cross-entropy of the spine mask in the loss
    (:func:`seg.segmentation_loss`). ``grid_mm`` is the pixel size of the cached cases (checked) and is
    recorded in the weights' ``preprocessing``. Under ``torchrun`` each process draws its own crops and DDP
    averages the gradients; only rank 0 writes.
    """
    import torch
    from tqdm import tqdm

    from SpineInpaintLib import training

    if threads:
        torch.set_num_threads(int(threads))
    ctx = training.init_distributed(device)
    seed = training.seed_everything(seed)
    out = Path(out)
    grid_mm = seg.check_grid(grid_mm)
    cases = [c for c in load_cache(cache, grid_mm) if c.case_id not in set(exclude)]
    if not cases:
        raise SpineInpaintError(f"no cached cases in {cache} (run with --phantoms N or --deeplesion DIR)")
    train_cases_, val_cases = assign_splits(cases, folds=folds, fold=fold, seed=seed, train_cases=train_cases)
    if not train_cases_:
        raise SpineInpaintError("no training cases after the split (add cases or change --folds/--fold)")
    network = seg.build_network(net)
    if init is not None and not (resume and (out / "checkpoint.pt").exists()):
        training.load_weights(network, init)
    model = ctx.wrap(network)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = seg.segmentation_loss(boundary_weight)
    checkpoint = out / "checkpoint.pt"
    start_epoch, resumed = 1, False
    if resume and checkpoint.exists():
        state = training.load_checkpoint(checkpoint, models={"net": model}, optimizers={"opt": optimizer})
        start_epoch, resumed = state["epoch"] + 1, True
        if state["seed"] != seed:
            raise SpineInpaintError(f"{checkpoint} was trained with seed {state['seed']}, not {seed}: "
                                    "use the same --seed or a new --out")
    log = training.MetricsLog(out / "metrics.csv", resume_epoch=start_epoch - 1 if resumed else 0) \
        if ctx.is_main else None
    val_x, val_y = _val_batches(val_cases, val_per_case, max(crop, 192))
    steps_done = (start_epoch - 1) * steps_per_epoch
    summary: dict = {}
    for epoch in range(start_epoch, epochs + 1):
        if max_steps is not None and steps_done >= max_steps:
            break
        # Seeds per (epoch, rank): a resumed run draws the same crops as an uninterrupted one.
        sampler = CropSampler(train_cases_, crop=crop, seed=seed * 100_003 + epoch * 101 + ctx.rank,
                              real_weight=real_weight, low_resolution=low_resolution, intensity=intensity)
        current_lr = lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(1, epochs)))
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        model.train()
        t0 = time.perf_counter()
        losses, counts = [], np.zeros(4)
        steps = steps_per_epoch if max_steps is None else min(steps_per_epoch, max_steps - steps_done)
        bar = tqdm(range(steps), desc=f"{net} epoch {epoch}/{epochs}", unit="step", disable=not (progress and ctx.is_main))
        for _ in bar:
            x, y = sampler.batch(batch_size)
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
                                     seed=seed, extra={"net": net, "steps": steps_done})
            training.plot_curves(out / "metrics.csv", out / "curves.png",
                                 [("loss", ["train_loss", "val_loss"]), ("IoU (spine)", ["train_iou", "val_iou"])],
                                 title=f"{net}: loss and IoU per epoch (cf. Miao et al. Fig. 4)")
            summary = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "train_iou": train_iou,
                       "val_iou": val_iou, "train_mean_iou_2class": train_miou, "val_mean_iou_2class": val_miou}
        ctx.barrier()
    if ctx.is_main:
        meta = {
            "architecture": {"net": net, "in_channels": seg.IN_CHANNELS, "out_channels": seg.N_CLASSES,
                             "parameters": seg.count_parameters(training.unwrap(model)),
                             "monai_class": "UNet" if net == "unet" else "VNet (3x3 convolutions, 16-channel head)"},
            "preprocessing": {"orientation": "LPS", "grid_mm": grid_mm, "neighbour_mm": seg.NEIGHBOUR_MM,
                              "windows_hu": [list(w) for w in seg.WINDOWS],
                              "input": "slice below, slice, slice above (wide window), slice (bone window)"},
            "classes": {str(i): int(v) for i, v in enumerate(seg.CLASS_IDS)},
            "training": {"seed": seed, "epochs": summary.get("epoch"), "steps": steps_done,
                         "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "crop": crop, "lr": lr,
                         "world_size": ctx.world_size, "folds": folds, "fold": fold if folds else None,
                         "train_cases": [c.case_id for c in train_cases_], "val_cases": [c.case_id for c in val_cases],
                         "data": data_note, "phantom_seeds": list(phantom_seeds) if phantom_seeds else None,
                         "healthy_fraction": healthy_fraction, "real_in_training": list(real),
                         "real_weight": real_weight, "init": str(init) if init else None,
                         "low_resolution_augmentation": low_resolution,
                         "intensity_augmentation": intensity, "boundary_weight": boundary_weight},
            "metrics_last_epoch": summary,
        }
        weights = training.save_weights(model, out / f"{net}.safetensors", meta)
        summary["weights"] = str(weights)
        if export:
            import shutil

            export = Path(export)
            export.mkdir(parents=True, exist_ok=True)
            for path in (weights, weights.with_suffix(".json")):
                shutil.copy2(path, export / path.name)
            for name, target in (("metrics.csv", f"{net}_metrics.csv"), ("curves.png", f"{net}_curves.png")):
                if (out / name).exists():
                    shutil.copy2(out / name, export / target)
    ctx.close()
    return summary


# --- evaluation -----------------------------------------------------------------------------------------
def evaluate_case(result: seg.SegmentationResult, case: datasets.Case) -> dict:
    """Scores of a whole-volume segmentation against a case's healthy labels, on the case's own grid.

    ``iou_3d``/``dice_3d``: the binary spine mask over the volume; ``slice_iou``: the spine IoU pooled
    over the axial slices holding spine (truth or prediction) and ``slice_mean_iou_2class`` the mean of
    it and the background IoU of those slices (Keras' 2-class ``MeanIoU``, the paper's likely
    definition); per vertebra (TotalSegmentator ids present in the truth): Dice and HD95 (mm).
    """
    from SpineInpaintLib import metrics

    truth_labels = case.labels.array
    truth = datasets.spine_mask(truth_labels) > 0
    pred = result.spine.array > 0
    spacing = case.ct.spacing_zyx
    rows = np.nonzero((truth | pred).reshape(truth.shape[0], -1).any(axis=1))[0]
    counts = np.array(slice_iou(pred[rows], truth[rows]), float) if rows.size else np.zeros(4)
    s_iou, s_miou = _iou_values(counts)
    per_level = {}
    truth_v = np.where(truth, truth_labels, 0)
    for level in sorted(int(v) for v in np.unique(truth_v) if v):
        t_mask = truth_v == level
        p_mask = result.labels.array == level
        per_level[level] = {"dice": metrics.dice(p_mask, t_mask),
                            "hd95_mm": metrics.hd95(p_mask, t_mask, spacing) if p_mask.any() else float("inf"),
                            "truth_ml": float(np.count_nonzero(t_mask) * np.prod(spacing) / 1000.0)}
    return {"case_id": case.case_id, "iou_3d": metrics.iou(pred, truth), "dice_3d": metrics.dice(pred, truth),
            "hd95_mm": metrics.hd95(pred, truth, spacing) if pred.any() else float("inf"),
            "slice_iou": s_iou, "slice_mean_iou_2class": s_miou, "per_vertebra": per_level,
            "seconds": result.timings.get("total"), "flags": result.flags}


def evaluate_cases(model, cases: Iterable[datasets.Case], *, net: str, progress: bool = True) -> list[dict]:
    """:func:`evaluate_case` for every case, segmenting each with ``model``."""
    records = []
    for case in cases:
        result = seg.segment_volume(case.ct, net, model=model)
        record = evaluate_case(result, case)
        records.append(record)
        if progress:
            print(f"  {net} {case.case_id}: 3D IoU {record['iou_3d']:.4f}  Dice {record['dice_3d']:.4f}  "
                  f"slice 2-class mIoU {record['slice_mean_iou_2class']:.4f}  ({record['seconds']:.1f} s)", flush=True)
    return records


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summarise(records: Sequence[dict]) -> dict:
    """Means over cases, and per vertebra over the cases holding it."""
    levels: dict[int, list[dict]] = {}
    for r in records:
        for level, v in r["per_vertebra"].items():
            levels.setdefault(int(level), []).append(v)
    return {
        "cases": len(records),
        "iou_3d": _mean(r["iou_3d"] for r in records),
        "dice_3d": _mean(r["dice_3d"] for r in records),
        "hd95_mm": _mean(r["hd95_mm"] for r in records),
        "slice_iou": _mean(r["slice_iou"] for r in records),
        "slice_mean_iou_2class": _mean(r["slice_mean_iou_2class"] for r in records),
        "per_vertebra": {level: {"dice": _mean(v["dice"] for v in vs), "hd95_mm": _mean(v["hd95_mm"] for v in vs),
                                 "missing": sum(1 for v in vs if not np.isfinite(v["hd95_mm"])), "n": len(vs)}
                         for level, vs in sorted(levels.items())},
    }


# --- command line (arguments declared in SpineInpaintLib.cli) -------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    """``train segmentation``: build the cache (rank 0), then train; prints the last epoch's metrics."""
    from tqdm import tqdm

    from SpineInpaintLib import training

    if args.phantoms < 0:
        raise SpineInpaintError(f"--phantoms must be >= 0, got {args.phantoms}")
    if args.varied_phantoms < 0:
        raise SpineInpaintError(f"--varied-phantoms must be >= 0, got {args.varied_phantoms}")
    if args.crop % 16 or args.crop < 32:
        raise SpineInpaintError(f"--crop must be a multiple of 16 and >= 32, got {args.crop}")
    if not 0.0 <= args.low_resolution <= 1.0:
        raise SpineInpaintError(f"--low-resolution must be a probability in [0, 1], got {args.low_resolution}")
    if not 0.0 <= args.intensity_augment <= 1.0:
        raise SpineInpaintError(f"--intensity-augment must be a probability in [0, 1], got {args.intensity_augment}")
    if args.boundary_weight < 0:
        raise SpineInpaintError(f"--boundary-weight must be >= 0, got {args.boundary_weight}")
    if args.real_weight <= 0:
        raise SpineInpaintError(f"--real-weight must be > 0, got {args.real_weight}")
    if args.init and not Path(args.init).is_file():
        raise SpineInpaintError(f"--init weights not found: {args.init}")
    if args.folds == 1 or args.folds < 0:
        raise SpineInpaintError(f"--folds must be 0 (fixed split) or >= 2, got {args.folds}")
    if args.folds and not 0 <= args.fold < args.folds:
        raise SpineInpaintError(f"--fold must be in [0, {args.folds - 1}], got {args.fold}")
    grid_mm = seg.check_grid(args.grid_mm)
    cache = Path(args.cache)
    load_cache(cache, grid_mm)  # a cache of another grid is refused before any case is built
    out = Path(args.out or f"runs/segmentation/{args.net}")
    lesion_types = ("lytic", "sclerotic", "mixed")
    builders = []
    for prefix, first, count, make in (("phantom", args.phantom_seed, args.phantoms, datasets.phantom_case),
                                       ("varied", args.varied_seed, args.varied_phantoms, datasets.varied_phantom_case)):
        for s in range(first, first + count):
            healthy = np.random.default_rng([s, 15485863]).random() < args.healthy_fraction
            builders.append((f"{prefix}_{s:04d}", lambda s=s, h=healthy, make=make: make(
                s, lesion_types=None if h else lesion_types)))
    real = [r.strip() for r in args.real.split(",") if r.strip()]
    forced = []
    for name in real:
        if name not in io.REAL_CASES:
            raise SpineInpaintError(f"unknown real case '{name}' (known: {', '.join(io.REAL_CASES)})")
        # A scan whose labels carry no vertebra id (dcmqi_ct3slice: one label, 2, level unknown) would
        # teach the network that its vertebra is background.
        if not datasets.spine_mask(io.load_real_case(name)[1].array).any():
            raise SpineInpaintError(f"real case '{name}' has no vertebra labels (TotalSegmentator ids 25-50) "
                                    "to train on")
        for s, types in ((0, None), (1, lesion_types)):
            builders.append((f"real_{name}_{s:04d}", lambda n=name, s=s, t=types: datasets.real_case(n, seed=s, lesion_types=t)))
            forced.append(f"real_{name}_{s:04d}")
    ctx = training.init_distributed(args.device)
    if ctx.is_main:
        existing = {c.case_id for c in load_cache(cache)}
        todo = [(i, b) for i, b in builders if i not in existing]
        for case_id, build in tqdm(todo, desc="caching cases", unit="case", disable=not todo):
            cache_case(build(), cache, grid_mm)
        for root in args.deeplesion:
            for case in deeplesion_cases(Path(root)):
                if case.case_id not in existing:
                    cache_case(case, cache, grid_mm)
    ctx.barrier()
    ids = [i for i, _ in builders]
    for root in args.deeplesion:
        ids += [c.case_id for c in load_cache(cache) if c.source == "deeplesion"]
    # No source named at all: train on every case already in the cache.
    excluded = [c.case_id for c in load_cache(cache) if c.case_id not in set(ids)] if ids else []
    phantom_seeds = (args.phantom_seed, args.phantom_seed + args.phantoms)
    if not ids:
        all_cached = load_cache(cache)
        cached = [c for c in all_cached if c.source == "phantom" and not c.case_id.startswith("varied_")]
        varied = [c for c in all_cached if c.case_id.startswith("varied_")]
        if varied:
            seeds = [c.info["seed"] for c in varied]
            args.varied_phantoms, args.varied_seed = len(varied), min(seeds)
        real = sorted({c.info["real_case"] for c in all_cached if c.info.get("real_case")})
        forced = [c.case_id for c in all_cached if c.source == "real"]
        if cached:
            seeds = [c.info["seed"] for c in cached]
            phantom_seeds = (min(seeds), max(seeds) + 1)
            args.phantoms, args.phantom_seed = len(cached), min(seeds)
    note = (f"{args.phantoms} phantoms (seeds {args.phantom_seed}-{args.phantom_seed + args.phantoms - 1}, "
            f"healthy fraction {args.healthy_fraction}, lesions {', '.join(lesion_types)}; labels = healthy labels)"
            + (f"; {args.varied_phantoms} varied phantoms (seeds {args.varied_seed}-"
               f"{args.varied_seed + args.varied_phantoms - 1}: low bone density, softer point spread, pelvic "
               "fields of view; datasets.varied_phantom_case)" if args.varied_phantoms else "")
            + (f"; real scans in training: {', '.join(real)} (labels are TotalSegmentator predictions)" if real else
               "; no real scan in training")
            + (f"; DeepLesion folders: {', '.join(args.deeplesion)}" if args.deeplesion else ""))
    summary = train_segmentation(
        args.net, out, cache, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, seed=args.seed, folds=args.folds, fold=args.fold, train_cases=forced,
        exclude=excluded, max_steps=args.max_steps, device=args.device, resume=not args.no_resume,
        val_per_case=getattr(args, "val_slices", 12),
        export=Path(args.export) if args.export else None, threads=args.threads, data_note=note,
        phantom_seeds=phantom_seeds, healthy_fraction=args.healthy_fraction,
        real=real, real_weight=args.real_weight, init=Path(args.init) if args.init else None,
        low_resolution=args.low_resolution, intensity=args.intensity_augment,
        boundary_weight=args.boundary_weight, grid_mm=grid_mm)
    if ctx.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def _test_phantoms(meta: dict) -> list[tuple[int, bool]]:
    """(seed, healthy) of the held-out test-split phantoms of a training's seed range."""
    seeds = meta.get("training", {}).get("phantom_seeds") or [1000, 1040]
    fraction = meta.get("training", {}).get("healthy_fraction", 0.3)
    out = []
    for s in range(int(seeds[0]), int(seeds[1])):
        if datasets.split_of(f"phantom_{s:04d}") == "test":
            out.append((s, bool(np.random.default_rng([s, 15485863]).random() < fraction)))
    return out


def format_table_i(rows: dict) -> str:
    """The paper's Table I (loss and IoU, train and validation) for our networks beside the paper's."""
    nets = [n for n in seg.NETWORKS if n in rows]
    head = f"{'':<22}" + "".join(f"{'ours ' + n:>14}{'paper ' + n:>14}" for n in nets)
    lines = ["Table I (Miao et al.) - loss and IoU", head]
    for key, name in (("train_loss", "loss, training set"), ("val_loss", "loss, validation set"),
                      ("train_iou", "IoU, training set"), ("val_iou", "IoU, validation set"),
                      ("train_mean_iou_2class", "2-class mean IoU, train"), ("val_mean_iou_2class", "2-class mean IoU, val")):
        cells = ""
        for n in nets:
            ours = rows[n].get(key)
            paper = PAPER_TABLE_I[n].get(key)
            cells += f"{ours:>14.4f}" if isinstance(ours, (int, float)) else f"{'-':>14}"
            cells += f"{paper:>14.4f}" if paper is not None else f"{'-':>14}"
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    """``evaluate segmentation``: Table I beside the paper's, then whole-volume scores of held-out cases."""
    import torch

    from SpineInpaintLib.labels import vertebra_name

    if args.threads:
        torch.set_num_threads(int(args.threads))
    nets = [n.strip().lower() for n in args.nets.split(",") if n.strip()]
    bad = [n for n in nets if n not in seg.NETWORKS]
    if bad or not nets:
        raise SpineInpaintError(f"unknown network {', '.join(bad) or '(none)'} (use unet, vnet)")
    models, metas = {}, {}
    for net in nets:
        models[net], metas[net] = seg.load_model(net, Path(args.weights_dir) / f"{net}.safetensors")
    print(format_table_i({n: metas[n].get("metrics_last_epoch", {}) for n in nets}))
    grids = ", ".join(f"{n} {getattr(models[n], 'spine_grid_mm', seg.GRID_MM):g} mm" for n in nets)
    print(f"(ours: last epoch, 2.5D crops on the network grid ({grids}), spine-class IoU pooled over the "
          "validation crops; the paper: 512x512 slices, Keras)")
    report: dict = {"table_i": {n: metas[n].get("metrics_last_epoch", {}) for n in nets}, "paper": PAPER_TABLE_I}
    test = _test_phantoms(metas[nets[0]])
    if args.cases is not None:
        test = test[: max(0, args.cases)]
    real = [r.strip() for r in args.real.split(",") if r.strip()]
    print(f"\nwhole-volume inference on {len(test)} held-out test phantoms (seeds {', '.join(str(s) for s, _ in test)})"
          + (f" and the real scans {', '.join(real)}" if real else ""))
    records: dict[str, list[dict]] = {n: [] for n in nets}
    real_records: dict[str, list[dict]] = {n: [] for n in nets}
    # Each case is built once and segmented by every network.
    for seed_, healthy in test:
        case = datasets.phantom_case(seed_, lesion_types=None if healthy else ("lytic", "sclerotic", "mixed"))
        for net in nets:
            records[net] += evaluate_cases(models[net], [case], net=net)
    for name in real:
        case = datasets.real_case(name, lesion_types=None)
        for net in nets:
            real_records[net] += evaluate_cases(models[net], [case], net=net)
    for net in nets:
        summary = summarise(records[net])
        report[net] = {"phantom_test": summary, "phantom_cases": records[net], "real": real_records[net],
                       "real_in_training": metas[net].get("training", {}).get("real_in_training", [])}
        print(f"\n{net}: mean over {summary['cases']} test phantoms: 3D IoU {summary['iou_3d']:.4f}, "
              f"3D Dice {summary['dice_3d']:.4f}, HD95 {summary['hd95_mm']:.2f} mm, per-slice spine IoU "
              f"{summary['slice_iou']:.4f}, per-slice 2-class mean IoU {summary['slice_mean_iou_2class']:.4f}")
        print(f"{'vertebra':<9}{'Dice':>8}{'HD95 mm':>9}{'missing':>9}")
        for level, v in summary["per_vertebra"].items():
            print(f"{vertebra_name(level):<9}{v['dice']:>8.3f}{v['hd95_mm']:>9.2f}{v['missing']:>6}/{v['n']}")
        for r in real_records[net]:
            in_training = "in training" if report[net]["real_in_training"] else "not in training"
            print(f"{net} real {r['case_id']} ({in_training}; labels are TotalSegmentator predictions): "
                  f"spine 3D Dice {r['dice_3d']:.4f}, IoU {r['iou_3d']:.4f}, HD95 {r['hd95_mm']:.2f} mm; per vertebra Dice "
                  + ", ".join(f"{vertebra_name(k)} {v['dice']:.2f}" for k, v in r["per_vertebra"].items()))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=float))
        print(f"results: {path}")
    return 0


def plot_figure4(csv_paths: dict[str, Path], png: Path, *, example: tuple[io.Volume, io.Volume] | None = None) -> Path:
    """The paper's Figure 4 layout: loss and IoU per epoch, U-Net blue and V-Net red (train solid,
    validation dashed); with ``example`` = (CT, per-vertebra labels) a third panel shows a mid-sagittal
    slice of the CT with the labels over it.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if example is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    colours = {"unet": "tab:blue", "vnet": "tab:red"}
    for net, path in csv_paths.items():
        with Path(path).open() as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes[:2], ("loss", "iou")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [float(r[f"{split}_{key}"]) for r in rows]
                ax.plot(epochs, values, style, color=colours.get(net), label=f"{net} {split}")
    for ax, name in zip(axes[:2], ("loss (Dice + cross-entropy)", "IoU of the spine mask")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if example is not None:
        ct, labels = (io.reorient(v, "LPS") for v in example)
        column = int(np.argmax(np.bincount(np.nonzero(labels.array)[2]))) if labels.array.any() else ct.shape[2] // 2
        image = ct.array[:, :, column]
        lab = labels.array[:, :, column].astype(float)
        aspect = ct.spacing[2] / ct.spacing[1]
        axes[2].imshow(np.clip(image, -200, 1300), cmap="gray", origin="lower", aspect=aspect)
        axes[2].imshow(np.ma.masked_equal(lab, 0), cmap="tab10", alpha=0.5, origin="lower", aspect=aspect,
                       interpolation="nearest")
        axes[2].set_title("per-vertebra labels (sagittal)")
        axes[2].axis("off")
    fig.suptitle("Spine segmentation on CPU: loss and IoU per epoch (cf. Miao et al., Fig. 4)")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
