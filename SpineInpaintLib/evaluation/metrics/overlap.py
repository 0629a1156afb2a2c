"""Evaluation metrics for every stage: segmentation, detection, inpainting.

All functions take plain numpy arrays and need no torch. Voxel spacing is always given in
**array order**: ``(z, y, x)`` for a volume, ``(y, x)`` for a slice, in millimetres. For a
:class:`SpineInpaintLib.io.Volume` that is ``volume.spacing_zyx`` (``volume.spacing`` is ITK's
``(x, y, z)`` order and would be wrong here). Masks may be bool or integer/float arrays holding only
0 and 1. Arrays that should match and do not raise :class:`SpineInpaintError` with a one-line message.

Segmentation (binary masks, 2D or 3D)
    :func:`iou`, :func:`dice`, :func:`iou_per_label`, :func:`dice_per_label`,
    :func:`surface_distances`, :func:`hausdorff_distance`, :func:`hd95`, :func:`assd`,
    :func:`volume_error` (:class:`VolumeError`).
Detection (axis-aligned boxes, one array per image)
    :func:`box_iou`, :func:`average_precision` (COCO 101-point), :func:`coco_ap`,
    :func:`froc` (:class:`FrocResult`).
Distribution distance (the paper's "KMMD")
    :func:`median_bandwidth`, :func:`gaussian_kernel`, :func:`mmd2_biased`, :func:`mmd2_unbiased`,
    :func:`mmd_permutation_test`.
Image quality inside a mask (BraTS 2023 inpainting-challenge normalisation)
    :func:`brats_intensity_range`, :func:`brats_normalise`, :func:`masked_mae`, :func:`masked_mse`,
    :func:`masked_psnr`, :func:`masked_ssim`, :func:`inpainting_quality`.

Conventions for degenerate input (documented per function): overlap of two empty masks is 1.0;
a surface distance between an empty and a non-empty mask is ``inf`` and between two empty masks 0.0;
AP without any ground-truth box is ``nan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError

__all__ = [
    "iou", "dice", "iou_per_label", "dice_per_label", "surface_distances", "hausdorff_distance", "hd95", "assd",
    "VolumeError", "volume_error",
]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as a bool array; bool or numeric with only 0 and 1 is accepted."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise SpineInpaintError(f"{name} must be a bool or numeric mask, got dtype {mask.dtype}")
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise SpineInpaintError(
            f"{name} must be binary (0/1 or bool), got values {shown}; "
            "use the *_per_label functions for label maps"
        )
    return mask.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray, names: str = "pred and truth") -> None:
    if a.shape != b.shape:
        raise SpineInpaintError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def _mask_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _binary(pred, "pred"), _binary(truth, "truth")
    _same_shape(pred, truth)
    if pred.ndim == 0:
        raise SpineInpaintError("pred and truth must be arrays with at least one axis, got scalars")
    return pred, truth


def _spacing(spacing: float | Sequence[float], ndim: int) -> np.ndarray:
    """Spacing as a float array of length ``ndim`` (a scalar means isotropic)."""
    values = np.atleast_1d(np.asarray(spacing, dtype=float))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.ndim != 1 or values.size != ndim:
        raise SpineInpaintError(
            f"spacing needs {ndim} values in array order, got {np.asarray(spacing).tolist()}"
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise SpineInpaintError(f"spacing must be positive and finite, got {values.tolist()}")
    return values


# ---------------------------------------------------------------------------------------------
# segmentation: overlap
# ---------------------------------------------------------------------------------------------
def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two binary masks of any dimension.

    Returns 1.0 when both masks are empty (they agree perfectly), so that averaging over cases or
    labels does not silently drop them.
    """
    pred, truth = _mask_pair(pred, truth)
    union = np.count_nonzero(pred | truth)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & truth) / union


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|P & T| / (|P| + |T|)`` of two binary masks of any dimension.

    Returns 1.0 when both masks are empty.
    """
    pred, truth = _mask_pair(pred, truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & truth) / total


def _per_label(metric, pred_labels, truth_labels, labels) -> dict[int, float]:
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _same_shape(pred_labels, truth_labels, "pred_labels and truth_labels")
    for name, array in (("pred_labels", pred_labels), ("truth_labels", truth_labels)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            if not np.issubdtype(array.dtype, np.floating) or np.any(array != np.round(array)):
                raise SpineInpaintError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if labels is None:
        present = np.union1d(np.unique(pred_labels), np.unique(truth_labels))
        labels = [int(v) for v in present if v != 0]
    return {int(label): metric(pred_labels == label, truth_labels == label) for label in labels}


def iou_per_label(
    pred_labels: np.ndarray, truth_labels: np.ndarray, labels: Sequence[int] | None = None
) -> dict[int, float]:
    """:func:`iou` for each label of two label maps.

    Parameters
    ----------
    pred_labels, truth_labels
        Integer label maps of the same shape; 0 is background.
    labels
        Labels to score. Default: every non-zero label present in either map. A requested label
        absent from both maps scores 1.0.
    """
    return _per_label(iou, pred_labels, truth_labels, labels)


def dice_per_label(
    pred_labels: np.ndarray, truth_labels: np.ndarray, labels: Sequence[int] | None = None
) -> dict[int, float]:
    """:func:`dice` for each label of two label maps (arguments as :func:`iou_per_label`)."""
    return _per_label(dice, pred_labels, truth_labels, labels)


# ---------------------------------------------------------------------------------------------
# segmentation: surface distances
# ---------------------------------------------------------------------------------------------
def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with at least one face neighbour outside it (or off the array)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: float | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in millimetres between two binary masks.

    The surface of a mask is the set of its voxels with at least one face-connected neighbour
    outside it (voxels on the array border count as surface). Each surface voxel's distance is the
    Euclidean distance, scaled by ``spacing``, from its centre to the nearest surface-voxel centre of
    the other mask (an exact distance transform, :func:`scipy.ndimage.distance_transform_edt`).

    Parameters
    ----------
    pred, truth
        Binary masks of the same shape (2D or 3D).
    spacing
        Voxel size in mm in array order: ``(z, y, x)`` or ``(y, x)``; a scalar means isotropic.

    Returns
    -------
    (pred_to_truth, truth_to_pred)
        One distance per surface voxel of ``pred`` and of ``truth``. When one mask is empty the other
        mask's distances are all ``inf`` and its own array is empty; both empty gives two empty arrays.
    """
    pred, truth = _mask_pair(pred, truth)
    sampling = _spacing(spacing, pred.ndim)
    union = pred | truth
    if not union.any():
        return np.zeros(0), np.zeros(0)
    if not pred.any():
        return np.zeros(0), np.full(np.count_nonzero(_surface(truth)), np.inf)
    if not truth.any():
        return np.full(np.count_nonzero(_surface(pred)), np.inf), np.zeros(0)
    # Every surface voxel lies inside the union's bounding box: crop to it, then pad one background
    # voxel so that the erosion treats the array border as background; distances are unchanged.
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    pred_s = _surface(np.pad(pred[box], 1))
    truth_s = _surface(np.pad(truth[box], 1))
    to_truth = ndimage.distance_transform_edt(~truth_s, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_s, sampling=sampling)
    return to_truth[pred_s], to_pred[truth_s]


def hausdorff_distance(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: float | Sequence[float],
    percentile: float = 100.0,
    *,
    pooled: bool = False,
) -> float:
    """Symmetric (percentile) Hausdorff distance in millimetres.

    Default definition (``pooled=False``): the larger of the two directed ``percentile``-th
    percentiles, ``max(P_q(d(pred -> truth)), P_q(d(truth -> pred)))``, as MONAI's
    ``compute_hausdorff_distance(..., percentile=q)`` and DeepMind's ``surface-distance`` package
    (which also weights by surface area) define HD95. ``pooled=True`` instead takes the percentile
    of both directions' distances together (medpy's ``hd95``), typically a little smaller.
    Percentiles interpolate linearly (numpy's default). Distances are those of
    :func:`surface_distances`.

    Returns ``inf`` when exactly one mask is empty and 0.0 when both are.
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise SpineInpaintError(f"percentile must be in [0, 100], got {percentile}")
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    if d_pt.size == 0 and d_tp.size == 0:
        return 0.0
    if d_pt.size == 0 or d_tp.size == 0:
        return float("inf")
    if pooled:
        return float(np.percentile(np.concatenate([d_pt, d_tp]), percentile))
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: float | Sequence[float], *, pooled: bool = False
) -> float:
    """95th-percentile Hausdorff distance in mm: :func:`hausdorff_distance` with ``percentile=95``.

    By default the maximum of the two directed 95th percentiles (MONAI's definition); ``inf`` when
    exactly one mask is empty, 0.0 when both are.
    """
    return hausdorff_distance(pred, truth, spacing, 95.0, pooled=pooled)


def assd(pred: np.ndarray, truth: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Average symmetric surface distance in mm.

    The mean over both surfaces' voxels of the distance to the other surface:
    ``(sum d(pred -> truth) + sum d(truth -> pred)) / (n_pred + n_truth)`` (MONAI's
    ``compute_average_surface_distance(symmetric=True)``). ``inf`` when exactly one mask is empty,
    0.0 when both are.
    """
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    if d_pt.size == 0 and d_tp.size == 0:
        return 0.0
    if d_pt.size == 0 or d_tp.size == 0:
        return float("inf")
    return float(np.concatenate([d_pt, d_tp]).mean())


@dataclasses.dataclass(frozen=True)
class VolumeError:
    """Volumes of a predicted and a true mask and how far apart they are.

    Attributes
    ----------
    pred_ml, truth_ml
        Volumes in millilitres.
    difference_ml
        ``pred_ml - truth_ml`` (signed: positive means over-segmentation).
    relative
        ``difference_ml / truth_ml`` (signed); ``inf`` when the truth is empty and the prediction not,
        0.0 when both are empty.
    """

    pred_ml: float
    truth_ml: float
    difference_ml: float
    relative: float

    @property
    def absolute_ml(self) -> float:
        """``|pred_ml - truth_ml|``."""
        return abs(self.difference_ml)


def volume_error(pred: np.ndarray, truth: np.ndarray, spacing: float | Sequence[float]) -> VolumeError:
    """Volume error of a 3D binary mask against the truth, in mL and relative.

    Parameters
    ----------
    pred, truth
        3D binary masks of the same shape.
    spacing
        Voxel size in mm, array order ``(z, y, x)`` (``Volume.spacing_zyx``).
    """
    pred, truth = _mask_pair(pred, truth)
    if pred.ndim != 3:
        raise SpineInpaintError(f"volume_error needs 3D masks, got shape {pred.shape}")
    voxel_ml = float(np.prod(_spacing(spacing, 3))) / 1000.0
    pred_ml = np.count_nonzero(pred) * voxel_ml
    truth_ml = np.count_nonzero(truth) * voxel_ml
    difference = pred_ml - truth_ml
    if truth_ml > 0:
        relative = difference / truth_ml
    else:
        relative = float("inf") if pred_ml > 0 else 0.0
    return VolumeError(pred_ml, truth_ml, difference, relative)
