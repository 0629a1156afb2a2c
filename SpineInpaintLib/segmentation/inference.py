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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import is_vertebra, vertebra_id, vertebra_name
from SpineInpaintLib.segmentation.networks import (
    DEFAULT_NETWORK,
    GRID_MM,
    IN_CHANNELS,
    N_CLASSES,
    check_grid,
    load_model,
)
from SpineInpaintLib.segmentation.vertebrae import clean_mask, split_vertebrae

__all__ = [
    "NEIGHBOUR_MM", "WINDOWS", "CT_HU_RANGE", "MIN_SLICES", "to_network_grid", "channel_stack", "check_ct", "predict_grid", "locate_spine",
    "SegmentationResult", "segment_volume", "export_vertebra", "LOCATED_NETWORKS", "LOCATE_MARGIN_MM",
    "LOCATE_MIN_MM",
]

#: Networks that segment_volume runs only on a box around the spine that the U-Net finds first
#: (:func:`locate_spine`): the V-Net's full-resolution layers make whole slices slow on a CPU.
LOCATED_NETWORKS = ("vnet",)

#: Margin (mm) around the located spine, and the least width of the box (the training crops: 160 px of 1.5 mm).
LOCATE_MARGIN_MM = 24.0

LOCATE_MIN_MM = 240.0

#: Distance (mm) of the two neighbour slices of the 2.5D input above and below the slice.
NEIGHBOUR_MM = 2.5

#: HU windows mapped to [0, 1]: a wide one for the three slices, a bone window on the centre slice.
WINDOWS = ((-200.0, 1300.0), (100.0, 1100.0))


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
#: Values any stored CT can hold: int16 padding down to -32768, extended-scale metal up to 65535 HU.
CT_HU_RANGE = (-32768, 65535)

#: Fewest slices a CT volume may have (a 2-slice volume has no neighbours for the 2.5D networks).
MIN_SLICES = 3


def check_ct(ct: io.Volume) -> list[str]:
    """Reasons why ``ct`` does not look like a CT in Hounsfield units (empty list: looks fine).

    CT of a body has air outside it (about -1000 HU) and bone above about 300 HU. A constant image,
    one with no voxel below -500 HU (MR, PET, an already-windowed image) or one with no voxel above
    150 HU is flagged, and so are values outside :data:`CT_HU_RANGE` and volumes of fewer than
    :data:`MIN_SLICES` slices along every axis but two.
    """
    array = np.asarray(ct.array)
    reasons = []
    if array.size == 0:
        return ["the volume is empty"]
    if min(array.shape) < MIN_SLICES:
        reasons.append(f"the volume is {'x'.join(map(str, ct.size_xyz))} voxels: a CT volume needs at least "
                       f"{MIN_SLICES} slices")
    if not np.issubdtype(array.dtype, np.number):
        return [f"the volume holds {array.dtype} values, not numbers"]
    finite = np.isfinite(array)
    if not finite.all():
        reasons.append(f"{np.count_nonzero(~finite)} voxels are NaN or infinite")
        array = np.where(finite, array, 0)
    lo, hi = float(array.min()), float(array.max())
    if lo < CT_HU_RANGE[0] or hi > CT_HU_RANGE[1]:
        reasons.append(f"values from {lo:.0f} to {hi:.0f} lie outside any CT's range ({CT_HU_RANGE[0]} to "
                       f"{CT_HU_RANGE[1]} HU): not HU, or a damaged file")
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
    try:
        label = vertebra_id(level)
    except ValueError as err:
        raise SpineInpaintError(str(err)) from None
    mask = labels.array == label
    if not mask.any():
        present = ", ".join(vertebra_name(v) for v in np.unique(labels.array) if is_vertebra(v)) or "none"
        raise SpineInpaintError(f"vertebra {vertebra_name(label)} is not in the label map (present: {present})")
    return labels.with_array(mask.astype(np.uint8))
