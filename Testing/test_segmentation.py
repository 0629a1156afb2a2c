"""Vertebra segmentation: networks, network grid, 2.5D input, post-processing, inference, training, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.cli import main as cli_main
from SpineInpaintLib.core import io
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.segmentation import inference as seg_inference
from SpineInpaintLib.segmentation import networks as seg
from SpineInpaintLib.segmentation.inference import (
    WINDOWS,
    channel_stack,
    check_ct,
    export_vertebra,
    locate_spine,
    predict_grid,
    segment_volume,
    to_network_grid,
)
from SpineInpaintLib.segmentation.vertebrae import clean_mask, directional_flood, number_chain, split_vertebrae
from SpineInpaintLib.training import augment
from SpineInpaintLib.training import segmentation as st
from SpineInpaintLib.training.segmentation import segmentation_loss, train_transforms

REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------------------
def _column_case(case_id: str, seed: int = 0, direction: np.ndarray | None = None) -> datasets.Case:
    """A small synthetic CT: air, a soft-tissue body and four bone 'vertebrae' (L5 ... L2) stacked in z.

    Grid 36 x 64 x 64 at 1.5 mm x 1.5 mm x 2.5 mm (LPS unless ``direction``); each vertebra is a
    36 x 36 x 15 mm box, separated by 5 mm 'discs'.
    """
    rng = np.random.default_rng(seed)
    ct = np.full((36, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 8:56] = 40.0
    labels = np.zeros(ct.shape, np.uint8)
    for k, level in enumerate((27, 28, 29, 30)):
        z0 = 3 + 8 * k
        ct[z0:z0 + 6, 20:44, 20:44] = 600.0
        labels[z0:z0 + 6, 20:44, 20:44] = level
    ct += rng.normal(0, 10, ct.shape).astype(np.float32)
    spacing = (1.5, 1.5, 2.5)
    origin = (-48.0, -40.0, 100.0)
    volume = io.Volume(ct, spacing, origin, np.eye(3) if direction is None else direction)
    label_volume = volume.with_array(labels)
    return datasets.Case(case_id, volume, volume, label_volume, None, "phantom", seed)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """A network-grid cache of three synthetic cases (two train, one val by the fixed split)."""
    folder = tmp_path_factory.mktemp("segcache")
    for case_id in ("synthetic_0", "synthetic_1", "synthetic_32"):
        st.cache_case(_column_case(case_id), folder)
    return folder


# --- networks --------------------------------------------------------------------------------------------
def test_unet_and_vnet_forward_shapes():
    torch.manual_seed(0)
    x = torch.rand(2, seg.IN_CHANNELS, 48, 64)
    for name in seg.NETWORKS:
        model = seg.build_network(name).eval()
        with torch.no_grad():
            assert model(x).shape == (2, seg.N_CLASSES, 48, 64)


def test_vnet_is_configured_as_the_paper():
    """Five stages joined by 2x2 stride-2 convolutions, 3x3 padded convolutions, 16 channels, 1x1 head."""
    model = seg.build_network("vnet")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    down = [m for m in convs if m.kernel_size == (2, 2) and m.stride == (2, 2)]
    assert [m.out_channels for m in down] == [32, 64, 128, 256]  # 16 -> 256: five resolution stages
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for m in model.modules())
    others = [m for m in convs if m not in down]
    assert {m.kernel_size for m in others} == {(3, 3), (1, 1)}
    assert all(m.padding == (1, 1) for m in others if m.kernel_size == (3, 3))
    head = model.out_tr.conv2
    assert head.kernel_size == (1, 1) and head.in_channels == 16 and head.out_channels == seg.N_CLASSES
    assert model.in_tr.conv_block.conv.out_channels == 16


def test_unknown_network_is_a_user_error():
    with pytest.raises(SpineInpaintError, match="unknown segmentation network 'segnet'"):
        seg.build_network("segnet")


# --- data on the grid ----------------------------------------------------------------------------------
def test_ids_to_classes():
    ids = np.array([0, 5, 25, 26, 27, 34, 35, 40, 50, 117], np.uint8)
    np.testing.assert_array_equal(seg.ids_to_classes(ids), [0, 0, 2, 3, 4, 11, 1, 1, 1, 0])
    assert [seg.CLASS_IDS[c] for c in seg.ids_to_classes(np.array([25, 29, 34]))] == [25, 29, 34]


def test_channel_stack_interpolates_neighbours_in_millimetres():
    # Slice z holds z * 100 HU; spacing 1.25 mm -> neighbours are 2 slices away; 1 mm -> 2.5 slices.
    hu = np.repeat(np.arange(8, dtype=np.float32)[:, None, None] * 100.0, 4, axis=1).repeat(4, axis=2)
    lo, hi = WINDOWS[0]
    wide = lambda v: np.clip((v - lo) / (hi - lo), 0, 1)  # noqa: E731
    stack = channel_stack(hu, 1.25, [3, 0, 7])
    assert stack.shape == (3, 4, 4, 4)
    np.testing.assert_allclose(stack[0, :, 0, 0], [wide(100), wide(300), wide(500),
                                                   np.clip((300 - WINDOWS[1][0]) / 1000, 0, 1)], atol=1e-6)
    np.testing.assert_allclose(stack[1, 0, 0, 0], wide(0.0), atol=1e-6)  # clamped at the first slice
    np.testing.assert_allclose(stack[2, 2, 0, 0], wide(700.0), atol=1e-6)  # clamped at the last slice
    half = channel_stack(hu, 1.0, [4])
    np.testing.assert_allclose(half[0, 0, 0, 0], wide(150.0), atol=1e-6)  # 4 - 2.5 = 1.5 -> 150 HU


def test_network_grid_keeps_physical_positions_for_any_orientation():
    # The same anatomy stored RAS (rows and columns flipped): the grid is LPS at 1.5 mm in-plane and
    # a label resampled to the grid and back lands on the same voxels.
    flip = np.diag([-1.0, -1.0, 1.0])
    case = _column_case("synthetic_0")
    ras = io.reorient(case.labels, "RAS")
    assert np.allclose(ras.direction, flip)
    grid = to_network_grid(ras, labels=True)
    assert np.allclose(grid.direction, np.eye(3))
    assert grid.spacing[:2] == (seg.GRID_MM, seg.GRID_MM) and grid.spacing[2] == pytest.approx(2.5)
    back = io.resample_like(grid, ras, labels=True)
    np.testing.assert_array_equal(back.array, ras.array)
    # The L3 box centre is at the same LPS point on both grids.
    c_ras = ras.index_to_physical(np.argwhere(ras.array == 29).mean(axis=0))
    c_grid = grid.index_to_physical(np.argwhere(grid.array == 29).mean(axis=0))
    np.testing.assert_allclose(c_ras, c_grid, atol=1e-6)



def test_network_grid_of_another_pixel_size_keeps_physical_positions():
    case = _column_case("synthetic_0")
    fine = to_network_grid(case.labels, labels=True, grid_mm=1.0)
    assert fine.spacing == pytest.approx((1.0, 1.0, 2.5))
    # 64 pixels of 1.5 mm = 96 mm: 96 pixels of 1 mm.
    assert fine.shape[1:] == (96, 96)
    c_src = case.labels.index_to_physical(np.argwhere(case.labels.array == 29).mean(axis=0))
    c_fine = fine.index_to_physical(np.argwhere(fine.array == 29).mean(axis=0))
    np.testing.assert_allclose(c_src, c_fine, atol=0.51)  # box edges fall on half-pixels of the coarser grid
    back = io.resample_like(fine, case.labels, labels=True)
    np.testing.assert_array_equal(back.array, case.labels.array)
    for bad in (0.1, 5.0, float("nan"), "a"):
        with pytest.raises(SpineInpaintError, match="segmentation pixel size must be"):
            to_network_grid(case.ct, grid_mm=bad)

# --- checks and post-processing ------------------------------------------------------------------------
def test_check_ct_flags_non_ct():
    case = _column_case("synthetic_0")
    assert check_ct(case.ct) == []
    assert "constant" in check_ct(case.ct.with_array(np.zeros(case.ct.shape)))[0]
    mr = case.ct.with_array(np.random.default_rng(1).uniform(0, 2000, case.ct.shape))
    assert any("no air" in r for r in check_ct(mr))
    # int32 extremes written into bone and air: no CT stores such values
    broken = case.ct.array.astype(np.int32)
    broken[broken > 300], broken[broken < -900] = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    assert any("outside any CT's range" in r for r in check_ct(case.ct.with_array(broken)))
    two = io.Volume(case.ct.array[:2].copy(), case.ct.spacing, case.ct.origin, case.ct.direction)
    assert any("needs at least 3 slices" in r for r in check_ct(two))


def test_restore_refuses_int32_extremes_and_two_slices_in_one_line(real_case):
    from SpineInpaintLib import pipeline

    ct, _ = real_case
    broken = ct.array.astype(np.int32)
    broken[broken > 300] = np.iinfo(np.int32).max
    with pytest.raises(SpineInpaintError, match="outside any CT's range") as err:
        pipeline.restore(ct.with_array(broken))
    assert "\n" not in str(err.value)
    with pytest.raises(SpineInpaintError, match="needs at least 3 slices"):
        pipeline.restore(io.Volume(ct.array[:2].copy(), ct.spacing, ct.origin, ct.direction))


def test_clean_mask_removes_specks_keeps_neighbouring_vertebrae():
    mask = np.zeros((40, 60, 60), bool)
    mask[2:12, 20:40, 20:40] = True       # vertebra A (4000 voxels)
    mask[15:25, 20:40, 20:40] = True      # vertebra B, 3 slices (6 mm) away: kept
    mask[30:32, 2:5, 2:5] = True          # speck far away: removed
    mask[5:9, 50:58, 50:58] = True        # rib-like 256 voxels, 10 pixels (20 mm) away: removed
    kept = clean_mask(mask, (2.0, 2.0, 2.0), min_ml=0.5)
    assert kept[2:12, 20:40, 20:40].all() and kept[15:25, 20:40, 20:40].all()
    assert not kept[30:32, 2:5, 2:5].any() and not kept[5:9, 50:58, 50:58].any()


def test_split_vertebrae_numbers_a_column_through_its_posterior_bridge():
    # Four 'bodies' separated by discs, joined by a thin posterior bar; the network's
    # scores are right on two vertebrae only and uniform elsewhere: the order fixes the others.
    case = _column_case("synthetic_0")
    labels = case.labels.array.copy()
    mask = labels > 0
    mask[3:33, 44:48, 30:34] = True  # posterior bar (6 x 6 mm), bridges the discs
    scores = np.full((seg.N_CLASSES,) + labels.shape, 1.0 / seg.N_CLASSES, np.float32)
    for level in (28, 30):
        one_hot = np.zeros(seg.N_CLASSES, np.float32)
        one_hot[seg.CLASS_IDS.index(level)] = 1.0
        scores[:, labels == level] = one_hot[:, None]
    out = split_vertebrae(mask, scores, case.ct.spacing_zyx, core_mm=5.0)
    for level in (27, 28, 29, 30):
        body = labels == level
        assert (out[body] == level).mean() > 0.95, level
    assert set(np.unique(out)) == {0, 27, 28, 29, 30}
    assert not out[~mask].any()


def test_split_vertebrae_does_not_take_a_thick_blob_beside_a_thin_column_for_the_spine():
    # A network that sees the spine only as thin plates (no voxel 5 mm deep: no body core) but a
    # femoral head 90 mm to the side as one thick ball: the ball must not become the column's
    # mid-line, or every spine voxel is dropped as too far from it (what a phantom-trained network
    # did on the real scan: Dice 0.000 from a raw mask of 0.45).
    spacing = (2.0, 2.0, 2.0)  # z, y, x
    mask = np.zeros((60, 80, 120), bool)
    mask[5:55, 30:34, 20:40] = True           # the column: 100 x 8 x 40 mm, 16 ml, 4 mm deep at most
    zz, yy, xx = np.ogrid[:60, :80, :120]
    ball = (zz - 30) ** 2 + (yy - 32) ** 2 + (xx - 75) ** 2 <= 9 ** 2  # radius 18 mm, 90 mm from x 30
    mask |= ball
    assert mask[5:55, 30:34, 20:40].sum() > ball.sum()  # the spine is most of the mask
    scores = np.zeros((seg.N_CLASSES,) + mask.shape, np.float32)
    scores[seg.CLASS_IDS.index(29)] = 1.0     # L3 everywhere
    out = split_vertebrae(mask, scores, spacing)
    assert (out[5:55, 30:34, 20:40] == 29).all()  # the column keeps its voxels and the network's level
    assert not out[~mask].any()


def test_number_chain_skips_a_level_only_where_the_votes_say_two_vertebrae_merged():
    # Four pieces caudal to cranial voting for chain positions (0 = sacrum and S1, 1 = L5, ...).
    votes = np.zeros((4, 8))
    votes[[0, 1, 2, 3], [1, 2, 3, 4]] = 10.0
    assert number_chain(votes) == [1, 2, 3, 4]  # consecutive: the best offset
    # The second piece is L4 and L3 in one (a missed disc); the pieces above vote for L2 and L1.
    merged = np.zeros((4, 8))
    merged[[0, 1, 2, 3], [1, 2, 4, 5]] = 10.0
    assert number_chain(merged) == [1, 2, 4, 5]
    assert number_chain(merged, skip_cost=100.0) in ([1, 2, 3, 4], [2, 3, 4, 5])  # no skip: a shift
    # Weak evidence for a skip (0.2 of a piece's votes against a cost of half a piece): none.
    weak = np.zeros((4, 8))
    weak[[0, 1], [1, 2]] = 10.0
    weak[[2, 3], [3, 4]] = 1.0
    weak[[2, 3], [4, 5]] = 1.2
    assert number_chain(weak) == [1, 2, 3, 4]
    # More pieces than levels: the extra ones get no level (position = number of levels).
    assert number_chain(np.eye(3, 2)) == [0, 1, 2]
    assert number_chain(np.zeros((0, 5))) == []


def test_directional_flood_costs_match_hand_computed_paths():
    # A column of 11 voxels along z, seeds at both ends. Unit costs: each half goes to its end.
    # Climbing costs 4: voxel z is reached from below at 4 z and from above at 10 - z, so the
    # lower seed keeps z 0 and 1 only (z 2 is a tie).
    mask = np.ones((11, 1, 1), bool)
    seeds = np.zeros(mask.shape, np.int32)
    seeds[0], seeds[10] = 1, 2
    plain = directional_flood(seeds, mask)[:, 0, 0]
    assert plain[:5].tolist() == [1] * 5 and plain[6:].tolist() == [2] * 5
    climb = directional_flood(seeds, mask, upward_cost=4)[:, 0, 0]
    assert climb[:2].tolist() == [1, 1] and climb[3:].tolist() == [2] * 8
    with pytest.raises(ValueError, match="upward_cost"):
        directional_flood(seeds, mask, upward_cost=0)
    with pytest.raises(ValueError, match="upward_cost"):       # refused even with nothing to flood
        directional_flood(np.zeros_like(seeds), mask, upward_cost=0)


def test_directional_flood_gives_each_voxel_to_a_nearest_seed():
    # Independent reference: per-seed shortest paths (skimage's minimum-cost path, face steps).
    from skimage.graph import MCP_Geometric

    rng = np.random.default_rng(3)
    mask = rng.random((12, 20, 20)) > 0.3
    starts = [(1, 2, 2), (10, 17, 18), (6, 10, 9)]
    seeds = np.zeros(mask.shape, np.int32)
    for k, point in enumerate(starts, start=1):
        mask[point] = True
        seeds[point] = k
    outside = (0, 19, 0)
    mask[outside] = False
    seeds[outside] = 4                   # a seed outside the mask floods nothing
    for upward_cost in (1, 3):
        ours = directional_flood(seeds, mask, upward_cost=upward_cost)
        assert not (ours == 4).any() and not ours[~mask].any()
        # Climbing dearer: costs per voxel entered, so give the reference the same by direction.
        distances = []
        for point in starts:
            if upward_cost == 1:
                mcp = MCP_Geometric(np.where(mask, 1.0, np.inf), fully_connected=False)
                distances.append(mcp.find_costs([point])[0])
            else:
                distances.append(_dial_reference(mask, point, upward_cost))
        distances = np.stack(distances)
        reached = np.isfinite(distances.min(axis=0)) & mask
        assert np.array_equal(ours > 0, reached)
        owner_distance = np.take_along_axis(distances, np.clip(ours - 1, 0, None)[None], 0)[0]
        assert np.allclose(owner_distance[reached], distances.min(axis=0)[reached])


def _dial_reference(mask: np.ndarray, start: tuple, upward_cost: int) -> np.ndarray:
    """Plain Dijkstra over face steps (z + 1 costs ``upward_cost``, others 1), one seed, for tests."""
    import heapq

    dist = np.full(mask.shape, np.inf)
    dist[start] = 0.0
    heap = [(0.0, start)]
    steps = [((1, 0, 0), upward_cost), ((-1, 0, 0), 1), ((0, 1, 0), 1), ((0, -1, 0), 1), ((0, 0, 1), 1),
             ((0, 0, -1), 1)]
    while heap:
        d, (z, y, x) = heapq.heappop(heap)
        if d > dist[z, y, x]:
            continue
        for (dz, dy, dx), cost in steps:
            n = (z + dz, y + dy, x + dx)
            if all(0 <= n[i] < mask.shape[i] for i in range(3)) and mask[n] and d + cost < dist[n]:
                dist[n] = d + cost
                heapq.heappush(heap, (d + cost, n))
    return dist


def _facet_column() -> np.ndarray:
    """Two vertebrae (L4 below, L3 above; slices inferior to superior at 3 x 1.5 x 1.5 mm), the
    bodies split by a disc; L3's lamina hangs down behind the disc to an inferior articular process
    that touches, face to face, the superior articular process rising from L4's pedicle."""
    labels = np.zeros((20, 48, 40), np.uint8)
    labels[1:9, 4:22, 8:32] = 28          # L4 body
    labels[11:19, 4:22, 8:32] = 29        # L3 body (disc at z 9-10)
    labels[6:9, 22:30, 10:14] = 28        # L4 pedicle
    labels[6:11, 30:34, 8:14] = 28        # L4 superior articular process, up to z 10
    labels[16:19, 22:30, 14:18] = 29      # L3 pedicle
    labels[9:19, 30:40, 14:20] = 29       # L3 lamina and inferior articular process, down to z 9
    return labels


def _one_hot_scores(labels: np.ndarray) -> np.ndarray:
    """Network scores that are sure of every voxel's class (background where the label is 0)."""
    scores = np.zeros((seg.N_CLASSES,) + labels.shape, np.float32)
    scores[0][labels == 0] = 1.0
    for level in np.unique(labels[labels > 0]):
        scores[seg.CLASS_IDS.index(int(level))][labels == level] = 1.0
    return scores


def test_split_vertebrae_keeps_the_articular_process_with_its_own_vertebra():
    labels = _facet_column()
    mask = labels > 0
    scores = _one_hot_scores(labels)
    posterior = np.zeros(mask.shape, bool)
    posterior[:, 30:, :] = True
    process = (labels == 29) & posterior   # L3's lamina and inferior articular process
    spacing = (3.0, 1.5, 1.5)
    # Plain breadth-first flooding hands the process's lower part to L4 across the joint ...
    plain = split_vertebrae(mask, scores, spacing, core_mm=5.0, contact_erosion=0, upward_cost=1)
    assert (plain[process] == 28).sum() >= 50
    # ... the default (no path through the thin contact, climbing dearer) keeps it with L3.
    out = split_vertebrae(mask, scores, spacing, core_mm=5.0)
    assert (out[process] == 29).mean() > 0.99
    assert (out[(labels == 28) & posterior] == 28).mean() > 0.99
    assert (out[mask] == labels[mask]).mean() > 0.99


def test_split_vertebrae_fill_rejoins_bone_a_lesion_cut_off():
    # A destructive lesion took L4's pedicle: its superior articular process touches only L3.
    labels = _facet_column()
    lesion = np.zeros(labels.shape, bool)
    lesion[6:9, 22:30, 10:14] = True
    labels[lesion] = 0
    mask = labels > 0
    scores = _one_hot_scores(labels)
    process = labels == 28
    process[:, :30] = False               # L4's superior articular process
    spacing = (3.0, 1.5, 1.5)
    alone = split_vertebrae(mask, scores, spacing, core_mm=5.0)
    assert (alone[process] == 29).mean() > 0.9    # reached from L3 only
    out = split_vertebrae(mask, scores, spacing, core_mm=5.0, fill=lesion)
    assert (out[process] == 28).mean() > 0.99
    assert not out[lesion].any() and not out[~mask].any()   # the lesion itself gets no label
    with pytest.raises(ValueError, match="fill"):
        split_vertebrae(mask, scores, spacing, fill=lesion[:-1])


def test_export_vertebra():
    case = _column_case("synthetic_0")
    l3 = export_vertebra(case.labels, "L3")
    assert l3.same_grid(case.labels) and l3.array.sum() == (case.labels.array == 29).sum()
    with pytest.raises(SpineInpaintError, match="T12 is not in the label map"):
        export_vertebra(case.labels, "T12")


# --- whole-volume inference -----------------------------------------------------------------------------
@pytest.mark.parametrize("values", ["zeros", "mr"])
def test_non_ct_input_warns_and_returns_empty_flagged_masks(values):
    case = _column_case("synthetic_0")
    array = np.zeros(case.ct.shape, np.float32) if values == "zeros" else \
        np.random.default_rng(2).uniform(0, 2000, case.ct.shape).astype(np.float32)
    model = seg.build_network("unet").eval()
    with pytest.warns(UserWarning, match="does not look like CT"):
        result = segment_volume(case.ct.with_array(array), model=model)
    assert result.flags == ["not_ct"] and not result.ok
    assert result.spine.array.sum() == 0 and result.labels.array.sum() == 0
    assert result.spine.same_grid(case.ct)


def test_segment_volume_returns_masks_on_the_input_grid():
    # An oblique, anisotropic input: the output must carry its exact geometry.
    angle = np.deg2rad(15.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    case = _column_case("synthetic_0", direction=direction)
    torch.manual_seed(0)
    model = seg.build_network("unet").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained network may well find no spine
        result = segment_volume(case.ct, model=model, batch_size=16)
    assert result.spine.same_grid(case.ct) and result.labels.same_grid(case.ct)
    assert result.spine.array.dtype == np.uint8 and set(np.unique(result.spine.array)) <= {0, 1}
    assert not result.labels.array[result.spine.array == 0].any()
    assert set(result.timings) >= {"network", "total"}


def test_segment_volume_with_a_known_lesion_keeps_the_vertebra_it_cut_apart(real_case):
    # Real scan with a destructive lytic L4 lesion through the body and left pedicle (seed 3):
    # without the lesion, L4's left posterior elements lose their path to the body and go to L3.
    from SpineInpaintLib.data import lesions
    from SpineInpaintLib.evaluation.metrics import overlap as metrics

    ct, labels = real_case
    sim = lesions.simulate_lesion(ct, labels, "L4", "lytic", True, size=0.7, seed=3)
    model, _ = seg.load_model("unet")
    plain = segment_volume(sim.ct, model=model)
    guided = segment_volume(sim.ct, model=model, lesion=sim.mask)
    assert np.array_equal(plain.spine.array, guided.spine.array)   # the lesion guides the split only
    outside = sim.mask.array == 0
    truth = (labels.array == 28) & outside
    dice_plain = metrics.dice((plain.labels.array == 28) & outside, truth)
    dice_guided = metrics.dice((guided.labels.array == 28) & outside, truth)
    assert dice_guided >= 0.90 and dice_guided >= dice_plain + 0.03, (dice_plain, dice_guided)
    with pytest.raises(SpineInpaintError, match="lesion mask has shape"):
        segment_volume(sim.ct, model=model, lesion=io.Volume(sim.mask.array[:-1], sim.mask.spacing,
                                                                  sim.mask.origin, sim.mask.direction))


def test_segment_volume_rejects_a_non_volume():
    with pytest.raises(SpineInpaintError, match="needs an io.Volume"):
        segment_volume(np.zeros((4, 4, 4)))


class _BoneIsSpine(torch.nn.Module):
    """A stand-in network without weights: spine (class 2) wherever the bone-window channel is bright.

    Pointwise, so every pixel's answer depends on that pixel alone and a crop changes nothing.
    Records the input shape of every call.
    """

    def __init__(self, name: str = "unet"):
        super().__init__()
        self._spine_net = name
        self.spine_grid_mm = seg.GRID_MM
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        spine = (x[:, 3] > 0.3).float()
        logits = torch.zeros((x.shape[0], seg.N_CLASSES) + tuple(x.shape[2:]))
        logits[:, 0] = 50.0 * (1.0 - spine)
        logits[:, 2] = 50.0 * spine
        return logits


def test_predict_grid_runs_the_network_on_the_box_only():
    grid = to_network_grid(_column_case("synthetic_0").ct)
    hu, z_spacing = grid.array, grid.spacing[2]
    model = _BoneIsSpine()
    whole = predict_grid(model, hu, z_spacing, box=(slice(None), slice(None)))
    assert model.calls[-1][1:] == (seg.IN_CHANNELS, 64, 64)
    assert whole[2].sum() > 0
    part = predict_grid(model, hu, z_spacing, box=(slice(18, 46), slice(19, 40)), batch_size=5)
    box = (slice(16, 48), slice(16, 48))  # moved to multiples of 16 (the networks' strides) and grown to them
    assert model.calls[-1][1:] == (seg.IN_CHANNELS, 32, 32)
    assert [c[0] for c in model.calls] == [8] * 4 + [4] + [5] * 7 + [1]  # 36 slices in batches
    np.testing.assert_array_equal(part[:, :, box[0], box[1]], whole[:, :, box[0], box[1]])
    outside = np.ones(hu.shape[1:], bool)
    outside[box] = False
    assert (part[0][:, outside] == 1).all() and not part[1:][:, :, outside].any()
    # A box at the image's edge is padded with air to a multiple of 16; None is the whole slice.
    edge = predict_grid(model, hu, z_spacing, box=(slice(40, 64), slice(0, 64)))
    assert model.calls[-1][1:] == (seg.IN_CHANNELS, 32, 64)  # rows 32-63, then 8 rows of air
    np.testing.assert_array_equal(edge[:, :, 32:], whole[:, :, 32:])
    np.testing.assert_array_equal(predict_grid(model, hu, z_spacing), whole)


def test_locate_spine_boxes_the_located_column_with_a_margin_and_a_least_width():
    grid = to_network_grid(_column_case("synthetic_0").ct)  # bone in rows and columns 20-43
    hu, spacing = grid.array, grid.spacing_zyx
    assert locate_spine(_BoneIsSpine(), hu, spacing, margin_mm=6.0, min_mm=0.0) == (slice(16, 48),) * 2
    assert locate_spine(_BoneIsSpine(), hu, spacing, margin_mm=6.0, min_mm=60.0) == (slice(12, 52),) * 2
    assert locate_spine(_BoneIsSpine(), hu, spacing) == (slice(0, 64),) * 2  # 240 mm > the 96 mm image
    # Near the border: grown to the least width, then shifted back inside the image.
    corner = np.full((5, 64, 64), -1000.0, np.float32)
    corner[:, 2:10, 50:60] = 600.0
    assert locate_spine(_BoneIsSpine(), corner, spacing, margin_mm=0.0, min_mm=30.0) == \
        (slice(0, 20), slice(44, 64))
    assert locate_spine(_BoneIsSpine(), np.full_like(hu, -1000.0), spacing) is None


def test_vnet_on_the_located_spine_matches_whole_slices(real_case):
    # The shipped V-Net (default) runs on the box the shipped U-Net finds: same masks as on whole slices.
    from SpineInpaintLib.evaluation.metrics import overlap as metrics

    ct, labels = real_case
    assert seg.DEFAULT_NETWORK == "vnet"
    model, _ = seg.load_model()
    located = segment_volume(ct, model=model)
    whole = segment_volume(ct, model=model, locator=None)
    assert located.net == whole.net == "vnet"
    assert "locate" in located.timings and "locate" not in whole.timings
    assert metrics.dice(located.spine.array > 0, whole.spine.array > 0) >= 0.99
    assert np.mean(located.labels.array == whole.labels.array) >= 0.999
    truth = (labels.array >= 25) & (labels.array <= 50)
    assert metrics.dice(located.spine.array > 0, truth) >= 0.90


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(SpineInpaintError, match="segmentation weights not found"):
        seg.load_model("unet", tmp_path / "nope.safetensors")


# --- loss, splits -----------------------------------------------------------------------------------------
def test_loss_prefers_the_right_answer():
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:20, 8:20] = 5
    right = torch.full((2, seg.N_CLASSES, 32, 32), -10.0)
    right.scatter_(1, target.unsqueeze(1), 10.0)
    wrong = torch.full((2, seg.N_CLASSES, 32, 32), -10.0)
    wrong[:, 0] = 10.0
    loss = segmentation_loss()
    assert float(loss(right, target)) < 0.05 < 1.0 < float(loss(wrong, target))


def test_boundary_weight_adds_the_spine_mask_s_binary_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, seg.N_CLASSES, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 5:12] = 3
    added = float(segmentation_loss(2.0)(logits, target)) - float(segmentation_loss()(logits, target))
    # By hand: p(spine) = 1 - softmax(...)[background], mean binary cross-entropy against any vertebra.
    p = 1.0 - torch.softmax(logits.double(), dim=1)[:, 0]
    y = (target > 0).double()
    bce = float(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
    assert added == pytest.approx(2.0 * bce, rel=1e-4)
    with pytest.raises(SpineInpaintError, match="boundary weight must be >= 0, got -1"):
        segmentation_loss(-1.0)


def test_folds_partition_cases_and_test_split_stays_out(tiny_cache):
    ids = [f"phantom_{k:04d}" for k in range(200)]
    folds = [st.fold_of(i, 10) for i in ids]
    assert set(folds) == set(range(10)) and folds == [st.fold_of(i, 10) for i in ids]
    cases = st.load_cache(tiny_cache)
    train, val = st.assign_splits(cases)
    assert {c.case_id for c in train} == {"synthetic_0", "synthetic_1"}
    assert {c.case_id for c in val} == {"synthetic_32"}
    seen = []
    for k in range(3):
        tr, va = st.assign_splits(cases, folds=3, fold=k)
        assert not {c.case_id for c in tr} & {c.case_id for c in va}
        seen += [c.case_id for c in va]
    assert sorted(seen) == sorted(c.case_id for c in cases)
    with pytest.raises(SpineInpaintError, match="--fold must be in"):
        st.assign_splits(cases, folds=3, fold=3)


# --- training: checkpoints, resume, weights, CLI, torchrun ------------------------------------------------
def test_train_resume_and_weights_roundtrip(tiny_cache, tmp_path):
    out = tmp_path / "run"
    kwargs = dict(net="unet", out=out, cache=tiny_cache, steps_per_epoch=2, batch_size=2, crop=32, seed=3,
                  threads=1, progress=False, val_per_case=2)
    first = st.train_segmentation(st.SegmentationTrainConfig(epochs=1, **kwargs))
    assert first["epoch"] == 1
    # An interrupted run resumes from the epoch-1 checkpoint and only trains epoch 2.
    second = st.train_segmentation(st.SegmentationTrainConfig(epochs=2, **kwargs))
    assert second["epoch"] == 2
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,train_iou,val_iou") and len(rows) == 3
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert (out / "curves.png").stat().st_size > 0
    meta = json.loads((out / "unet.json").read_text())
    assert meta["training"]["seed"] == 3 and meta["training"]["steps"] == 4 and len(meta["sha256"]) == 64
    model, meta2 = seg.load_model("unet", out / "unet.safetensors")
    assert meta2["architecture"]["net"] == "unet"
    with pytest.raises(SpineInpaintError, match="trained with seed 3"):
        st.train_segmentation(st.SegmentationTrainConfig(epochs=3, **{**kwargs, "seed": 4}))


def test_init_starts_from_given_weights_and_records_them(tiny_cache, tmp_path):
    kwargs = dict(net="unet", cache=tiny_cache, steps_per_epoch=1, batch_size=2, crop=32, seed=3, threads=1,
                  progress=False, val_per_case=2)
    st.train_segmentation(st.SegmentationTrainConfig(out=tmp_path / "a", epochs=1, **kwargs))
    source = tmp_path / "a" / "unet.safetensors"
    # No training step at all: the exported weights are exactly the ones it started from.
    st.train_segmentation(st.SegmentationTrainConfig(out=tmp_path / "b", epochs=1, max_steps=0, init=source, **kwargs))
    from safetensors.numpy import load_file

    a, b = load_file(str(source)), load_file(str(tmp_path / "b" / "unet.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "b" / "unet.json").read_text())
    assert meta["training"]["init"] == str(source) and meta["training"]["real_weight"] == 1.0


def test_weights_carry_their_grid_to_segment_volume(tmp_path, monkeypatch):
    # A cache and a run on a 1.0 mm grid: the weights record it, load_model reads it back and
    # segment_volume resamples the CT to it (64 pixels of 1.5 mm -> 96 of 1 mm).
    cache = tmp_path / "cache10"
    for case_id in ("synthetic_0", "synthetic_32"):
        info = st.cache_case(_column_case(case_id), cache, grid_mm=1.0)
        assert info["grid_mm"] == 1.0 and info["shape_zyx"] == [36, 96, 96]
    kwargs = dict(steps_per_epoch=1, batch_size=1, crop=32, seed=0, threads=1, progress=False, val_per_case=1)
    st.train_segmentation(st.SegmentationTrainConfig(net="unet", out=tmp_path / "run", cache=cache, epochs=1,
                                                     grid_mm=1.0, **kwargs))
    model, meta = seg.load_model("unet", tmp_path / "run" / "unet.safetensors")
    assert meta["preprocessing"]["grid_mm"] == 1.0 and model.spine_grid_mm == 1.0
    seen = []

    def background_only(model_, hu, z_spacing, **_):
        seen.append(hu.shape)
        probs = np.zeros((seg.N_CLASSES,) + hu.shape, np.float16)
        probs[0] = 1.0
        return probs

    monkeypatch.setattr(seg_inference, "predict_grid", background_only)
    case = _column_case("synthetic_0")
    with pytest.warns(UserWarning, match="no spine"):
        result = segment_volume(case.ct, model=model)
    assert seen == [(36, 96, 96)] and result.spine.same_grid(case.ct)
    # Weights without a recorded grid (written before it was recorded) run on the old fixed grid.
    model_old = seg.build_network("unet").eval()
    with pytest.warns(UserWarning, match="no spine"):
        segment_volume(case.ct, model=model_old)
    assert seen[-1] == (36, 64, 64)


def test_a_cache_of_another_grid_is_refused(tiny_cache, tmp_path, capsys):
    with pytest.raises(SpineInpaintError, match="holds cases on a 1.5 mm grid, not 1 mm"):
        st.train_segmentation(st.SegmentationTrainConfig(net="unet", out=tmp_path / "run", cache=tiny_cache, epochs=1,
                                                         grid_mm=1.0, threads=1, progress=False))
    assert not (tmp_path / "run").exists()
    assert all(c.grid_mm == 1.5 for c in st.load_cache(tiny_cache, 1.5))
    # A case cached before the grid was recorded holds the then fixed 1.5 mm grid.
    assert st.CachedCase(tiny_cache, {"case_id": "x", "z_spacing": 2.5}).grid_mm == 1.5
    # On the command line: refused before any phantom is built.
    assert cli_main(["train", "segmentation", "--cache", str(tiny_cache), "--grid-mm", "1.0", "--phantoms", "3",
                     "--out", str(tmp_path / "cli")]) == 2
    assert "holds cases on a 1.5 mm grid, not 1 mm: use another --cache" in capsys.readouterr().err
    assert sorted(c.case_id for c in st.load_cache(tiny_cache)) == ["synthetic_0", "synthetic_1", "synthetic_32"]
    assert cli_main(["train", "segmentation", "--grid-mm", "0.1"]) == 2
    assert "segmentation pixel size must be between 0.25 and 4 mm, got 0.1" in capsys.readouterr().err

def test_real_weight_draws_real_scans_more_often(tiny_cache):
    cases = st.load_cache(tiny_cache)
    cases[0].source = "real"
    plain = st.CropSampler(cases, crop=32, augment=False).weights
    heavy = st.CropSampler(cases, crop=32, augment=False, real_weight=4.0).weights
    share = lambda w: w[0] / w.sum()  # noqa: E731
    odds = lambda p: p / (1 - p)  # noqa: E731
    assert odds(share(heavy)) == pytest.approx(4.0 * odds(share(plain)))


def test_low_resolution_augmentation_blurs_the_image_only():
    # Moved to the shared domain randomisation: --low-resolution sets its in-plane resolution probability.
    rng = np.random.default_rng(0)
    ct = io.Volume(rng.normal(0.0, 200.0, (6, 64, 64)).astype(np.float32), (1.5, 1.5, 2.0))
    labels = ct.with_array((rng.random((6, 64, 64)) > 0.5).astype(np.uint8))
    domain = st.SegmentationTrainConfig(net="unet", out="o", cache="c", low_resolution=1.0).domain_config()
    only = augment.DomainRandomisation.off(in_plane_probability=domain.in_plane_probability)
    out, out_labels, record = augment.randomise_domain(ct, labels, 0, only)
    assert record["in_plane_zoom"] is not None and out.shape == ct.shape
    np.testing.assert_array_equal(out_labels.array, labels.array)
    # Down-sampling then up-sampling removes fine detail: less variance between neighbouring pixels.
    assert np.abs(np.diff(out.array, axis=-1)).mean() < 0.8 * np.abs(np.diff(ct.array, axis=-1)).mean()
    assert [type(t).__name__ for t in train_transforms(0).transforms] == ["RandAffined", "RandFlipd"]


def test_cli_train_segmentation_single_process(tiny_cache, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["train", "segmentation", "--net", "vnet", "--cache", str(tiny_cache), "--phantoms", "0",
                     "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1",
                     "--crop", "32", "--threads", "1", "--max-steps", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["epoch"] == 1
    assert (out / "vnet.safetensors").exists() and (out / "checkpoint.pt").exists()


def test_cli_train_rejects_bad_arguments(capsys):
    assert cli_main(["train", "segmentation", "--crop", "100"]) == 2
    assert "--crop must be a multiple of 16" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--folds", "10", "--fold", "10"]) == 2
    assert "--fold must be in [0, 9]" in capsys.readouterr().err
    assert cli_main(["train"]) == 2
    assert cli_main(["train", "segmentation", "--real-weight", "0"]) == 2
    assert "--real-weight must be > 0" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--init", "missing.safetensors"]) == 2
    assert "--init weights not found" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--low-resolution", "1.5"]) == 2
    assert "--low-resolution must be a probability in [0, 1], got 1.5" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--intensity-augment", "-0.1"]) == 2
    assert "--intensity-augment must be a probability in [0, 1], got -0.1" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--boundary-weight", "-1"]) == 2
    assert "--boundary-weight must be >= 0, got -1" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--varied-phantoms", "-2"]) == 2
    assert "--varied-phantoms must be >= 0, got -2" in capsys.readouterr().err
    assert cli_main(["train", "segmentation", "--real", "dcmqi_ct3slice"]) == 2
    assert "real case 'dcmqi_ct3slice' has no vertebra labels" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_cache, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "SpineInpaintLib", "train", "segmentation", "--net", "unet", "--cache", str(tiny_cache),
           "--phantoms", "0", "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "1",
           "--crop", "32", "--device", "cpu", "--threads", "1", "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].rstrip().endswith(",2")  # world_size column
    assert json.loads((out / "unet.json").read_text())["training"]["world_size"] == 2


def test_intensity_augmentation_remaps_the_image_monotonically_and_keeps_the_label():
    # Moved to the shared domain randomisation: --intensity-augment sets its gamma probability.
    rng = np.random.default_rng(1)
    ramp = np.linspace(-1000.0, 1500.0, 64, dtype=np.float32)
    ct = io.Volume(np.broadcast_to(ramp, (4, 64, 64)).copy(), (1.5, 1.5, 2.0))
    labels = ct.with_array((rng.random((4, 64, 64)) > 0.5).astype(np.uint8))
    domain = st.SegmentationTrainConfig(net="unet", out="o", cache="c", intensity=1.0).domain_config()
    only = augment.DomainRandomisation.off(gamma_probability=domain.gamma_probability)
    changed = 0
    for seed in range(5):
        out, out_labels, _ = augment.randomise_domain(ct, labels, seed, only)
        np.testing.assert_array_equal(out_labels.array, labels.array)
        # One mapping for every voxel, and it keeps the order of the values (bone stays brighter).
        np.testing.assert_allclose(out.array, np.broadcast_to(out.array[0, 0], ct.shape), atol=1e-3)
        assert np.all(np.diff(out.array[0, 0]) >= -1e-3)
        changed += not np.allclose(out.array, ct.array, atol=1.0)
    assert changed >= 4
