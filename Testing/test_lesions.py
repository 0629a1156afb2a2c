"""lesions: simulated metastases on real CT, the bit-identical guarantee, boxes, geometry and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.data.lesions import LESION_TYPES, estimate_noise_std, random_lesion, simulate_lesion
from SpineInpaintLib.data.real import load_real_case

L3, T11, T12 = 29, 33, 32
#: Labels a destructive mass may replace (unlabelled tissue and the paravertebral muscles).
MASS_LABELS = [0] + list(range(80, 90))


@pytest.fixture(scope="module")
def dicom_case():
    """The TotalSegmentator DICOM series: 0.98 x 0.98 x 2 mm, identity direction, T12 and T11."""
    return load_real_case("totalsegmentator_dicom")


@pytest.fixture(scope="module")
def lesions_l3(real_case):
    """One simulation per kind on L3 of the 3 mm scan, shared by the tests below."""
    ct, labels = real_case
    return {
        "lytic": simulate_lesion(ct, labels, "L3", "lytic", seed=1),
        "lytic_destructive": simulate_lesion(ct, labels, "L3", "lytic", destructive=True, seed=1),
        "sclerotic": simulate_lesion(ct, labels, L3, "sclerotic", seed=2),
        "mixed_destructive": simulate_lesion(ct, labels, L3, "mixed", destructive=True, size=0.8, seed=3),
    }


def _outside_unchanged(sim) -> bool:
    outside = sim.mask.array == 0
    return np.array_equal(sim.ct.array[outside], sim.healthy_ct.array[outside])


# --- the guarantee: every voxel outside the mask is bit-identical -----------------------------------
@pytest.mark.parametrize("kind", ["lytic", "lytic_destructive", "sclerotic", "mixed_destructive"])
def test_voxels_outside_the_mask_are_bit_identical_on_the_real_scan(real_case, lesions_l3, kind):
    ct, labels = real_case
    sim = lesions_l3[kind]
    assert sim.mask.array.dtype == np.uint8 and sim.mask.array.any()
    assert sim.ct.array.dtype == ct.array.dtype
    assert sim.ct.same_grid(ct) and sim.mask.same_grid(ct) and sim.bone_destroyed.same_grid(ct)
    outside = sim.mask.array == 0
    assert np.array_equal(sim.ct.array[outside], ct.array[outside])
    # ... and the lesion did change the scan.
    inside = sim.mask.array == 1
    assert np.mean(sim.ct.array[inside] != ct.array[inside]) > 0.9


def test_inputs_are_not_modified_and_the_healthy_truth_is_a_copy(real_case):
    ct, labels = real_case
    ct_before, labels_before = ct.array.copy(), labels.array.copy()
    sim = simulate_lesion(ct, labels, "L2", "mixed", destructive=True, collapse=0.2, seed=7)
    assert np.array_equal(ct.array, ct_before) and np.array_equal(labels.array, labels_before)
    assert np.array_equal(sim.healthy_ct.array, ct_before)
    assert np.array_equal(sim.healthy_labels.array, labels_before)
    sim.healthy_ct.array[0, 0, 0] += 1  # a copy: writing to it leaves the caller's volume alone
    assert ct.array[0, 0, 0] == ct_before[0, 0, 0]
    assert not np.shares_memory(sim.ct.array, ct.array)


# --- tissue values --------------------------------------------------------------------------------
def test_lytic_bone_becomes_soft_tissue(lesions_l3):
    for kind in ("lytic", "lytic_destructive"):
        sim = lesions_l3[kind]
        destroyed = sim.bone_destroyed.array == 1
        assert destroyed.sum() > 50
        assert 0.0 <= sim.ct.array[destroyed].mean() <= 80.0
        # Healthy trabecular bone of this scan is denser than the tumour that replaced it.
        assert sim.healthy_ct.array[destroyed].mean() > sim.ct.array[destroyed].mean() + 40.0


def test_sclerotic_bone_becomes_dense(lesions_l3):
    sim = lesions_l3["sclerotic"]
    destroyed = sim.bone_destroyed.array == 1
    assert sim.ct.array[destroyed].mean() > 700.0
    assert 800.0 <= sim.params["sclerotic_hu"] <= 1500.0


def test_mixed_lesion_holds_both_lytic_and_sclerotic_tissue(lesions_l3):
    sim = lesions_l3["mixed_destructive"]
    values = sim.ct.array[sim.bone_destroyed.array == 1]
    assert np.mean(values < 150) > 0.15 and np.mean(values > 700) > 0.15
    # The extra-osseous mass is soft tissue.
    mass = (sim.mask.array == 1) & (sim.healthy_labels.array != L3)
    assert -50.0 < sim.ct.array[mass].mean() < 120.0


def test_lesion_texture_carries_the_scan_noise(real_case, lesions_l3):
    ct, labels = real_case
    sim = lesions_l3["lytic"]
    # Independent reading: the fine-grained noise inside the liver (id 5), away from its edges.
    data = ct.array.astype(np.float32)
    liver = ndimage.binary_erosion(labels.array == 5, iterations=2)
    residual = (data - ndimage.uniform_filter(data, size=3))[liver]
    liver_sigma = 1.4826 * np.median(np.abs(residual - np.median(residual))) / np.sqrt(26 / 27)
    assert sim.params["noise_std_hu"] == pytest.approx(liver_sigma, rel=0.3)
    assert sim.ct.array[sim.mask.array == 1].std() > 10.0  # not a flat fill


@pytest.mark.parametrize("mean_hu", [-110.0, 50.0])  # fat, soft tissue
@pytest.mark.parametrize("sigma", [5.0, 12.0, 25.0])
def test_noise_estimate_recovers_white_noise(mean_hu, sigma):
    rng = np.random.default_rng(0)
    volume = mean_hu + rng.normal(0.0, sigma, size=(20, 50, 50))
    assert estimate_noise_std(volume) == pytest.approx(sigma, rel=0.05)


def test_noise_estimate_ignores_tissue_edges_and_bone():
    rng = np.random.default_rng(1)
    volume = rng.normal(0.0, 8.0, size=(20, 48, 48))
    stripes = (np.arange(48) // 4) % 2 == 0  # fat and soft tissue in 4-voxel stripes: edges everywhere
    volume += np.where(stripes, -100.0, 50.0)[None, None, :]
    assert estimate_noise_std(volume) == pytest.approx(8.0, rel=0.05)
    assert estimate_noise_std(np.full((10, 10, 10), 2000.0)) == 0.0  # no fat or soft tissue to measure


# --- shape: intact cortex, destroyed cortex, position in the body ---------------------------------
def test_non_destructive_lesion_keeps_the_cortex(lesions_l3):
    for kind in ("lytic", "sclerotic"):
        sim = lesions_l3[kind]
        vert = sim.healthy_labels.array == L3
        mask = sim.mask.array == 1
        # 3 mm voxels: a 2 mm cortex is one voxel, so the mask lies in the label eroded once.
        assert not np.any(mask & ~ndimage.binary_erosion(vert))
        assert np.array_equal(sim.bone_destroyed.array, sim.mask.array)
        assert sim.params["extraosseous_ml"] == 0.0


def test_destructive_lesion_breaks_the_cortex_into_soft_tissue(lesions_l3):
    for kind in ("lytic_destructive", "mixed_destructive"):
        sim = lesions_l3[kind]
        vert = sim.healthy_labels.array == L3
        mask = sim.mask.array == 1
        outside = mask & ~vert
        assert outside.sum() >= 5
        # The mass touches the bone it broke out of ...
        assert np.any(outside & ndimage.binary_dilation(vert))
        # ... through the outermost bone layer (the cortex), which the lesion replaced.
        cortex = vert & ~ndimage.binary_erosion(vert)
        assert np.any(mask & cortex & ndimage.binary_dilation(outside))
        # It grew only into soft tissue: no air, no other bone, no organ or vessel.
        assert np.all(np.isin(sim.healthy_labels.array[outside], MASS_LABELS))
        healthy = sim.healthy_ct.array[outside]
        assert healthy.min() >= -250 and healthy.max() <= 250
        np.testing.assert_array_equal(sim.bone_destroyed.array, (mask & vert).astype(np.uint8))


def test_lesion_sits_in_the_vertebral_body_anterior_of_the_canal(real_case, lesions_l3):
    ct, labels = real_case
    sim = lesions_l3["lytic"]
    vert_centre = ct.index_to_physical(np.argwhere(labels.array == L3).mean(axis=0))[0]
    lesion_centre = ct.index_to_physical(np.argwhere(sim.mask.array == 1).mean(axis=0))[0]
    # LPS: anterior is -y. The body is the front of the vertebra, the arch behind it.
    assert lesion_centre[1] < vert_centre[1] - 5.0
    anterior = np.asarray(sim.params["axes_lps"]["anterior"])
    assert sim.params["anterior_from"] == "vertebra shape"
    assert anterior @ np.array([0.0, -1.0, 0.0]) > 0.9


def test_frame_is_physical_not_tied_to_the_array_layout(real_case):
    """The same scan stored with flipped rows and columns (identity direction) gives the same frame."""
    ct, labels = real_case
    flip = (slice(None), slice(None, None, -1), slice(None, None, -1))
    ny, nx = ct.shape[1:]
    origin = ct.index_to_physical([[0, ny - 1, nx - 1]])[0]
    direction = ct.direction @ np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(direction, np.eye(3))
    ct2 = io.Volume(ct.array[flip].copy(), ct.spacing, origin, direction)
    labels2 = io.Volume(labels.array[flip].copy(), ct.spacing, origin, direction)
    a = simulate_lesion(ct, labels, L3, seed=0)
    b = simulate_lesion(ct2, labels2, L3, seed=0)
    for axis in ("lateral", "anterior", "superior"):
        np.testing.assert_allclose(a.params["axes_lps"][axis], b.params["axes_lps"][axis], atol=1e-3)
    np.testing.assert_allclose(a.params["body_half_extents_mm"], b.params["body_half_extents_mm"], atol=1e-2)


# --- boxes ----------------------------------------------------------------------------------------
def test_boxes_are_tight_on_every_slice_and_in_3d(lesions_l3):
    sim = lesions_l3["mixed_destructive"]
    mask = sim.mask.array == 1
    slices_with_mask = set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())
    assert set(sim.boxes_2d) == slices_with_mask
    for z, (x1, y1, x2, y2) in sim.boxes_2d.items():
        rows, cols = np.nonzero(mask[z])
        assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        inside = np.zeros_like(mask[z])
        inside[y1:y2, x1:x2] = True
        assert not np.any(mask[z] & ~inside)
    zz, yy, xx = np.nonzero(mask)
    assert sim.box_3d == (zz.min(), yy.min(), xx.min(), zz.max() + 1, yy.max() + 1, xx.max() + 1)


def test_3d_box_in_lps_covers_the_outer_faces_of_the_mask_voxels(lesions_l3):
    sim = lesions_l3["lytic_destructive"]
    centres = sim.ct.index_to_physical(np.argwhere(sim.mask.array == 1))
    half = np.asarray(sim.ct.spacing) / 2.0  # the direction is diagonal (+-1): faces are half a voxel out
    lo, hi = np.asarray(sim.box_3d_lps[0]), np.asarray(sim.box_3d_lps[1])
    np.testing.assert_allclose(lo, centres.min(axis=0) - half, atol=1e-6)
    np.testing.assert_allclose(hi, centres.max(axis=0) + half, atol=1e-6)


def test_manifest_is_json_ready(lesions_l3):
    sim = lesions_l3["mixed_destructive"]
    record = json.loads(json.dumps(sim.manifest()))
    assert record["level_name"] == "L3" and record["lesion_type"] == "mixed" and record["destructive"] is True
    assert record["seed"] == 3 and record["box_3d"] == list(sim.box_3d)
    assert len(record["boxes_2d"]) == len(sim.boxes_2d)
    assert record["mask_ml"] == pytest.approx(sim.mask.array.sum() * 27.0 / 1000.0, rel=1e-3)


# --- reproducibility --------------------------------------------------------------------------------
def test_same_seed_same_lesion_other_seed_other_lesion(real_case, lesions_l3):
    ct, labels = real_case
    again = simulate_lesion(ct, labels, "L3", "lytic", destructive=True, seed=1)
    first = lesions_l3["lytic_destructive"]
    assert np.array_equal(again.ct.array, first.ct.array)
    assert np.array_equal(again.mask.array, first.mask.array)
    assert again.params == first.params
    other = simulate_lesion(ct, labels, "L3", "lytic", destructive=True, seed=2)
    assert not np.array_equal(other.mask.array, first.mask.array)


# --- collapse -------------------------------------------------------------------------------------
def test_collapse_lowers_the_superior_endplate_and_keeps_the_inferior_one(real_case):
    """On a CT painted from the L3 label (bone 1000 HU, rest 0) the body's height is easy to read."""
    _, labels = real_case
    vert = labels.array == L3
    painted = labels.with_array(np.where(vert, 1000, 0).astype(np.int16))
    sim = simulate_lesion(painted, labels, L3, "lytic", size=0.35, collapse=0.3, seed=4)
    assert _outside_unchanged(sim)
    assert sim.mask.array.sum() > sim.lesion_mask.array.sum()  # the deformation changed more than the tumour
    # Central columns of the body: the bone (or tumour) spans fewer slices, from the same bottom.
    body_zyx = np.argwhere(sim.bone_destroyed.array == 1).mean(axis=0).round().astype(int)
    _, y, x = body_zyx
    heights_before, heights_after, bottoms = [], [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            before = np.flatnonzero(vert[:, y + dy, x + dx])
            column = (slice(None), y + dy, x + dx)
            after = np.flatnonzero((sim.ct.array[column] > 500) | (sim.lesion_mask.array[column] == 1))
            heights_before.append(before.max() - before.min() + 1)
            heights_after.append(after.max() - after.min() + 1)
            bottoms.append(after.min() - before.min())
    expected = 0.7 * np.mean(heights_before)
    assert abs(np.mean(heights_after) - expected) <= 1.0
    assert np.all(np.abs(bottoms) <= 1)
    assert sim.params["collapse_lost_mm"] == pytest.approx(0.3 * sim.params["collapse_height_mm"])


def test_float_scan_keeps_exact_bits_outside_the_mask_through_a_collapse(real_case):
    ct, labels = real_case
    fine = ct.with_array(ct.array.astype(np.float64) + 0.123456789)  # values float32 cannot hold
    sim = simulate_lesion(fine, labels, "L4", "mixed", destructive=True, collapse=0.25, seed=5)
    assert sim.ct.array.dtype == np.float64
    assert _outside_unchanged(sim)
    inside = sim.mask.array == 1
    assert np.all(sim.ct.array[inside] != fine.array[inside])  # the mask holds only changed voxels


# --- anisotropic spacing: the DICOM series --------------------------------------------------------
def test_dicom_case_with_anisotropic_voxels(dicom_case):
    ct, labels = dicom_case
    assert ct.spacing[2] == pytest.approx(2.0) and ct.spacing[0] < 1.0
    vert = labels.array == T12
    intact = simulate_lesion(ct, labels, "T12", "sclerotic", seed=0)
    assert _outside_unchanged(intact)
    # A 2 mm cortex survives: every lesion voxel lies at least ~2 mm (in mm, not voxels) inside the bone.
    depth = ndimage.distance_transform_edt(vert, sampling=ct.spacing_zyx)
    assert depth[intact.mask.array == 1].min() > 1.9
    assert intact.ct.array[intact.bone_destroyed.array == 1].mean() > 700

    broken = simulate_lesion(ct, labels, "T12", "lytic", destructive=True, seed=0)
    assert _outside_unchanged(broken)
    outside = (broken.mask.array == 1) & ~vert
    assert outside.sum() > 20 and np.any(outside & ndimage.binary_dilation(vert))
    assert 0.0 <= broken.ct.array[broken.bone_destroyed.array == 1].mean() <= 80.0
    assert broken.ct.array.dtype == np.int16


# --- random lesions for datasets ------------------------------------------------------------------
def test_random_lesion_is_seeded_and_draws_only_usable_levels(real_case):
    ct, labels = real_case
    drawn = [random_lesion(ct, labels, seed=s) for s in range(4)]
    # Not T11 (33, 2 cm^3 of bone in the scan) and not the sacrum (25) unless asked for.
    assert all(sim.level in range(26, 33) for sim in drawn)
    assert all(sim.lesion_type in LESION_TYPES and _outside_unchanged(sim) for sim in drawn)
    again = random_lesion(ct, labels, seed=2)
    assert again.params == drawn[2].params and np.array_equal(again.mask.array, drawn[2].mask.array)
    assert random_lesion(ct, labels, seed=9, levels=["L1"]).level == 31
    assert {random_lesion(ct, labels, seed=s, lesion_types=["sclerotic"]).lesion_type for s in range(3)} == {
        "sclerotic"
    }


# --- bad requests ---------------------------------------------------------------------------------
def test_errors_name_the_problem(real_case):
    ct, labels = real_case
    with pytest.raises(SpineInpaintError, match=r"no vertebra C3 \(id 48\) in the label map"):
        simulate_lesion(ct, labels, "C3")
    with pytest.raises(SpineInpaintError, match="unknown vertebra 'X9'"):
        simulate_lesion(ct, labels, "X9")
    with pytest.raises(SpineInpaintError, match="unknown lesion type 'blastic'"):
        simulate_lesion(ct, labels, "L3", "blastic")
    with pytest.raises(SpineInpaintError, match="larger than the vertebral body"):
        simulate_lesion(ct, labels, "L3", size=1.5)
    with pytest.raises(SpineInpaintError, match="collapse 0.95 is outside"):
        simulate_lesion(ct, labels, "L3", collapse=0.95)
    with pytest.raises(SpineInpaintError, match="holds 0 voxels only"):
        simulate_lesion(ct, labels, "L3", size=0.05)
    with pytest.raises(SpineInpaintError, match=r"vertebra T11 \(id 33\) is too small"):
        simulate_lesion(ct, labels, "T11")
    with pytest.raises(SpineInpaintError, match="no vertebra C3"):
        random_lesion(ct, labels, seed=0, levels=["C3"])
    with pytest.raises(SpineInpaintError, match="unknown lesion type 'osteoid'"):
        random_lesion(ct, labels, seed=0, lesion_types=["lytic", "osteoid"])


def test_errors_for_bad_volumes(real_case):
    ct, labels = real_case
    with pytest.raises(SpineInpaintError, match="label map is empty"):
        simulate_lesion(ct, labels.with_array(np.zeros_like(labels.array)), "L3")
    empty = io.Volume(np.zeros((0, 4, 4), dtype=np.int16))
    with pytest.raises(SpineInpaintError, match="the ct volume is empty"):
        simulate_lesion(empty, empty, "L3")
    cropped = io.Volume(labels.array[1:], labels.spacing, labels.origin, labels.direction)
    with pytest.raises(SpineInpaintError, match="different grids"):
        simulate_lesion(ct, cropped, "L3")
    shifted = io.Volume(labels.array, labels.spacing, (0.0, 0.0, 0.0), labels.direction)
    with pytest.raises(SpineInpaintError, match="different grids"):
        simulate_lesion(ct, shifted, "L3")
    flat = ct.copy()
    flat.array = flat.array[0]  # a 2D array slipped into a Volume after construction
    with pytest.raises(SpineInpaintError, match="must be a 3D volume"):
        simulate_lesion(flat, labels, "L3")
    with pytest.raises(SpineInpaintError, match="must be an integer label map"):
        simulate_lesion(ct, labels.with_array(labels.array.astype(np.float32)), "L3")
    with pytest.raises(SpineInpaintError, match="ct must be a Volume"):
        simulate_lesion(ct.array, labels, "L3")
