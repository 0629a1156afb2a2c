"""lesions_focal: several focal lesions per scan (lytic with remnants, soft-tissue mass, blastic nodules) in the
body, pedicle and posterior elements, C1-S1; the classic contract (bit-identical outside the mask, tight boxes),
the appearance of each kind, errors and the simulator registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import vertebra_id
from SpineInpaintLib.data import lesion_textures as textures
from SpineInpaintLib.data import lesions, lesions_focal
from SpineInpaintLib.data.lesion_geometry import _vertebra_geometry, _working_box
from SpineInpaintLib.data.lesions_focal import (
    FOCAL_KINDS,
    LOCATIONS,
    SIMULATORS,
    random_focal_lesion,
    random_lesion_from,
    simulate_focal_lesions,
)
from SpineInpaintLib.data.phantom import PhantomConfig, make_phantom
from SpineInpaintLib.data.real import load_real_case

L2, L3, C1, C3 = 30, 29, 50, 48
#: Label ids a mass may replace: unlabelled tissue, the paravertebral muscles and non-TotalSegmentator ids.
MASS_LABELS = [0] + list(range(80, 90))


@pytest.fixture(scope="module")
def phantom():
    """A small phantom, 1.5 x 1.5 x 2 mm, holding L2 and L3 whole."""
    ph = make_phantom(PhantomConfig(seed=1, shape_xy=(128, 128), spacing_xy=1.5, slice_thickness=2.0,
                                    levels=("L2", "L3")))
    return ph.ct, ph.labels


@pytest.fixture(scope="module")
def neck():
    """The real neck CT s0003 (1.5 mm, C1-T3) and its label map in TotalSegmentator v2 ids."""
    return load_real_case("s0003")


def _check_contract(sim, ct, labels) -> None:
    """Bit-identical outside the mask, every changed voxel in it, masks nested, params JSON-ready."""
    mask = sim.mask.array.astype(bool)
    assert sim.mask.array.dtype == np.uint8 and mask.any()
    assert sim.ct.array.dtype == ct.array.dtype and sim.ct.same_grid(ct) and sim.mask.same_grid(ct)
    assert np.array_equal(sim.ct.array[~mask], ct.array[~mask])
    assert not ((sim.ct.array != ct.array) & ~mask).any()
    lesion = sim.lesion_mask.array.astype(bool)
    assert lesion.any() and not (lesion & ~mask).any()
    assert not (sim.bone_destroyed.array.astype(bool) & ~lesion).any()
    assert np.array_equal(sim.healthy_ct.array, ct.array) and np.array_equal(sim.healthy_labels.array, labels.array)
    assert sim.params["simulator"] == "focal" and len(sim.params["lesions"]) == sim.params["count"]
    json.dumps(sim.manifest())


def _recorded(sim, index: int = 0) -> dict:
    return sim.params["lesions"][index]


# --- the contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FOCAL_KINDS)
@pytest.mark.parametrize("location", LOCATIONS)
def test_every_kind_and_location_changes_only_the_mask_on_a_phantom(phantom, kind, location):
    ct, labels = phantom
    sim = simulate_focal_lesions(ct, labels, 4, levels="L3", kinds=kind, locations=location, sizes=0.5)
    _check_contract(sim, ct, labels)
    assert sim.level == L3 and sim.lesion_type == kind and _recorded(sim)["location"] == location
    # The lesion did change the scan.
    assert np.mean(sim.ct.array[sim.mask.array == 1] != ct.array[sim.mask.array == 1]) > 0.5


def test_boxes_are_tight_around_the_mask(phantom):
    ct, labels = phantom
    sim = simulate_focal_lesions(ct, labels, 2, levels=["L2", "L3"], count=2,
                                 kinds=["soft_tissue_mass", "lytic_remnant"], collapse=0.2, locations="body")
    mask = sim.mask.array.astype(bool)
    zs, ys, xs = np.nonzero(mask)
    assert sim.box_3d == (zs.min(), ys.min(), xs.min(), zs.max() + 1, ys.max() + 1, xs.max() + 1)
    assert sorted(sim.boxes_2d) == sorted(set(zs.tolist()))
    for z, (x1, y1, x2, y2) in sim.boxes_2d.items():
        rows, cols = np.nonzero(mask[z])
        assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    corners = np.array([[a, b, c] for a in (zs.min() - 0.5, zs.max() + 0.5) for b in (ys.min() - 0.5, ys.max() + 0.5)
                        for c in (xs.min() - 0.5, xs.max() + 0.5)])
    lps = ct.index_to_physical(corners)
    np.testing.assert_allclose(sim.box_3d_lps[0], lps.min(axis=0))
    np.testing.assert_allclose(sim.box_3d_lps[1], lps.max(axis=0))


def test_inputs_are_untouched_and_the_healthy_truth_is_a_copy(phantom):
    ct, labels = phantom
    ct_before, labels_before = ct.array.copy(), labels.array.copy()
    sim = simulate_focal_lesions(ct, labels, 7, levels="L3", count=3, collapse=0.3, locations="body")
    for bad in ({"kinds": "nope"}, {"count": 0}, {"levels": "C5"}):
        with pytest.raises(SpineInpaintError):
            simulate_focal_lesions(ct, labels, 7, **bad)
    assert np.array_equal(ct.array, ct_before) and np.array_equal(labels.array, labels_before)
    sim.healthy_ct.array[0, 0, 0] += 1  # a copy: writing to it leaves the caller's volume alone
    assert ct.array[0, 0, 0] == ct_before[0, 0, 0]
    assert not np.shares_memory(sim.ct.array, ct.array)


def test_the_same_seed_gives_the_same_result(phantom):
    ct, labels = phantom
    first, again = (simulate_focal_lesions(ct, labels, 11, count=2) for _ in range(2))
    assert np.array_equal(first.ct.array, again.ct.array) and np.array_equal(first.mask.array, again.mask.array)
    assert first.params == again.params
    other = simulate_focal_lesions(ct, labels, 12, count=2)
    assert not np.array_equal(first.ct.array, other.ct.array)


def _reoriented(ct, labels, how: str):
    """The phantom stored with its rows flipped (the same patient) or with an oblique direction (a rotated one)."""
    if how == "flipped":
        step = ct.direction @ np.diag(ct.spacing)
        origin = np.asarray(ct.origin) + step[:, 1] * (ct.shape[1] - 1)
        direction = ct.direction.copy()
        direction[:, 1] *= -1
        array, label_array = ct.array[:, ::-1], labels.array[:, ::-1]
    else:
        angle = np.deg2rad(25.0)
        tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
        direction, origin, array, label_array = tilt @ ct.direction, ct.origin, ct.array, labels.array
    out = io.Volume(array.astype(np.float64) + 0.25, ct.spacing, origin, direction)
    return out, out.with_array(label_array.copy())


@pytest.mark.parametrize("how", ["flipped", "tilted"])
def test_a_float64_scan_in_any_orientation_keeps_its_bits_and_its_anatomy(phantom, how):
    ct, labels = _reoriented(*phantom, how)
    sim = simulate_focal_lesions(ct, labels, 3, levels="L3", kinds="blastic_nodular", locations="pedicle")
    _check_contract(sim, ct, labels)
    geo = _independent_frame(ct, labels, L3)
    assert _frame_v(geo, _recorded(sim)["centre_lps"]) < np.percentile(geo.region.v[geo.body], 5)
    if how == "tilted":  # the spine leans 25 degrees: the frame follows it
        superior = np.asarray(_recorded(sim)["axes_lps"]["superior"])
        assert abs(float(superior @ [0.0, -np.sin(np.deg2rad(25.0)), np.cos(np.deg2rad(25.0))])) > 0.95


# --- appearance --------------------------------------------------------------------------------------------
def test_lytic_remnant_is_tumour_hu_with_surviving_struts(phantom, neck):
    for (ct, labels), level in ((phantom, "L3"), (neck, "C3")):
        sim = simulate_focal_lesions(ct, labels, 5, levels=level, kinds="lytic_remnant", sizes=0.6,
                                     locations="body")
        record = _recorded(sim)
        tumour = sim.bone_destroyed.array == 1
        assert tumour.sum() > 30
        low, high = textures.REMNANT_FRACTION
        assert low - 0.02 <= record["remnant_fraction"] <= high
        # Independently, inside the tumour's soft edge: struts are the voxels well above the tumour's HU, about
        # as many as recorded; the rest is tumour tissue.
        inner = ndimage.binary_erosion(tumour)
        values = sim.ct.array[inner].astype(float)
        struts = values > record["tumour_hu"] + 45.0
        assert abs(struts.mean() - record["remnant_fraction"]) < 0.12
        assert abs(np.median(values[~struts]) - record["tumour_hu"]) < 20.0
        assert 10.0 <= record["tumour_hu"] <= 70.0
        # Healthy cancellous bone there was denser than what replaced it.
        assert ct.array[tumour].mean() > sim.ct.array[tumour].mean() + 40.0


def test_a_sclerotic_rim_is_brighter_than_the_bone_it_reinforces(phantom):
    ct, labels = phantom
    sims = (simulate_focal_lesions(ct, labels, seed, levels="L3", kinds="lytic_remnant", locations="body")
            for seed in range(20))
    sim = next(s for s in sims if _recorded(s)["rim"])
    rim = (sim.lesion_mask.array == 1) & (sim.bone_destroyed.array == 0)
    assert rim.sum() > 10
    added = sim.ct.array[rim].astype(float) - ct.array[rim].astype(float)
    assert added.min() >= textures.RIM_HU[0] - 1.0 and added.mean() <= textures.RIM_HU[1] + 100.0
    assert np.all(labels.array[rim] == L3)  # the rim is reinforced bone of the vertebra


def test_soft_tissue_mass_is_soft_tissue_grown_into_allowed_tissue(phantom, neck):
    for (ct, labels), level in ((phantom, "L3"), (neck, "C3")):
        sim = simulate_focal_lesions(ct, labels, 6, levels=level, kinds="soft_tissue_mass", sizes=0.6)
        record = _recorded(sim)
        mass = sim.lesion_mask.array == 1
        assert sim.destructive and record["extraosseous_ml"] > 0
        assert 10.0 <= sim.ct.array[mass].mean() <= 80.0
        outside = mass & (labels.array != vertebra_id(level))
        assert np.isin(labels.array[outside], MASS_LABELS + list(range(118, 256))).all()
        assert (ct.array[outside] >= lesions._MASS_HU[0]).all() and (ct.array[outside] <= lesions._MASS_HU[1]).all()


def _mass_radius(sim, ct) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ellipsoid radius and HU of the mass's extra-osseous voxels, in the simulator's frame and axes."""
    record = _recorded(sim)
    axes = np.array([record["axes_lps"][k] for k in ("lateral", "anterior", "superior")])
    index = np.argwhere((sim.lesion_mask.array == 1) & (sim.healthy_labels.array != sim.level))  # off the bone
    frame_mm = (ct.index_to_physical(index) - np.asarray(record["frame_origin_lps"])) @ axes.T
    q = np.sqrt((((frame_mm - record["mass_centre_frame_mm"]) / record["semi_axes_mm"]) ** 2).sum(axis=1))
    return q, sim.ct.array[tuple(index.T)].astype(float)


def test_soft_tissue_mass_has_a_necrotic_centre_darker_than_its_rim(phantom):
    ct, labels = phantom
    checked = 0
    for seed in range(20):
        sim = simulate_focal_lesions(ct, labels, seed, levels="L3", kinds="soft_tissue_mass", locations="body")
        q, values = _mass_radius(sim, ct)
        if not _recorded(sim)["necrosis"] or (q < 0.2).sum() < 4:
            continue  # no necrosis drawn, or the centre fell in tissue a mass may not replace
        assert np.median(values[q < 0.2]) < np.median(values[(q > 0.75) & (q < 0.95)]) - 10.0
        checked += 1
    assert checked >= 2


def test_blastic_nodules_are_dense_and_never_darken_the_bone(phantom, neck):
    for (ct, labels), level in ((phantom, "L3"), (neck, "C3")):
        sim = simulate_focal_lesions(ct, labels, 8, levels=level, kinds="blastic_nodular", sizes=0.6)
        lesion = sim.lesion_mask.array == 1
        values = np.sort(sim.ct.array[lesion].astype(float))
        assert 600.0 <= values[len(values) // 2:].mean() <= 1400.0 + 100.0
        assert (sim.ct.array[lesion].astype(float) >= ct.array[lesion]).all()
        assert (labels.array[lesion] == vertebra_id(level)).all() and not sim.destructive
        assert 3 <= len(_recorded(sim)["nodules"]) <= 7


# --- locations and levels ------------------------------------------------------------------------------
def _independent_frame(ct, labels, level):
    """The classic simulator's frame and body of ``level`` (a reference the focal one is checked against)."""
    objects = lesions._label_boxes(labels.array)
    return _vertebra_geometry(ct, labels.array, objects, level, _working_box(ct, objects[level - 1], 5.0))


def _frame_v(geo, lps) -> float:
    """Anterior coordinate (mm) of an LPS point in the classic frame."""
    return float((np.asarray(lps) - geo.region.centre) @ geo.region.axes[1])


@pytest.mark.parametrize("location", ["pedicle", "posterior"])
def test_pedicle_and_posterior_lesions_sit_behind_the_body(phantom, neck, location):
    for (ct, labels), level in ((phantom, L3), (neck, C3)):
        geo = _independent_frame(ct, labels, level)
        wall = np.percentile(geo.region.v[geo.body], 5)
        vs = []
        for seed in range(3):
            sim = simulate_focal_lesions(ct, labels, seed, levels=level, kinds="lytic_remnant", locations=location)
            record = _recorded(sim)
            assert record["part"] in ("pedicle", "posterior elements")
            vs.append(_frame_v(geo, record["centre_lps"]))
            assert vs[-1] < wall and record["centre_frame_mm"][1] < record["body_wall_v_mm"]
            if location == "pedicle":  # LPS +x is the patient's left
                lateral = float((np.asarray(record["centre_lps"]) - geo.region.centre) @ [1.0, 0.0, 0.0])
                assert (lateral > 0) == (record["side"] == "left") and abs(lateral) > 3.0
        body = simulate_focal_lesions(ct, labels, 0, levels=level, kinds="lytic_remnant", locations="body")
        assert _frame_v(geo, _recorded(body)["centre_lps"]) > max(vs)


def test_two_lesions_at_two_levels_and_two_in_one_vertebra(phantom):
    ct, labels = phantom
    sim = simulate_focal_lesions(ct, labels, 9, levels=["L3", "L2"], count=2, kinds=["blastic_nodular",
                                                                                   "lytic_remnant"])
    _check_contract(sim, ct, labels)
    assert sim.level == L3 and sim.lesion_type == "blastic_nodular" and sim.params["levels"] == [L3, L2]
    assert [r["level"] for r in sim.params["lesions"]] == [L3, L2]
    lesion = sim.lesion_mask.array == 1
    assert (lesion & (labels.array == L2)).any() and (lesion & (labels.array == L3)).any()
    same = simulate_focal_lesions(ct, labels, 9, levels="L3", count=2, kinds="blastic_nodular")
    _check_contract(same, ct, labels)
    assert [r["level"] for r in same.params["lesions"]] == [L3, L3]
    single = simulate_focal_lesions(ct, labels, 9, levels="L3", count=1, kinds="blastic_nodular")
    assert same.mask.array.sum() > single.mask.array.sum()


def test_every_kind_works_on_the_real_neck_at_c3_and_at_c1(neck):
    ct, labels = neck
    for kind in FOCAL_KINDS:
        _check_contract(simulate_focal_lesions(ct, labels, 1, levels="C3", kinds=kind), ct, labels)
    # C1 has no body: a body lesion goes to a lateral mass, off the midline, not into the canal.
    sim = simulate_focal_lesions(ct, labels, 1, levels="C1", kinds="lytic_remnant", locations="body", sizes=0.5)
    _check_contract(sim, ct, labels)
    record = _recorded(sim)
    assert record["part"] == "lateral mass" and abs(record["centre_frame_mm"][0]) > 8.0
    assert (labels.array[sim.lesion_mask.array == 1] == C1).all()
    with pytest.raises(SpineInpaintError, match="C1 has no vertebral body"):
        simulate_focal_lesions(ct, labels, 1, levels="C1", collapse=0.2)


def test_a_collapse_keeps_the_guarantee(phantom):
    ct, labels = phantom
    sim = simulate_focal_lesions(ct, labels, 3, levels="L3", kinds="lytic_remnant", locations="body", collapse=0.3)
    _check_contract(sim, ct, labels)
    assert sim.collapse == 0.3 and sim.params["collapse_lost_mm"] > 0
    assert sim.mask.array.sum() > sim.lesion_mask.array.sum()


# --- errors ----------------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(phantom):
    ct, labels = phantom
    empty = labels.with_array(np.zeros_like(labels.array))
    cropped = io.Volume(labels.array[:, :-1], labels.spacing, labels.origin, labels.direction)
    cases = [
        (lambda: simulate_focal_lesions(ct, empty, 0), "empty"),
        (lambda: simulate_focal_lesions(ct, labels, 0, levels="C5"), "no vertebra C5"),
        (lambda: simulate_focal_lesions(ct, labels, 0, levels="X9"), "unknown vertebra"),
        (lambda: simulate_focal_lesions(ct, labels, 0, kinds="lytic"), "unknown focal lesion kind"),
        (lambda: simulate_focal_lesions(ct, labels, 0, locations="skull"), "unknown lesion location"),
        (lambda: simulate_focal_lesions(ct, labels, 0, count=0), "count must be"),
        (lambda: simulate_focal_lesions(ct, labels, 0, count=-2), "count must be"),
        (lambda: simulate_focal_lesions(ct, labels, 0, count=2, levels=["L2", "L3", "L3"]), "3 entries"),
        (lambda: simulate_focal_lesions(ct, labels, 0, sizes=1.5), "size"),
        (lambda: simulate_focal_lesions(ct, labels, 0, collapse=0.9), "collapse"),
        (lambda: simulate_focal_lesions(ct, cropped, 0), "different grids"),
        (lambda: random_focal_lesion(ct, labels, 0, kinds=["sclerotic"]), "unknown focal lesion kind"),
        (lambda: random_lesion_from("nope", ct, labels, 0), "unknown lesion simulator"),
    ]
    for call, words in cases:
        with pytest.raises(SpineInpaintError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


# --- random draws and the registry ----------------------------------------------------------------------
def test_random_focal_lesions_draw_counts_kinds_and_locations(phantom):
    ct, labels = phantom
    sims = [random_focal_lesion(ct, labels, seed, levels=["L2", "L3"]) for seed in range(12)]
    for sim in sims:
        _check_contract(sim, ct, labels)
        assert set(sim.params["levels"]) <= {L2, L3}
    assert {s.params["count"] for s in sims} >= {1, 2}
    assert len({r["location"] for s in sims for r in s.params["lesions"]}) >= 2
    only = random_focal_lesion(ct, labels, 3, kinds=["blastic_nodular"])
    assert set(only.params["kinds"]) == {"blastic_nodular"}


def test_random_focal_lesions_on_the_3mm_real_scan_keep_the_contract(real_case):
    ct, labels = real_case
    for seed in range(6):
        sim = random_focal_lesion(ct, labels, seed)
        _check_contract(sim, ct, labels)
        assert all(25 < level <= 50 for level in sim.params["levels"])  # never the sacrum unless asked


def test_random_draws_follow_their_weights(phantom, monkeypatch):
    ct, labels = phantom
    calls = []
    monkeypatch.setattr(lesions_focal, "simulate_focal_lesions", lambda *args, **kwargs: calls.append(kwargs))
    for seed in range(400):
        random_focal_lesion(ct, labels, seed)
    counts = np.array([kw["count"] for kw in calls])
    assert all(len(kw["levels"]) == len(kw["kinds"]) == len(kw["locations"]) == kw["count"] for kw in calls)
    for count, share in ((1, 0.7), (2, 0.2), (3, 0.1)):
        assert abs(np.mean(counts == count) - share) < 0.06
    locations = [loc for kw in calls for loc in kw["locations"]]
    for location, share in (("body", 0.6), ("pedicle", 0.2), ("posterior", 0.2)):
        assert abs(np.mean([loc == location for loc in locations]) - share) < 0.07
    kinds = [kind for kw in calls for kind in kw["kinds"]]
    assert all(abs(np.mean([k == kind for k in kinds]) - 1 / 3) < 0.08 for kind in FOCAL_KINDS)
    assert abs(np.mean([kw["collapse"] > 0 for kw in calls]) - 0.2) < 0.06
    assert all(0.1 <= kw["collapse"] <= 0.4 for kw in calls if kw["collapse"] > 0)
    assert all(abs(level - kw["levels"][0]) <= 3 for kw in calls for level in kw["levels"])


def test_simulators_are_picked_by_name_and_say_which_they_are(phantom):
    ct, labels = phantom
    assert set(SIMULATORS) == {"classic", "focal"}
    classic = random_lesion_from("classic", ct, labels, 1, levels=["L3"])
    assert classic.params["simulator"] == "classic" and classic.lesion_type in lesions.LESION_TYPES
    focal = random_lesion_from("focal", ct, labels, 1, levels=["L3"])
    assert focal.params["simulator"] == "focal" and focal.lesion_type in FOCAL_KINDS
