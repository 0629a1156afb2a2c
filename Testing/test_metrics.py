"""Tests for SpineInpaintLib.metrics: hand-computed cases and independent implementations (MONAI, skimage)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.evaluation.metrics import overlap as M
from SpineInpaintLib.evaluation.metrics.boxes import FROC_FPS_PER_IMAGE, average_precision, box_iou, coco_ap, froc
from SpineInpaintLib.evaluation.metrics.image import (
    brats_intensity_range,
    brats_normalise,
    inpainting_quality,
    masked_mae,
    masked_mse,
    masked_psnr,
    masked_ssim,
)
from SpineInpaintLib.evaluation.metrics.mmd import median_bandwidth, mmd2_biased, mmd2_unbiased, mmd_permutation_test

# MONAI (the reference implementation here) warns about its own deprecated internal argument.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _blob(shape, seed, level=0.0, sigma=3.0):
    """A smooth random binary mask (a few irregular blobs)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma) > level


def _monai(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask[None, None].astype(np.float32))


# --------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------
def test_iou_and_dice_by_hand_2d():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, 0:3] = True  # 3 pixels
    truth[0, 1:4] = True  # 3 pixels, 2 shared
    assert M.iou(pred, truth) == pytest.approx(2 / 4)
    assert M.dice(pred, truth) == pytest.approx(2 * 2 / 6)


def test_iou_dice_3d_int_masks_and_relation():
    pred = _blob((12, 14, 16), 1).astype(np.uint8)
    truth = _blob((12, 14, 16), 2).astype(np.int64)
    d, j = M.dice(pred, truth), M.iou(pred, truth)
    inter = np.count_nonzero(pred & truth)
    assert j == pytest.approx(inter / np.count_nonzero(pred | truth))
    assert d == pytest.approx(2 * j / (1 + j))  # Dice = 2J / (1 + J) for any pair of sets
    assert 0 < j < d < 1


def test_empty_masks_overlap_is_one_and_one_sided_is_zero():
    empty = np.zeros((5, 5), bool)
    full = np.ones((5, 5), bool)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(empty, full) == 0.0 and M.iou(full, empty) == 0.0


def test_per_label_dice_and_iou():
    truth = np.zeros((6, 6), np.int16)
    pred = np.zeros((6, 6), np.int16)
    truth[0:2, 0:2] = 27  # 4 px
    pred[0:2, 0:1] = 27  # 2 px inside -> dice 2*2/6, iou 2/4
    truth[4:6, 4:6] = 31  # label 31 missed entirely
    pred[3, 3] = 5  # a label only in the prediction
    dice = M.dice_per_label(pred, truth)
    assert sorted(dice) == [5, 27, 31]
    assert dice[27] == pytest.approx(4 / 6) and dice[31] == 0.0 and dice[5] == 0.0
    assert M.iou_per_label(pred, truth, labels=[27, 40]) == {27: pytest.approx(0.5), 40: 1.0}


def test_non_binary_mask_is_rejected_with_hint():
    labels = np.array([[0, 27], [31, 0]])
    with pytest.raises(SpineInpaintError, match="binary.*per_label"):
        M.dice(labels, labels)


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: M.dice(a, b),
        lambda a, b: M.iou(a, b),
        lambda a, b: M.dice_per_label(a, b),
        lambda a, b: M.hd95(a, b, 1.0),
        lambda a, b: M.assd(a, b, 1.0),
        lambda a, b: masked_mae(a, b, a),
        lambda a, b: masked_psnr(a, b, a),
    ],
)
def test_shape_mismatch_raises_one_line_error(call):
    a, b = np.ones((4, 5), bool), np.ones((4, 6), bool)
    with pytest.raises(SpineInpaintError, match=r"same shape.*\(4, 5\).*\(4, 6\)") as info:
        call(a, b)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# surface distances
# --------------------------------------------------------------------------------------------
def test_surface_distances_by_hand_anisotropic():
    # Two 1-pixel-thick horizontal bars 2 rows apart; spacing 3 mm in y, 0.5 mm in x.
    pred = np.zeros((5, 6), bool)
    truth = np.zeros((5, 6), bool)
    pred[1, 1:5] = True
    truth[3, 1:5] = True
    d_pt, d_tp = M.surface_distances(pred, truth, (3.0, 0.5))
    np.testing.assert_allclose(d_pt, 6.0)  # every bar pixel sits 2 rows (6 mm) from the other bar
    np.testing.assert_allclose(d_tp, 6.0)
    # Array order matters: the same masks with spacing given as (x, y) would be 2 * 0.5 = 1 mm.
    assert M.hd95(pred, truth, (0.5, 3.0)) == pytest.approx(1.0)
    assert M.hd95(pred, truth, (3.0, 0.5)) == pytest.approx(6.0)
    assert M.assd(pred, truth, (3.0, 0.5)) == pytest.approx(6.0)


def test_hausdorff_max_of_directed_vs_pooled_by_hand():
    # truth: a single pixel; pred: that pixel plus a far one 10 px to the right (1 mm pixels).
    truth = np.zeros((3, 15), bool)
    truth[1, 2] = True
    pred = truth.copy()
    pred[1, 12] = True
    d_pt, d_tp = M.surface_distances(pred, truth, 1.0)
    assert sorted(d_pt.tolist()) == [0.0, 10.0] and d_tp.tolist() == [0.0]
    assert M.hausdorff_distance(pred, truth, 1.0) == 10.0
    # Directed 95th percentiles: pred->truth interp(0, 10 at 0.95) = 9.5, truth->pred 0 -> max 9.5.
    assert M.hd95(pred, truth, 1.0) == pytest.approx(9.5)
    # Pooled {0, 0, 10}: position 0.95 * 2 = 1.9 between 0 and 10 -> 9.0.
    assert M.hd95(pred, truth, 1.0, pooled=True) == pytest.approx(9.0)
    assert M.assd(pred, truth, 1.0) == pytest.approx(10.0 / 3.0)


@pytest.mark.parametrize(
    "shape, spacing, seeds",
    [
        ((20, 30, 25), (2.5, 0.8, 0.7), (0, 1)),
        ((60, 50), (1.2, 0.6), (2, 3)),
        ((18, 22, 20), (1.0, 1.0, 1.0), (4, 5)),
    ],
)
def test_hd95_hd_assd_match_monai(shape, spacing, seeds):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred, truth = _blob(shape, seeds[0], 0.02), _blob(shape, seeds[1])
    assert pred.any() and truth.any() and not np.array_equal(pred, truth)
    kw = {"include_background": True, "spacing": list(spacing)}
    monai_hd95 = compute_hausdorff_distance(_monai(pred), _monai(truth), percentile=95, **kw).item()
    monai_hd = compute_hausdorff_distance(_monai(pred), _monai(truth), **kw).item()
    monai_assd = compute_average_surface_distance(_monai(pred), _monai(truth), symmetric=True, **kw).item()
    assert M.hd95(pred, truth, spacing) == pytest.approx(monai_hd95, rel=1e-5)
    assert M.hausdorff_distance(pred, truth, spacing) == pytest.approx(monai_hd, rel=1e-5)
    assert M.assd(pred, truth, spacing) == pytest.approx(monai_assd, rel=1e-5)
    assert M.hd95(pred, truth, spacing, pooled=True) <= M.hd95(pred, truth, spacing) + 1e-9


def test_surface_touching_array_border_and_cropping_do_not_change_distances():
    # A mask filling the array edge: its border voxels are surface (the outside counts as background).
    truth = np.zeros((8, 9, 10), bool)
    truth[:, :4, :] = True
    pred = np.zeros_like(truth)
    pred[:, :6, :] = True
    spacing = (2.0, 1.5, 1.0)
    from monai.metrics import compute_hausdorff_distance

    expected = compute_hausdorff_distance(
        _monai(pred), _monai(truth), include_background=True, percentile=95, spacing=list(spacing)
    ).item()
    assert M.hd95(pred, truth, spacing) == pytest.approx(expected, rel=1e-6)
    # Embedding both masks in a larger empty array changes nothing: off the array is background too.
    big_p, big_t = np.zeros((20, 30, 30), bool), np.zeros((20, 30, 30), bool)
    big_p[5:13, 10:19, 7:17], big_t[5:13, 10:19, 7:17] = pred, truth
    assert M.assd(big_p, big_t, spacing) == pytest.approx(M.assd(pred, truth, spacing))
    assert M.hd95(big_p, big_t, spacing) == pytest.approx(expected, rel=1e-6)


def test_empty_mask_rules_for_surface_metrics():
    empty = np.zeros((6, 6, 6), bool)
    cube = np.zeros((6, 6, 6), bool)
    cube[1:4, 1:4, 1:4] = True
    assert M.hd95(empty, empty, 1.0) == 0.0 and M.assd(empty, empty, 1.0) == 0.0
    assert M.hd95(empty, cube, 1.0) == math.inf and M.hd95(cube, empty, 1.0) == math.inf
    assert M.assd(cube, empty, (1, 2, 3)) == math.inf
    d_pt, d_tp = M.surface_distances(empty, cube, 1.0)
    assert d_pt.size == 0 and d_tp.size == 26 and np.all(np.isinf(d_tp))  # 27 voxels, 1 interior


def test_surface_metrics_on_real_vertebra_match_monai(real_case):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    _, labels = real_case
    truth = labels.array == 31  # L1
    assert truth.sum() > 100
    # A plausible segmentation error: one voxel of over-segmentation plus a 1-voxel shift along z.
    pred = np.roll(ndimage.binary_dilation(truth), 1, axis=0)
    spacing = labels.spacing_zyx
    kw = {"include_background": True, "spacing": list(spacing)}
    assert M.hd95(pred, truth, spacing) == pytest.approx(
        compute_hausdorff_distance(_monai(pred), _monai(truth), percentile=95, **kw).item(), rel=1e-5
    )
    assert M.assd(pred, truth, spacing) == pytest.approx(
        compute_average_surface_distance(_monai(pred), _monai(truth), symmetric=True, **kw).item(), rel=1e-5
    )
    assert M.dice(pred, truth) < 1.0


def test_spacing_is_validated():
    a = np.ones((3, 3, 3), bool)
    with pytest.raises(SpineInpaintError, match="spacing needs 3 values"):
        M.hd95(a, a, (1.0, 1.0))
    with pytest.raises(SpineInpaintError, match="positive"):
        M.assd(a, a, (1.0, 0.0, 1.0))


def test_volume_error_by_hand():
    truth = np.zeros((10, 10, 10), bool)
    truth[:5] = True  # 500 voxels
    pred = np.zeros_like(truth)
    pred[:6] = True  # 600 voxels
    err = M.volume_error(pred, truth, (2.0, 1.0, 0.5))  # 1 mm^3 per voxel
    assert err.truth_ml == pytest.approx(0.5) and err.pred_ml == pytest.approx(0.6)
    assert err.difference_ml == pytest.approx(0.1) and err.absolute_ml == pytest.approx(0.1)
    assert err.relative == pytest.approx(0.2)
    under = M.volume_error(truth, pred, 1.0)
    assert under.relative == pytest.approx(-1 / 6) and under.difference_ml == pytest.approx(-0.1)
    assert M.volume_error(pred, np.zeros_like(pred), 1.0).relative == math.inf
    with pytest.raises(SpineInpaintError, match="3D"):
        M.volume_error(pred[0], truth[0], 1.0)


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------
def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    expected = np.array([[50 / 150, 0.0, 1.0], [0.0, 0.0, 4 / 100]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    # 3D boxes: two unit cubes overlapping by half along x.
    cubes = box_iou(np.array([[0, 0, 0, 2, 2, 2]]), np.array([[1, 0, 0, 3, 2, 2]]))
    assert cubes[0, 0] == pytest.approx(4 / 12)


def test_box_validation():
    with pytest.raises(SpineInpaintError, match=r"shape \(N, 4\)"):
        box_iou(np.zeros((2, 3)), np.zeros((1, 4)))
    with pytest.raises(SpineInpaintError, match="x2 >= x1"):
        box_iou(np.array([[5, 0, 1, 2]]), np.zeros((1, 4)))
    with pytest.raises(SpineInpaintError, match="one entry per image"):
        average_precision([np.zeros((0, 4))], [], [np.zeros((0, 4))])
    with pytest.raises(SpineInpaintError, match="2 boxes but 1 scores"):
        average_precision([np.zeros((2, 4))], [np.ones(1)], [np.zeros((0, 4))])


def _three_images():
    """The hand-worked detection case used by the AP and FROC tests.

    image 0: gt G1 = [0,0,10,10]; A (0.90) = G1 exactly; B (0.85) far away.
    image 1: gt G2 = [0,0,10,10], G3 = [50,50,60,60] (never found);
             C (0.80) = [0,0,10,8.2], IoU 0.82 with G2; D (0.70) = G2 exactly.
    image 2: no gt; E (0.50) somewhere.
    """
    g = np.array([[0, 0, 10, 10]], float)
    pred = [
        np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float),
        np.array([[0, 0, 10, 8.2], [0, 0, 10, 10]], float),
        np.array([[0, 0, 5, 5]], float),
    ]
    scores = [np.array([0.9, 0.85]), np.array([0.8, 0.7]), np.array([0.5])]
    gt = [g, np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.zeros((0, 4))]
    return pred, scores, gt


def test_average_precision_hand_computed():
    pred, scores, gt = _three_images()
    # IoU 0.5: ranking A TP, B FP, C TP (takes G2), D FP (duplicate of G2), E FP; 3 true boxes.
    # recall 1/3,1/3,2/3,2/3,2/3; precision 1,1/2,2/3,1/2,2/5 -> interpolated 1,2/3,2/3,1/2,2/5.
    # 101 recall points: r = 0.00..0.33 (34 points) -> 1; r = 0.34..0.66 (33 points) -> 2/3; r >= 0.67 -> 0.
    # AP = (34 + 33 * 2/3) / 101 = 56/101.
    assert average_precision(pred, scores, gt, 0.5) == pytest.approx(56 / 101)
    # IoU 0.9: C (0.82) misses, so D takes G2: A TP, B FP, C FP, D TP, E FP.
    # precision 1,1/2,1/3,1/2,2/5 -> interpolated 1,1/2,1/2,1/2,2/5; AP = (34 + 33/2) / 101 = 0.5.
    assert average_precision(pred, scores, gt, 0.9) == pytest.approx(0.5)


def test_coco_ap_hand_computed():
    pred, scores, gt = _three_images()
    ap = coco_ap(pred, scores, gt)
    # Thresholds 0.50..0.80 (7 of them) give 56/101, 0.85..0.95 (3) give 0.5.
    assert ap["ap50"] == pytest.approx(56 / 101)
    assert ap["ap75"] == pytest.approx(56 / 101)
    assert ap["ap50_95"] == pytest.approx((7 * 56 / 101 + 3 * 0.5) / 10)


def test_average_precision_edge_cases():
    box = np.array([[0, 0, 4, 4]], float)
    assert average_precision([box], [np.array([0.3])], [box]) == pytest.approx(1.0)
    assert average_precision([np.zeros((0, 4))], [np.zeros(0)], [box]) == 0.0
    assert math.isnan(average_precision([box], [np.array([0.3])], [np.zeros((0, 4))]))
    # A perfect box still counts at IoU threshold 1.0 (COCO compares with 1 - 1e-10).
    assert average_precision([box], [np.array([0.3])], [box], iou_threshold=1.0) == pytest.approx(1.0)


def test_equal_iou_tie_goes_to_the_later_truth_box_as_in_cocoeval():
    # The first detection overlaps both true boxes with IoU 1/3; cocoeval keeps the later one (G1),
    # which leaves G0 for the second detection: two hits, AP 1. Taking G0 first would give 51/101.
    gt = [np.array([[0, 0, 10, 10], [10, 0, 20, 10]], float)]
    pred = [np.array([[5, 0, 15, 10], [0, 0, 10, 10]], float)]
    assert average_precision(pred, [np.array([0.9, 0.8])], gt, iou_threshold=0.3) == pytest.approx(1.0)


def test_coco_ap_matches_monai_coco_metric():
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch

    rng = np.random.default_rng(7)
    pred_boxes, pred_scores, gt_boxes = [], [], []
    for _ in range(12):
        n_gt = int(rng.integers(0, 4))
        corner = rng.uniform(0, 80, size=(n_gt, 2))
        gt = np.hstack([corner, corner + rng.uniform(8, 20, size=(n_gt, 2))])
        # Jittered copies of the truth (of varied quality) plus random false positives.
        jitter = gt + rng.normal(0, 2.5, size=gt.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        n_fp = int(rng.integers(0, 4))
        fp_corner = rng.uniform(0, 80, size=(n_fp, 2))
        fp = np.hstack([fp_corner, fp_corner + rng.uniform(5, 20, size=(n_fp, 2))])
        boxes = np.vstack([jitter, fp]).reshape(-1, 4)
        pred_boxes.append(boxes)
        pred_scores.append(rng.uniform(size=boxes.shape[0]))
        gt_boxes.append(gt.reshape(-1, 4))
    ours = coco_ap(pred_boxes, pred_scores, gt_boxes)

    def iou_fn(a, b):
        return box_iou(a, b)

    metric = COCOMetric(classes=["lesion"], iou_list=(0.5, 0.75), iou_range=(0.5, 0.95, 0.05), verbose=False)
    matches = matching_batch(
        iou_fn=iou_fn,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=pred_boxes,
        pred_classes=[np.zeros(len(b), int) for b in pred_boxes],
        pred_scores=pred_scores,
        gt_boxes=gt_boxes,
        gt_classes=[np.zeros(len(g), int) for g in gt_boxes],
        max_detections=100,
    )
    theirs = metric(matches)[0]
    assert 0.05 < ours["ap50_95"] < ours["ap50"] < 1.0  # a non-trivial case
    assert ours["ap50"] == pytest.approx(theirs["lesion_AP_IoU_0.50_MaxDet_100"], abs=1e-9)
    assert ours["ap75"] == pytest.approx(theirs["lesion_AP_IoU_0.75_MaxDet_100"], abs=1e-9)
    assert ours["ap50_95"] == pytest.approx(theirs["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=1e-9)


def test_froc_hand_computed():
    pred, scores, gt = _three_images()
    result = froc(pred, scores, gt)
    # Ranking A TP, B FP, C TP, D FP, E FP over 3 images and 3 true boxes; curve (FP/image, sens):
    # (0,0) (0,1/3) (1/3,1/3) (1/3,2/3) (2/3,2/3) (1,2/3).
    np.testing.assert_allclose(result.curve_fps, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(result.curve_sensitivity, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result.sensitivities, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert result.mean_sensitivity == pytest.approx((2 * 1 / 3 + 5 * 2 / 3) / 7)  # = 4/7
    assert result.fps_per_image == FROC_FPS_PER_IMAGE


def test_froc_tied_scores_enter_together():
    # One image, one true box; a hit and a false positive share score 0.5: there is no operating
    # point with the hit but without the false positive, so at 0 FP/image the sensitivity is 0.
    gt = [np.array([[0, 0, 10, 10]], float)]
    pred = [np.array([[0, 0, 10, 10], [30, 30, 40, 40]], float)]
    result = froc(pred, [np.array([0.5, 0.5])], gt, fps_per_image=(0.0, 1.0))
    np.testing.assert_allclose(result.sensitivities, [0.0, 1.0])
    with pytest.raises(SpineInpaintError, match="ground-truth"):
        froc(pred, [np.array([0.5, 0.5])], [np.zeros((0, 4))])


# --------------------------------------------------------------------------------------------
# kernel MMD
# --------------------------------------------------------------------------------------------
def _mmd2_loops(x, y, sigma, unbiased):
    """The textbook double-sum formulas, one kernel evaluation at a time."""

    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    m, n = len(x), len(y)
    if unbiased:
        sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m)) / m**2
        syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n)) / n**2
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_matches_double_loop_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 4))
    y = rng.normal(0.5, 1.2, size=(7, 4))
    sigma = 1.7
    assert mmd2_unbiased(x, y, sigma) == pytest.approx(_mmd2_loops(x, y, sigma, True), rel=1e-10)
    assert mmd2_biased(x, y, sigma) == pytest.approx(_mmd2_loops(x, y, sigma, False), rel=1e-10)


def test_mmd_tiny_case_by_hand_and_image_flattening():
    x = np.array([[0.0], [0.0]])
    y = np.array([[1.0], [1.0]])
    # Kxx = Kyy = 1, Kxy = exp(-1/2) at sigma 1: both estimators give 2 - 2 exp(-1/2).
    expected = 2 - 2 * math.exp(-0.5)
    assert mmd2_biased(x, y, 1.0) == pytest.approx(expected)
    assert mmd2_unbiased(x, y, 1.0) == pytest.approx(expected)
    rng = np.random.default_rng(4)
    images_a, images_b = rng.normal(size=(5, 8, 8)), rng.normal(size=(6, 8, 8))
    assert mmd2_unbiased(images_a, images_b) == pytest.approx(
        mmd2_unbiased(images_a.reshape(5, -1), images_b.reshape(6, -1))
    )


def test_median_bandwidth_by_hand():
    # Pooled 1-D points 0, 1, 3: pair distances 1, 3, 2 -> median 2.
    assert median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0], [3.0]])) == pytest.approx(
        np.median([1, 3, 3, 2, 2, 0])
    )
    assert median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0], [5.0]])) == pytest.approx(2.5)
    # Default bandwidth is that median.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_unbiased(x, y, median_bandwidth(x, y)))


def test_identical_samples_give_zero_biased_mmd():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 16))
    assert mmd2_biased(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    # The unbiased estimator of identical samples is negative: it drops the diagonal only within groups.
    assert mmd2_unbiased(x, x.copy()) < 0


def test_permutation_test_separates_distributions_seeded():
    rng = np.random.default_rng(8)
    x = rng.normal(0.0, 1.0, size=(40, 5))
    y_far = rng.normal(1.5, 1.0, size=(40, 5))
    y_same = rng.normal(0.0, 1.0, size=(40, 5))
    mmd_far, p_far = mmd_permutation_test(x, y_far, n_permutations=200, seed=1)
    mmd_same, p_same = mmd_permutation_test(x, y_same, n_permutations=200, seed=1)
    assert mmd_far == pytest.approx(mmd2_unbiased(x, y_far))
    assert p_far == pytest.approx(1 / 201)  # no permutation reaches the observed statistic
    assert p_same > 0.05 and mmd_same < mmd_far
    assert mmd_permutation_test(x, y_same, n_permutations=200, seed=1) == (mmd_same, p_same)


def test_mmd_input_validation():
    with pytest.raises(SpineInpaintError, match="at least 2 samples"):
        mmd2_unbiased(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(SpineInpaintError, match="same feature size"):
        mmd2_biased(np.zeros((3, 3)), np.zeros((4, 2)))
    with pytest.raises(SpineInpaintError, match="bandwidth must be positive"):
        mmd2_biased(np.zeros((3, 3)), np.ones((4, 3)), bandwidth=0.0)


# --------------------------------------------------------------------------------------------
# image quality inside a mask
# --------------------------------------------------------------------------------------------
def test_brats_intensity_range_by_hand():
    image = np.arange(1000, dtype=float).reshape(10, 100)
    void = np.zeros_like(image, bool)
    void[9] = True  # the values 900..999
    # Voided values: 0..899 plus 100 zeros -> sorted, indices 0..100 are 0 and index k > 100 is k - 100.
    # 0.5th percentile at position 4.995 -> 0; 99.5th at 994.005 -> 894 + 0.005.
    low, high = brats_intensity_range(image, void)
    assert low == pytest.approx(0.0) and high == pytest.approx(894.005)
    # Leaving the void out: 0..899, positions 4.495 and 894.505.
    low, high = brats_intensity_range(image, void, void_value=None)
    assert low == pytest.approx(4.495) and high == pytest.approx(894.505)


def test_brats_normalise_maps_window_to_unit_interval():
    rng = np.random.default_rng(9)
    ct = rng.normal(0, 400, size=(20, 20)) - 200  # CT-like values, many negative
    void = np.zeros_like(ct, bool)
    void[5:10, 5:10] = True
    low, high = brats_intensity_range(ct, void)
    out = brats_normalise(ct, void)
    assert low < -500  # the default keeps negative Hounsfield units
    assert out.min() == 0.0 and out.max() == 1.0
    inside = (ct > low) & (ct < high)
    np.testing.assert_allclose(out[inside], (ct[inside] - low) / (high - low))
    # The challenge's option raises the lower bound to 0 (all negative values become 0).
    positive = brats_normalise(ct, void, strictly_positive=True)
    assert np.all(positive[ct <= 0] == 0.0)


def test_masked_mae_mse_psnr_by_hand():
    target = np.zeros((4, 4))
    prediction = np.full((4, 4), 5.0)  # outside the mask: wildly wrong, must not count
    mask = np.zeros((4, 4), int)
    mask[1:3, 1:3] = 1
    prediction[1:3, 1:3] = [[0.1, -0.1], [0.1, 0.1]]
    assert masked_mae(prediction, target, mask) == pytest.approx(0.1)
    assert masked_mse(prediction, target, mask) == pytest.approx(0.01)
    assert masked_psnr(prediction, target, mask) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert masked_psnr(prediction, target, mask, data_range=10.0) == pytest.approx(40.0)
    assert masked_psnr(target, target, mask) == math.inf
    with pytest.raises(SpineInpaintError, match="mask is empty"):
        masked_mae(prediction, target, np.zeros((4, 4), bool))


def test_masked_ssim_identical_is_one_and_full_mask_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(10)
    target = ndimage.gaussian_filter(rng.uniform(size=(32, 40)), 1.0)
    prediction = np.clip(target + rng.normal(0, 0.05, size=target.shape), 0, 1)
    mask = np.ones(target.shape, bool)
    assert masked_ssim(target, target, mask) == pytest.approx(1.0)
    options = {"data_range": 1.0, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    _, full_map = structural_similarity(target, prediction, full=True, **options)
    assert masked_ssim(prediction, target, mask) == pytest.approx(full_map.mean())
    # skimage's own mean SSIM leaves out a 5-pixel border: the same mask must give the same number.
    interior = np.zeros_like(mask)
    interior[5:-5, 5:-5] = True
    mssim = structural_similarity(target, prediction, **options)
    assert masked_ssim(prediction, target, interior) == pytest.approx(mssim)


@pytest.mark.parametrize("shape", [(30, 34), (14, 16, 18)])
def test_masked_ssim_matches_monai_on_valid_region(shape):
    # MONAI convolves without padding, so its map covers exactly the voxels 5 away from every border.
    from monai.metrics.regression import compute_ssim_and_cs

    rng = np.random.default_rng(11)
    target = ndimage.gaussian_filter(rng.uniform(size=shape), 1.0)
    prediction = np.clip(target + rng.normal(0, 0.08, size=shape), 0, 1)
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(prediction[None, None]).double(),
        torch.from_numpy(target[None, None]).double(),
        spatial_dims=len(shape),
        kernel_size=[11] * len(shape),
        kernel_sigma=[1.5] * len(shape),
        data_range=1.0,
    )
    interior = np.zeros(shape, bool)
    interior[tuple(slice(5, -5) for _ in shape)] = True
    # MONAI builds its Gaussian window in float32, hence the 1e-5 tolerance.
    assert masked_ssim(prediction, target, interior) == pytest.approx(ssim_map.mean().item(), abs=1e-5)


def test_masked_ssim_is_local_and_validates_size():
    rng = np.random.default_rng(12)
    target = ndimage.gaussian_filter(rng.uniform(size=(48, 48)), 1.0)
    prediction = target.copy()
    damaged = np.zeros(target.shape, bool)
    damaged[30:40, 30:40] = True
    prediction[damaged] = rng.uniform(size=damaged.sum())
    far = np.zeros_like(damaged)
    far[2:10, 2:10] = True  # more than a window away from the damage
    assert masked_ssim(prediction, target, far) == pytest.approx(1.0)
    assert masked_ssim(prediction, target, damaged) < 0.5
    with pytest.raises(SpineInpaintError, match="at least 11 voxels"):
        masked_ssim(np.zeros((8, 20)), np.zeros((8, 20)), np.ones((8, 20), bool))


def test_inpainting_quality_combines_normalisation_and_masked_metrics():
    rng = np.random.default_rng(13)
    truth = ndimage.gaussian_filter(rng.normal(0, 300, size=(40, 40)), 1.0) + 100.0
    void = np.zeros(truth.shape, bool)
    void[15:25, 12:28] = True
    restored = truth.copy()
    restored[void] += 20.0  # a 20 HU bias inside the inpainted region only
    low, high = brats_intensity_range(truth, void)
    result = inpainting_quality(restored, truth, void)
    t_n = brats_normalise(truth, void)
    r_n = brats_normalise(restored, void, reference=truth)
    assert result["mae"] == pytest.approx(np.abs(r_n - t_n)[void].mean())
    assert result["mae"] <= 20.0 / (high - low) + 1e-12  # clipping can only shrink the error
    assert result["psnr"] == pytest.approx(10 * np.log10(1.0 / result["mse"]))
    assert 0.0 < result["ssim"] < 1.0
    assert inpainting_quality(truth, truth, void)["ssim"] == pytest.approx(1.0)
