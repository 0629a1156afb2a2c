"""Detection metrics: box IoU, average precision (VOC and COCO-style) and FROC."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError

__all__ = ["COCO_IOU_THRESHOLDS", "FROC_FPS_PER_IMAGE", "box_iou", "average_precision", "coco_ap", "FrocResult", "froc"]

#: COCO's AP@[0.5:0.95] thresholds: 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())

#: COCO's 101 recall points at which interpolated precision is sampled.
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)

#: The usual FROC operating points (average false positives per image), as in LUNA16 / DeepLesion.
FROC_FPS_PER_IMAGE = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


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
