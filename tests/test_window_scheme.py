"""bench/window_scheme.py's measures: the window borders it checks, the seam ratios (a step at a border is
found, a smooth volume passes), scheme parsing; and that a low-redundancy scheme of larger windows blends to
the same whole-volume result as the training-patch scheme for a convolution."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch

from libs.windows import window_grid, windowed_denoise
from tests.test_superres import _conv_net

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from window_scheme import border_planes, compare, parse_scheme, scheme_stats, self_seam  # noqa: E402


def test_border_planes_are_the_inner_window_edges():
    # 56 voxels, windows of 32 with >= 15 % overlap: starts 0 and 24, so borders at 24 (start) and 32 (end)
    planes = border_planes((56, 56, 96), (32, 32, 52), 0.15)
    assert planes == [[24, 32], [24, 32], [44, 52]]
    assert border_planes((56, 56, 96), (56, 56, 96), 0.25) == [[], [], []]
    stats = scheme_stats((56, 56, 96), (32, 32, 52), 0.15)
    assert stats["windows"] == 8 and stats["overlap_voxels"] == [8, 8, 8]
    assert stats["redundancy"] == pytest.approx(8 * 32 * 32 * 52 / (56 * 56 * 96))


def _smooth(shape=(40, 40, 60)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    noise = np.random.default_rng(0).normal(0.0, 5.0, shape)           # texture: |neighbour difference| ~ 6 HU
    return (300.0 * x + 150.0 * y ** 2 + 100.0 * z + noise).astype(np.float32)


def test_self_seam_finds_a_step_at_a_border_and_passes_a_smooth_volume():
    planes = [[20], [], [30]]
    smooth = _smooth()
    assert self_seam(smooth, planes) == pytest.approx(1.0, abs=0.05)
    seamed = smooth.copy()
    seamed[20:] += 40.0                                   # a 40 HU jump between planes 19 and 20 of axis 0
    assert self_seam(seamed, planes) > 2.0
    assert np.isnan(self_seam(smooth, [[], [], []]))


def test_compare_against_the_reference():
    ref = {"ct": _smooth(), "suv": np.ones((40, 40, 60), np.float32)}
    same = compare(ref, ref, [[20], [], []])
    assert same["max_abs_ct_hu"] == 0.0 and same["max_abs_suv"] == 0.0 and same["seam_ratio"] == pytest.approx(1.0)
    seamed = {"ct": ref["ct"].copy(), "suv": ref["suv"] + 0.5}
    seamed["ct"][20:] += 40.0
    out = compare(seamed, ref, [[20], [], []])
    assert out["max_abs_ct_hu"] == pytest.approx(40.0) and out["max_abs_suv"] == pytest.approx(0.5)
    assert out["seam_ratio"] > 2.0


def test_parse_scheme():
    assert parse_scheme("56x56x96@0.25") == ((56, 56, 96), 0.25)
    for bad in ("56x56@0.25", "56x56x96", "56x56x96@1.5", "axbxc@0.1"):
        with pytest.raises(click.BadParameter):
            parse_scheme(bad)


@torch.no_grad()
def test_large_windows_blend_like_the_training_patch_for_a_convolution():
    net = _conv_net()
    full = (48, 48, 80)
    x, cond = torch.randn(1, 2, *full), torch.randn(1, 2, *full)

    def cond_fn(start, win):
        return cond[0, :, start[0]:start[0] + win[0], start[1]:start[1] + win[1], start[2]:start[2] + win[2]]

    small = windowed_denoise(net, x, torch.ones(1), cond_fn, (16, 16, 32), overlap=0.25, batch=8)
    large = windowed_denoise(net, x, torch.ones(1), cond_fn, (26, 26, 42), overlap=0.05, batch=8)
    small_stats, large_stats = scheme_stats(full, (16, 16, 32), 0.25), scheme_stats(full, (26, 26, 42), 0.05)
    assert large_stats["windows"] == 8 and large_stats["redundancy"] < 1.3 < small_stats["redundancy"]
    torch.testing.assert_close(large, small, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(large, net(x, None, cond), atol=1e-5, rtol=1e-5)
    _, starts, _ = window_grid(full, (16, 16, 32), 0.25)
    assert len(starts) > 8
