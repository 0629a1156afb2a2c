"""The whole-column phantom (C1 to the sacrum): levels and regions, ribs, chest, phases, transitional
anatomy, and the thoracolumbar phantoms it must leave voxel for voxel as they were."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError, cli
from SpineInpaintLib.data import phantom as ph
from SpineInpaintLib.data.phantom import PhantomConfig, make_phantom, parse_levels

#: Small whole-column grid: 96 x 96 at 3 mm, 4 mm slices (well under a second a phantom).
TINY = dict(shape_xy=(96, 96), spacing_xy=3.0, slice_thickness=4.0)
SMALL = dict(shape_xy=(128, 128), spacing_xy=2.0, slice_thickness=3.0)


def _digest(p: ph.Phantom) -> str:
    m = hashlib.sha256()
    m.update(p.ct.array.tobytes())
    m.update(p.labels.array.tobytes())
    return m.hexdigest()[:16]


@pytest.fixture(scope="module")
def whole() -> ph.Phantom:
    return make_phantom(PhantomConfig(seed=1, levels="C1-sacrum", shape_xy=(128, 128), spacing_xy=2.0,
                                      slice_thickness=3.0))


# --- backward compatibility -----------------------------------------------------------------------
# sha256 (first 16 hex digits) of ct + labels bytes, recorded with the thoracolumbar code before the
# whole column existed (same machine libraries: a numpy/scipy upgrade may change the last bits).
_BEFORE = {
    "fixed_0": (dict(seed=0, **SMALL), "15f892041489c659"),
    "fixed_1": (dict(seed=1, **SMALL), "22acef0feb62d1d7"),
    "sacrum_S1": (dict(seed=4, levels=("sacrum", "S1"), **SMALL), "1f16d3d799cf6d09"),
    "T11_T10_n40": (dict(seed=6, levels=("T11", "T10"), n_slices=40, **SMALL), "73a39baaf10e8776"),
    "no_contrast": (dict(seed=8, shape_xy=(96, 96), spacing_xy=3.0, slice_thickness=4.0, contrast=False),
                    "4f9720865b9a7cfd"),
}


@pytest.mark.parametrize("name", sorted(_BEFORE))
def test_thoracolumbar_phantoms_are_unchanged(name):
    kwargs, digest = _BEFORE[name]
    assert _digest(make_phantom(PhantomConfig(**kwargs))) == digest


def test_random_configs_are_unchanged():
    p = make_phantom(PhantomConfig.random(3, **SMALL))
    assert _digest(p) == "f71a4991c87357f9"
    old = {k: v for k, v in PhantomConfig.random(4).to_dict().items()
           if k not in ("thoracic_kyphosis_deg", "cervical_lordosis_deg", "arterial_hu", "myelogram_hu", "kernel",
                        "sharpening", "rib_pairs", "lumbarised_s1")}
    assert hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16] == "33ebe3139a74a181"
    # the boolean contrast reads as the portal phase and no contrast
    for flag, phase in ((True, "portal"), (False, "none")):
        a = make_phantom(PhantomConfig(seed=2, contrast=flag, levels=("L1",), **TINY))
        b = make_phantom(PhantomConfig(seed=2, contrast=phase, levels=("L1",), **TINY))
        assert _digest(a) == _digest(b)


# --- levels and regions ---------------------------------------------------------------------------
def test_region_names_and_ranges_parse():
    assert parse_levels("C1-sacrum") == parse_levels("whole") == tuple(range(25, 51))
    assert parse_levels("abdomen") == tuple(range(25, 35))
    assert parse_levels("thoracolumbar") == tuple(range(26, 36))
    assert parse_levels("neck") == tuple(range(43, 51))
    assert parse_levels("chest") == tuple(range(31, 45))
    assert parse_levels("T4-L2") == parse_levels("L2-T4") == tuple(range(30, 41))
    assert parse_levels("L1, L3") == (29, 31) and parse_levels(("C2", 27)) == (27, 49)
    assert PhantomConfig(levels="neck").level_ids() == tuple(range(43, 51))


@pytest.mark.parametrize("bad", ["T13", "L1-", "C1-X", "pelvis", "L1--L2", "L1,,L2", 12.5])
def test_bad_level_strings_give_one_line_errors(bad):
    with pytest.raises(SpineInpaintError) as err:
        PhantomConfig(levels=bad).level_ids()
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_grid_must_stay_in_the_modelled_column():
    with pytest.raises(SpineInpaintError, match="models only"):
        make_phantom(PhantomConfig(levels="whole", n_slices=400, **TINY))


# --- the column -----------------------------------------------------------------------------------
def test_every_vertebra_once_in_cranio_caudal_order(whole):
    lab = whole.labels.array
    assert whole.levels_in_view() == tuple(range(25, 51))
    z = []
    vol = {}
    for v in range(25, 51):
        comp, n = ndimage.label(lab == v)
        sizes = np.bincount(comp.ravel())[1:]
        # one bone (small tips of articular processes may be cut off by the level above at 2 mm)
        assert sizes.max() >= 0.85 * sizes.sum(), f"label {v} is in pieces"
        vol[v] = int(sizes.sum())
        z.append(np.argwhere(lab == v)[:, 0].mean())
    assert np.all(np.diff(z) > 0)  # sacrum lowest, C1 highest
    cervical = np.mean([vol[v] for v in range(44, 49)])  # C7-C3
    thoracic = np.mean([vol[v] for v in range(32, 44)])
    lumbar = np.mean([vol[v] for v in range(27, 32)])
    assert cervical < thoracic < lumbar
    assert [lv.name for lv in whole.centerline][-3:] == ["C3", "C2", "C1"]


def test_ribs_touch_their_own_vertebra(whole):
    lab, spacing = whole.labels.array, whole.labels.spacing_zyx
    for n in range(1, 13):
        dist = ndimage.distance_transform_edt(lab != 44 - n, sampling=spacing)  # T_n is id 44 - n
        for rib in (91 + n, 103 + n):  # rib_left_n, rib_right_n
            mask = lab == rib
            assert mask.sum() > 50, f"rib {rib} missing"
            assert dist[mask].min() <= 3.0 + 1e-6, f"rib {rib} is {dist[mask].min():.1f} mm from T{n}"


def test_chest_view_has_sternum_shoulders_and_thorax():
    p = make_phantom(PhantomConfig(seed=2, levels="chest", **TINY))
    present = set(np.unique(p.labels.array).tolist())
    L = ph.TISSUE_LABELS
    names = ("sternum", "costal_cartilages", "clavicula_left", "clavicula_right", "scapula_left", "scapula_right",
             "heart", "aorta", "trachea", "esophagus", "lung_upper_lobe_left", "lung_lower_lobe_left",
             "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
    assert {L[n] for n in names} <= present
    ct, lab = p.ct.array, p.labels.array
    assert np.median(ct[lab == L["lung_upper_lobe_left"]]) < -700
    assert np.median(ct[lab == L["trachea"]]) < -500  # air in the airway
    assert 44 in p.levels_in_view() and 31 in p.levels_in_view()


def test_neck_view_has_skull_base_and_small_outline():
    p = make_phantom(PhantomConfig(seed=3, levels="neck", **TINY))
    lab = p.labels.array
    assert {91, 50, 49, 16, 57, 58} <= set(np.unique(lab).tolist())
    c4 = np.argwhere(lab == 47)[:, 0].mean()
    body = (p.ct.array[int(round(c4))] > -500).sum() - (lab[int(round(c4))] == 205).sum()
    assert body * 9.0 < 200 * 200  # the neck is far smaller than the trunk


# --- variety --------------------------------------------------------------------------------------
def test_myelogram_makes_the_dural_sac_bright():
    kw = dict(seed=0, levels=("L3",), shape_xy=(96, 96), spacing_xy=1.5, slice_thickness=3.0, noise_hu=0.0)
    plain = make_phantom(PhantomConfig(contrast="none", **kw))
    myelo = make_phantom(PhantomConfig(contrast="myelogram", myelogram_hu=500.0, **kw))
    sac = myelo.labels.array == ph.TISSUE_LABELS["spinal_cord"]
    assert sac.sum() > 20
    assert np.median(myelo.ct.array[sac]) > 300 and np.median(plain.ct.array[sac]) < 60


def test_arterial_phase_and_sharp_kernel():
    kw = dict(seed=0, levels=("L2",), shape_xy=(96, 96), spacing_xy=1.0, slice_thickness=3.0, noise_hu=0.0)
    art = make_phantom(PhantomConfig(contrast="arterial", arterial_hu=420.0, **kw))
    aorta = art.labels.array == ph.TISSUE_LABELS["aorta"]
    assert np.median(art.ct.array[aorta]) > 300
    soft = make_phantom(PhantomConfig(**kw)).ct.array.astype(float)
    sharp = make_phantom(PhantomConfig(kernel="sharp", **kw)).ct.array.astype(float)

    def edges(a):  # in-plane high-pass energy
        return np.abs(a - ndimage.gaussian_filter(a, (0, 1.5, 1.5))).mean()

    assert edges(sharp) > 1.3 * edges(soft)
    with pytest.raises(SpineInpaintError, match="contrast"):
        PhantomConfig(contrast="delayed").validate()


def test_transitional_anatomy_is_labelled_consistently():
    kw = dict(seed=4, levels="thoracolumbar", **TINY)
    normal = make_phantom(PhantomConfig(**kw)).labels.array
    eleven = make_phantom(PhantomConfig(rib_pairs=11, **kw)).labels.array
    thirteen = make_phantom(PhantomConfig(rib_pairs=13, **kw))
    assert 103 in normal and 115 in normal and 103 not in eleven and 115 not in eleven
    lab13 = thirteen.labels.array
    extra = lab13 == ph.TISSUE_LABELS["supernumerary_rib"]
    dist = ndimage.distance_transform_edt(lab13 != 31, sampling=thirteen.labels.spacing_zyx)
    assert extra.sum() > 20 and dist[extra].min() <= 3.0 + 1e-6  # on L1
    assert ph.totalsegmentator_labels(thirteen.labels).array[extra].max() == 0
    lumb = make_phantom(PhantomConfig(lumbarised_s1=True, **kw)).labels.array

    def disc_below_s1(lab):
        z_s1 = np.argwhere(lab == 26)[:, 0].min()
        z_sac = np.argwhere(lab == 25)[:, 0].max()
        return (lab[min(z_sac, z_s1):max(z_sac, z_s1) + 1] == 200).sum()

    assert {25, 26} <= set(np.unique(lumb).tolist())
    assert disc_below_s1(lumb) > disc_below_s1(normal) + 10  # a disc under the mobile S1


def test_random_extended_draws_are_valid_and_seeded():
    draws = [PhantomConfig.random(s, extended=True) for s in range(40)]
    for c in draws:
        c.validate()
    assert PhantomConfig.random(5, extended=True) == draws[5]
    assert {c.phase for c in draws} >= {"none", "arterial", "portal"}
    assert any(max(c.level_ids()) > 34 for c in draws) and min(c.cancellous_hu for c in draws) < 140
    p = make_phantom(PhantomConfig.random(7, extended=True, **TINY))
    assert p.levels_in_view()


def test_cli_phantom_accepts_levels(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["phantom", "--out", str(out), "--cases", "1", "--size", "64", "--lesions", "none",
                     "--levels", "neck"]) == 0
    entry = json.loads((out / "manifest.json").read_text())
    assert "neck" in json.dumps(entry)
    assert cli.main(["phantom", "--out", str(tmp_path / "bad"), "--levels", "T13"]) == 2
    assert "unknown level" in capsys.readouterr().err and not (tmp_path / "bad").exists()
