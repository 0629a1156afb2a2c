"""Procedural spine CT phantoms: reproducibility, geometry in physical space, anatomy, HU calibration
against the real TotalSegmentator example scan, the shared tissue definitions, and bad requests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import THORACOLUMBAR
from SpineInpaintLib.data.phantom import config as ph
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.data.phantom.tissues import body_outline, compare_with_real, disc_mask, tissue_hu_statistics

# A coarse grid keeps each phantom around a second or two; the anatomy is defined in mm, so the
# coarse phantom has the same anatomy as a clinical-resolution one.
SMALL = dict(shape_xy=(128, 128), spacing_xy=2.0, slice_thickness=3.0)
#: HU tolerance of the "done when" criterion: max(25 % of the real mean, 25 HU).
REL_TOL, ABS_TOL = 0.25, 25.0


@pytest.fixture(scope="module")
def small_phantom() -> ph.Phantom:
    return make_phantom(ph.PhantomConfig(seed=3, **SMALL))


@pytest.fixture(scope="module")
def abdomen_phantom() -> ph.Phantom:
    """The default anatomy on a 410 mm field of view at 1.6 mm / 3 mm (the whole body in view)."""
    return make_phantom(ph.PhantomConfig(shape_xy=(256, 256), spacing_xy=1.6, slice_thickness=3.0))


def _centroid_lps(vol: io.Volume, mask: np.ndarray) -> np.ndarray:
    return vol.index_to_physical(np.argwhere(mask).mean(0))[0]


def _to_local(level: ph.SpineLevel, pts: np.ndarray) -> np.ndarray:
    """(u, v, w) of LPS points in a vertebra's frame."""
    return (pts - level.center) @ level.frame


# --- reproducibility ---------------------------------------------------------------------------
def test_same_seed_gives_identical_volumes(small_phantom):
    again = make_phantom(ph.PhantomConfig(seed=3, **SMALL))
    assert np.array_equal(again.ct.array, small_phantom.ct.array)
    assert np.array_equal(again.labels.array, small_phantom.labels.array)
    assert again.ct.same_grid(small_phantom.ct)


def test_different_seed_gives_different_volumes(small_phantom):
    other = make_phantom(ph.PhantomConfig(seed=4, **SMALL))
    diff = np.abs(other.ct.array.astype(np.int32) - small_phantom.ct.array.astype(np.int32))
    assert np.mean(diff > 0) > 0.5  # at least the noise differs almost everywhere
    assert not np.array_equal(other.labels.array, small_phantom.labels.array)  # and the textures/anatomy


def test_random_config_is_reproducible_varied_and_within_the_clinical_ranges():
    # range(70) holds seed 65, whose draw once gave a body deeper than wide (refused by validate).
    configs = [ph.PhantomConfig.random(s) for s in range(70)]
    assert ph.PhantomConfig.random(5) == configs[5]
    for c in configs:
        c.validate()
        assert 0.5 <= c.spacing_xy <= 1.0 and 1.0 <= c.slice_thickness <= 3.0
        assert abs(c.scoliosis_deg) <= 15.0 and c.shape_xy == (512, 512)
    for field in ("spacing_xy", "slice_thickness", "lordosis_deg", "scoliosis_deg", "vertebra_scale",
                  "noise_hu"):
        assert len({getattr(c, field) for c in configs}) > 5, field
    assert sum(abs(c.scoliosis_deg) >= 5 for c in configs) >= 10  # a share of scoliotic spines
    assert ph.PhantomConfig.random(5, n_slices=7).n_slices == 7


# --- grid and labels ------------------------------------------------------------------------------
def test_grid_is_as_requested(small_phantom):
    ct, lab = small_phantom.ct, small_phantom.labels
    assert ct.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert ct.same_grid(lab)
    assert ct.spacing == (2.0, 2.0, 3.0)
    assert ct.size_xyz[:2] == (128, 128)
    assert np.array_equal(ct.direction, np.eye(3))
    origin = (-100.0, -80.0, round(float(small_phantom.level("L3").center[2])) - 15.0)
    p = make_phantom(ph.PhantomConfig(seed=3, origin=origin, n_slices=12, levels=("L3",), **SMALL))
    assert p.ct.origin == origin and p.ct.shape == (12, 128, 128)


def test_every_requested_level_is_labelled(small_phantom):
    present = small_phantom.levels_in_view()
    for level in THORACOLUMBAR:
        assert level in present
        assert np.count_nonzero(small_phantom.labels.array == level) * 12.0 > 20_000  # > 20 cm^3 of bone
    only = make_phantom(ph.PhantomConfig(seed=3, levels=("L2", "L3"), **SMALL))
    assert {30, 29} <= set(only.levels_in_view())
    assert only.ct.shape[0] < small_phantom.ct.shape[0]  # the field of view follows the request


def test_sacrum_plate_makes_the_lower_sacrum_a_wide_plate_bowed_forward():
    """``sacrum_plate``: the lower sacrum about 90 mm wide (a real one), not ~60 mm of bodies; off, the
    phantom is the one drawn before the option existed (checked by hash against the previous commit)."""
    cfg = dict(seed=3, levels=("sacrum", "S1"), shape_xy=(192, 192), spacing_xy=1.5, slice_thickness=3.0)
    widths = {}
    for plate in (False, True):
        p = make_phantom(ph.PhantomConfig(sacrum_plate=plate, **cfg))
        sacrum = p.labels.array == 25
        s2 = next(lv for lv in p.centerline if lv.name == "sacrum")  # placed at S2
        u, v, w = _to_local(s2, p.ct.index_to_physical(np.argwhere(sacrum))).T
        low = (w >= -50.0) & (w < -30.0)  # S4-S5
        widths[plate] = np.ptp(u[low])
        if plate:
            mid, side = low & (np.abs(u) < 8.0), low & (np.abs(u) > 30.0)
            # the plate's sides lie in front of its middle (v points back)
            assert np.median(v[side]) < np.median(v[mid]) - 3.0
    assert widths[True] > 85.0 and widths[False] < 65.0, widths
    with pytest.raises(SpineInpaintError, match="sacrum_plate must be True or False"):
        make_phantom(ph.PhantomConfig(sacrum_plate="yes", **cfg))


@pytest.mark.parametrize("plate", [False, True])
def test_sacroiliac_joint_brings_each_ilium_to_the_sacrum_across_a_joint_space(plate):
    """``sacroiliac_joint``: each ilium meets the sacrum and S1 over a broad surface (as in a real
    pelvis) but never touches them: a 2.5 mm joint space stays; off, only a sliver comes that near."""
    from scipy import ndimage

    cfg = dict(seed=3, levels=("sacrum", "S1"), shape_xy=(192, 192), spacing_xy=1.5, slice_thickness=3.0,
               sacrum_plate=plate)
    near = {}
    for joint in (False, True):
        lab = make_phantom(ph.PhantomConfig(sacroiliac_joint=joint, **cfg)).labels.array
        dist = ndimage.distance_transform_edt(~np.isin(lab, [25, 26]), sampling=(3.0, 1.5, 1.5))
        for hip in (77, 78):  # hip_left, hip_right
            d = dist[lab == hip]
            near[joint, hip] = int((d < 6.0).sum())  # ilium voxels within 6 mm of the sacrum
            if joint:
                assert d.min() >= 2.5, (hip, d.min())  # the joint space is kept open
    for hip in (77, 78):
        assert near[True, hip] > 3 * near[False, hip] and near[True, hip] > 500, near
    with pytest.raises(SpineInpaintError, match="sacroiliac_joint must be True or False"):
        make_phantom(ph.PhantomConfig(sacroiliac_joint=1, **cfg))


def test_sacrum_upright_runs_the_sacrum_down_with_its_tip_turned_forward():
    """``sacrum_upright``: a real sacrum's kyphosis (~110 mm tall, the coccyx tip in front of the
    sacrum's back); off, the old one that bends back toward the horizontal, ~55 mm tall."""
    cfg = dict(seed=3, levels=("sacrum", "S1"), shape_xy=(192, 192), spacing_xy=1.5, slice_thickness=3.0)
    for upright in (False, True):
        p = make_phantom(ph.PhantomConfig(sacrum_upright=upright, **cfg))
        x, y, z = p.ct.index_to_physical(np.argwhere(p.labels.array == 25)).T  # LPS: y points back
        tip_y = np.median(y[z < z.min() + 10.0])  # the lowest 10 mm
        if upright:
            assert np.ptp(z) > 95.0 and tip_y < y.max() - 30.0, (np.ptp(z), tip_y, y.max())
        else:
            assert np.ptp(z) < 70.0 and tip_y > y.max() - 25.0, (np.ptp(z), tip_y, y.max())
        assert 25 in p.levels_in_view()
    with pytest.raises(SpineInpaintError, match="sacrum_upright must be True or False"):
        ph.PhantomConfig(sacrum_upright="no", **cfg).validate()


def test_sacrum_level_extends_the_field_of_view_into_the_pelvis(small_phantom):
    """``levels=("sacrum", ...)`` covers S2-S5 (label 25) to its lowest voxel, with the ilium beside it."""
    pelvic = make_phantom(ph.PhantomConfig(seed=3, levels=("sacrum", "S1"), **SMALL))
    lab = pelvic.labels.array
    sacrum_slices = np.nonzero((lab == 25).any(axis=(1, 2)))[0]
    assert sacrum_slices.size and sacrum_slices.min() > 0  # the sacrum ends inside the field of view
    s1_only = make_phantom(ph.PhantomConfig(seed=3, levels=("S1",), **SMALL))
    # The same anatomy (same seed): in physical z the pelvic field of view starts > 25 mm lower.
    assert pelvic.ct.origin[2] < s1_only.ct.origin[2] - 25.0
    low = set(np.unique(lab[: sacrum_slices.max()]).tolist())
    assert {75, 76, 77, 78} <= low  # femur_left / femur_right heads, hip_left / hip_right
    assert not np.isin(s1_only.labels.array, (75, 76)).any()  # the hip joints lie below an S1 field of view
    assert 34 not in pelvic.levels_in_view()  # still only what was asked for (no T10)


def test_tissue_labels_use_totalsegmentator_ids(small_phantom):
    present = set(np.unique(small_phantom.labels.array).tolist())
    for name in ("spinal_cord", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
                 "intervertebral_disc", "subcutaneous_fat", "deep_fat", "table", "rib_left_12",
                 "rib_right_11", "aorta", "kidney_left", "liver", "sacrum", "hip_left"):
        assert ph.TISSUE_LABELS[name] in present, name
    # left is the patient's left, +x in LPS
    lab = small_phantom.labels
    for left, right in ((86, 87), (88, 89), (3, 2), (103, 115)):
        assert _centroid_lps(lab, lab.array == left)[0] > 0 > _centroid_lps(lab, lab.array == right)[0]
    ts = ph.totalsegmentator_labels(lab)
    assert ts.array.max() <= 117 and np.array_equal(ts.array == 29, lab.array == 29)


def test_anatomy_is_in_place(small_phantom):
    """Table posterior to the body, spine posterior in the body, canal behind the vertebral bodies,
    aorta in front of the spine and on the left, liver on the right, lungs only in the upper part."""
    lab = small_phantom.labels
    y = {k: _centroid_lps(lab, lab.array == v)[1] for k, v in
         (("table", 205), ("spine", 29), ("cord", 79), ("aorta", 52), ("fat", 201), ("bowel", 18))}
    assert y["table"] > y["cord"] > y["spine"] > y["aorta"] and y["spine"] > y["bowel"]
    assert _centroid_lps(lab, lab.array == 52)[0] > 0 > _centroid_lps(lab, lab.array == 5)[0]
    z_lung = _centroid_lps(lab, np.isin(lab.array, (11, 14)))[2]
    assert z_lung > small_phantom.level("T12").center[2] > small_phantom.level("L3").center[2]


# --- geometry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing, thickness", [(2.0, 3.0), (1.0, 1.5)])
def test_vertebral_bodies_sit_on_the_configured_centreline(spacing, thickness):
    """The centroid of each vertebral body (the label voxels inside the body's local box) lies on
    the centreline pose, whatever the grid: within one voxel across the spine and along it."""
    n = int(round(256 / spacing))
    p = make_phantom(ph.PhantomConfig(seed=1, shape_xy=(n, n), spacing_xy=spacing,
                                         slice_thickness=thickness, scoliosis_deg=12.0,
                                         axial_rotation_deg=8.0, levels=("L4", "L1")))
    lab = p.labels
    for name in ("L4", "L3", "L2", "L1"):
        lev = p.level(name)
        pts = lab.index_to_physical(np.argwhere(lab.array == lev.label))
        _, v, w = _to_local(lev, pts).T
        body = (v < 0.5 * lev.depth / 2) & (np.abs(w) < lev.height / 2 + 2)
        c = _to_local(lev, pts[body].mean(0)[None])[0]
        assert abs(c[0]) < spacing and abs(c[2]) < thickness, (name, c)
        # in v the body is an ellipse cut at 0.5 of its half depth: centroid ~0.17 half-depths anterior
        assert abs(c[1] + 0.17 * lev.depth / 2) < max(spacing, 1.5), (name, c)


def test_centreline_is_independent_of_the_grid():
    a = make_phantom(ph.PhantomConfig(seed=2, **SMALL))
    b = make_phantom(ph.PhantomConfig(seed=2, shape_xy=(96, 96), spacing_xy=1.0, slice_thickness=1.0,
                                         levels=("L3",), noise_hu=0.0))
    for la, lb in zip(a.centerline, b.centerline):
        assert np.allclose(la.center, lb.center) and np.allclose(la.frame, lb.frame)
    # and the labels agree in physical space: L3's centroid within one coarse voxel
    ca = _centroid_lps(a.labels, a.labels.array == 29)
    cb = _centroid_lps(b.labels, b.labels.array == 29)
    assert np.all(np.abs(ca - cb) < np.array([2.0, 2.0, 3.0]))


def test_lordosis_and_kyphosis_follow_the_config():
    p = make_phantom(ph.PhantomConfig(seed=0, lordosis_deg=52.0, kyphosis_deg=9.0, levels=("S1", "L1"),
                                         **SMALL))
    tilt = {lev.name: lev.tilt_deg[0] for lev in p.centerline}
    assert tilt["L1"] - tilt["S1"] == pytest.approx(52.0, abs=1e-6)
    assert tilt["L1"] - tilt["T10"] == pytest.approx(9.0, abs=1e-6)
    # measured on the labels: the chord between adjacent centroids turns by the lordosis less the
    # halves of the end discs' shares (0.36/2 + 0.09/2 of it); the posterior elements shift each
    # centroid, so compare two lordoses to cancel that offset
    turn = {}
    for lordosis in (30.0, 55.0):
        q = make_phantom(ph.PhantomConfig(seed=0, lordosis_deg=lordosis, levels=("S1", "L1"), **SMALL))
        c = {i: _centroid_lps(q.labels, q.labels.array == i) for i in (26, 27, 30, 31)}
        chord = [math.degrees(math.atan2(b[1] - a[1], b[2] - a[2]))
                 for a, b in ((c[26], c[27]), (c[30], c[31]))]
        turn[lordosis] = chord[1] - chord[0]
    assert turn[55.0] - turn[30.0] == pytest.approx(25.0 * (1 - 0.225), abs=4.0)


def _coronal_cobb(p: ph.Phantom) -> float:
    """Cobb angle (deg) from the label centroids: the spread of the chord angles between adjacent
    vertebrae in the coronal plane (x against z)."""
    cents = [_centroid_lps(p.labels, p.labels.array == lev) for lev in THORACOLUMBAR]
    angles = [math.degrees(math.atan2(b[0] - a[0], b[2] - a[2])) for a, b in zip(cents[:-1], cents[1:])]
    return max(angles) - min(angles), cents


@pytest.mark.parametrize("cobb", [15.0, -10.0, 0.0])
def test_scoliosis_measured_on_the_labels_matches_the_config(cobb):
    p = make_phantom(ph.PhantomConfig(seed=0, scoliosis_deg=cobb, scoliosis_apex="L1", **SMALL))
    measured, cents = _coronal_cobb(p)
    assert measured == pytest.approx(abs(cobb), abs=3.0)
    if cobb:
        # positive = convex to the left: the apex (L1) lies left (+x) of the end vertebrae's chord
        apex, lo, hi = cents[5], cents[2], cents[8]
        chord_x = lo[0] + (hi[0] - lo[0]) * (apex[2] - lo[2]) / (hi[2] - lo[2])
        assert np.sign(apex[0] - chord_x) == np.sign(cobb)


def test_axial_rotation_turns_the_apical_vertebra():
    p = make_phantom(ph.PhantomConfig(seed=0, axial_rotation_deg=12.0, scoliosis_apex="L2", levels=("L2",),
                                         shape_xy=(128, 128), spacing_xy=1.0, slice_thickness=2.0))
    lev = p.level("L2")
    # the spinous process (far posterior part of the label) points 12 deg to the patient's right
    pts = p.labels.index_to_physical(np.argwhere(p.labels.array == 30))
    far = pts[(pts - lev.center) @ lev.frame[:, 1] > 45.0]
    d = far.mean(0) - lev.center
    angle = math.degrees(math.atan2(-d[0], d[1]))
    assert angle == pytest.approx(12.0, abs=3.0)


# --- intensities --------------------------------------------------------------------------------
def test_tissue_hu_before_noise_and_blur():
    """Noise-free nominal values: cortex 700-1500, cancellous core 150-350 with texture, disc 70-100."""
    cfg = ph.PhantomConfig(seed=0, noise_hu=0.0, blur_mm=0.0, cortical_mm=2.5, levels=("L3",),
                           shape_xy=(128, 128), spacing_xy=0.5, slice_thickness=1.0)
    p = make_phantom(cfg)
    lev = p.level("L3")
    mask = p.labels.array == 29
    pts = p.labels.index_to_physical(np.argwhere(mask))
    u, v, w = _to_local(lev, pts).T
    hu = p.ct.array[mask].astype(float)
    a, b, hc = lev.width / 2, lev.depth / 2, lev.height / 2
    core = ((u / (a - 7)) ** 2 + (v / (b - 7)) ** 2 < 1) & (np.abs(w) < hc - 6)
    assert core.sum() > 1000
    assert 150 <= hu[core].mean() <= 350 and abs(hu[core].mean() - cfg.cancellous_hu) < 15
    assert 15 < hu[core].std() < 60  # trabecular texture, bounded
    assert np.all((hu[core] >= 100) & (hu[core] <= 400))
    # a 2.5 mm shell is resolved at 0.5 mm: its plateau is the nominal cortical value
    cortical = np.percentile(hu, 99)
    assert 700 <= cortical <= 1500 and cortical == pytest.approx(cfg.cortical_hu, rel=0.08)
    disc = p.ct.array[p.labels.array == ph.TISSUE_LABELS["intervertebral_disc"]]
    assert 70 <= np.median(disc) <= 100


def test_noise_level_in_soft_tissue():
    p = make_phantom(ph.PhantomConfig(seed=0, noise_hu=15.0, levels=("L3",), **SMALL))
    quiet = make_phantom(ph.PhantomConfig(seed=0, noise_hu=0.0, levels=("L3",), **SMALL))
    diff = p.ct.array.astype(float) - quiet.ct.array.astype(float)
    assert diff.std() == pytest.approx(15.0, rel=0.1)


def test_air_table_and_body_on_a_full_field_of_view(abdomen_phantom):
    ct, lab = abdomen_phantom.ct.array, abdomen_phantom.labels.array
    assert ct[:, :5, :5].mean() < -950 and (lab[:, :5, :5] == 0).all()  # air in the corner
    body = body_outline(abdomen_phantom.ct)
    assert not body[lab == ph.TISSUE_LABELS["table"]].any()  # the table is apart from the body
    assert body[lab == 29].all() and body[np.isin(lab, (11, 14))].all()  # lungs filled in


def test_hu_statistics_match_the_real_scan(real_case, abdomen_phantom):
    """Done-when of issue 3: bone, disc, muscle and fat means of the phantom, measured on the real
    scan's 3 mm grid, within max(25 %, 25 HU) of the real scan's."""
    real_ct, real_lab = real_case
    result = compare_with_real(abdomen_phantom, real_ct, real_lab)
    for tissue in ("bone", "disc", "muscle", "fat"):
        r = result[tissue]
        assert r["real_n"] > 1000 and r["phantom_n"] > 1000, tissue
        assert r["tolerance"] == max(REL_TOL * abs(r["real_mean"]), ABS_TOL)
        assert abs(r["phantom_mean"] - r["real_mean"]) <= r["tolerance"], (tissue, r)
    # the real scan's own numbers (a regression guard on the measurement definitions)
    assert result["bone"]["real_mean"] == pytest.approx(189.4, abs=1.0)
    assert result["muscle"]["real_mean"] == pytest.approx(27.2, abs=1.0)


# --- the shared tissue definitions on hand-made volumes ----------------------------------------------
def test_disc_mask_is_the_anterior_gap_between_adjacent_vertebrae():
    lab = np.zeros((20, 30, 10), np.uint8)
    lab[2:8, 5:25, 2:8] = 28  # L4, z 2..7
    lab[11:17, 5:25, 2:8] = 29  # L3 above it, gap z 8..10
    vol = io.Volume(lab, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    disc = disc_mask(vol)
    # both centroids lie at row 14.5 (P = 14.5 mm): only rows 5..14 of the gap count
    expected = np.zeros_like(disc)
    expected[8:11, 5:15, 2:8] = True
    assert np.array_equal(disc, expected)
    # a gap longer than 20 mm is not a disc; non-adjacent ids are not paired
    lab2 = lab.copy()
    lab2[11:17][lab2[11:17] == 29] = 30
    assert not disc_mask(io.Volume(lab2, spacing=(1.0, 1.0, 2.0))).any()
    assert not disc_mask(io.Volume(lab, spacing=(1.0, 1.0, 8.0))).any()


def test_disc_mask_follows_the_direction_matrix():
    lab = np.zeros((20, 30, 10), np.uint8)
    lab[2:8, 5:25, 2:8] = 29  # superior vertebra at low index: the z axis runs inferior
    lab[11:17, 5:25, 2:8] = 28
    flipped = np.diag([1.0, 1.0, -1.0])
    disc = disc_mask(io.Volume(lab, spacing=(1.0, 1.0, 2.0), direction=flipped))
    assert disc[8:11].any() and disc.sum() == 3 * 10 * 6


def test_fat_is_counted_inside_the_body_outline_only():
    ct = np.full((4, 40, 40), -1000, np.int16)
    ct[:, 5:35, 5:35] = -100  # body: fat
    ct[:, 15:25, 15:25] = -1000  # gas inside the body: a hole, filled for the outline
    ct[:, 0:2, :] = -100  # a thin strip apart from the body (the "table"): not the body
    labels = io.Volume(np.zeros_like(ct, dtype=np.uint8))
    vol = io.Volume(ct)
    body = body_outline(vol)
    assert body[:, 15:25, 15:25].all() and not body[:, 0:2].any()
    stats = tissue_hu_statistics(vol, labels)
    assert stats["fat"]["n"] == 4 * (30 * 30 - 10 * 10) and stats["fat"]["mean"] == -100.0
    assert math.isnan(stats["bone"]["mean"]) and stats["bone"]["n"] == 0


# --- bad requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(shape_xy=(0, 512)), "shape_xy"),
        (dict(shape_xy=(512,)), "shape_xy"),
        (dict(n_slices=0), "n_slices"),
        (dict(spacing_xy=0.1), "spacing_xy"),
        (dict(spacing_xy=float("nan")), "spacing_xy"),
        (dict(slice_thickness=9.0), "slice_thickness"),
        (dict(levels=("L3", "L6")), "unknown level"),
        (dict(levels=("L9",)), "unknown level"),
        (dict(levels=()), "levels is empty"),
        (dict(scoliosis_deg=25.0), "scoliosis_deg"),
        (dict(scoliosis_apex="S1"), "scoliosis_apex"),
        (dict(lordosis_deg=120.0), "lordosis_deg"),
        (dict(seed=-1), "seed"),
        (dict(body_depth_mm=400.0, body_width_mm=300.0), "body_depth_mm"),
        (dict(n_slices=600, slice_thickness=3.0), "models only"),
        (dict(origin=(0.0, 0.0, 5000.0), n_slices=10), "models only"),
    ],
)
def test_bad_requests_raise_a_clear_error(change, message):
    with pytest.raises(SpineInpaintError, match=message):
        make_phantom(ph.PhantomConfig(**{**SMALL, **change}))


def test_bad_overrides_and_unknown_level_names():
    with pytest.raises(SpineInpaintError, match="unknown phantom option"):
        make_phantom(colour="red")
    with pytest.raises(SpineInpaintError, match="PhantomConfig"):
        make_phantom({"seed": 1})
    p = make_phantom(ph.PhantomConfig(seed=0, levels=("L3",), **SMALL))
    with pytest.raises(SpineInpaintError, match="not modelled"):
        p.level("C2")


# --- full size ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_phantom_512x512x100():
    """The benchmark grid (0.8 mm, 2.5 mm slices) and the default anatomy at clinical resolution."""
    p = make_phantom(ph.PhantomConfig(seed=0, n_slices=100))
    assert p.ct.shape == (100, 512, 512) and p.ct.spacing == (0.8, 0.8, 2.5)
    assert len(p.levels_in_view()) >= 7
    soft = p.ct.array[p.labels.array == ph.TISSUE_LABELS["iliopsoas_left"]]
    assert 10 < soft.mean() < 70
