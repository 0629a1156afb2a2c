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
from typing import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError

__all__ = [
    "iou",
    "dice",
    "iou_per_label",
    "dice_per_label",
    "surface_distances",
    "hausdorff_distance",
    "hd95",
    "assd",
    "VolumeError",
    "volume_error",
    "box_iou",
    "average_precision",
    "coco_ap",
    "COCO_IOU_THRESHOLDS",
    "FROC_FPS_PER_IMAGE",
    "FrocResult",
    "froc",
    "median_bandwidth",
    "gaussian_kernel",
    "mmd2_biased",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "brats_intensity_range",
    "brats_normalise",
    "masked_mae",
    "masked_mse",
    "masked_psnr",
    "masked_ssim",
    "inpainting_quality",
]

#: COCO's AP@[0.5:0.95] thresholds: 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
#: COCO's 101 recall points at which interpolated precision is sampled.
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
#: The usual FROC operating points (average false positives per image), as in LUNA16 / DeepLesion.
FROC_FPS_PER_IMAGE = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


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


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
def _boxes(boxes, name: str) -> np.ndarray:
    """(N, 2d) float boxes ``(x1, y1[, z1], x2, y2[, z2])`` with d = 2 or 3; empty input gives (0, 4)."""
    boxes = np.asarray(boxes, dtype=float)
    if boxes.size == 0:
        return boxes.reshape(0, boxes.shape[-1] if boxes.ndim == 2 and boxes.shape[-1] in (4, 6) else 4)
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise SpineInpaintError(
            f"{name} must have shape (N, 4) as x1, y1, x2, y2 (or (N, 6) in 3D), got {boxes.shape}"
        )
    d = boxes.shape[1] // 2
    if not np.all(np.isfinite(boxes)) or np.any(boxes[:, d:] < boxes[:, :d]):
        raise SpineInpaintError(
            f"{name} must be finite with x2 >= x1 and y2 >= y1 (corner format x1, y1, x2, y2)"
        )
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two sets of axis-aligned boxes.

    Boxes are corners ``(x1, y1, x2, y2)`` in continuous coordinates (area ``(x2-x1)(y2-y1)``, no
    "+1" as in COCO), shape (N, 4); 3D boxes ``(x1, y1, z1, x2, y2, z2)``, shape (N, 6), work alike.
    Returns an (N, M) array; a pair of zero-area boxes has IoU 0.
    """
    a, b = _boxes(a, "a"), _boxes(b, "b")
    if a.shape[1] != b.shape[1]:
        raise SpineInpaintError(
            f"a and b must both be 2D or both 3D boxes, got {a.shape[1]} and {b.shape[1]} columns"
        )
    d = a.shape[1] // 2
    low = np.maximum(a[:, None, :d], b[None, :, :d])
    high = np.minimum(a[:, None, d:], b[None, :, d:])
    inter = np.prod(np.clip(high - low, 0.0, None), axis=-1)
    area_a = np.prod(a[:, d:] - a[:, :d], axis=-1)
    area_b = np.prod(b[:, d:] - b[:, :d], axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _detections(pred_boxes, pred_scores, gt_boxes) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validated per-image (boxes, scores, gt) triples."""
    if not (len(pred_boxes) == len(pred_scores) == len(gt_boxes)):
        raise SpineInpaintError(
            "pred_boxes, pred_scores and gt_boxes need one entry per image, got "
            f"{len(pred_boxes)}, {len(pred_scores)} and {len(gt_boxes)}"
        )
    images = []
    for i, (boxes, scores, gt) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        boxes, gt = _boxes(boxes, f"pred_boxes[{i}]"), _boxes(gt, f"gt_boxes[{i}]")
        scores = np.asarray(scores, dtype=float).reshape(-1)
        if scores.shape[0] != boxes.shape[0]:
            raise SpineInpaintError(f"image {i}: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
        if boxes.shape[0] and gt.shape[0] and boxes.shape[1] != gt.shape[1]:
            raise SpineInpaintError(f"image {i}: predicted and true boxes differ in dimension")
        images.append((boxes, scores, gt))
    return images


def _match_image(
    boxes: np.ndarray,
    scores: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    max_detections: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO greedy matching on one image.

    Detections are taken by decreasing score (stable for ties); each one matches the still unmatched
    ground-truth box with the highest IoU if that IoU >= threshold, else it is a false positive.

    Returns the kept scores sorted (D,) and a (T, D) bool array of true positives, one row per threshold.
    """
    order = np.argsort(-scores, kind="mergesort")
    if max_detections is not None:
        order = order[:max_detections]
    scores = scores[order]
    tp = np.zeros((len(thresholds), order.size), dtype=bool)
    if order.size == 0 or gt.shape[0] == 0:
        return scores, tp
    ious = box_iou(boxes[order], gt)
    for t_index, threshold in enumerate(thresholds):
        # COCO compares with min(t, 1 - 1e-10) so that a perfect box still matches at t = 1.
        needed = min(float(threshold), 1.0 - 1e-10)
        taken = np.zeros(gt.shape[0], dtype=bool)
        for d in range(order.size):
            candidates = np.where(taken, -1.0, ious[d])
            # On equal IoU COCO keeps the later box: take the last maximum.
            g = candidates.size - 1 - int(np.argmax(candidates[::-1]))
            if candidates[g] >= needed:
                taken[g] = True
                tp[t_index, d] = True
    return scores, tp


def _ap_from_matches(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP of pooled detections (scores, tp flags) against n_gt boxes."""
    if n_gt == 0:
        return float("nan")
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(~tp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    # Interpolated precision: the best precision at any recall >= r (running max from the right).
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, _RECALL_POINTS, side="left")
    # Recall points never reached have precision 0.
    sampled = np.where(index < precision.size, precision[np.minimum(index, precision.size - 1)], 0.0)
    return float(sampled.mean())


def _pooled_matches(images, thresholds, max_detections):
    """Per-threshold pooled (scores, tp) over images, and the number of ground-truth boxes."""
    all_scores, all_tp = [], []
    for boxes, scores, gt in images:
        s, tp = _match_image(boxes, scores, gt, thresholds, max_detections)
        all_scores.append(s)
        all_tp.append(tp)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(thresholds), 0), dtype=bool)
    n_gt = sum(gt.shape[0] for _, _, gt in images)
    return scores, tp, n_gt


def average_precision(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    *,
    max_detections: int | None = 100,
) -> float:
    """COCO-style average precision of one class over a list of images.

    Per image, the ``max_detections`` highest-scoring boxes are matched greedily by score to the
    ground truth (see COCO's ``cocoeval``: each detection takes the unmatched true box of highest
    IoU >= ``iou_threshold``; a second detection of the same box is a false positive). Detections
    of all images are then pooled and ranked by score; the precision/recall curve's interpolated
    precision (best precision at recall >= r) is averaged over the 101 recall points 0, 0.01, ..., 1.

    Parameters
    ----------
    pred_boxes
        One (N_i, 4) array of ``x1, y1, x2, y2`` boxes per image (may be empty).
    pred_scores
        One (N_i,) array of confidences per image.
    gt_boxes
        One (G_i, 4) array of true boxes per image.
    iou_threshold
        IoU needed for a match.
    max_detections
        Detections kept per image (COCO: 100); ``None`` keeps all.

    Returns
    -------
    float
        AP in [0, 1]; ``nan`` when there is no ground-truth box at all.
    """
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise SpineInpaintError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    images = _detections(pred_boxes, pred_scores, gt_boxes)
    scores, tp, n_gt = _pooled_matches(images, [iou_threshold], max_detections)
    return _ap_from_matches(scores, tp[0], n_gt)


def coco_ap(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    *,
    max_detections: int | None = 100,
) -> dict[str, float]:
    """COCO's headline APs: ``{"ap50": AP@0.5, "ap75": AP@0.75, "ap50_95": mean AP over 0.5:0.05:0.95}``.

    Arguments and matching as :func:`average_precision`; values are ``nan`` without ground truth.
    """
    images = _detections(pred_boxes, pred_scores, gt_boxes)
    scores, tp, n_gt = _pooled_matches(images, COCO_IOU_THRESHOLDS, max_detections)
    aps = np.array([_ap_from_matches(scores, row, n_gt) for row in tp])
    return {
        "ap50": float(aps[COCO_IOU_THRESHOLDS.index(0.5)]),
        "ap75": float(aps[COCO_IOU_THRESHOLDS.index(0.75)]),
        "ap50_95": float(aps.mean()),
    }


@dataclasses.dataclass(frozen=True)
class FrocResult:
    """Free-response ROC: sensitivity against average false positives per image.

    Attributes
    ----------
    fps_per_image
        The requested operating points.
    sensitivities
        Sensitivity (fraction of true boxes found) at each operating point.
    mean_sensitivity
        Mean of ``sensitivities`` (LUNA16's competition performance metric for the default points).
    curve_fps, curve_sensitivity
        The whole curve, one point per distinct score threshold (starting at (0, 0)).
    """

    fps_per_image: tuple[float, ...]
    sensitivities: np.ndarray
    mean_sensitivity: float
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray


def froc(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    fps_per_image: Sequence[float] = FROC_FPS_PER_IMAGE,
    iou_threshold: float = 0.5,
) -> FrocResult:
    """FROC sensitivities at given average numbers of false positives per image.

    A detection is a hit when it matches a true box with IoU >= ``iou_threshold`` under the same
    greedy, score-ordered matching as :func:`average_precision` (so a second detection of an already
    found lesion is a false positive); every other detection is a false positive. Sweeping the score
    threshold down through the pooled detections (only between distinct scores: tied detections
    enter together) gives the curve; the sensitivity reported for ``f`` false positives per image is
    the highest sensitivity of any threshold whose average false positives per image is <= ``f``.
    All detections are used (no per-image cap).
    """
    fps_targets = tuple(float(f) for f in fps_per_image)
    if not fps_targets or any(f < 0 or not np.isfinite(f) for f in fps_targets):
        raise SpineInpaintError(f"fps_per_image must be non-negative numbers, got {list(fps_per_image)}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise SpineInpaintError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    images = _detections(pred_boxes, pred_scores, gt_boxes)
    if not images:
        raise SpineInpaintError("froc needs at least one image")
    scores, tp, n_gt = _pooled_matches(images, [iou_threshold], None)
    if n_gt == 0:
        raise SpineInpaintError("froc needs at least one ground-truth box (sensitivity is undefined)")
    order = np.argsort(-scores, kind="mergesort")
    scores, hits = scores[order], tp[0][order]
    # Operating points: after the last detection of each group of equal scores.
    ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if scores.size else np.zeros(0, int)
    curve_fps = np.concatenate([[0.0], np.cumsum(~hits)[ends] / len(images)])
    curve_sens = np.concatenate([[0.0], np.cumsum(hits)[ends] / n_gt])
    sens = np.array([curve_sens[curve_fps <= f].max() for f in fps_targets])
    return FrocResult(fps_targets, sens, float(sens.mean()), curve_fps, curve_sens)


# ---------------------------------------------------------------------------------------------
# kernel maximum mean discrepancy
# ---------------------------------------------------------------------------------------------
def _samples(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Two samples as (N, D) float arrays; images (N, ...) are flattened."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    for name, s in (("x", x), ("y", y)):
        if s.ndim < 1 or s.shape[0] < 2:
            raise SpineInpaintError(f"{name} needs at least 2 samples along axis 0, got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise SpineInpaintError(f"{name} holds nan or inf")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise SpineInpaintError(f"x and y must have the same feature size, got {x.shape[1]} and {y.shape[1]}")
    return x, y


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (clipped at 0 against rounding)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def _median_bandwidth(pooled: np.ndarray) -> float:
    d = np.sqrt(_squared_distances(pooled, pooled)[np.triu_indices(pooled.shape[0], k=1)])
    positive = d[d > 0]
    # All-equal samples give distance 0; any bandwidth then gives a constant kernel, take 1.
    if positive.size == 0:
        return 1.0
    median = float(np.median(d))
    return median if median > 0 else float(np.median(positive))


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """The median heuristic: the median Euclidean distance over all pairs ``i < j`` of the pooled sample.

    If more than half of the pairs coincide, the median of the non-zero distances is used instead;
    if all points coincide, 1.0.
    """
    x, y = _samples(x, y)
    return _median_bandwidth(np.concatenate([x, y]))


def gaussian_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian RBF kernel matrix ``k(a_i, b_j) = exp(-||a_i - b_j||^2 / (2 sigma^2))``, sigma = bandwidth."""
    if not bandwidth > 0 or not np.isfinite(bandwidth):
        raise SpineInpaintError(f"bandwidth must be positive, got {bandwidth}")
    a = np.asarray(a, dtype=float).reshape(len(a), -1)
    b = np.asarray(b, dtype=float).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise SpineInpaintError(f"a and b must have the same feature size, got {a.shape[1]} and {b.shape[1]}")
    return np.exp(-_squared_distances(a, b) / (2.0 * bandwidth**2))


def _kernel_blocks(x, y, bandwidth):
    x, y = _samples(x, y)
    sigma = _median_bandwidth(np.concatenate([x, y])) if bandwidth is None else float(bandwidth)
    return gaussian_kernel(x, x, sigma), gaussian_kernel(y, y, sigma), gaussian_kernel(x, y, sigma)


def mmd2_biased(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Biased (V-statistic) squared MMD with a Gaussian kernel (Gretton et al., JMLR 2012, eq. 5).

    ``mean(K_xx) + mean(K_yy) - 2 mean(K_xy)``, diagonals included; never negative, 0 for identical
    samples.

    Parameters
    ----------
    x, y
        Samples of shape (M, ...) and (N, ...); each sample is flattened to a feature vector.
    bandwidth
        Kernel sigma; default :func:`median_bandwidth` of the pooled sample.
    """
    kxx, kyy, kxy = _kernel_blocks(x, y, bandwidth)
    return float(kxx.mean() + kyy.mean() - 2.0 * kxy.mean())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased (U-statistic) squared MMD with a Gaussian kernel (Gretton et al., JMLR 2012, eq. 3).

    ``sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum k(x_i, y_j) / (mn)``;
    unbiased, hence slightly negative at times when the distributions agree. Arguments as
    :func:`mmd2_biased`. (Miao et al. report "KMMD" 0.001084 for WGAN-GP without naming the
    estimator or the bandwidth.)
    """
    kxx, kyy, kxy = _kernel_blocks(x, y, bandwidth)
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float(sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * kxy.mean())


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    bandwidth: float | None = None,
) -> tuple[float, float]:
    """Two-sample test: unbiased MMD^2 and its permutation p-value.

    The pooled sample is split at random into groups of the original sizes ``n_permutations`` times;
    the p-value is ``(1 + #{MMD^2_perm >= MMD^2_observed}) / (1 + n_permutations)``. The bandwidth
    (default: median heuristic of the pooled sample, which permutations do not change) is fixed
    across permutations.

    Returns
    -------
    (mmd2, p_value)
    """
    if int(n_permutations) < 1:
        raise SpineInpaintError(f"n_permutations must be >= 1, got {n_permutations}")
    x, y = _samples(x, y)
    pooled = np.concatenate([x, y])
    m, n = x.shape[0], y.shape[0]
    sigma = _median_bandwidth(pooled) if bandwidth is None else float(bandwidth)
    kernel = gaussian_kernel(pooled, pooled, sigma)
    np.fill_diagonal(kernel, 0.0)  # U-statistic: no k(a, a) terms

    def statistic(in_x: np.ndarray) -> np.ndarray:
        """Unbiased MMD^2 for each column of a (m+n, P) 0/1 membership matrix of the first group."""
        in_y = 1.0 - in_x
        sxx = ((kernel @ in_x) * in_x).sum(0)
        syy = ((kernel @ in_y) * in_y).sum(0)
        sxy = ((kernel @ in_x) * in_y).sum(0)
        return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)

    observed_membership = np.zeros((m + n, 1))
    observed_membership[:m] = 1.0
    observed = float(statistic(observed_membership)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    batch = 256
    for start in range(0, int(n_permutations), batch):
        size = min(batch, int(n_permutations) - start)
        membership = np.zeros((m + n, size))
        for column in range(size):
            membership[rng.permutation(m + n)[:m], column] = 1.0
        exceed += int(np.count_nonzero(statistic(membership) >= observed))
    return observed, (1 + exceed) / (1 + int(n_permutations))


# ---------------------------------------------------------------------------------------------
# image quality inside a mask
# ---------------------------------------------------------------------------------------------
def _image_pair(prediction, target, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    prediction, target = np.asarray(prediction, dtype=float), np.asarray(target, dtype=float)
    _same_shape(prediction, target, "prediction and target")
    mask = _binary(mask, "mask")
    _same_shape(prediction, mask, "images and mask")
    if not mask.any():
        raise SpineInpaintError("mask is empty: nothing to compare")
    return prediction, target, mask


def brats_intensity_range(
    image: np.ndarray,
    void_mask: np.ndarray,
    *,
    percentiles: tuple[float, float] = (0.5, 99.5),
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> tuple[float, float]:
    """The intensity window of the BraTS 2023 inpainting challenge: percentiles of the voided image.

    The challenge (Kofler et al., arXiv 2305.08992; package ``BraTS-inpainting/inpainting``) takes the
    0.5th and 99.5th percentiles of the *voided* image, the image the model sees, with the region to
    inpaint set to 0, over every voxel of the array (the void included).

    Parameters
    ----------
    image
        The true image.
    void_mask
        Binary mask of the region to inpaint, same shape.
    percentiles
        Lower and upper percentile.
    void_value
        Value the voided region takes in the percentile computation (the challenge: 0). ``None``
        leaves the voided voxels out instead.
    strictly_positive
        Raise a negative lower bound to 0, as the challenge does. Harmless for its MRI (non-negative)
        but it would clip all of air, fat and water in CT Hounsfield units, so off by default.

    Returns
    -------
    (low, high)
    """
    image = np.asarray(image, dtype=float)
    void_mask = _binary(void_mask, "void_mask")
    _same_shape(image, void_mask, "image and void_mask")
    low_p, high_p = (float(p) for p in percentiles)
    if not 0.0 <= low_p < high_p <= 100.0:
        raise SpineInpaintError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if void_value is None:
        values = image[~void_mask]
        if values.size == 0:
            raise SpineInpaintError("void_mask covers the whole image: no voxel left to normalise with")
    else:
        values = np.where(void_mask, float(void_value), image)
    low, high = (float(v) for v in np.percentile(values, [low_p, high_p]))
    if strictly_positive:
        low = max(low, 0.0)
    if not high > low:
        raise SpineInpaintError(f"the voided image is constant between its percentiles ({low} .. {high})")
    return low, high


def brats_normalise(
    image: np.ndarray,
    void_mask: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> np.ndarray:
    """Map ``image`` to [0, 1] with the BraTS inpainting challenge's percentile window.

    The window comes from :func:`brats_intensity_range` of ``reference`` (default: ``image``) and
    ``void_mask``; ``image`` is clipped to it and scaled linearly, low -> 0 and high -> 1. To compare an
    inpainted image with the truth, normalise both with ``reference=truth`` (the challenge uses the
    voided input, which equals the truth outside the void).
    """
    image = np.asarray(image, dtype=float)
    reference = image if reference is None else np.asarray(reference, dtype=float)
    _same_shape(image, reference, "image and reference")
    low, high = brats_intensity_range(
        reference,
        void_mask,
        percentiles=percentiles,
        void_value=void_value,
        strictly_positive=strictly_positive,
    )
    return (np.clip(image, low, high) - low) / (high - low)


def masked_mae(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error over the voxels inside ``mask`` (which must not be empty)."""
    prediction, target, mask = _image_pair(prediction, target, mask)
    return float(np.abs(prediction[mask] - target[mask]).mean())


def masked_mse(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over the voxels inside ``mask`` (which must not be empty)."""
    prediction, target, mask = _image_pair(prediction, target, mask)
    return float(((prediction[mask] - target[mask]) ** 2).mean())


def masked_psnr(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0
) -> float:
    """Peak signal-to-noise ratio in dB over the voxels inside ``mask``.

    ``10 log10(data_range^2 / MSE)`` with the MSE of the masked voxels only; ``data_range`` is 1 for
    images normalised by :func:`brats_normalise`. ``inf`` when the images agree in the mask.
    """
    if not data_range > 0:
        raise SpineInpaintError(f"data_range must be positive, got {data_range}")
    mse = masked_mse(prediction, target, mask)
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


#: SSIM window: Gaussian, sigma 1.5, truncated to 11 taps (Wang et al. 2004; torchmetrics, MONAI).
_SSIM_SIGMA = 1.5
_SSIM_WINDOW = 11


def masked_ssim(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0
) -> float:
    """Mean structural similarity inside ``mask``.

    The SSIM map is computed over the whole image (2D or 3D) with Wang et al.'s constants
    (K1 = 0.01, K2 = 0.03), an 11-tap Gaussian window of sigma 1.5 and population covariances
    (:func:`skimage.metrics.structural_similarity`, borders reflected); its values inside ``mask``
    are averaged. Every axis needs at least 11 voxels.
    """
    from skimage.metrics import structural_similarity  # scikit-image is heavy: import on use

    prediction, target, mask = _image_pair(prediction, target, mask)
    if not data_range > 0:
        raise SpineInpaintError(f"data_range must be positive, got {data_range}")
    if prediction.ndim not in (2, 3) or min(prediction.shape) < _SSIM_WINDOW:
        raise SpineInpaintError(
            f"SSIM needs a 2D or 3D image at least {_SSIM_WINDOW} voxels along every axis, "
            f"got {prediction.shape}"
        )
    _, ssim_map = structural_similarity(
        target,
        prediction,
        data_range=float(data_range),
        gaussian_weights=True,
        sigma=_SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return float(ssim_map[mask].mean())


def inpainting_quality(
    prediction: np.ndarray,
    target: np.ndarray,
    void_mask: np.ndarray,
    *,
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> dict[str, float]:
    """MAE, MSE, PSNR and SSIM of an inpainted image inside the inpainted region, BraTS-style.

    Both images are normalised to [0, 1] with the window of the truth voided by ``void_mask``
    (:func:`brats_normalise`), then compared inside ``void_mask`` with data range 1. Unlike the
    challenge, which computes SSIM on images zeroed outside the void, the SSIM map here is taken on
    the full images so that the window sees the real surroundings.

    Returns
    -------
    dict with ``mae``, ``mse``, ``psnr`` (dB) and ``ssim``.
    """
    options = {"void_value": void_value, "strictly_positive": strictly_positive}
    pred_n = brats_normalise(prediction, void_mask, reference=target, **options)
    target_n = brats_normalise(target, void_mask, **options)
    return {
        "mae": masked_mae(pred_n, target_n, void_mask),
        "mse": masked_mse(pred_n, target_n, void_mask),
        "psnr": masked_psnr(pred_n, target_n, void_mask, 1.0),
        "ssim": masked_ssim(pred_n, target_n, void_mask, 1.0),
    }
