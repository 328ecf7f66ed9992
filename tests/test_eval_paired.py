"""Paired metrics with known answers: Dice of shifted cubes, HD95 of a known displacement, PSNR/SSIM/MAE,
and resampling through the affines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from libs.evaluation.paired import dice, hausdorff95, image_metrics, mae, psnr, resample_to, ssim_in_box
from libs.volumes import Volume


def cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_dice_of_shifted_cubes(shift):
    a, b = cube((40, 40, 40), (5, 5, 5), 20), cube((40, 40, 40), (5 + shift, 5, 5), 20)
    assert dice(a, b) == pytest.approx((20 - shift) / 20)
    assert dice(a, a) == 1.0 and math.isnan(dice(a & False, b & False))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 3.0, 5.0)])
def test_hd95_of_a_known_displacement(spacing):
    a, b = cube((40, 40, 40), (5, 5, 5), 20), cube((40, 40, 40), (8, 5, 5), 20)
    assert hausdorff95(a, b, spacing) == pytest.approx(3 * spacing[0])
    c = cube((40, 40, 40), (5, 5, 9), 20)                     # along z: 4 voxels of 5 mm
    assert hausdorff95(a, c, spacing) == pytest.approx(4 * spacing[2])
    assert hausdorff95(a, a, spacing) == 0.0
    assert math.isnan(hausdorff95(a, a & False, spacing))


def test_psnr_ssim_mae_sanity():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 100, (30, 30, 30))
    mask = cube(img.shape, (3, 3, 3), 24)
    assert psnr(img, img, mask, 2000.0) == math.inf
    assert ssim_in_box(img, img, mask, 2000.0) == pytest.approx(1.0)
    assert mae(img, img + 7.0, mask) == pytest.approx(7.0)
    assert psnr(img, img + 20.0, mask, 2000.0) == pytest.approx(10 * math.log10(2000.0**2 / 400.0))
    noisy = img + rng.normal(0, 200, img.shape)
    assert ssim_in_box(img, noisy, mask, 2000.0) < 0.9


def test_image_metrics_clip_to_the_window():
    a = np.full((10, 10, 10), 3000.0)                    # bone beyond the CT window
    b = np.full((10, 10, 10), 1500.0)
    out = image_metrics(a, b, np.ones(a.shape, bool), (-1000.0, 1000.0), ("mae", "psnr", "ssim"))
    assert out["mae"] == 0.0 and out["psnr"] == math.inf


def test_resample_onto_another_grid_through_the_affines():
    fine = np.diag([4.0, 4.0, 4.0, 1.0])
    coarse = np.diag([8.0, 8.0, 8.0, 1.0])
    coarse[:3, 3] = 2.0                                   # 8 mm voxel centres at 2, 10, 18 ... mm
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 5                             # world 18 … 42 mm
    out = resample_to(Volume(labels, coarse), (16, 16, 16), fine, "labels")
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 5}
    xs = np.flatnonzero(out[:, 8, 8] == 5) * 4.0          # fine voxel centres (mm) labelled 5
    assert (xs.min(), xs.max(), xs.size) == (16.0, 44.0, 8), "labelled span 14…46 mm"
    ct = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 8, 8), np.float32)
    shifted = fine.copy()
    shifted[0, 3] = 4.0                                   # b's voxel i sits where a's voxel i + 1 is
    got = resample_to(Volume(ct, shifted), (8, 8, 8), fine, "ct")
    np.testing.assert_allclose(got[1:, 4, 4], ct[:-1, 4, 4])
    assert got[0, 4, 4] == -1000.0, "outside b's field of view CT is air"
