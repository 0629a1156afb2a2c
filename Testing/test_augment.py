"""The shared domain randomisation (training.augment) and its use by every trainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import vertebra_mask
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.phantom import PhantomConfig, make_phantom
from SpineInpaintLib.training import augment
from SpineInpaintLib.training.augment import DomainRandomisation, randomise_domain, randomise_pair

ORGANS = (augment.AORTA, augment.KIDNEY_RIGHT, augment.KIDNEY_LEFT, augment.SPINAL_CORD)


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom(PhantomConfig(seed=1, shape_xy=(128, 128), spacing_xy=1.5, slice_thickness=2.0,
                                    levels=("L2", "L3")))
    return ph.ct, ph.labels


@pytest.fixture(scope="module")
def lesioned():
    return datasets.real_case("totalsegmentator", seed=1, lesion_types=["lytic"])


def test_the_same_seed_gives_the_same_output_and_another_seed_another(phantom):
    ct, labels = phantom
    first, first_labels, record = randomise_domain(ct, labels, 11)
    again, again_labels, record_again = randomise_domain(ct, labels, 11)
    np.testing.assert_array_equal(first.array, again.array)
    np.testing.assert_array_equal(first_labels.array, again_labels.array)
    assert record == record_again and first.array.dtype == np.float32
    other, _, other_record = randomise_domain(ct, labels, 12)
    assert other_record != record
    assert other.shape != first.shape or not np.allclose(other.array, first.array)
    # A generator is accepted too; its draw is recorded as the seed.
    _, _, drawn = randomise_domain(ct, labels, np.random.default_rng(5))
    assert isinstance(drawn["seed"], int)


def test_the_record_is_json_ready_holds_the_seed_and_replays(phantom):
    ct, labels = phantom
    out, _, record = randomise_domain(ct, labels, 21)
    replayed = json.loads(json.dumps(record))
    assert replayed["seed"] == 21 and replayed["config"] == augment.domain_digest(DomainRandomisation())
    again, _ = augment.apply_domain(ct, labels, replayed)
    np.testing.assert_array_equal(again.array, out.array)


def test_labels_and_grid_are_unchanged_without_a_crop_or_kept_thick_slices(phantom):
    ct, labels = phantom
    config = DomainRandomisation(fov_z_probability=0.0, fov_xy_probability=0.0, keep_thick_probability=0.0)
    for seed in range(4):
        out, out_labels, _ = randomise_domain(ct, labels, seed, config)
        np.testing.assert_array_equal(out_labels.array, labels.array)
        assert out.same_grid(ct) and out_labels.same_grid(labels)


def test_inputs_are_untouched(phantom):
    ct, labels = phantom
    before_ct, before_labels = ct.array.copy(), labels.array.copy()
    everything = DomainRandomisation(**{f: 1.0 for f in DomainRandomisation.__dataclass_fields__
                                        if f.endswith("_probability")})
    randomise_domain(ct, labels, 3, everything, protect=np.zeros(ct.shape, bool))
    np.testing.assert_array_equal(ct.array, before_ct)
    np.testing.assert_array_equal(labels.array, before_labels)


def test_a_field_of_view_crop_keeps_every_voxel_at_its_lps_position(phantom):
    ct, labels = phantom
    config = DomainRandomisation.off(fov_z_probability=1.0, fov_xy_probability=1.0, fov_xy_max_cut=0.3)
    cropped = 0
    for seed in range(6):
        out, out_labels, record = randomise_domain(ct, labels, seed, config)
        if record["fov_zyx"] is None:
            continue
        cropped += 1
        assert out.shape == out_labels.shape and out.shape != ct.shape
        assert vertebra_mask(out_labels.array).any()  # the crop keeps spine
        rng = np.random.default_rng(seed)
        picks = np.argwhere(vertebra_mask(out_labels.array))
        for zyx in picks[rng.choice(len(picks), 5)]:
            source = np.rint(ct.physical_to_index(out.index_to_physical(zyx))).astype(int).reshape(-1)
            assert labels.array[tuple(source)] == out_labels.array[tuple(zyx)]
            assert ct.array[tuple(source)] == out.array[tuple(zyx)]
    assert cropped >= 4


def test_bright_structures_avoid_the_vertebrae_and_are_150_to_500_hu(phantom):
    ct, labels = phantom
    config = DomainRandomisation.off(aorta_probability=1.0, kidney_probability=1.0, ureter_probability=1.0,
                                     myelogram_probability=1.0)
    without_organs = labels.with_array(np.where(np.isin(labels.array, ORGANS), 0, labels.array))
    spine = vertebra_mask(labels.array)
    for label_map, from_label in ((without_organs, False), (labels, True)):
        for seed in (0, 1):
            out, _, record = randomise_domain(ct, label_map, seed, config)
            kinds = [s["kind"] for s in record["structures"]]
            assert kinds == ["aorta", "kidneys", "ureter", "myelogram"]
            assert [bool(s.get("from_label")) for s in record["structures"] if s["kind"] != "ureter"] == [from_label] * 3
            changed = np.abs(out.array - ct.array.astype(np.float32)) > 1e-3
            assert changed.sum() > 500 and not (changed & spine).any()
            assert out.array[changed].max() <= 500.0 + 1e-3
            for s in record["structures"]:
                assert 150.0 <= s["hu"] <= 500.0
                assert np.any(np.abs(out.array[changed] - s["hu"]) < 1e-2), s["kind"]


def test_bone_scaling_changes_bone_and_leaves_fat_and_muscle(phantom):
    ct, labels = phantom
    hu = ct.array.astype(np.float32)
    spine = vertebra_mask(labels.array)
    soft = (hu > -150) & (hu < 90)
    for scale in (0.6, 1.4):
        out, _, record = randomise_domain(ct, labels, 0, DomainRandomisation.off(bone_probability=1.0,
                                                                                   bone_scale=(scale, scale)))
        assert record["bone_scale"] == pytest.approx(scale)
        before, after = np.median(hu[spine]), np.median(out.array[spine])
        assert after - 100 == pytest.approx((before - 100) * scale, rel=0.05)
        assert np.abs(out.array[soft] - hu[soft]).max() <= 2.0


def test_noise_std_in_a_flat_region_matches_the_drawn_value():
    flat = io.Volume(np.full((24, 64, 64), 40, np.int16), (1.0, 1.0, 2.0))
    labels = flat.with_array(np.zeros(flat.shape, np.uint8))
    config = DomainRandomisation.off(noise_probability=1.0, noise_std_hu=(5.0, 30.0))
    for seed in range(3):
        out, _, record = randomise_domain(flat, labels, seed, config)
        measured = out.array[4:-4, 8:-8, 8:-8].std()
        assert measured == pytest.approx(record["noise_std_hu"], rel=0.2)


def test_blur_softens_and_sharpening_overshoots_an_edge_in_plane_only():
    edge = np.zeros((8, 32, 32), np.int16)
    edge[:, :, 16:] = 400
    ct = io.Volume(edge, (1.0, 1.0, 2.0))
    labels = ct.with_array(np.zeros(ct.shape, np.uint8))
    soft, _, _ = randomise_domain(ct, labels, 0, DomainRandomisation.off(blur_probability=1.0,
                                                                          blur_sigma_mm=(1.0, 1.0)))
    bone, _, record = randomise_domain(ct, labels, 0, DomainRandomisation.off(sharpen_probability=1.0))
    assert record["sharpen"]["amount"] > 0
    assert np.abs(np.diff(soft.array, axis=-1)).max() < 400 and soft.array.min() >= -1e-3
    assert bone.array.max() > 400 + 10 and bone.array.min() < -10  # the kernel's overshoot on both sides
    np.testing.assert_allclose(bone.array, np.broadcast_to(bone.array[:1, :1], ct.shape), atol=1e-3)


def test_pair_randomisation_changes_both_ct_alike_outside_the_lesion(lesioned):
    case = lesioned
    mask = case.lesion_mask > 0
    pointwise = DomainRandomisation.off(bone_probability=1.0, global_probability=1.0, gamma_probability=1.0,
                                        aorta_probability=1.0, kidney_probability=1.0, noise_probability=1.0,
                                        noise_std_hu=(10.0, 20.0))
    ct, healthy, _, record = randomise_pair(case.ct, case.healthy_ct, case.labels, 4, pointwise)
    assert record["noise_std_hu"] and record["structures"]
    np.testing.assert_array_equal(ct.array[~mask], healthy.array[~mask])
    assert not np.allclose(ct.array[mask], healthy.array[mask])
    # With the spatial filters, equal outside the lesion grown by their reach; randomise_case's mask
    # covers every voxel where the two differ.
    spatial = DomainRandomisation(thickness_probability=1.0, blur_probability=1.0, in_plane_probability=1.0,
                                  fov_z_probability=0.0, fov_xy_probability=0.0, keep_thick_probability=0.0)
    ct, healthy, _, record = randomise_pair(case.ct, case.healthy_ct, case.labels, 5, spatial)
    reach = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=6)
    np.testing.assert_array_equal(ct.array[~reach], healthy.array[~reach])
    randomised = augment.randomise_case(case, 5, spatial)
    np.testing.assert_array_equal(randomised.ct.array, ct.array)
    differ = np.abs(randomised.ct.array - randomised.healthy_ct.array) > 0.5
    assert not (differ & ~(randomised.lesion_mask > 0)).any()
    assert randomised.lesion.bone_destroyed.shape == randomised.ct.shape
    assert randomised.info["domain_randomisation"] == record


def test_bad_configurations_are_one_line_errors():
    for kwargs, message in (({"noise_probability": 1.5}, "noise_probability must be in [0, 1]"),
                            ({"blur_sigma_mm": (-0.5, 1.0)}, "blur_sigma_mm must not be negative"),
                            ({"bone_scale": (1.4, 0.6)}, "bone_scale must be a (low, high) range"),
                            ({"fov_z_min_mm": -1.0}, "fov_z_min_mm must not be negative")):
        with pytest.raises(SpineInpaintError, match=re.escape(message)) as err:
            DomainRandomisation(**kwargs)
        assert "\n" not in str(err.value)


def test_a_512_slice_grid_randomises_within_seconds():
    import time

    ct = io.Volume(np.random.default_rng(0).integers(-100, 400, (60, 512, 512)).astype(np.int16), (0.8, 0.8, 2.5))
    labels = ct.with_array(np.zeros(ct.shape, np.uint8))
    labels.array[:, 250:300, 230:280] = 30
    config = DomainRandomisation(**{f: 1.0 for f in DomainRandomisation.__dataclass_fields__
                                    if f.endswith("_probability") and not f.startswith(("fov", "keep", "sharpen"))})
    randomise_domain(ct, labels, 0, DomainRandomisation.off(in_plane_probability=1.0))  # imports MONAI
    start = time.perf_counter()
    out, _, record = randomise_domain(ct, labels, 1, config)
    assert out.shape == ct.shape and record["slice_thickness_mm"] and record["noise_std_hu"]
    # 60 of the 150 slices of the budget's 512x512x150 volume (3 s): generous for a shared CI machine.
    assert time.perf_counter() - start < 6.0


# --- every trainer draws its training cases through the shared module ---------------------------------
def _counting(monkeypatch, name: str) -> list:
    calls: list = []
    original = getattr(augment, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(augment, name, counted)
    return calls


def test_segmentation_training_crops_come_from_randomised_cases(phantom, tmp_path, monkeypatch):
    from SpineInpaintLib.training import segmentation as st

    ct, labels = phantom
    case = datasets.Case("phantom_0001", ct, ct, labels, None, "phantom", 1)
    st.cache_case(case, tmp_path)
    cases = st.load_cache(tmp_path)
    calls = _counting(monkeypatch, "randomise_domain")
    sampler = st.CropSampler(cases, crop=32, seed=0, domain=DomainRandomisation())
    image, label = sampler.batch(3)
    assert len(calls) == 1 and image.shape == (3, 4, 32, 32) and label.shape == (3, 32, 32)
    st.CropSampler(cases, crop=32, seed=0, domain=None).batch(2)
    st.CropSampler(cases, crop=32, seed=0, augment=False, domain=DomainRandomisation()).batch(2)
    assert len(calls) == 1
    config = st.SegmentationTrainConfig(net="unet", out=tmp_path / "run", cache=tmp_path)
    assert config.domain == DomainRandomisation()
    assert st.SegmentationTrainConfig(net="unet", out="o", cache="c", low_resolution=0.7).domain_config() \
        .in_plane_probability == 0.7
    assert [type(t).__name__ for t in st.train_transforms(0).transforms] == ["RandAffined", "RandFlipd"]


def test_detection_randomises_training_cases_only(lesioned, tmp_path, monkeypatch):
    from SpineInpaintLib.training import detection as dt

    calls = _counting(monkeypatch, "randomise_case")
    specs = [("real_lytic", lambda: lesioned, {})]
    samples = dt.build_sample_set(specs, seed=0, domain=DomainRandomisation(), min_negatives=2)
    assert len(calls) == 1 and len(samples) > 0
    dt.build_sample_set(specs, seed=0, min_negatives=2)
    assert len(calls) == 1
    # training_data hands the configuration to the training cases and none to the validation cases.
    seen = {}

    def fake_build(specs, *, seed, cache, domain=None, **kwargs):
        seen[Path(cache).name] = domain
        return dt.SampleSet.empty(kwargs["size"])

    monkeypatch.setattr(dt, "build_sample_set", fake_build)
    config = dt.TrainConfig(cache=str(tmp_path / "cache"), phantoms=1, real=0, healthy_phantoms=0, val_phantoms=1,
                            val_real=0, progress=False)
    with pytest.raises(SpineInpaintError, match="no training samples"):
        dt.training_data(config)
    digest = augment.domain_digest(config.domain)
    assert seen == {f"cases_dr{digest}": config.domain, "cases_val": None}
    plain = dt.training_cache_paths(dt.TrainConfig(cache="c", domain=None))
    assert plain[0] != dt.training_cache_paths(config)[0] and plain[0].name.startswith("train-")


def test_gan_and_context_crop_cache_randomises_training_cases(tmp_path, monkeypatch):
    from SpineInpaintLib.training import gan

    seen = []

    def fake_arrays(case, **kwargs):
        seen.append(case.info.get("domain_randomisation"))
        return {"binary": np.zeros((0, 64, 64), np.uint8)}

    monkeypatch.setattr(gan, "case_training_arrays", fake_arrays)
    monkeypatch.setattr(datasets, "split_of", lambda case_id, *a, **k: "train")
    calls = _counting(monkeypatch, "randomise_case")
    gan.build_crop_cache(tmp_path, real=["totalsegmentator"], progress=False)
    assert len(calls) == 1 and seen[-1] is not None and seen[-1]["seed"] == augment.case_seed(
        0, "real_totalsegmentator_0000", "domain")
    gan.build_crop_cache(tmp_path, real=["totalsegmentator"], progress=False)  # cached with this draw
    assert len(calls) == 1 and len(seen) == 1
    gan.build_crop_cache(tmp_path, real=["totalsegmentator"], progress=False, domain=None)  # rebuilt plain
    assert len(calls) == 1 and len(seen) == 2 and seen[-1] is None
    monkeypatch.setattr(datasets, "split_of", lambda case_id, *a, **k: "val")
    gan.build_crop_cache(tmp_path / "val", real=["totalsegmentator"], progress=False)
    assert len(calls) == 1 and seen[-1] is None


def test_the_command_line_turns_the_randomisation_off(tmp_path, monkeypatch):
    from SpineInpaintLib.cli import main as cli_main
    from SpineInpaintLib.cli import train_run

    seen = {}

    def record(name: str, domain) -> dict:
        seen[name] = domain
        return {}

    monkeypatch.setattr(train_run, "train_segmentation", lambda config: record("seg", config.domain))
    monkeypatch.setattr(train_run, "train_detector", lambda config, on_epoch=None: record("det", config.domain))
    monkeypatch.setattr(train_run, "build_crop_cache", lambda *args, domain, **kwargs: record("gan", domain))
    monkeypatch.setattr(train_run, "train_gan", lambda config: {})
    for flags in ([], ["--no-domain-randomisation"]):
        seen.clear()
        common = ["--out", str(tmp_path / "run"), "--quiet"] + flags
        assert cli_main(["train", "segmentation", "--phantoms", "0", "--cache", str(tmp_path / "c")]
                        + common[:2] + flags) == 0
        assert cli_main(["train", "detection", "--cache", str(tmp_path / "d")] + common) == 0
        assert cli_main(["train", "gan", "--phantoms", "0", "--real", "totalsegmentator", "--data",
                         str(tmp_path / "g")] + common) == 0
        expected = None if flags else DomainRandomisation()
        assert seen == {"seg": expected, "det": expected, "gan": expected}
