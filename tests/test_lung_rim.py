"""bench/lowres_quality.py's lung / rim measure: a binary lung edge has no rim, a grey one loses lung volume to
the −400 HU threshold and shows it as rim voxels."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from libs.demographics import Demographics
from libs.intensity import ct_to_unit, suv_to_unit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("lowres_quality", ROOT / "bench" / "lowres_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torso(grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 40 × 40 × 12 volume: air around a soft-tissue box (40 HU) holding a 12 × 12 lung block (−850 HU,
    clipped to the window's −500 like the training data); ``grey``: the lung edge blurred over ~1 voxel."""
    ct = np.full((40, 40, 12), -1000.0)
    ct[6:34, 6:34, :] = 40.0
    ct[14:26, 14:26, :] = -850.0
    ct = np.clip(ct, -500.0, 500.0)
    if grey:
        inside = ct[6:34, 6:34, :]
        ct[6:34, 6:34, :] = ndimage.uniform_filter(inside, size=(3, 3, 1), mode="nearest")
    suv = np.where(ct > -400.0, 1.0, 0.0)
    return ct_to_unit(ct).astype(np.float32), suv_to_unit(suv).astype(np.float32)


def test_binary_lungs_have_no_rim_and_are_counted_whole(quality):
    ct, pet = _torso(grey=False)
    m = quality.lung_rim(ct, pet)
    assert m["lung_voxels"] == 12 * 12 * 12
    assert m["rim_voxels"] == 0


def test_grey_lung_edges_show_as_rim_and_lose_lung_voxels(quality):
    sharp = quality.lung_rim(*_torso(grey=False))
    grey = quality.lung_rim(*_torso(grey=True))
    # a 3-voxel box blur makes the edge ring grey (lung side −500 → tissue side +40 HU): the −400 HU threshold
    # keeps only the inner part of the lung, the ring shows up in the −400..−200 HU band
    assert grey["lung_voxels"] < sharp["lung_voxels"]
    assert grey["rim_voxels"] > 0
    assert grey["lung_voxels"] + grey["rim_voxels"] > sharp["lung_voxels"] - 12 * 4 * 12


def test_lungs_by_sex_reports_each_sex_against_its_own_heldout(quality):
    sharp = np.stack(_torso(grey=False))
    grey = np.stack(_torso(grey=True))
    records = [Demographics("a", 1.7, 70.0, "F", 50.0), Demographics("b", 1.8, 80.0, "M", 50.0)]
    ref = torch.from_numpy(np.stack([sharp, sharp]))
    gen = torch.from_numpy(np.stack([sharp, grey]))
    out = quality.lungs_by_sex(records, ref, gen)
    assert out["F"]["n"] == 1 and out["M"]["n"] == 1
    assert out["F"]["delta_pct"]["lung_voxels"] == pytest.approx(0.0)
    assert out["M"]["delta_pct"]["lung_voxels"] < 0 and out["M"]["generated"]["rim_voxels"] > 0
