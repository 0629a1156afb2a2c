"""Lesion detection: crop geometry, both detectors, training steps, 3D linking and the lesion mask."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from SpineInpaintLib import SpineInpaintError, cli
from SpineInpaintLib import detection as det
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.core.weights import save_weights, sha256_of
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.evaluation.detection import evaluate_detection, truth_box_3d, tune_volume_level
from SpineInpaintLib.training import detection as dt
from SpineInpaintLib.training import detection_cases


# --- crop geometry ----------------------------------------------------------------------------------
def test_neighbour_offset_rounds_two_millimetres_to_slices():
    assert det.neighbour_offset(1.0) == 2
    assert det.neighbour_offset(0.5) == 4
    assert det.neighbour_offset(3.0) == 1  # at least one slice away
    with pytest.raises(SpineInpaintError, match="slice spacing must be positive"):
        det.neighbour_offset(0.0)


def test_slice_stack_repeats_the_edge_slices():
    volume = np.arange(5)[:, None, None] * np.ones((5, 2, 2))
    assert det.slice_stack(volume, 0, 2)[:, 0, 0].tolist() == [0, 0, 2]
    assert det.slice_stack(volume, 4, 1)[:, 0, 0].tolist() == [3, 4, 4]
    with pytest.raises(SpineInpaintError, match="outside the volume"):
        det.slice_stack(volume, 5, 1)


def test_crop_puts_a_square_where_the_box_mapping_says():
    # Source: 0.5 mm pixels, a 20x10 mm bright rectangle; crop of 64 at 1 mm centred at (100, 120).
    image = np.zeros((300, 300), np.float32)
    image[90:110, 140:180] = 1000.0  # rows 90-110 (10 mm), cols 140-180 (20 mm)
    centre = (99.5, 119.5)
    crop = det.crop_slices(image[None], centre, (0.5, 0.5), size=64, cval=0.0)[0]
    source_box = np.array([[140, 90, 180, 110]], float)
    crop_box = det.source_to_crop(source_box, centre, (0.5, 0.5), size=64)
    # Hand computed: the crop centre (edge coordinate 32) is source edge coordinate 120 (x) / 100 (y);
    # 1 crop pixel = 2 source pixels.
    np.testing.assert_allclose(crop_box, [[42, 27, 62, 37]])
    rows, cols = np.nonzero(crop > 500)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (42, 27, 62, 37)
    np.testing.assert_allclose(det.crop_to_source(crop_box, centre, (0.5, 0.5), size=64), source_box)


def test_crop_rotation_matrix_rotates_about_the_centre():
    image = np.zeros((41, 41), np.float32)
    image[20, 30] = 1.0  # 10 px right of the centre
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # (row, col) offsets: col offset c samples row -c
    crop = det.crop_slices(image[None], (20, 20), (1, 1), size=41, matrix=quarter, cval=0.0)[0]
    assert np.unravel_index(np.argmax(crop), crop.shape) == (30, 20)


def test_normalise_maps_the_window_to_unit_range():
    np.testing.assert_allclose(det.normalise(np.array([-1000, -200, 550, 1300, 3000])), [0, 0, 0.5, 1, 1])


# --- detectors ------------------------------------------------------------------------------------------
def test_unknown_architecture_is_a_user_error():
    with pytest.raises(SpineInpaintError, match="unknown detector 'yolo'"):
        det.Detector("yolo")


def test_retinanet_box_order_is_converted_to_x_then_y():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert det.Detector._swap(boxes).tolist() == [[2.0, 1.0, 4.0, 3.0]]


@pytest.fixture(scope="module")
def tiny_samples():
    """A few slices of a lesion simulated on the real scan (3 mm), cached crops."""
    case = datasets.real_case(seed=5, lesion_types=["lytic"])
    return dt.samples_from_case(case, rng=np.random.default_rng(0), min_negatives=2, max_negatives=2)


def test_samples_hold_the_simulated_lesion_box(tiny_samples):
    pos = [i for i, m in enumerate(tiny_samples.meta) if m["lesion_type"] != "none"]
    neg = [i for i, m in enumerate(tiny_samples.meta) if m["lesion_type"] == "none"]
    assert pos and len(neg) == 2
    boxes = tiny_samples.centre_boxes()
    assert all(len(boxes[i]) == 1 for i in pos) and all(len(boxes[i]) == 0 for i in neg)
    # The 3 mm lesion box, resampled to 1 mm: at least MIN_BOX_MM on each side and inside the crop.
    for i in pos:
        w, h = boxes[i][0, 2] - boxes[i][0, 0], boxes[i][0, 3] - boxes[i][0, 1]
        assert min(w, h) >= dt.MIN_BOX_MM - 3 and boxes[i].min() >= 0 and boxes[i].max() <= det.CROP_SIZE
    assert tiny_samples.images.dtype == np.int16
    assert tiny_samples.images.shape[1:] == (3, dt.CACHE_SIZE, dt.CACHE_SIZE)


def test_boxes_hold_the_bone_part_of_a_destructive_lesion_only():
    # A destructive lesion breaks the cortex: its extra-osseous mass is not boxed, and a slice with
    # tumour outside the vertebra only is neither a positive nor a negative.
    case = datasets.real_case(seed=3, lesion_types=["lytic"])  # seed 3 draws a destructive lesion
    assert case.lesion.destructive
    lesion = case.lesion
    tumour = io.reorient(lesion.lesion_mask, "LPS").array > 0
    bone = io.reorient(lesion.bone_destroyed, "LPS").array > 0
    assert (tumour & ~bone).sum() > 0.1 * tumour.sum()  # a real extra-osseous part
    samples = dt.samples_from_case(case, rng=np.random.default_rng(0), min_negatives=2, max_negatives=2)
    ct = io.reorient(case.ct, "LPS")
    for m, mask in zip(samples.meta, samples.masks):
        if m["lesion_type"] == "none":
            assert not tumour[m["z"]].any() and not mask.any()
            continue
        # The cached instance mask is the bone part of that slice, resampled to the crop grid.
        area_mm2 = bone[m["z"]].sum() * ct.spacing_zyx[1] * ct.spacing_zyx[2]
        assert abs(mask.sum() * det.GRID_MM ** 2 - area_mm2) <= 0.25 * area_mm2 + 20
    assert truth_box_3d(case)[0, 2] == np.nonzero(bone.any(axis=(1, 2)))[0].min()


def test_retinanet_presets_build_and_load_from_their_metadata(tmp_path):
    seed_everything(2)
    small = det.Detector("retinanet", config=det.RETINANET_PRESETS["small"])
    base = det.Detector("retinanet")
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in base.parameters())
    path = save_weights(small.model, tmp_path / "r.safetensors",
                                 {"arch": "retinanet", "architecture": det.RETINANET_PRESETS["small"]})
    loaded = det.load_detector(path)  # rebuilt from the recorded architecture, not the default
    assert sum(p.numel() for p in loaded.parameters()) == n_small
    bad = dict(det.RETINANET_PRESETS["base"], feature_map_scales=(1, 2))
    with pytest.raises(SpineInpaintError, match="one feature map scale per returned layer"):
        det.build_retinanet(config=bad)
    with pytest.raises(SpineInpaintError, match="exactly the keys"):
        det.build_retinanet(config={"layers": (1, 1, 1, 1)})


def test_augment_without_randomness_returns_the_centre_crop(tiny_samples):
    i = next(i for i, m in enumerate(tiny_samples.meta) if m["lesion_type"] != "none")
    rng = np.random.default_rng(0)
    image, boxes = dt.augment(tiny_samples.images[i], tiny_samples.masks[i], rng, max_rotation_deg=0,
                              scale=(1, 1), max_shift_mm=0, flip_probability=0, noise_probability=0)
    np.testing.assert_allclose(image, tiny_samples.centre_crops()[i], atol=1e-5)
    np.testing.assert_array_equal(boxes, tiny_samples.centre_boxes()[i])
    flipped, fboxes = dt.augment(tiny_samples.images[i], tiny_samples.masks[i], rng, max_rotation_deg=0,
                                 scale=(1, 1), max_shift_mm=0, flip_probability=1, noise_probability=0)
    x1, y1, x2, y2 = boxes[0]
    np.testing.assert_array_equal(fboxes[0], [det.CROP_SIZE - x2, y1, det.CROP_SIZE - x1, y2])
    np.testing.assert_allclose(flipped[:, :, ::-1], image, atol=1e-5)


def test_faster_rcnn_is_configured_as_the_paper():
    model = det.build_faster_rcnn()
    # 3 scales x 3 ratios on the single conv5_3 map (stride 16, 512 channels), RoI max pooling 7x7.
    assert model.rpn.anchor_generator.num_anchors_per_location() == [9]
    assert isinstance(model.roi_heads.box_roi_pool, det.RoIPoolOnMap)
    features = model.backbone(torch.zeros(1, 3, det.CROP_SIZE, det.CROP_SIZE))
    assert features.shape == (1, 512, det.CROP_SIZE // 16, det.CROP_SIZE // 16)
    rois = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    assert model.roi_heads.box_roi_pool({"0": features}, rois, [(128, 128)]).shape == (1, 512, 7, 7)


@pytest.mark.parametrize("arch", ["retinanet", pytest.param("faster_rcnn", marks=pytest.mark.slow)])
def test_a_few_training_steps_change_the_weights_and_predict_valid_boxes(arch, tiny_samples):
    seed_everything(0)
    detector = det.Detector(arch)
    before = [p.detach().clone() for p in detector.model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        images, boxes = zip(*(dt.augment(tiny_samples.images[i], tiny_samples.masks[i], rng)
                              for i in (0, 1, -1)))
        losses = detector.loss(np.stack(images), list(boxes))
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = [p for p in detector.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    (boxes, scores), = detector.predict(tiny_samples.centre_crops()[:1])
    assert boxes.shape == (scores.shape[0], 4) and np.all(boxes[:, 2:] >= boxes[:, :2])
    assert np.all((scores >= 0) & (scores <= 1))


def test_weights_round_trip_through_safetensors(tmp_path, tiny_samples):
    seed_everything(1)
    detector = det.Detector("retinanet")
    path = save_weights(detector.model, tmp_path / "retinanet.safetensors", {"arch": "retinanet"})
    loaded = det.load_detector(path)
    assert loaded.arch == "retinanet" and loaded.metadata["sha256"] == sha256_of(path)
    images = tiny_samples.centre_crops()[:2]
    for (b1, s1), (b2, s2) in zip(detector.predict(images), loaded.predict(images)):
        np.testing.assert_allclose(s1, s2)
        np.testing.assert_allclose(b1, b2)
    with pytest.raises(SpineInpaintError, match="detector weights not found"):
        det.load_detector(tmp_path / "missing.safetensors")


def test_giou_box_loss_trains_and_a_wrong_box_loss_is_refused_before_any_data_is_built(tmp_path, tiny_samples):
    detector = det.Detector("retinanet")
    rng = np.random.default_rng(0)
    images, boxes = zip(*(dt.augment(tiny_samples.images[i], tiny_samples.masks[i], rng) for i in (0, 1)))
    smooth = detector.loss(np.stack(images), list(boxes))["box_regression"].detach()
    detector.set_box_loss("giou")
    giou = detector.loss(np.stack(images), list(boxes))["box_regression"].detach()
    # Generalised IoU loss lies in [0, 2]; an untrained head is far from the boxes.
    assert torch.isfinite(giou) and 0.1 < float(giou) <= 2.0 and float(giou) != float(smooth)
    with pytest.raises(SpineInpaintError, match="unknown box loss 'l2'"):
        detector.set_box_loss("l2")
    for config, message in ((dt.TrainConfig(box_loss="l2", out=str(tmp_path / "run"), cache=str(tmp_path / "cache")),
                             "unknown box loss 'l2' \\(use smooth_l1 or giou\\)"),
                            (dt.TrainConfig(arch="faster_rcnn", box_loss="giou", out=str(tmp_path / "run"),
                                            cache=str(tmp_path / "cache")), "--box-loss giou is for RetinaNet")):
        with pytest.raises(SpineInpaintError, match=message):
            dt.train_detector(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# --- metrics wrapper ------------------------------------------------------------------------------------
def test_score_detections_on_hand_made_boxes():
    truth = [np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    boxes = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([[5, 5, 9, 9]], float)]
    scores = [np.array([0.9, 0.3]), np.array([0.5])]
    out = dt.score_detections(boxes, scores, truth)
    assert out["ap50"] == pytest.approx(1.0) and out["ap50_95"] == pytest.approx(1.0)
    # The lesion is the top detection: found with 0 false positives.
    assert out["froc@0.5"] == 1.0 and out["images"] == 2 and out["lesion_boxes"] == 1


# --- volume level ----------------------------------------------------------------------------------------
class _ScriptedDetector(det.Detector):
    """A detector whose per-crop output is given: exercises the volume-level code without a network."""

    def __init__(self, outputs):
        self.arch, self.outputs, self.calls = "retinanet", outputs, 0

    def predict(self, images):
        out = []
        for _ in images:
            out.append(self.outputs(self.calls))
            self.calls += 1
        return out


def test_link_detections_follows_overlapping_boxes_and_drops_single_slices():
    per_slice = {
        3: (np.array([[10, 10, 20, 20]], float), np.array([0.9])),
        4: (np.array([[11, 11, 21, 21], [60, 60, 70, 70]], float), np.array([0.8, 0.7])),
        6: (np.array([[12, 12, 22, 22]], float), np.array([0.6])),  # one-slice gap is bridged
        9: (np.array([[12, 12, 22, 22]], float), np.array([0.6])),  # too far: new track, dropped
    }
    tracks = det.link_detections(per_slice, link_iou=0.3, max_gap=1, min_slices=2)
    assert len(tracks) == 1
    boxes, scores = tracks[0]
    assert sorted(boxes) == [3, 4, 6] and scores[4] == pytest.approx(0.8)


def _cube_case(direction=np.eye(3)):
    """A vertebra (a 40x40 mm block, 200 HU, 1 mm) with a lytic 10x10x6 mm hole on slices 10-15."""
    rng = np.random.default_rng(0)
    hu = rng.normal(200, 10, (24, 64, 64)).astype(np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[2:22, 12:52, 12:52] = 29
    hu[labels == 0] = 0.0
    hu[10:16, 25:35, 25:35] = 40.0
    ct = io.Volume(hu, spacing=(1.0, 1.0, 1.0), origin=(5.0, -3.0, 7.0), direction=direction)
    return ct, ct.with_array(labels)


def test_detect_volume_keeps_boxes_in_the_spine_and_reports_lps_corners():
    ct, labels = _cube_case()
    centre = det.spine_centre(labels.array[10] > 0)

    def outputs(call):
        z = 2 + call  # slices with spine, in order
        boxes, scores = [], []
        # The lesion (source pixels 25-35) on slices 10-15 and a box far outside the spine on every slice.
        if 10 <= z < 16:
            boxes.append(det.source_to_crop(np.array([[25, 25, 35, 35]]), centre, (1, 1))[0])
            scores.append(0.9)
        boxes.append(det.source_to_crop(np.array([[55, 1, 63, 9]]), centre, (1, 1))[0])
        scores.append(0.95)
        return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)

    lesions = det.detect_volume(ct, labels, _ScriptedDetector(outputs), score_threshold=0.5)
    assert len(lesions) == 1
    les = lesions[0]
    assert les.z_range == (10, 16) and les.confidence == pytest.approx(0.9)
    np.testing.assert_allclose(les.boxes[12], [25, 25, 35, 35], atol=1e-3)
    # Identity direction: LPS = origin + index * spacing, outer faces at index -0.5.
    np.testing.assert_allclose(les.box_lps[0], (5 + 24.5, -3 + 24.5, 7 + 9.5), atol=1e-3)
    np.testing.assert_allclose(les.box_lps[1], (5 + 34.5, -3 + 34.5, 7 + 15.5), atol=1e-3)
    assert json.loads(json.dumps(les.to_dict()))["n_slices"] == 6


class _BrightSpotDetector(det.Detector):
    """Boxes the bright (> 0.6, sclerotic) pixels of each crop at 0.95, plus a faint 0.35 box in the spine."""

    def __init__(self, metadata=None):
        self.arch, self.metadata = "retinanet", metadata or {}

    def predict(self, images):
        out = []
        for image in images:
            rows, cols = np.nonzero(image[1] > 0.6)
            boxes, scores = [[54.0, 54.0, 62.0, 62.0]], [0.35]
            if rows.size:
                boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
                scores.append(0.95)
            out.append((np.asarray(boxes, np.float32), np.asarray(scores, np.float32)))
        return out


def _sclerotic_cube_case(lesioned: bool):
    ct, labels = _cube_case()
    hu = ct.array.copy()
    hu[10:16, 25:35, 25:35] = 1000.0 if lesioned else 200.0
    bone = np.zeros(hu.shape, np.uint8)
    if lesioned:
        bone[10:16, 25:35, 25:35] = 1
    lesion = types.SimpleNamespace(lesion_type="sclerotic", destructive=False, level=29,
                                   lesion_mask=ct.with_array(bone), bone_destroyed=ct.with_array(bone),
                                   healthy_labels=labels) if lesioned else None
    return datasets.Case("cube_lesion" if lesioned else "cube_healthy", ct.with_array(hu), ct, labels, lesion,
                         "phantom", 0, {})


def test_detect_volume_takes_the_thresholds_tuned_for_the_weights():
    case = _sclerotic_cube_case(True)
    # Default thresholds (score 0.9): only the lesion; the detector's own (0.3): the faint box too.
    assert len(det.detect_volume(case.ct, case.labels, _BrightSpotDetector())) == 1
    tuned = _BrightSpotDetector({"volume_level": {"score_threshold": 0.3, "slice_threshold": 0.3,
                                                  "min_slices": 2}})
    assert det.volume_thresholds(tuned) == {"score_threshold": 0.3, "slice_threshold": 0.3, "min_slices": 2}
    assert len(det.detect_volume(case.ct, case.labels, tuned)) == 2
    assert len(det.detect_volume(case.ct, case.labels, tuned, score_threshold=0.5)) == 1  # argument wins


def test_tuning_the_volume_thresholds_drops_the_faint_false_lesion():
    cases = [_sclerotic_cube_case(True), _sclerotic_cube_case(False)]
    tuning = tune_volume_level(_BrightSpotDetector(), cases, score_thresholds=(0.3, 0.5, 0.9),
                                  slice_thresholds=(0.2, 0.5), min_slices=(2, 3))
    chosen = tuning["chosen"]
    assert chosen["sensitivity"] == 1.0 and chosen["fp_per_healthy_volume"] == 0.0
    assert chosen["score_threshold"] == 0.9 and tuning["cases"] == ["cube_lesion", "cube_healthy"]
    low = [g for g in tuning["grid"] if g["score_threshold"] == 0.3 and g["slice_threshold"] == 0.2]
    assert low and all(g["fp_per_healthy_volume"] == 1.0 for g in low)
    assert len(tuning["grid"]) == 2 * 1 + 2 * 2 + 2 * 2  # slice threshold never above the score threshold
    with pytest.raises(SpineInpaintError, match="no validation volume"):
        tune_volume_level(_BrightSpotDetector(), [])


def test_spine_binary_takes_the_vertebrae_of_a_label_map():
    labels = np.array([0, 1, 24, 25, 29, 50, 51, 87])
    assert det.spine_binary(labels).tolist() == [False, False, False, True, True, True, False, False]
    assert det.spine_binary(np.array([0, 1, 1, 0])).tolist() == [False, True, True, False]


def test_boxes_off_the_vertebrae_of_a_label_map_are_dropped():
    # A labelled muscle (id 87) beside the vertebra: a confident box on it is no spinal lesion.
    ct, labels = _cube_case()
    lab = labels.array.copy()
    lab[2:22, 52:64, 52:64] = 87
    labels = labels.with_array(lab)
    centre = det.spine_centre(det.spine_binary(lab[10]))
    muscle_box = det.source_to_crop(np.array([[53, 53, 63, 63]]), centre, (1, 1))[0]

    def outputs(call):
        return np.asarray([muscle_box], np.float32), np.asarray([0.99], np.float32)

    assert det.detect_volume(ct, labels, _ScriptedDetector(outputs)) == []


def test_healthy_volume_gives_no_lesion_and_no_mask():
    ct, labels = _cube_case()
    detector = _ScriptedDetector(lambda call: (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
    lesions, mask = det.find_lesions(ct, labels, detector)
    assert lesions == [] and mask is None


def test_lesion_mask_is_the_abnormal_bone_inside_the_box_on_the_input_grid():
    # RAS direction: the mask must come back on the input's own grid.
    ct, labels = _cube_case(np.diag([-1.0, -1.0, 1.0]))
    lps = io.reorient(ct, "LPS")
    truth = np.zeros(ct.shape, bool)
    truth[10:16, 25:35, 25:35] = True
    truth_lps = io.reorient(ct.with_array(truth.astype(np.uint8)), "LPS").array > 0
    zz, yy, xx = np.nonzero(truth_lps)
    box = (xx.min() - 3.0, yy.min() - 3.0, xx.max() + 4.0, yy.max() + 4.0)  # a loose box
    les = det.Lesion3D({z: box for z in range(zz.min(), zz.max() + 1)}, {z: 0.9 for z in range(10, 16)}, 0.9,
                       ((0, 0, 0), (1, 1, 1)))
    mask = det.lesion_mask_from_detections(ct, [les], labels)
    assert mask.same_grid(ct) and mask.array.dtype == np.uint8
    got = mask.array > 0
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice > 0.9
    assert not got[:10].any() and not got[16:].any()
    assert lps.shape == ct.shape


def test_detect_volume_rejects_a_mask_on_another_grid():
    ct, labels = _cube_case()
    other = io.Volume(labels.array[:, :, :-1], labels.spacing, labels.origin)
    with pytest.raises(SpineInpaintError, match="same grid"):
        det.detect_volume(ct, other, _ScriptedDetector(lambda c: None))


# --- command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--retinanet", "--compare"])
def test_evaluate_detection_with_missing_weights_is_a_one_line_error(flag, tmp_path, capsys):
    code = cli.main(["evaluate", "detection", flag, str(tmp_path / "none.safetensors"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "detector weights not found" in err


def test_save_thresholds_without_tune_is_a_one_line_error(capsys):
    code = cli.main(["evaluate", "detection", "--save-thresholds", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--save-thresholds needs --tune" in err


def test_unknown_backbone_is_refused_before_any_data_is_built(tmp_path):
    config = dt.TrainConfig(backbone="huge", out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    with pytest.raises(SpineInpaintError, match="unknown RetinaNet backbone 'huge' \\(use small or base\\)"):
        dt.train_detector(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_hard_negative_phantoms_follow_the_other_cases_and_reach_s1():
    base = dt.case_specs("train", phantoms=6, real=2, healthy_phantoms=2, healthy_real=True)
    more = dt.case_specs("train", phantoms=6, real=2, healthy_phantoms=2, negative_phantoms=12, healthy_real=True)
    # Adding hard negatives leaves every other case (and so its cached samples) as it was.
    assert [s[0] for s in base] == [s[0] for s in more if not s[0].endswith("_negatives")]
    negatives = [s for s in more if s[0].endswith("_negatives")]
    assert len(negatives) == 12 and all(options == {"min_negatives": 30} for _, _, options in negatives)
    assert all(datasets.split_of(key[:12]) == "train" for key, _, _ in negatives)
    levels = [make.keywords["levels"] for _, make, _ in negatives]
    assert all(len(w) == 3 and set(w) <= set(detection_cases._NEGATIVE_LEVELS) for w in levels)
    assert any("S1" in w for w in levels) and all(make.keywords["lesion_types"] is None for _, make, _ in negatives)
    # The aggregate of the training samples is kept per case list; the per-case files are shared.
    paths = [dt.training_cache_paths(dt.TrainConfig(cache="c", negative_phantoms=n)) for n in (0, 0, 12)]
    assert paths[0] == paths[1] and paths[0][0] != paths[2][0] and paths[0][1] == paths[2][1]


def test_a_negative_case_count_is_refused_before_any_data_is_built(tmp_path):
    config = dt.TrainConfig(negative_phantoms=-5, out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    with pytest.raises(SpineInpaintError, match="--negative-phantoms must be >= 0, got -5"):
        dt.train_detector(config)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_case_spec_s_own_options_decide_its_samples(tmp_path):
    case = datasets.real_case(seed=0, lesion_types=None)
    specs = [("few", lambda: case, {}), ("many", lambda: case, {"min_negatives": 9})]
    samples = dt.build_sample_set(specs, seed=0, cache=tmp_path, min_negatives=3)
    assert len(samples) == 3 + 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.npz", "many.npz"]
    assert len(dt.SampleSet.load(tmp_path / "many.npz")) == 9


def _seed_cache(cache: Path, samples: dt.SampleSet) -> None:
    """Ready-made training and validation samples where a run with ``cache`` (default cases) looks."""
    for path in dt.training_cache_paths(dt.TrainConfig(cache=str(cache))):
        samples.save(path)


def test_init_weights_missing_or_of_another_architecture_are_refused_before_any_data_is_built(tmp_path):
    missing = dt.TrainConfig(init=str(tmp_path / "none.safetensors"), out=str(tmp_path / "run"),
                             cache=str(tmp_path / "cache"))
    with pytest.raises(SpineInpaintError, match="--init weights not found"):
        dt.train_detector(missing)
    other = dt.TrainConfig(backbone="small", init=str(det.DEFAULT_WEIGHTS), out=str(tmp_path / "run"),
                           cache=str(tmp_path / "cache"))
    with pytest.raises(SpineInpaintError, match="another architecture than --arch retinanet --backbone small"):
        dt.train_detector(other)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_init_starts_the_training_from_the_given_weights(tmp_path, tiny_samples):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    cache.mkdir()
    _seed_cache(cache, tiny_samples)
    config = dt.TrainConfig(init=str(det.DEFAULT_WEIGHTS), out=str(tmp_path / "run"), cache=str(cache),
                            epochs=1, steps_per_epoch=1, batch_size=2, lr=1e-12, progress=False, threads=1)
    dt.train_detector(config)
    shipped, tuned = load_file(str(det.DEFAULT_WEIGHTS)), load_file(str(tmp_path / "run" / "best.safetensors"))
    assert shipped.keys() == tuned.keys()
    # Learned weights stay put at a learning rate of 1e-12 (batch-norm running statistics move).
    learned = [k for k in shipped if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert learned and all(torch.allclose(shipped[k].float(), tuned[k].float(), atol=1e-6) for k in learned)
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["training"]["init"] == str(det.DEFAULT_WEIGHTS)


def test_export_copies_the_chosen_epoch_s_weights(tmp_path, tiny_samples, capsys):
    cache = tmp_path / "cache"
    _seed_cache(cache, tiny_samples)
    run, shipped = tmp_path / "run", tmp_path / "resources"
    code = cli.main(["train", "detection", "--cache", str(cache), "--out", str(run), "--epochs", "2",
                     "--steps-per-epoch", "1", "--batch-size", "2", "--lr", "1.0", "--threads", "1", "--quiet",
                     "--export", str(shipped), "--export-weights", "final"])
    assert code == 0 and "exported the final weights" in capsys.readouterr().out
    exported = json.loads((shipped / "retinanet.json").read_text())
    assert exported == json.loads((run / "final.json").read_text()) and exported["metrics"]["epoch"] == 2
    assert sha256_of(shipped / "retinanet.safetensors") == exported["sha256"]


def test_ema_weights_are_the_running_average_saved_and_resumed(tmp_path, tiny_samples):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    cache.mkdir()
    _seed_cache(cache, tiny_samples)
    run = tmp_path / "run"
    settings = dict(out=str(run), cache=str(cache), steps_per_epoch=1, batch_size=2, lr=1.0, progress=False,
                    resume=True, threads=1, ema=0.5)
    dt.train_detector(dt.TrainConfig(epochs=2, max_minutes=1e-9, **settings))  # stops after epoch 1
    first = torch.load(run / "last.pt", weights_only=True)["models"]
    name = "network.classification_head.cls_logits.weight"
    # The first update copies the weights; the second (after resuming) averages with decay 0.5.
    torch.testing.assert_close(first["ema"]["module." + name], first["detector"][name])
    dt.train_detector(dt.TrainConfig(epochs=2, **settings))
    second = torch.load(run / "last.pt", weights_only=True)["models"]
    expected = 0.5 * first["detector"][name] + 0.5 * second["detector"][name]
    torch.testing.assert_close(second["ema"]["module." + name], expected)
    assert not torch.allclose(second["detector"][name], first["detector"][name])
    # The saved weights are the average's: the best by validation AP, and the last epoch's.
    saved = load_file(str(run / "best.safetensors"))[name].float()
    assert any(torch.allclose(saved, state["ema"]["module." + name].float(), atol=1e-6) for state in (first, second))
    final = load_file(str(run / "final.safetensors"))[name].float()
    torch.testing.assert_close(final, second["ema"]["module." + name].float())
    assert json.loads((run / "final.json").read_text())["metrics"]["epoch"] == 2
    # Resuming the averaged run without the average (or the other way round) is a one-line error.
    with pytest.raises(SpineInpaintError, match="another --ema setting"):
        dt.train_detector(dt.TrainConfig(epochs=3, **{**settings, "ema": 0.0}))
    with pytest.raises(SpineInpaintError, match="--ema must be in \\[0, 1\\)"):
        dt.train_detector(dt.TrainConfig(**{**settings, "ema": 1.0}))


def test_small_box_weight_draws_slices_with_small_boxes_more_often(tmp_path):
    masks = np.zeros((3, dt.CACHE_SIZE, dt.CACHE_SIZE), np.uint8)
    masks[0, 50:56, 50:80] = 1  # 6 x 30 px: small (1 mm pixels)
    masks[1, 50:90, 50:90] = 1  # 40 x 40 px
    samples = dt.SampleSet(np.zeros((3, 3, dt.CACHE_SIZE, dt.CACHE_SIZE), np.int16), masks, [{}] * 3)
    np.testing.assert_allclose(dt.positive_draw_weights(samples, np.array([0, 1]), 3.0), [0.75, 0.25])
    assert dt.positive_draw_weights(samples, np.array([0, 1]), 1.0) is None
    rng = np.random.default_rng(0)
    _, boxes = dt._batch(samples, np.array([0, 1]), np.array([2]), 40, 1.0, rng, np.array([1.0, 0.0]))
    # Every draw is the small lesion (under 1,000 px^2 after rotation and scaling; the large one is 1,600).
    assert all(len(b) == 1 and (b[0, 2] - b[0, 0]) * (b[0, 3] - b[0, 1]) < 1000 for b in boxes)
    with pytest.raises(SpineInpaintError, match="--small-box-weight must be > 0"):
        dt.train_detector(dt.TrainConfig(small_box_weight=0.0, out=str(tmp_path / "run"),
                                         cache=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_a_finer_input_grid_crops_the_same_lesion_in_millimetres(tiny_samples):
    case = datasets.real_case(seed=5, lesion_types=["lytic"])
    fine = dt.samples_from_case(case, rng=np.random.default_rng(0), min_negatives=2, max_negatives=2,
                                size=dt.cache_size(160), grid_mm=0.75)
    assert dt.cache_size(det.CROP_SIZE) == dt.CACHE_SIZE and dt.cache_size(160) == 220
    assert fine.images.shape[1:] == (3, 220, 220) and {m["grid_mm"] for m in fine.meta} == {0.75}
    assert [m["z"] for m in fine.meta] == [m["z"] for m in tiny_samples.meta]  # the same slices
    coarse_boxes, fine_boxes = tiny_samples.centre_boxes(), fine.centre_boxes(160)
    for b1, b2 in zip(coarse_boxes, fine_boxes):
        assert len(b1) == len(b2)
        if len(b1):
            # Both crops are centred on the same point: millimetres from the centre agree to a pixel.
            np.testing.assert_allclose((b2[0] - 80) * 0.75, (b1[0] - 64) * 1.0, atol=1.0)
    i = next(i for i, b in enumerate(fine_boxes) if len(b))
    image, boxes = dt.augment(fine.images[i], fine.masks[i], np.random.default_rng(0), size=160, grid_mm=0.75,
                              max_rotation_deg=0, scale=(1, 1), max_shift_mm=0, flip_probability=0,
                              noise_probability=0)
    np.testing.assert_allclose(image, fine.centre_crops(160)[i], atol=1e-5)
    np.testing.assert_array_equal(boxes, fine_boxes[i])


def test_detector_weights_carry_their_input_grid_to_volume_detection(tmp_path):
    detector = det.Detector("retinanet", crop_size=160, grid_mm=0.75)
    path = save_weights(detector.model, tmp_path / "fine.safetensors",
                                 {"arch": "retinanet", "architecture": det.RETINANET_CONFIG,
                                  "input": {"size": [160, 160], "pixel_mm": 0.75}})
    loaded = det.load_detector(path)
    assert (loaded.crop_size, loaded.grid_mm) == (160, 0.75)
    ct, labels = _cube_case()
    centre = det.spine_centre(labels.array[10] > 0)
    seen = []

    def outputs(call):
        z = 2 + call
        box = det.source_to_crop(np.array([[25, 25, 35, 35]]), centre, (1, 1), size=160, grid_mm=0.75)
        return (box.astype(np.float32), np.array([0.9], np.float32)) if 10 <= z < 16 else \
            (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    scripted = _ScriptedDetector(outputs)
    scripted.crop_size, scripted.grid_mm = 160, 0.75
    original = scripted.predict
    scripted.predict = lambda images: (seen.append(np.shape(images)), original(images))[1]
    lesions = det.detect_volume(ct, labels, scripted, score_threshold=0.5)
    assert all(shape[1:] == (3, 160, 160) for shape in seen)
    assert len(lesions) == 1 and lesions[0].z_range == (10, 16)
    np.testing.assert_allclose(lesions[0].boxes[12], [25, 25, 35, 35], atol=1e-3)


def test_evaluation_feeds_each_detector_the_same_slices_on_its_own_grid():
    case = dt.slim_case(datasets.real_case(seed=5, lesion_types=["sclerotic"]))

    class Recorder(_BrightSpotDetector):
        def predict(self, images):
            self.shapes.add(np.shape(images)[1:])
            return super().predict(images)

    coarse, fine = Recorder(), Recorder()
    coarse.shapes, fine.shapes = set(), set()
    fine.crop_size, fine.grid_mm = 160, 0.75
    result = evaluate_detection({"coarse": coarse, "fine": fine}, cases=[case], volume_level=False,
                                   progress=False)
    assert coarse.shapes == {(3, 128, 128)} and fine.shapes == {(3, 160, 160)}
    rows = result["detectors"]
    assert rows["coarse"]["input_grid"] == {"size": 128, "pixel_mm": 1.0}
    assert rows["fine"]["input_grid"] == {"size": 160, "pixel_mm": 0.75}
    assert rows["coarse"]["images"] == rows["fine"]["images"] == result["slices"]
    assert rows["coarse"]["lesion_boxes"] == rows["fine"]["lesion_boxes"] > 0


def test_an_input_grid_the_network_cannot_take_or_another_grids_cache_is_refused(tmp_path, tiny_samples):
    with pytest.raises(SpineInpaintError, match="multiple of 32 and at least 64 pixels, got 100"):
        dt.train_detector(dt.TrainConfig(crop_size=100, out=str(tmp_path / "run"), cache=str(tmp_path / "c")))
    with pytest.raises(SpineInpaintError, match="pixel size must be between 0.25 and 4 mm, got 0"):
        det.Detector("retinanet", grid_mm=0.0)
    assert not (tmp_path / "c").exists() and not (tmp_path / "run").exists()
    cache = tmp_path / "cache"
    cache.mkdir()
    _seed_cache(cache, tiny_samples)
    config = dt.TrainConfig(grid_mm=0.75, crop_size=160, out=str(tmp_path / "run"), cache=str(cache),
                            progress=False)
    with pytest.raises(SpineInpaintError, match="holds crops of 176 pixels of 1 mm, not 220 of 0.75 mm"):
        dt.train_detector(config)


def test_shipped_retinanet_weights_are_small_and_documented():
    if not det.DEFAULT_WEIGHTS.exists():
        pytest.skip("no shipped detector weights (training did not reach a useful model)")
    meta = json.loads(det.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert det.DEFAULT_WEIGHTS.stat().st_size < 40e6
    assert meta["arch"] == "retinanet" and meta["sha256"] == sha256_of(det.DEFAULT_WEIGHTS)
    assert meta["input"]["window_hu"] == list(det.WINDOW) and not math.isnan(meta["metrics"]["val_ap50"])
    det.load_detector()


def test_deeplesion_folder_gives_the_key_slice_with_its_padded_box(tmp_path):
    case = datasets.real_case(seed=5, lesion_types=["lytic"])
    root = datasets.write_deeplesion([case], tmp_path / "dl")
    samples = dt.samples_from_deeplesion(root, None, rng=np.random.default_rng(0))
    assert len(samples) == 1 and samples.meta[0]["lesion_type"] == "bone"
    (box,) = samples.centre_boxes()[0]
    # The same slice cut from the case: DeepLesion's key slice is the lesion mask's largest slice, its
    # box the RECIST box padded by 5 pixels (3 mm pixels: 15 mm a side at our 1 mm grid, plus one
    # 3 mm pixel for DeepLesion's inclusive end), so it holds the mask's box.
    ct = io.reorient(case.ct, "LPS")
    tumour = io.reorient(case.lesion.lesion_mask, "LPS").array
    z = int(np.argmax(tumour.reshape(tumour.shape[0], -1).sum(axis=1)))
    spine = spine_mask(io.reorient(case.labels, "LPS").array[z])
    centre = det.spine_centre(spine)
    a = (dt.CACHE_SIZE - det.CROP_SIZE) // 2
    mask = det.crop_slices(tumour[z][None].astype(np.float32), centre, ct.spacing_zyx[1:], size=dt.CACHE_SIZE,
                           order=0, cval=0)[0][a:a + det.CROP_SIZE, a:a + det.CROP_SIZE]
    rows, cols = np.nonzero(mask)
    assert box[0] <= cols.min() + 1 and box[1] <= rows.min() + 1
    assert box[2] >= cols.max() and box[3] >= rows.max()
    assert box[2] - box[0] <= cols.max() - cols.min() + 1 + 2 * 15 + 3
