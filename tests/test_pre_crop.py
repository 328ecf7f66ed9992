"""Crop and resample on a 4 mm phantom (known landmark positions), --labels-from, and the RANSAC height fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from libs.cohort import Cohort
from libs.demographics import Demographics
from libs.labels import label_id
from libs.phantom.build import make_phantom
from libs.preprocess.crop import BOTTOM_LANDMARKS, TOP_LANDMARKS, resample, target_grid
from libs.preprocess.errors import PreprocessError
from libs.preprocess.height_fit import fit_height_law
from libs.preprocess.work import WorkDir
from libs.volumes import Volume, read_volume, spacing_of, voxel_to_world, write_volume

ROOT = Path(__file__).resolve().parents[1]
PAD = 12  # air slices added above and below the phantom, which the crop must drop


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work directory holding one 4 mm phantom padded in z, and its labels as a separate 'segmentation'."""
    root = tmp_path_factory.mktemp("pre")
    demo = Demographics("ph01", 1.72, 78.0, "M", 55.0)
    ph = make_phantom(demo, seed=3, spacing_mm=4.0)
    pad = ((0, 0), (0, 0), (PAD, PAD))
    ct = np.pad(ph.ct, pad, constant_values=-1000)
    suv = np.pad(ph.suv, pad, constant_values=0.0)
    labels = np.pad(ph.labels, pad, constant_values=0)
    affine = ph.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * PAD
    wd = WorkDir(root / "work")
    wd.write_study(demo, (ct, affine), (suv, affine), {"source": "phantom"})
    wd.rebuild_demographics()
    write_volume(root / "seg" / "ph01.nii.gz", labels, affine, "labels")
    _run("2_segment_organs.py", "--work", str(root / "work"), "--labels-from", str(root / "seg"))
    return root, labels, affine


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    quiet = [] if script.startswith("4_") else ["--quiet"]
    run = subprocess.run([sys.executable, str(ROOT / "0_Preprocess" / script), *args, *quiet],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _z_extent(labels: np.ndarray, names) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, [label_id(n) for n in names]).any(axis=(0, 1)))


@pytest.mark.parametrize("size, margin", [(128, 3), (48, 5)])
def test_crop_window_and_centering(work, size, margin):
    root, labels_in, affine_in = work
    out = root / f"cohort_{size}"
    _run("3_crop_and_resample.py", "--work", str(root / "work"), "--out", str(out), "--spacing-mm", "4",
         "--size", str(size), "--margin", str(margin))
    ct, suv = read_volume(out / "ct" / "ph01.nii.gz", "ct"), read_volume(out / "suv" / "ph01.nii.gz", "suv")
    labels = read_volume(out / "labels" / "ph01.nii.gz", "labels")
    bottom, top = _z_extent(labels_in, BOTTOM_LANDMARKS).min(), _z_extent(labels_in, TOP_LANDMARKS).max()
    assert ct.shape == (size, size, top - bottom + 1 + 2 * margin), ct.shape
    # z window: landmarks sit exactly `margin` slices inside each end (checked where nothing is cut in-plane)
    if size >= labels_in.shape[0]:
        assert _z_extent(labels.array, TOP_LANDMARKS).max() == ct.shape[2] - 1 - margin
        assert _z_extent(labels.array, BOTTOM_LANDMARKS).min() == margin
    # world coordinates are kept: output voxel (0, 0, 0) is the source voxel (x0, y0, bottom - margin)
    start = json.loads((out / "meta" / "ph01.json").read_text())["window_start_voxel"]
    assert start[2] == bottom - margin
    np.testing.assert_allclose(voxel_to_world(ct.affine, [0, 0, 0]), voxel_to_world(affine_in, start), atol=1e-4)
    # in-plane: the body's bounding box is centred in the size × size grid
    body = ct.array > -1000
    for axis in (0, 1):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit[0] > 0 and hit[-1] < size - 1:   # not cut by the window
            assert abs((hit[0] + hit[-1]) / 2 - (size - 1) / 2) <= 0.5
        else:                                    # wider than the grid: cut symmetrically
            assert hit[0] == 0 and hit[-1] == size - 1
    if size == 128:
        assert (ct.array[0] == -1000).all() and (suv.array[0] == 0).all(), "padding is CT −1000, SUV 0"
    outside = ~np.any(body, axis=(0, 1))
    assert not outside[margin:-margin].any(), "every slice between the landmarks holds body"
    assert (out / "demographics.csv").read_text().splitlines()[1].startswith("ph01,1.720,78.0,M")
    if size == 128:
        rerun = _run("3_crop_and_resample.py", "--work", str(root / "work"), "--out", str(out), "--spacing-mm", "4",
                     "--size", str(size), "--margin", str(margin))
        assert "1 already complete" in rerun.stdout


def test_target_grid_is_isotropic_and_keeps_the_centre():
    pet = Volume(np.zeros((10, 12, 8), np.float32), np.diag([4.0, 4.0, 3.0, 1.0]))
    shape, affine = target_grid(pet, 2.0)
    assert shape == (20, 24, 12) and spacing_of(affine) == pytest.approx((2.0, 2.0, 2.0))
    np.testing.assert_allclose(voxel_to_world(affine, (np.array(shape) - 1) / 2),
                               voxel_to_world(pet.affine, (np.array(pet.shape) - 1) / 2))
    ramp = Volume(np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 12, 8), np.float32), pet.affine)
    out = resample(ramp, shape, affine, 1, -1.0)
    x = np.linalg.solve(pet.affine, affine @ [5.0, 5.0, 5.0, 1.0])[0]
    assert out[5, 5, 5] == pytest.approx(x), "linear resampling reproduces a ramp"


def test_missing_landmarks_reported(work, tmp_path):
    root, labels_in, affine = work
    seg = tmp_path / "seg"
    no_hips = np.where(np.isin(labels_in, [label_id(n) for n in BOTTOM_LANDMARKS]), 0, labels_in).astype(np.uint8)
    write_volume(seg / "ph01.nii.gz", no_hips, affine, "labels")
    wd = WorkDir(tmp_path / "w")
    src = WorkDir(root / "work")
    wd.write_study(src.collected_demographics()[0], (read_volume(src.path("ct", "ph01")).array, affine),
                   (read_volume(src.path("suv", "ph01")).array, affine), {})
    wd.rebuild_demographics()
    _run("2_segment_organs.py", "--work", str(tmp_path / "w"), "--labels-from", str(seg))
    run = subprocess.run([sys.executable, str(ROOT / "0_Preprocess/3_crop_and_resample.py"), "--work",
                          str(tmp_path / "w"), "--out", str(tmp_path / "c"), "--spacing-mm", "4", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)
    assert "1 skipped" in run.stdout and "hip or sacrum" in run.stderr
    assert "hip or sacrum" in (tmp_path / "c" / "skipped.csv").read_text()


def test_ransac_fit_ignores_outliers():
    rng = np.random.default_rng(0)
    h = rng.uniform(1.5, 2.0, 60)
    y = 146.629 * h + 110.419 + rng.normal(0, 1.0, h.size)
    y[:8] += rng.choice([-1, 1], 8) * rng.uniform(60, 120, 8)  # e.g. crops that lost the pelvis
    fit = fit_height_law(h, y, residual_threshold=4.0)
    assert fit.a == pytest.approx(146.629, rel=0.02) and fit.b == pytest.approx(110.419, abs=5.0)
    assert not fit.inliers[:8].any() and fit.inliers[8:].mean() > 0.9
    assert fit.r2_inliers > 0.98
    with pytest.raises(PreprocessError, match="at least 10"):
        fit_height_law(h[:9], y[:9])


def test_height_cli_writes_the_lowres_yaml(tmp_path):
    rng = np.random.default_rng(1)
    cohort, records = Cohort(tmp_path / "ph"), []
    for k in range(12):   # tiny volumes whose length (4 mm slices) follows a known law
        h = 1.55 + 0.04 * k
        n = int(round((150.0 * h + 100.0 + rng.normal(0, 0.5)) / 2))
        records.append(Demographics(f"s{k:02d}", h, 70.0, "F", 50.0))
        cohort.write_subject(f"s{k:02d}", np.zeros((2, 2, n)), np.zeros((2, 2, n)), np.diag([4.0, 4.0, 4.0, 1]))
    cohort.write_demographics(records)
    run = _run("4_fit_height_scaler.py", "--cohort", str(tmp_path / "ph"), "--out", str(tmp_path / "h.yaml"))
    law = yaml.safe_load((tmp_path / "h.yaml").read_text())
    assert set(law) == {"height_law"} and set(law["height_law"]) == {"a", "b", "slice_mm"}
    assert law["height_law"]["slice_mm"] == 2.0 and "R² on inliers" in run.stdout
    assert law["height_law"]["a"] == pytest.approx(150.0, rel=0.05)
    assert (tmp_path / "h.png").stat().st_size > 0
    from libs.lowres import HeightLaw
    HeightLaw(**law["height_law"])


def test_failure_messages_lose_paths_but_keep_folder_words():
    from libs.preprocess.jobs import scrub
    msg = "no labels/ folder for /data/Doe^John_1960/PET_CT/ct.nii.gz (see C:\\scans\\Doe); step 2 first\nsecond"
    out = scrub(msg)
    assert "Doe" not in out and "1960" not in out and "second" not in out
    assert out == "no labels/ folder for <path> (see <path> step 2 first"


def test_crop_and_labels_redo_subjects_whose_inputs_changed(work, tmp_path):
    """Issue 13 (found beyond its list): labels and cropped subjects were reused because their files existed,
    even after the work CT, SUV or given segmentation changed."""
    import shutil

    from libs.manifest import ManifestError
    from libs.preprocess.crop import CropSettings, crop_cohort
    from libs.preprocess.segment import segment_work

    root, labels_in, affine_in = work
    shutil.copytree(root / "work", tmp_path / "work")
    shutil.copytree(root / "seg", tmp_path / "seg")
    wd, settings = WorkDir(tmp_path / "work"), CropSettings(spacing_mm=4.0, size=48, margin=3)
    assert segment_work(wd.root, tmp_path / "seg", overwrite=True, progress=False).written == ["ph01"]
    assert segment_work(wd.root, tmp_path / "seg", progress=False).complete == ["ph01"]
    assert crop_cohort(wd.root, tmp_path / "cohort", settings, progress=False).written == ["ph01"]
    assert crop_cohort(wd.root, tmp_path / "cohort", settings, progress=False).complete == ["ph01"]
    before = read_volume(tmp_path / "cohort" / "suv" / "ph01.nii.gz", "suv").array.max()
    suv = read_volume(wd.path("suv", "ph01"), "suv")
    write_volume(wd.path("suv", "ph01"), suv.array * 2.0, suv.affine, "suv")          # e.g. a corrected dose
    assert crop_cohort(wd.root, tmp_path / "cohort", settings, progress=False).written == ["ph01"]
    after = read_volume(tmp_path / "cohort" / "suv" / "ph01.nii.gz", "suv").array.max()
    assert after == pytest.approx(2.0 * before, rel=1e-4)
    write_volume(tmp_path / "seg" / "ph01.nii.gz", np.zeros_like(labels_in), affine_in, "labels")
    assert segment_work(wd.root, tmp_path / "seg", progress=False).written == ["ph01"], "the given labels changed"
    assert not read_volume(wd.path("labels", "ph01"), "labels").array.any()
    with pytest.raises(ManifestError, match="--overwrite"):
        crop_cohort(wd.root, wd.root / "meta", settings, progress=False)       # a folder of other files
