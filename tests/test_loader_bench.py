"""bench/loader_bench.py: its emulation of the loader before the fidelity issue's fix returns the fixed loader's
tensors (and the bench notices when it does not), the research design's reload takes the subset it claims, the
whole-training comparison's arithmetic, and one end-to-end run on a tiny 8 mm cohort."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from libs.config import load_config, to_dict
from libs.data import CohortVolumes
from libs.lowres import LowresConfig, Standardize, channel_stats
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.superres import ResidualPatches, SRConfig, load_pairing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import loader_bench  # noqa: E402

LOW = ROOT / "1_Trainings/configs/lowres_bench.yaml"
SR = ROOT / "1_Trainings/configs/superres_bench.yaml"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("loader") / "cohort"
    write_phantom_cohort(path, sampled_demographics(4, 3, prefix="lb"), seed=3, spacing_mm=8.0, progress=False)
    return path


def _configs():
    low = load_config(LOW, LowresConfig)
    sr = to_dict(load_config(SR, SRConfig))
    sr["lowres_config"] = str(LOW)
    return low, load_config(sr, SRConfig, origin=str(SR))


def test_whole_volume_draw_returns_the_fixed_loaders_tensors(cohort):
    low, sr = _configs()
    volumes = CohortVolumes(cohort, low.data.grid, None, 1, False, low.in_plane_mm)
    pairing = load_pairing(sr)
    patches = ResidualPatches(volumes, pairing, sr.data.patch, Standardize(*channel_stats(volumes), pairing.net_sigma))
    for seed in range(5):
        fixed = patches.draw(np.random.default_rng(seed))
        whole = loader_bench.whole_volume_draw(patches, np.random.default_rng(seed))
        assert fixed[0].shape == (2, *sr.data.patch) and fixed[0].abs().max() > 0
        for a, b in zip(fixed, whole):
            assert torch.equal(a, b)


def test_loader_costs_measure_every_loader_and_refuse_a_wrong_emulation(cohort, monkeypatch):
    low, sr = _configs()
    volumes = CohortVolumes(cohort, low.data.grid, None, 1, False, low.in_plane_mm)
    costs = loader_bench.loader_costs(volumes, low, sr, draws=1, seed=0)
    for key in ("lowres", "superres_augmented", "superres_plain", "superres_whole_volume"):
        assert costs[key]["s_per_batch"] > 0
        assert costs[key]["images_per_s"] == pytest.approx(4 / costs[key]["s_per_batch"])
    real = loader_bench.whole_volume_draw

    def off_by_a_little(patches, rng):
        residual, cond = real(patches, rng)
        return residual + 1e-6, cond

    monkeypatch.setattr(loader_bench, "whole_volume_draw", off_by_a_little)
    with pytest.raises(AssertionError, match="emulation differs"):
        loader_bench.loader_costs(volumes, low, sr, draws=1, seed=0)


def test_research_reload_takes_a_random_subset_of_distinct_subjects(cohort):
    low, _ = _configs()
    volumes = CohortVolumes(cohort, low.data.grid, None, 1, False, low.in_plane_mm)
    ids, seconds = loader_bench.reload_subset(volumes, 3, seed=1, workers=2)
    assert len(ids) == len(set(ids)) == 3 and seconds > 0
    assert set(ids) <= {d.subject_id for d in volumes.records}
    all_ids, _ = loader_bench.reload_subset(volumes, 20, seed=1, workers=1)      # capped at the cohort's size
    assert sorted(all_ids) == sorted(d.subject_id for d in volumes.records)


def test_whole_training_by_hand():
    # 1000 steps of 16 at 16 images/s = 1000 s of training; ours loads once (50 s), the research design
    # reloads (10 s) at each of its 4 launches of 250 steps (the last one full) or 3 launches of 400 (the last short)
    r = loader_bench.whole_training(1000, 16, 16.0, 50.0, 10.0, 250)
    assert r["research_launches"] == 4
    assert r["train_hours"] == pytest.approx(1000 / 3600)
    assert r["ours_hours"] == pytest.approx(1050 / 3600)
    assert r["research_hours"] == pytest.approx(1040 / 3600)
    assert r["research_over_ours"] == pytest.approx(1040 / 1050)
    assert loader_bench.whole_training(1000, 16, 16.0, 50.0, 10.0, 400)["research_launches"] == 3


def test_cli_writes_the_report(cohort, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(loader_bench.main, ["--out", str(out), "--cohort", str(cohort), "--lowres-config",
                                                    str(LOW), "--superres-config", str(SR), "--subset", "2",
                                                    "--draws", "1", "--launch-steps", "10,100",
                                                    "--consumer-rate", "5,6"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "loader.json").read_text())
    assert info["cohort"]["subjects"] == 4 and info["cohort"]["grid"] == [56, 56, 96]
    assert info["launch"]["research_subjects"] == 2
    assert info["consumer_rate"] == {"lowres": 5.0, "superres": 6.0}
    rows = info["whole_training"]["rows"]["superres"]
    assert [r["launch_steps"] for r in rows] == [10, 100]
    steps = load_config(SR, SRConfig).loop.steps
    assert [r["research_launches"] for r in rows] == [-(-steps // 10), -(-steps // 100)]
    assert info["whole_training"]["ours_launch_s"] == pytest.approx(info["launch"]["ours_nifti_s"] / 4 * 565)
    assert len(list((out / "cache").glob("*.npy"))) == 4                      # the cache the launch read from
    assert f"| superres | {steps} (4) | 100 |" in (out / "loader.md").read_text()
