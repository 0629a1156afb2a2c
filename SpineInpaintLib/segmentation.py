"""Vertebra segmentation: MONAI 2D U-Net and V-Net on axial slices, whole-volume inference, per-vertebra labels.

Miao et al. (sections II.B, III.A) segment the spine on 512x512 axial slices with a 2D U-Net and a 2D
V-Net (Keras) and report the IoU of the binary spine mask. Here both networks come from MONAI with
``spatial_dims=2``:

- U-Net: :class:`monai.networks.nets.UNet`, channels (16, 32, 64, 128, 256), stride-2 convolutions,
  two residual units per level.
- V-Net: :class:`monai.networks.nets.VNet` configured as the paper describes: five resolution
  stages (16, 32, 64, 128, 256 channels) joined by 2x2 stride-2 down-convolutions (no pooling),
  3x3 padded convolutions (MONAI's VNet hard-codes the original V-Net's 5x5 kernels, so they are
  swapped for 3x3 ones after construction), a 16-channel last feature map and a 1x1 output convolution.

Beyond the paper the networks see 2.5D input (the slice and its neighbours 2.5 mm above and below)
on a fixed in-plane grid (1.5 mm for the shipped weights; the grid is a property of the weights,
``preprocessing.grid_mm`` in their JSON), and predict, besides background, the vertebra level of each pixel
(T10 ... S1 and the sacrum, TotalSegmentator v2 ids, plus one class for vertebrae above T10). The
binary spine mask is ``1 - p(background)``; per-vertebra labels come from a 3D split of that mask
into vertebrae (a watershed seeded by the vertebral-body cores) numbered by the level votes of the
network along the column, so that each vertebra gets one consistent id.

Whole-volume inference (:func:`segment_volume`) takes a CT of any orientation and spacing,
re-orients it to LPS, resamples it to the network grid, segments the slices in batches, removes
stray components and returns the masks on the input grid with its geometry. The V-Net (the default
network) runs only on a box around the spine that the faster U-Net finds first
(:func:`locate_spine`): its full-resolution layers made whole slices slow on a CPU. Input that does not
look like CT (all one value, no air near -1000 HU, MR-like ranges) gives a :class:`UserWarning` and an
empty, flagged result instead of a crash.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError, io

__all__ = [
    "NETWORKS",
    "DEFAULT_NETWORK",
    "GRID_MM",
    "check_grid",
    "NEIGHBOUR_MM",
    "WINDOWS",
    "CLASS_IDS",
    "N_CLASSES",
    "IN_CHANNELS",
    "RESOURCES",
    "build_network",
    "count_parameters",
    "ids_to_classes",
    "to_network_grid",
    "channel_stack",
    "check_ct",
    "clean_mask",
    "directional_flood",
    "split_vertebrae",
    "number_chain",
    "SegmentationResult",
    "load_model",
    "default_weights",
    "predict_grid",
    "locate_spine",
    "segment_volume",
    "export_vertebra",
    "segmentation_loss",
    "train_transforms",
]

#: The two networks of the paper.
NETWORKS = ("unet", "vnet")
#: The network used when none is named: the V-Net, which scores higher than the U-Net (test-phantom
#: IoU 0.912 vs 0.871, restored L3 Dice 0.933 vs 0.909, README) and, run on the box around the spine
#: that the U-Net finds first (:func:`locate_spine`), segments a 512x512x100 volume in about 15 s.
DEFAULT_NETWORK = "vnet"
#: In-plane pixel size (mm) of the network grid of new training runs and of weights that do not
#: record one (the paper: 512x512 native, about 0.7-0.9 mm).
GRID_MM = 1.5
#: Networks that segment_volume runs only on a box around the spine that the U-Net finds first
#: (:func:`locate_spine`): the V-Net's full-resolution layers make whole slices slow on a CPU.
LOCATED_NETWORKS = ("vnet",)
#: Margin (mm) around the located spine, and the least width of the box (the training crops: 160 px of 1.5 mm).
LOCATE_MARGIN_MM = 24.0
LOCATE_MIN_MM = 240.0
#: Cost of skipping a level when the vertebrae are numbered (:func:`number_chain`), in mean votes of a vertebra.
SKIP_COST = 1.0
#: Distance (mm) of the two neighbour slices of the 2.5D input above and below the slice.
NEIGHBOUR_MM = 2.5
#: HU windows mapped to [0, 1]: a wide one for the three slices, a bone window on the centre slice.
WINDOWS = ((-200.0, 1300.0), (100.0, 1100.0))
#: Input channels: slice below, slice, slice above (wide window), slice (bone window).
IN_CHANNELS = 4
#: Class index -> TotalSegmentator v2 id: 0 background, 1 any vertebra above T10 (35-50),
#: 2 ... 11 the sacrum (25), S1 (26), L5 (27) ... T10 (34).
CLASS_IDS: tuple[int, ...] = (0, 35) + tuple(range(25, 35))
N_CLASSES = len(CLASS_IDS)
#: Shipped weights.
RESOURCES = Path(__file__).resolve().parents[1] / "Resources" / "segmentation"
#: Levels caudal to cranial as the numbering walks them: the sacrum and S1 (fused) first, then L5 ... C1.
_CHAIN: tuple[int, ...] = (26,) + tuple(range(27, 51))


# --- networks --------------------------------------------------------------------------------------
def _vnet_paper(in_channels: int, out_channels: int):
    """MONAI's 2D VNet with the paper's 3x3 padded convolutions and 16-channel last feature map."""
    import torch.nn as nn
    from monai.networks.nets import VNet
    from monai.networks.nets.vnet import OutputTransition

    act = ("elu", {"inplace": True})
    model = VNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, act=act,
                 dropout_prob_down=None, dropout_prob_up=(None, 0.0), dropout_dim=2)
    # Last block: 3x3 conv 32 -> 16 channels (the paper's 512x512x16 map), then a 1x1 conv to the classes.
    model.out_tr = OutputTransition(2, 32, 16, act)
    model.out_tr.conv2 = nn.Conv2d(16, out_channels, kernel_size=1)
    # MONAI hard-codes the original V-Net's 5x5 kernels; the paper uses 3x3 with padding.
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (5, 5):
                setattr(module, name, nn.Conv2d(child.in_channels, child.out_channels, 3, padding=1,
                                                bias=child.bias is not None))
    return model


def build_network(name: str, in_channels: int = IN_CHANNELS, out_channels: int = N_CLASSES):
    """A fresh (untrained) 2D segmentation network: ``'unet'`` or ``'vnet'``.

    Both output ``out_channels`` logits per pixel; input sizes must be multiples of 16.
    """
    name = str(name).lower()
    if name == "unet":
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                     channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    elif name == "vnet":
        if 16 % in_channels:
            raise SpineInpaintError(f"MONAI's VNet needs in_channels dividing 16, got {in_channels}")
        model = _vnet_paper(in_channels, out_channels)
    else:
        raise SpineInpaintError(f"unknown segmentation network '{name}' (use {' or '.join(NETWORKS)})")
    model._spine_net = name  # which network it is, for segment_volume's report and its locator
    return model


def count_parameters(model) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


# --- data on the network grid -------------------------------------------------------------------------
def ids_to_classes(labels: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids -> class indices of :data:`CLASS_IDS` (non-vertebra tissue -> 0)."""
    lut = np.zeros(256, np.uint8)
    for index, label in enumerate(CLASS_IDS):
        if index >= 2:
            lut[label] = index
    lut[35:51] = 1
    return lut[np.asarray(labels).astype(np.uint8)]


def check_grid(grid_mm: float) -> float:
    """``grid_mm`` as a float, or a one-line error when no network grid can have that pixel size."""
    try:
        value = float(grid_mm)
    except (TypeError, ValueError):
        raise SpineInpaintError(f"segmentation pixel size must be a number of mm, got {grid_mm!r}") from None
    if not (np.isfinite(value) and 0.25 <= value <= 4.0):
        raise SpineInpaintError(f"segmentation pixel size must be between 0.25 and 4 mm, got {grid_mm}")
    return value


def to_network_grid(volume: io.Volume, *, labels: bool = False, grid_mm: float = GRID_MM) -> io.Volume:
    """``volume`` re-oriented to LPS and resampled to ``grid_mm`` in-plane (slice spacing kept).

    The grid keeps the physical extent of the input (same origin corner and direction after the
    re-orientation), so :func:`SpineInpaintLib.io.resample_like` brings results back exactly.
    """
    grid_mm = check_grid(grid_mm)
    lps = io.reorient(volume, "LPS")
    spacing = (grid_mm, grid_mm, lps.spacing[2])
    default = 0.0 if labels else -1024.0
    if not labels and lps.array.dtype not in (np.float32, np.float64):
        lps = lps.with_array(lps.array.astype(np.float32))
    return io.resample_to_spacing(lps, spacing, labels=labels, default=default)


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def channel_stack(hu: np.ndarray, z_spacing: float, indices: Sequence[int] | None = None) -> np.ndarray:
    """2.5D network input of slices ``indices`` of a (z, y, x) HU volume on the network grid.

    Returns float32 (n, 4, y, x): the slices :data:`NEIGHBOUR_MM` below and above (linear
    interpolation between slices, clamped at the ends) and the slice itself in the wide window, and
    the slice in the bone window (:data:`WINDOWS`).
    """
    n = hu.shape[0]
    indices = range(n) if indices is None else indices
    offset = NEIGHBOUR_MM / float(z_spacing)
    out = np.empty((len(indices), IN_CHANNELS) + hu.shape[1:], np.float32)

    def at(position: float) -> np.ndarray:
        position = min(max(position, 0.0), n - 1.0)
        k = int(np.floor(position))
        t = position - k
        if t < 1e-6 or k + 1 >= n:
            return hu[k].astype(np.float32)
        return (1.0 - t) * hu[k].astype(np.float32) + t * hu[k + 1].astype(np.float32)

    for i, z in enumerate(indices):
        centre = hu[z]
        out[i, 0] = _window(at(z - offset), WINDOWS[0])
        out[i, 1] = _window(centre, WINDOWS[0])
        out[i, 2] = _window(at(z + offset), WINDOWS[0])
        out[i, 3] = _window(centre, WINDOWS[1])
    return out


# --- input checks -----------------------------------------------------------------------------------
def check_ct(ct: io.Volume) -> list[str]:
    """Reasons why ``ct`` does not look like a CT in Hounsfield units (empty list: looks fine).

    CT of a body has air outside it (about -1000 HU) and bone above about 300 HU. A constant image,
    one with no voxel below -500 HU (MR, PET, an already-windowed image) or one with no voxel above
    150 HU is flagged.
    """
    array = np.asarray(ct.array)
    reasons = []
    if array.size == 0:
        return ["the volume is empty"]
    if not np.issubdtype(array.dtype, np.number):
        return [f"the volume holds {array.dtype} values, not numbers"]
    finite = np.isfinite(array)
    if not finite.all():
        reasons.append(f"{np.count_nonzero(~finite)} voxels are NaN or infinite")
        array = np.where(finite, array, 0)
    lo, hi = float(array.min()), float(array.max())
    if hi - lo < 1e-6:
        reasons.append(f"the volume is constant ({lo:g}): not a CT")
        return reasons
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    p_lo, p_hi = np.percentile(sample, [1.0, 99.9])
    if p_lo > -500.0:
        reasons.append(f"no air: the 1st percentile is {p_lo:.0f} (CT in HU has air near -1000); "
                       "MR or a rescaled image?")
    if p_hi < 150.0:
        reasons.append(f"no bone: the 99.9th percentile is {p_hi:.0f} HU")
    return reasons


# --- post-processing -----------------------------------------------------------------------------------
def clean_mask(mask: np.ndarray, spacing_zyx: Sequence[float], *, min_ml: float = 0.5, max_gap_mm: float = 12.0,
               keep_fraction: float = 0.2) -> np.ndarray:
    """Remove stray components of a 3D spine mask.

    Starting from the largest connected component, keeps every component of at least ``min_ml``
    millilitres whose bounding box comes within ``max_gap_mm`` of a kept one (transitively, so a
    column of vertebrae separated by discs stays whole), and any component at least
    ``keep_fraction`` of the largest (a spine segment beyond a wider gap). Specks in ribs, pelvis,
    bowel contrast or the table go.
    """
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    spacing = np.asarray(spacing_zyx, float)
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    boxes = ndimage.find_objects(labels)
    lo = np.array([[sl.start for sl in box] for box in boxes], float) * spacing
    hi = np.array([[sl.stop - 1 for sl in box] for box in boxes], float) * spacing
    largest = int(np.argmax(sizes))
    keep = np.zeros(n, bool)
    keep[largest] = True
    keep |= sizes >= keep_fraction * sizes[largest]
    candidates = sizes >= min_ml
    changed = True
    while changed:
        changed = False
        for k in np.nonzero(candidates & ~keep)[0]:
            # Per-axis gap between box k and every kept box (0 where they overlap).
            gap = np.maximum(0.0, np.maximum(lo[keep] - hi[k], lo[k] - hi[keep]))
            if (np.sqrt((gap ** 2).sum(axis=1)) <= max_gap_mm).any():
                keep[k] = changed = True
    return np.concatenate([[False], keep])[labels]


def directional_flood(seeds: np.ndarray, mask: np.ndarray, *, upward_cost: int = 1) -> np.ndarray:
    """Hand every voxel of ``mask`` to the seed it reaches at the least cost (multi-source shortest path).

    Steps are face-connected; a step in-plane or to the slice below (z - 1) costs 1, a step to the
    slice above (z + 1) costs ``upward_cost`` (integers: Dial's bucket queue, exact). With
    ``upward_cost=1`` this is breadth-first flooding. Ties go to the seed whose front got there first
    in a fixed order of directions (deterministic).

    Parameters
    ----------
    seeds
        int (z, y, x) labels, 0 = not a seed; seeds outside ``mask`` are ignored.
    mask
        Binary (z, y, x) region to flood.

    Returns
    -------
    int32 labels of the seeds on ``mask`` (0 where no seed is reachable and outside ``mask``).
    """
    if int(upward_cost) < 1:
        raise ValueError(f"upward_cost must be an integer >= 1, got {upward_cost}")
    mask = np.asarray(mask) > 0
    seeds = np.where(mask, np.asarray(seeds), 0).astype(np.int32)
    out = np.zeros(mask.shape, np.int32)
    if not seeds.any():
        return out
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    # A one-voxel frame of False around the box, so that neighbour offsets of flat indices never wrap.
    region = np.pad(mask[box], 1)
    labels = np.pad(seeds[box], 1).ravel()
    inside = region.ravel()
    strides = np.array(region.strides) // region.itemsize
    moves = ((int(strides[0]), int(upward_cost)), (-int(strides[0]), 1), (int(strides[1]), 1),
             (-int(strides[1]), 1), (int(strides[2]), 1), (-int(strides[2]), 1))
    unreached = np.iinfo(np.int64).max
    dist = np.where(labels > 0, 0, unreached).astype(np.int64)
    buckets: dict[int, list[np.ndarray]] = {0: [np.flatnonzero(labels)]}
    while buckets:
        t = min(buckets)
        front = np.unique(np.concatenate(buckets.pop(t)))
        front = front[dist[front] == t]  # entries improved since they were queued are stale
        for offset, cost in moves:
            target = front + offset
            better = inside[target] & (dist[target] > t + cost)
            target, source = target[better], front[better]
            target, first = np.unique(target, return_index=True)
            dist[target] = t + cost
            labels[target] = labels[source[first]]
            if target.size:
                buckets.setdefault(t + cost, []).append(target)
    labels[dist == unreached] = 0
    out[box] = labels.reshape(region.shape)[1:-1, 1:-1, 1:-1]
    return out


def number_chain(votes: np.ndarray, *, skip_cost: float = SKIP_COST) -> list[int]:
    """Chain positions of vertebrae ordered caudal to cranial, from their votes for each position.

    ``votes`` (n, positions): the network's summed level probability of each vertebra for each
    position of the chain (sacrum-and-S1, L5, L4, ...). Consecutive vertebrae take consecutive
    positions, or skip one where two vertebrae came out as one piece (a missed disc): a skip costs
    ``skip_cost`` times the mean vote mass of a vertebra, so one merge no longer shifts every level
    above it. Without skips this is the best offset of a consecutive run. Dynamic programming, exact.
    """
    votes = np.asarray(votes, float)
    n, m = votes.shape
    if n == 0:
        return []
    if n > m:  # more pieces than levels: the extra ones get position m (no level)
        return number_chain(votes[:m], skip_cost=skip_cost) + [m] * (n - m)
    penalty = skip_cost * float(votes.sum()) / n
    best = np.full((n, m), -np.inf)
    came_from = np.zeros((n, m), int)
    best[0] = votes[0]
    for k in range(1, n):
        for p in range(k, m):
            options = [(best[k - 1, p - 1], p - 1)]
            if p >= 2:
                options.append((best[k - 1, p - 2] - penalty, p - 2))
            value, previous = max(options)
            best[k, p] = value + votes[k, p]
            came_from[k, p] = previous
    positions = [int(np.argmax(best[n - 1]))]
    for k in range(n - 1, 0, -1):
        positions.append(int(came_from[k, positions[-1]]))
    return positions[::-1]


def split_vertebrae(mask: np.ndarray, level_scores: np.ndarray, spacing_zyx: Sequence[float], *,
                    core_mm: float = 5.0, min_core_ml: float = 0.8, max_lateral_mm: float = 35.0,
                    flood: str = "geodesic", attach_mm: float = 6.0, keep_ml: float = 5.0,
                    contact_erosion: int = 1, upward_cost: int = 4, fill: np.ndarray | None = None) -> np.ndarray:
    """Split a 3D spine mask (LPS grid, slices inferior to superior) into numbered vertebrae.

    The vertebral bodies are the thick parts of the mask: the connected components of the voxels
    deeper than ``core_mm`` inside it, separated by the discs, seed a flooding (``flood``:
    ``'geodesic'``, breadth-first inside the mask, default; or ``'distance'``, a watershed of the
    distance map) that hands every mask voxel connected to them to one vertebra (cores more than ``max_lateral_mm``
    from the column's mid-line, e.g. an iliac wing taken for spine, seed nothing). The vertebrae, ordered along the slices, get
    TotalSegmentator ids (sacrum with S1, L5, L4, ...) that agree best with the network's per-voxel
    level scores, consecutive but for a level skipped where that pays more than a vertebra's votes
    (two vertebrae merged into one piece; :func:`number_chain`); inside the sacrum-and-S1 segment each
    voxel takes the better of the two ids. Pieces of the mask that no body reaches take the nearest
    vertebra when they come within ``attach_mm`` of one, or hold ``keep_ml`` or more within
    ``max_lateral_mm`` of the column, and are left out (0) otherwise. The geodesic flooding first
    runs inside the mask eroded ``contact_erosion`` times (6-connected), so that the thin contacts
    between neighbours (facet joints, touching spinous processes) are no path, and a step to the
    slice above costs ``upward_cost`` times a step in-plane or down (a vertebra's lamina, inferior
    articular and spinous processes hang below its pedicles, so bone is reached from the body above
    it rather than climbed into from the body below); the rim left by the erosion is filled last.
    ``fill`` (e.g. a known lesion) counts as bone while the bodies are found and flooded, so that a
    body or pedicle the lesion destroyed still joins the vertebra's parts; it gets no label itself.

    Parameters
    ----------
    mask
        Binary (z, y, x) mask.
    level_scores
        float (N_CLASSES, z, y, x) per-voxel class probabilities (:data:`CLASS_IDS`).
    spacing_zyx
        Voxel size (mm).

    Returns
    -------
    uint8 (z, y, x) label map with TotalSegmentator v2 ids (0 outside the mask).
    """
    from skimage.segmentation import watershed

    mask = np.asarray(mask) > 0
    out = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return out
    if fill is not None:
        if np.shape(fill) != mask.shape:
            raise ValueError(f"fill has shape {np.shape(fill)}, the mask {mask.shape}")
        fill = np.asarray(fill) > 0
        if fill.any():
            out = split_vertebrae(mask | fill, level_scores, spacing_zyx, core_mm=core_mm, min_core_ml=min_core_ml,
                                  max_lateral_mm=max_lateral_mm, flood=flood, attach_mm=attach_mm,
                                  keep_ml=keep_ml, contact_erosion=contact_erosion, upward_cost=upward_cost)
            out[~mask] = 0
            return out
    scores = np.asarray(level_scores)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    dist = ndimage.distance_transform_edt(mask, sampling=spacing_zyx)
    cores, n = ndimage.label(dist > core_mm)
    if n:
        sizes = np.bincount(cores.ravel())[1:] * voxel_ml
        big = sizes >= max(min_core_ml, 0.2 * float(np.median(sizes[sizes >= min_core_ml])) if (sizes >= min_core_ml).any() else min_core_ml)
        # The column runs near the mid-sagittal plane: a thick core far to the side (iliac wing,
        # femoral head, a false positive) is no vertebral body, whatever its size.
        x_mm = ndimage.mean(np.broadcast_to(np.arange(mask.shape[2]) * spacing_zyx[2], mask.shape), cores,
                            np.arange(1, n + 1))
        # Only cores near the mask's own median column count toward the mid-line: a network that
        # sees the spine as thin pieces but a femoral head as one thick blob would otherwise put
        # the mid-line through the hip and drop the whole spine (real scan left out of training:
        # one network's Dice 0.000 from a raw mask of 0.451).
        column_counts = np.cumsum(mask.sum(axis=(0, 1)))
        x_mask = float(np.searchsorted(column_counts, column_counts[-1] / 2.0)) * spacing_zyx[2]
        big &= np.abs(x_mm - x_mask) <= max_lateral_mm
        if big.any():
            order_x = np.argsort(x_mm[big])
            weights = np.cumsum(sizes[big][order_x])
            x_mid = x_mm[big][order_x][np.searchsorted(weights, weights[-1] / 2.0)]
            big &= np.abs(x_mm - x_mid) <= max_lateral_mm
        lut = np.zeros(n + 1, np.int32)
        lut[1:][big] = np.arange(1, int(big.sum()) + 1)
        cores, n = lut[cores], int(big.sum())
    if n == 0:
        # No vertebral body thick enough (a thin or partial scan): per-voxel network levels.
        classes = np.argmax(scores[1:], axis=0) + 1
        return np.where(mask, np.asarray(CLASS_IDS, np.uint8)[classes], 0).astype(np.uint8)
    if flood == "geodesic":
        # Flooding from the bodies inside the mask (face-connected steps): each voxel goes to the
        # body it reaches at the least cost through bone (the pedicles) rather than across a facet
        # joint. Breadth-first against flooding the distance map: real scan L3 Dice 0.81 -> 0.90,
        # held-out phantoms unchanged (mean per-vertebra Dice 0.885 vs 0.886 on four); repeating
        # thick slices to make the steps isotropic in mm was worse on the real scan.
        inner = mask
        if contact_erosion > 0:
            # At 1.5 mm x slice spacing, a facet joint or two touching spinous processes are one
            # or two voxels of contact: without them, each articular process is reached through its
            # own vertebra's lamina, not across the joint from the neighbour's pedicle. Real scan,
            # healthy: L3 Dice 0.898 -> 0.912, HD95 6.7 -> 4.2 mm (in-plane erosion: 0.900; two
            # erosions cut the laminae: 0.836); four test phantoms: mean per-vertebra Dice +0.003-0.010.
            inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1),
                                           iterations=contact_erosion) | (cores > 0)
        # Climbing costs more than descending: the L4 flood no longer reaches L3's inferior
        # articular processes up through its own superior ones first. Real scan, healthy L3 (with
        # the erosion): Dice 0.912 -> 0.934, HD95 4.2 -> 3.0 mm; with simulated L3 lesions, L3
        # outside the lesion +0.03; six test phantoms: mean per-vertebra Dice 0.787 -> 0.799 (costs
        # 2 and 3 tie with 4 there, 6 is worse; on the real scan 4 beats 2 and 3).
        seeds = directional_flood(cores, inner, upward_cost=upward_cost)
        segments = watershed(np.zeros(mask.shape, np.uint8), seeds, mask=mask)
    else:
        segments = watershed(-dist, cores, mask=mask)
    # Bone the flooding could not reach is joined to no vertebral body. A piece that touches a
    # vertebra within ``attach_mm`` (a posterior element cut off by a thin gap) or is as large as
    # a vertebra (``keep_ml``) and central (spine the network saw too thin to hold a core) takes the nearest
    # vertebra; a small piece farther away (a rib end, an iliac crest, a calcification) is not spine.
    unreached = mask & (segments == 0)
    if unreached.any():
        gap, nearest = ndimage.distance_transform_edt(segments == 0, sampling=spacing_zyx, return_indices=True)
        pieces, n_pieces = ndimage.label(unreached, structure=np.ones((3, 3, 3), bool))
        index = np.arange(1, n_pieces + 1)
        touching = ndimage.minimum(gap, pieces, index) <= attach_mm
        large = ndimage.sum_labels(unreached, pieces, index) * voxel_ml >= keep_ml
        # ... and on the column's mid-line, as the bodies are (an iliac wing is not).
        x_of = np.broadcast_to(np.arange(mask.shape[2]) * spacing_zyx[2], mask.shape)
        column_x = float(np.mean(x_of[cores > 0]))
        central = np.abs(ndimage.mean(x_of, pieces, index) - column_x) <= max_lateral_mm
        take = np.concatenate([[False], touching | (large & central)])[pieces]
        segments[take] = segments[tuple(i[take] for i in nearest)]
    # Order along the column by the centroid of each core (slices run inferior to superior).
    z_centre = ndimage.mean(np.arange(mask.shape[0])[:, None, None] * np.ones_like(cores), cores, np.arange(1, n + 1))
    order = np.argsort(z_centre)
    # Votes: summed probability of each chain position per segment.
    chain_votes = np.zeros((n, len(_CHAIN)))
    flat_segments = segments[mask]
    for c, label in enumerate(CLASS_IDS):
        if c == 0:
            continue
        per_segment = np.bincount(flat_segments, weights=scores[c][mask], minlength=n + 1)[1:]
        if label == 25 or label == 26:
            chain_votes[:, 0] += per_segment
        elif label == 35:
            chain_votes[:, _CHAIN.index(35):] += per_segment[:, None] / (len(_CHAIN) - _CHAIN.index(35))
        else:
            chain_votes[:, _CHAIN.index(label)] += per_segment
    positions = number_chain(chain_votes[order])
    lut = np.zeros(n + 1, np.uint8)
    for k in range(n):
        lut[order[k] + 1] = _CHAIN[positions[k]] if positions[k] < len(_CHAIN) else 0
    out = lut[segments]
    # The sacrum (S2-S5) and S1 are fused: split that segment voxel by voxel.
    s1 = out == 26
    if s1.any():
        sacrum = scores[CLASS_IDS.index(25)] > scores[CLASS_IDS.index(26)]
        out[s1 & sacrum] = 25
    return out.astype(np.uint8)


# --- training pieces (MONAI transforms and loss) -------------------------------------------------
def train_transforms(seed: int = 0, low_resolution: float = 0.0, intensity: float = 0.0):
    """MONAI augmentation of a 2.5D crop: dict ``{'image': (4, H, W), 'label': (1, H, W)}``.

    Affine jitter (rotation +-10 deg, scale +-10 %, shear), left-right flips (the level of a
    vertebra does not depend on the side), intensity scale and shift (other scanners' calibration and
    kernels), Gaussian noise and blur, and (``low_resolution`` > 0, that probability) a coarser scan:
    the crop down-sampled to 40-100 % of its pixels and back (3-4 mm pixels at most), as thick-slice
    clinical CT looks on the 1.5 mm grid; and (``intensity`` > 0, that probability each) a strong
    intensity remapping: a random gamma (0.5-2) and a random monotone histogram shift, one mapping for
    all four channels, so that a network cannot lean on the phantoms' exact bone and soft-tissue values
    (real osteopenic bone is dimmer than most phantoms').
    """
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandHistogramShiftd, RandScaleIntensityd,
                                  RandShiftIntensityd, RandSimulateLowResolutiond)

    keys = ("image", "label")
    transform = Compose([
        RandAffined(keys, prob=0.7, rotate_range=np.deg2rad(10.0), scale_range=0.1, shear_range=0.05,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandShiftIntensityd("image", offsets=0.04, prob=0.3),
        RandGaussianSmoothd("image", sigma_x=(0.25, 0.8), sigma_y=(0.25, 0.8), prob=0.2),
        RandGaussianNoised("image", std=0.015, prob=0.3),
    ] + ([RandSimulateLowResolutiond("image", prob=float(low_resolution), downsample_mode="area",
                                     upsample_mode="bilinear", zoom_range=(0.4, 1.0))] if low_resolution > 0 else [])
      + ([RandAdjustContrastd("image", prob=float(intensity), gamma=(0.5, 2.0)),
          RandHistogramShiftd("image", prob=float(intensity), num_control_points=(5, 10))] if intensity > 0 else []))
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

    def loss(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        target = target.long().unsqueeze(1)
        spine_prob = 1.0 - torch.softmax(logits, dim=1)[:, :1]
        total = multi(logits, target) + binary(spine_prob, (target > 0).float())
        if boundary_weight:
            # log p(spine) - log p(background), stable: the spine's logit of a two-class softmax.
            spine_logit = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - logits[:, :1]
            total = total + boundary_weight * F.binary_cross_entropy_with_logits(spine_logit, (target > 0).float())
        return total

    return loss


# --- models --------------------------------------------------------------------------------------
def default_weights(net: str = DEFAULT_NETWORK) -> Path:
    """Path of the shipped weights of ``net`` (``Resources/segmentation/<net>.safetensors``)."""
    if str(net).lower() not in NETWORKS:
        raise SpineInpaintError(f"unknown segmentation network '{net}' (use {' or '.join(NETWORKS)})")
    return RESOURCES / f"{str(net).lower()}.safetensors"


def load_model(net: str = DEFAULT_NETWORK, weights: str | Path | None = None, device: str = "cpu"):
    """A network in eval mode with its safetensors weights (default: the shipped ones) and their metadata.

    The network grid the weights were trained on (``preprocessing.grid_mm`` of the metadata,
    :data:`GRID_MM` when absent) is kept on the model as ``spine_grid_mm``; :func:`segment_volume`
    resamples to it.

    Returns
    -------
    (model, metadata)
    """
    import torch

    from SpineInpaintLib.training import load_weights, read_weights_metadata

    path = Path(weights) if weights else default_weights(net)
    if not path.exists():
        raise SpineInpaintError(f"segmentation weights not found: {path} (train them with "
                                f"'python -m SpineInpaintLib train segmentation --net {net}')")
    meta = read_weights_metadata(path)
    arch = meta.get("architecture", {})
    name = arch.get("net", net)
    model = build_network(name, arch.get("in_channels", IN_CHANNELS), arch.get("out_channels", N_CLASSES))
    load_weights(model, path)
    model.eval()
    model.spine_grid_mm = check_grid(meta.get("preprocessing", {}).get("grid_mm", GRID_MM))
    return model.to(torch.device(device)), meta


def _stride_aligned(part: slice, size: int, stride: int = 16) -> slice:
    """``part`` of ``range(size)`` starting at a multiple of ``stride``, ``stride``-long where the image allows."""
    start = (part.start or 0) // stride * stride
    stop = size if part.stop is None else min(size, part.stop)
    return slice(start, min(size, start + -(-(stop - start) // stride) * stride))


def predict_grid(model, hu: np.ndarray, z_spacing: float, *, batch_size: int = 8, device: str = "cpu",
                 progress: bool = False, box: tuple[slice, slice] | None = None,
                 desc: str = "segmentation") -> np.ndarray:
    """Class probabilities (C, z, y, x), float16, of every slice of a HU volume on the network grid.

    With ``box`` (rows, cols; None: whole slices) the network sees only that part of each slice, its
    start moved down to a multiple of 16 pixels and its size grown to one; outside it every pixel
    is background.
    """
    import torch

    n, rows, cols = hu.shape
    out = np.zeros((N_CLASSES, n, rows, cols), np.float16)
    out[0] = 1.0
    box_r, box_c = (slice(0, rows), slice(0, cols)) if box is None else box
    # Start the box on a multiple of 16 pixels: the networks' strides then fall on the same pixels
    # as for the whole slice (they are not shift-invariant), so a box changes no answer inside it;
    # and grow it to a multiple of 16 with image pixels where there are any (else air is padded).
    box_r, box_c = (_stride_aligned(b, size) for b, size in ((box_r, rows), (box_c, cols)))
    hu_box = hu[:, box_r, box_c]
    box_rows, box_cols = hu_box.shape[1:]
    pad_r, pad_c = (-box_rows) % 16, (-box_cols) % 16
    batches = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    dev = torch.device(device)
    # Written through a torch view: torch converts to float16 and transposes many times faster than numpy.
    out_box = torch.from_numpy(out)[:, :, box_r, box_c]
    with torch.inference_mode():
        for start in batches:
            stop = min(n, start + batch_size)
            x = channel_stack(hu_box, z_spacing, range(start, stop))
            x = np.pad(x, ((0, 0), (0, 0), (0, pad_r), (0, pad_c)))
            logits = model(torch.from_numpy(x).to(dev))
            probs = torch.softmax(logits.float(), dim=1)[:, :, :box_rows, :box_cols]
            out_box[:, start:stop] = probs.to(torch.float16).cpu().permute(1, 0, 2, 3)
    return out


def locate_spine(locator, hu: np.ndarray, spacing_zyx: Sequence[float], *, margin_mm: float = LOCATE_MARGIN_MM,
                 min_mm: float = LOCATE_MIN_MM, batch_size: int = 8, device: str = "cpu",
                 progress: bool = False) -> tuple[slice, slice] | None:
    """In-plane box (rows, cols) around the spine of a (z, y, x) HU volume on the network grid.

    ``locator`` (a fast network, the shipped U-Net in :func:`segment_volume`) segments the whole
    slices; the box holds its cleaned spine mask (:func:`clean_mask`) in every slice plus
    ``margin_mm``, at least ``min_mm`` wide (the training crops' size, so that the second network
    sees what it was trained on), inside the image. None when the locator finds no spine.
    """
    spacing_zyx = tuple(float(v) for v in spacing_zyx)
    probs = predict_grid(locator, hu, spacing_zyx[0], batch_size=batch_size, device=device, progress=progress,
                         desc="locating the spine")
    mask = probs[0] < 0.5
    if not mask.any():
        return None
    mask = clean_mask(mask, spacing_zyx)
    box = []
    for axis, size, pixel in ((1, hu.shape[1], spacing_zyx[1]), (2, hu.shape[2], spacing_zyx[2])):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in (0, 1, 2) if a != axis)))
        margin = int(np.ceil(margin_mm / pixel))
        lo, hi = int(present[0]) - margin, int(present[-1]) + 1 + margin
        short = int(np.ceil(min_mm / pixel)) - (hi - lo)
        if short > 0:  # grow evenly to the minimum width
            lo, hi = lo - short // 2, hi + short - short // 2
        if lo < 0:  # shift back inside the image, then clip
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = lo - (hi - size), size
        box.append(slice(max(0, lo), min(size, hi)))
    return box[0], box[1]


@dataclasses.dataclass
class SegmentationResult:
    """Output of :func:`segment_volume`, on the input grid with the input's geometry.

    Attributes
    ----------
    spine
        uint8 binary spine mask.
    labels
        uint8 per-vertebra labels (TotalSegmentator v2 ids; 0 elsewhere).
    flags
        Problems found: ``'not_ct'`` (input does not look like CT; masks empty), ``'no_spine'``.
    messages
        Human-readable reasons behind the flags.
    timings
        Seconds per step.
    net
        Network that produced the masks.
    """

    spine: io.Volume
    labels: io.Volume
    flags: list[str]
    messages: list[str]
    timings: dict
    net: str

    @property
    def ok(self) -> bool:
        return not self.flags

    def levels(self) -> list[int]:
        """Vertebra ids present, caudal to cranial."""
        return [int(v) for v in np.unique(self.labels.array) if v]


def _empty_result(ct: io.Volume, flags: list[str], messages: list[str], timings: dict, net: str) -> SegmentationResult:
    zeros = ct.with_array(np.zeros(ct.shape, np.uint8))
    return SegmentationResult(zeros, zeros.copy(), flags, messages, timings, net)


def _fill_unlabelled(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give mask voxels without a label the label of the nearest labelled voxel (within the mask's box)."""
    missing = mask & (labels == 0)
    if not missing.any() or not labels.any():
        return labels
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = labels[box]
    _, nearest = ndimage.distance_transform_edt(sub == 0, return_indices=True)
    filled = sub[tuple(nearest)]
    sub[missing[box]] = filled[missing[box]]
    labels[box] = sub
    return labels


def segment_volume(ct: io.Volume, net: str = DEFAULT_NETWORK, *, model=None, weights: str | Path | None = None,
                   device: str = "cpu", batch_size: int = 8, per_vertebra: bool = True, clean: bool = True,
                   progress: bool = False, lesion: io.Volume | None = None,
                   locator="auto") -> SegmentationResult:
    """Segment the spine of a whole CT volume (any orientation and spacing).

    The CT is re-oriented to LPS and resampled to the network grid (the weights' pixel size in-plane,
    :data:`GRID_MM` for a model without one; its own slice spacing), segmented slice by slice in
    batches, cleaned of stray components (:func:`clean_mask`), split into vertebrae
    (:func:`split_vertebrae`), and brought back to the input grid: the spine probability by linear
    interpolation then a 0.5 threshold, the levels by nearest neighbour inside that mask.

    Input that does not look like CT (:func:`check_ct`) gives a :class:`UserWarning` and an empty
    result flagged ``'not_ct'``; no spine found gives a warning and the flag ``'no_spine'``.

    Parameters
    ----------
    ct
        CT in HU.
    net
        ``'vnet'`` (:data:`DEFAULT_NETWORK`) or ``'unet'`` (the faster); ignored when ``model`` is given.
    model, weights
        A loaded network, or a weights file (default: the shipped weights of ``net``).
    per_vertebra
        Also number the vertebrae (else ``labels`` holds 1 on the spine).
    lesion
        A known lesion mask on the CT's grid: the split into vertebrae treats it as bone
        (``split_vertebrae(fill=...)``), so that bone a destructive lesion cut off from its body
        (a pedicle, the posterior arch) is not handed to the neighbour. The masks still leave it out.
    locator
        A fast network that first finds the spine, so that the network runs only on a box around
        it (:func:`locate_spine`; the rest of each slice is background). ``'auto'``: the shipped
        U-Net for the networks of :data:`LOCATED_NETWORKS` (the V-Net), on the same grid; None:
        whole slices.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not isinstance(ct, io.Volume):
        raise SpineInpaintError(f"segment_volume needs an io.Volume, got {type(ct).__name__}")
    if lesion is not None and lesion.shape != ct.shape:
        raise SpineInpaintError(f"the lesion mask has shape {lesion.shape}, the CT {ct.shape}")
    reasons = check_ct(ct)
    if reasons:
        message = "input does not look like CT in HU: " + "; ".join(reasons) + " -- returning an empty mask"
        warnings.warn(message, UserWarning, stacklevel=2)
        return _empty_result(ct, ["not_ct"], [message], {"total": time.perf_counter() - start}, net)
    if model is None:
        model, _ = load_model(net, weights, device)
    grid_mm = getattr(model, "spine_grid_mm", GRID_MM)
    used = str(getattr(model, "_spine_net", net)).lower()
    grid = to_network_grid(ct, grid_mm=grid_mm)
    timings["resample_in"] = time.perf_counter() - start
    t = time.perf_counter()
    if isinstance(locator, str) and locator == "auto":
        locator = load_model("unet", device=device)[0] if used in LOCATED_NETWORKS else None
    if locator is not None and getattr(locator, "spine_grid_mm", GRID_MM) != grid_mm:
        locator = None  # a box found on another grid would need resampling; whole slices instead
    box = None
    if locator is not None:
        box = locate_spine(locator, grid.array, grid.spacing_zyx, batch_size=batch_size, device=device,
                           progress=progress)
        timings["locate"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = predict_grid(model, grid.array, grid.spacing[2], batch_size=batch_size, device=device, progress=progress,
                         box=box)
    timings["network"] = time.perf_counter() - t
    t = time.perf_counter()
    spine_prob = 1.0 - probs[0].astype(np.float32)
    mask = spine_prob > 0.5
    spacing_zyx = grid.spacing_zyx
    if clean and mask.any():
        kept = clean_mask(mask, spacing_zyx)
        # Drop the removed components from the probabilities too, so that interpolation cannot revive them.
        removed = ndimage.binary_dilation(mask & ~kept, iterations=1) & ~ndimage.binary_dilation(kept, iterations=1)
        spine_prob[removed] = 0.0
        mask = kept
    grid_labels = np.zeros(mask.shape, np.uint8)
    if per_vertebra and mask.any():
        fill = None
        if lesion is not None:
            fill = to_network_grid(lesion.with_array((np.asarray(lesion.array) > 0).astype(np.uint8)),
                                   labels=True, grid_mm=grid_mm).array > 0
        grid_labels = split_vertebrae(mask, probs, spacing_zyx, fill=fill)
        # Pieces that belong to no vertebra leave the spine mask too (else the nearest label would
        # be handed to them on the input grid).
        detached = mask & (grid_labels == 0)
        if detached.any() and grid_labels.any():
            kept = mask & ~detached
            removed = ndimage.binary_dilation(detached, iterations=1) & ~ndimage.binary_dilation(kept, iterations=1)
            spine_prob[detached | removed] = 0.0
            mask = kept
    else:
        grid_labels[mask] = 1
    timings["postprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    prob_back = io.resample_like(grid.with_array(spine_prob.astype(np.float32)), ct)
    spine = (prob_back.array > 0.5)
    labels_back = io.resample_like(grid.with_array(grid_labels), ct, labels=True).array.astype(np.uint8)
    labels_back[~spine] = 0
    labels_back = _fill_unlabelled(labels_back, spine)
    timings["resample_out"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    flags, messages = [], []
    if not spine.any():
        message = "no spine found in the volume (is it a spine CT?)"
        warnings.warn(message, UserWarning, stacklevel=2)
        flags, messages = ["no_spine"], [message]
    return SegmentationResult(ct.with_array(spine.astype(np.uint8)), ct.with_array(labels_back), flags, messages,
                              timings, used)


def export_vertebra(labels: io.Volume, level: int | str) -> io.Volume:
    """Binary mask (uint8, same grid) of one vertebra of a label map, e.g. ``'L3'`` or ``29``."""
    from SpineInpaintLib.labels import vertebra_id, vertebra_name

    try:
        label = vertebra_id(level)
    except ValueError as err:
        raise SpineInpaintError(str(err)) from None
    mask = labels.array == label
    if not mask.any():
        present = ", ".join(vertebra_name(v) for v in np.unique(labels.array) if 25 <= v <= 50) or "none"
        raise SpineInpaintError(f"vertebra {vertebra_name(label)} is not in the label map (present: {present})")
    return labels.with_array(mask.astype(np.uint8))
