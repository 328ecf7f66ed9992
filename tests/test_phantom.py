"""The digital phantom: determinism, TotalSegmentator ids, anatomy, organ volumes, intensities."""

from __future__ import annotations

import numpy as np
import pytest

from libs.demographics import Demographics
from libs.labels import label_id, total_class_map
from libs.phantom import (
    ICRP89_MASS_G,
    body_length_mm,
    draw_organ_volumes,
    expected_volume_ml,
    make_phantom,
    reference_volume_ml,
    sample_demographics,
    subject_rng,
)
from libs.phantom.writer import sampled_demographics
from libs.volumes import voxel_to_world

REF_MALE = Demographics("ref_m", 1.76, 73.0, "M", 35.0)
REF_FEMALE = Demographics("ref_f", 1.63, 60.0, "F", 35.0)


@pytest.fixture(scope="module")
def phantom8():
    """One male phantom at 8 mm (fast) and the same subject regenerated."""
    d = Demographics("s1", 1.78, 82.0, "M", 55.0)
    return make_phantom(d, seed=7, spacing_mm=8.0), make_phantom(d, seed=7, spacing_mm=8.0)


@pytest.fixture(scope="module")
def phantom4():
    d = Demographics("s2", 1.68, 66.0, "F", 48.0)
    return make_phantom(d, seed=3, spacing_mm=4.0)


def _world_centroid(ph, name):
    ijk = np.argwhere(ph.labels == label_id(name))
    assert ijk.size, f"{name} missing from the phantom"
    return voxel_to_world(ph.affine, ijk).mean(axis=0)


def test_subject_independent_of_cohort_size():
    small, large = sampled_demographics(4, seed=11), sampled_demographics(25, seed=11)
    assert small == large[:4], "subject k must not depend on the number of subjects"
    assert sampled_demographics(4, seed=12) != small, "another seed must give other subjects"


def test_phantom_is_deterministic(phantom8):
    a, b = phantom8
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.suv, b.suv)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = make_phantom(a.demographics, seed=8, spacing_mm=8.0)
    assert not np.array_equal(other.ct, a.ct), "a different seed must change the phantom"


def test_dtypes_and_grid(phantom8):
    ph, _ = phantom8
    assert ph.ct.dtype == np.int16 and ph.suv.dtype == np.float32 and ph.labels.dtype == np.uint8
    assert ph.ct.shape == ph.suv.shape == ph.labels.shape
    assert ph.ct.shape[:2] == (56, 56), f"8 mm in-plane grid should be 56×56 (448 mm FOV), got {ph.ct.shape}"
    np.testing.assert_allclose(np.diag(ph.affine)[:3], [8.0, 8.0, 8.0])


def test_labels_are_totalsegmentator_ids(phantom4):
    ids = set(np.unique(phantom4.labels).tolist()) - {0}
    valid = set(total_class_map().values())
    assert ids <= valid, f"ids not in TotalSegmentator 'total': {sorted(ids - valid)}"
    # DESIGN.md's ids, read from the installed class map
    assert (label_id("liver"), label_id("spleen"), label_id("heart"), label_id("urinary_bladder")) == (5, 1, 51, 21)
    required = ["liver", "spleen", "kidney_left", "kidney_right", "heart", "stomach", "urinary_bladder", "aorta",
                "lung_upper_lobe_left", "lung_lower_lobe_right", "vertebrae_L3", "vertebrae_T8", "rib_left_5",
                "rib_right_5", "sternum", "clavicula_left", "clavicula_right", "hip_left", "hip_right", "sacrum"]
    missing = [n for n in required if label_id(n) not in ids]
    assert not missing, f"phantom lacks {missing}"


def test_anatomy_in_ras_world(phantom4):
    """Liver on the subject's right (+x), spleen left, heart above the liver, bladder lowest, spine behind."""
    c = {n: _world_centroid(phantom4, n) for n in ("liver", "spleen", "heart", "urinary_bladder", "vertebrae_L2",
                                                   "kidney_left", "kidney_right", "clavicula_left")}
    assert c["liver"][0] > 20 and c["spleen"][0] < -20, f"liver x {c['liver'][0]:.0f}, spleen x {c['spleen'][0]:.0f}"
    assert c["kidney_right"][0] > 0 > c["kidney_left"][0]
    assert c["heart"][2] > c["liver"][2] > c["urinary_bladder"][2], "cranio-caudal order heart > liver > bladder"
    assert c["clavicula_left"][2] > c["heart"][2]
    assert c["vertebrae_L2"][1] < c["urinary_bladder"][1], "spine must be posterior (−y) to the bladder"


def test_body_length_follows_height_law():
    for h in (1.55, 1.75, 1.95):
        d = Demographics(f"h{int(h * 100)}", h, 70.0, "F", 40.0)
        ph = make_phantom(d, seed=0, spacing_mm=8.0)
        length = ph.ct.shape[2] * 8.0
        expected = body_length_mm(h)
        assert abs(length / expected - 1) < 0.1, f"h={h}: length {length} mm vs law {expected:.0f} mm"
    assert body_length_mm(1.75) == pytest.approx(2 * (146.629 * 1.75 + 110.419))


@pytest.mark.slow
def test_two_mm_grid_is_224_wide():
    d = Demographics("g", 1.70, 70.0, "M", 50.0)
    ph = make_phantom(d, seed=0, spacing_mm=2.0)
    assert ph.ct.shape[:2] == (224, 224)
    assert abs(ph.ct.shape[2] - (146.629 * 1.70 + 110.419)) < 0.1 * 360, f"Z = {ph.ct.shape[2]}"


def test_organ_volume_draws_follow_icrp_and_sex():
    rng = np.random.default_rng(0)
    male = np.array([draw_organ_volumes(REF_MALE, rng)["liver"] for _ in range(4000)])
    female = np.array([draw_organ_volumes(REF_FEMALE, rng)["liver"] for _ in range(4000)])
    assert male.mean() / female.mean() == pytest.approx(1800 / 1400, rel=0.03)
    assert male.mean() == pytest.approx(1800 / 1.05, rel=0.03), "reference male liver ≈ ICRP 1800 g / 1.05 g/mL"
    cv = male.std() / male.mean()
    assert 0.10 <= cv <= 0.20, f"coefficient of variation {cv:.3f} outside 10–20 %"
    assert reference_volume_ml("kidney", "F") == pytest.approx(ICRP89_MASS_G["kidney"][1] / 1.05)


def test_organ_volume_scales_with_bsa():
    small = Demographics("a", 1.55, 50.0, "F", 40.0)
    large = Demographics("b", 1.80, 95.0, "F", 40.0)
    ratio = expected_volume_ml("liver", large) / expected_volume_ml("liver", small)
    assert ratio == pytest.approx(large.bsa_m2 / small.bsa_m2, rel=1e-9)
    assert ratio > 1.3


def test_voxelized_organ_volumes_match_draws():
    ratios = {"liver": [], "spleen": [], "kidney_left": [], "heart": [], "urinary_bladder": []}
    for d in sampled_demographics(4, seed=5):
        ph = make_phantom(d, seed=5, spacing_mm=4.0)
        for organ in ratios:
            ratios[organ].append((ph.labels == label_id(organ)).sum() * 64e-3 / ph.params.volumes_ml[organ])
    for organ, r in ratios.items():
        assert 0.75 < np.mean(r) < 1.1, f"{organ}: voxelized/drawn volume {np.mean(r):.2f}"


def test_intensities_per_tissue(phantom4):
    ph = phantom4
    lab, ct, suv = ph.labels, ph.ct.astype(float), ph.suv
    liver, lungs = lab == label_id("liver"), np.isin(lab, [label_id(n) for n in (
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_lower_lobe_right")])
    assert 35 < np.median(ct[liver]) < 75, f"liver HU {np.median(ct[liver]):.0f}"
    assert np.median(ct[lungs]) < -700, f"lung HU {np.median(ct[lungs]):.0f}"
    assert np.median(ct[lab == label_id("vertebrae_L3")]) > 150
    assert np.all(ct[0, 0, :] == -1000), "air outside the body is −1000 HU"
    assert suv.min() >= 0.0
    drawn = ph.params.suv["liver"]
    assert np.median(suv[liver]) == pytest.approx(drawn, rel=0.15), "liver SUV near its drawn value"
    assert 1.2 <= drawn <= 3.6
    bladder = np.median(suv[lab == label_id("urinary_bladder")])
    assert bladder > 2 * np.median(suv[liver]), f"bladder SUV {bladder:.1f} should be high"
    fat = (ct > -190) & (ct < -30) & (lab == 0)
    assert 0.1 < np.median(suv[fat]) < 0.8, "fat/background SUV in 0.2–0.4 before blur and noise"


def test_girth_and_fat_follow_weight():
    thin = make_phantom(Demographics("w1", 1.75, 55.0, "M", 50.0), seed=1, spacing_mm=8.0)
    heavy = make_phantom(Demographics("w1", 1.75, 98.0, "M", 50.0), seed=1, spacing_mm=8.0)
    girth = [np.mean((p.ct > -200).sum(axis=(0, 1))) for p in (thin, heavy)]
    fat = [np.sum((p.ct > -190) & (p.ct < -30)) for p in (thin, heavy)]
    assert girth[1] > 1.3 * girth[0], f"body area per slice {girth}"
    assert fat[1] > 1.5 * fat[0], f"fat voxels {fat}"


def test_sampled_demographics_like_autopet_adults():
    subjects = [sample_demographics(subject_rng(0, f"x{k}", 0), f"x{k}") for k in range(1500)]
    h = np.array([s.height_m for s in subjects])
    w = np.array([s.weight_kg for s in subjects])
    a = np.array([s.age_years for s in subjects])
    male = np.array([s.sex == "M" for s in subjects])
    assert h.min() >= 1.5 and h.max() <= 2.0 and w.min() >= 50 and w.max() <= 100 and a.min() >= 20 and a.max() <= 100
    assert 0.45 < male.mean() < 0.7
    assert h[male].mean() - h[~male].mean() > 0.08
    assert np.corrcoef(h, w)[0, 1] > 0.2, "height and weight must correlate"
