"""Organ and whole-body measures against constructed volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from libs.evaluation.body import body_length_mm, body_mask, body_measures
from libs.evaluation.measures import (
    organ_measures,
    region_label_ids,
    region_mask,
    sphere_kernel,
    sphere_radius_mm,
    suv_peak,
    voxel_volume_ml,
)
from libs.labels import label_id


def ball(shape, spacing, centre_mm, radius_mm):
    """Bool mask of voxel centres within ``radius_mm`` of ``centre_mm`` (voxel-index world, mm)."""
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_mm)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2


def test_voxelized_sphere_volume_within_one_percent_at_2mm():
    spacing, radius = (2.0, 2.0, 2.0), 40.0
    mask = ball((48, 48, 48), spacing, (47.0, 47.0, 47.0), radius)
    ct, suv = np.zeros(mask.shape, np.int16), np.ones(mask.shape, np.float32)
    got = organ_measures(mask, ct, suv, np.diag([*spacing, 1.0]))["volume_ml"]
    want = 4.0 / 3.0 * math.pi * radius**3 / 1000.0
    assert abs(got - want) / want < 0.01, f"sphere volume {got:.2f} mL, expected {want:.2f} mL"


def test_voxel_volume_uses_the_affine_spacing():
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # rotated axes
    assert voxel_volume_ml(affine) == pytest.approx(0.030)


def test_peak_sphere_is_one_millilitre():
    assert sphere_radius_mm() == pytest.approx(6.2035, abs=1e-4)
    fine = sphere_kernel((0.25, 0.25, 0.25))
    assert fine.sum() * 0.25**3 / 1000 == pytest.approx(1.0, rel=0.01)
    aniso = sphere_kernel((2.0, 2.0, 5.0))
    assert aniso.shape == (7, 7, 3), f"kernel half-widths follow the spacing, got {aniso.shape}"
    assert sphere_kernel((8.0, 8.0, 8.0)).sum() == 1, "voxels coarser than the sphere: the centre voxel only"


def test_suv_mean_max_peak_of_constructed_uptake():
    spacing = (2.0, 2.0, 2.0)
    affine = np.diag([*spacing, 1.0])
    organ = np.zeros((40, 40, 40), bool)
    organ[5:35, 5:35, 5:35] = True
    suv = np.where(organ, 2.0, 0.5).astype(np.float32)
    hot = ball(organ.shape, spacing, (40.0, 40.0, 40.0), 10.0)        # fully inside the organ
    suv[hot] = 6.0
    suv[30, 30, 30] = 40.0                                              # one voxel above the clip
    ct = np.where(organ, 55, -1000).astype(np.int16)
    m = organ_measures(organ, ct, suv, affine)
    clipped = np.clip(suv, 0, 25)
    assert m["suv_mean"] == pytest.approx(clipped[organ].mean(), rel=1e-9)
    assert m["suv_max"] == 25.0, "SUV is clipped to [0, 25]"
    kernel = sphere_kernel(spacing)
    single = (25.0 + 2.0 * (kernel.sum() - 1)) / kernel.sum()          # sphere around the lone hot voxel
    assert m["suv_peak"] == pytest.approx(max(6.0, single), rel=1e-9)
    assert m["hu_mean"] == 55.0 and m["volume_ml"] == pytest.approx(30**3 * 0.008)


def test_suv_peak_only_centres_inside_the_organ():
    spacing = (2.0, 2.0, 2.0)
    mask = np.zeros((30, 30, 30), bool)
    mask[10:20, 10:20, 10:20] = True
    suv = np.full(mask.shape, 1.0)
    suv[25, 25, 25] = 20.0                      # hot spot 5 voxels outside the organ: sphere cannot reach it
    assert suv_peak(suv, mask, spacing) == pytest.approx(1.0)
    suv[20, 15, 15] = 20.0                      # one voxel outside the face: reached by a centre on the face
    n = sphere_kernel(spacing).sum()
    assert suv_peak(suv, mask, spacing) == pytest.approx((20.0 + (n - 1)) / n)


def test_combined_kidneys_and_label_ids():
    assert region_label_ids("kidneys") == (label_id("kidney_left"), label_id("kidney_right"))
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:3] = label_id("kidney_left")
    labels[5:9] = label_id("kidney_right")
    assert region_mask(labels, "kidneys").sum() == 700


def test_empty_organ_gives_zero_volume_and_nan_uptake():
    z = np.zeros((5, 5, 5))
    m = organ_measures(z.astype(bool), z, z, np.eye(4))
    assert m["volume_ml"] == 0 and math.isnan(m["suv_mean"]) and math.isnan(m["suv_peak"])


def torso(shape=(40, 30, 12)):
    """A box torso: 2-voxel fat rim, muscle inside, an enclosed lung block and a visceral fat block."""
    ct = np.full(shape, -1000, np.int16)
    ct[4:36, 4:26, 1:11] = -100                   # fat everywhere in the body ...
    ct[6:34, 6:24, 1:11] = 40                     # ... muscle inside the rim
    ct[10:18, 10:18, 3:9] = -850                  # lung, enclosed in every slice
    ct[22:28, 10:16, 1:11] = -100                 # visceral fat, not touching the rim
    return ct


def test_body_mask_fills_the_lungs_and_drops_small_islands():
    ct = torso()
    ct[0, 0, 0] = 100                              # a speck of noise outside the body
    body = body_mask(ct)
    assert body.sum() == 32 * 22 * 10 and not body[0, 0, 0] and body[12, 12, 5]


def test_body_measures_with_anisotropic_spacing():
    ct = torso()
    spacing = (2.0, 3.0, 5.0)
    affine = np.diag([*spacing, 1.0])
    vml = 2.0 * 3.0 * 5.0 / 1000.0
    m = body_measures(ct, np.ones(ct.shape, np.float32), affine)
    rim = (32 * 22 - 28 * 18) * 10
    visceral = 6 * 6 * 10
    assert m["volume_ml"] == pytest.approx(32 * 22 * 10 * vml)
    assert m["length_mm"] == pytest.approx(10 * 5.0) == body_length_mm(body_mask(ct), affine)
    assert m["fat_volume_ml"] == pytest.approx((rim + visceral) * vml)
    assert m["sat_volume_ml"] == pytest.approx(rim * vml), "only fat connected to the skin line is subcutaneous"
    assert m["lung_volume_ml"] == pytest.approx(8 * 8 * 6 * vml)
    assert m["suv_mean"] == 1.0 and m["suv_p99"] == 1.0


def test_ct_roughness_counts_in_plane_neighbours_inside_the_body_only():
    from libs.evaluation.body import ct_roughness_hu
    ct = torso()
    body = body_mask(ct)
    flat = np.where(body, 40, -1000).astype(np.int16)
    assert ct_roughness_hu(flat, body) == 0.0, "the body edge against air must not count"
    checker = flat.copy()
    idx = np.indices(ct.shape).sum(axis=0) % 2 == 0
    checker[body & idx] = 140                      # ±100 HU checkerboard inside the body
    checker[body & ~idx] = -60
    assert ct_roughness_hu(checker, body) == pytest.approx(200.0)
    clipped = np.where(body, np.where(idx, 900, -900), -1000).astype(np.int16)
    assert ct_roughness_hu(clipped, body) == pytest.approx(1000.0), "CT is clipped to [−500, 500] HU first"
    m = body_measures(checker, np.ones(ct.shape, np.float32), np.eye(4))
    assert m["ct_roughness_hu"] == pytest.approx(200.0)


def test_lung_volume_tolerates_noise_at_the_window_floor():
    """Generated lungs sit at the −500 HU floor of the CT window plus sampler noise."""
    ct = torso().astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 20, ct.shape)
    lung = ct == -850
    ct[lung] = np.maximum(-500 + noise[lung], -500)
    m = body_measures(ct, np.ones(ct.shape, np.float32), np.eye(4))
    assert m["lung_volume_ml"] == pytest.approx(8 * 8 * 6 / 1000.0)


def test_generated_background_noise_becomes_air_but_lungs_stay():
    from libs.generate import restore_background
    ct = torso().astype(np.float32)
    rng = np.random.default_rng(1)
    outside = ct == -1000
    ct[outside] = np.maximum(-500 + rng.normal(0, 30, ct.shape)[outside], -500)   # the window floor + noise
    lung = torso() == -850
    ct[lung] = -500
    out = restore_background(ct)
    assert np.mean(out[outside] == -1000) > 0.99, "air at the window floor plus noise must become background"
    assert np.all(out[lung] == -500), "enclosed air (lungs) stays in the window"
    assert abs(int(body_mask(out).sum()) - 32 * 22 * 10) <= 0.005 * 32 * 22 * 10, "specks touching the skin only"


def test_preview_slice_is_the_body_centre_whatever_stray_voxels_lie_in_the_air():
    """Preview sheets (per subject and the comparison's grid) cut the body's front-to-back centre; a generated
    speck of tissue in the air behind the body must not move the slice (it used to: 15–55 instead of 15–41)."""
    from libs.previews import body_centre_y

    ct = np.full((32, 60, 48), -1000.0, dtype=np.float32)
    ct[5:25, 10:31, 5:40] = 0.0
    ct[12:16, 14:18, 20:30] = -800.0           # a lung inside the body: still the body's extent
    assert body_centre_y(ct) == 20
    ct[2, 55, 2] = 100.0                       # stray voxel far behind the body
    ct[30, 1, 46] = 40.0                       # and one in front of it
    assert body_centre_y(ct) == 20
    assert body_centre_y(np.full((8, 10, 6), -1000.0)) == 5
