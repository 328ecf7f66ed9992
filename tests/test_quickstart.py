"""The original project's Quick Start lines, run from inside the stage folders on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from libs.cohort import Cohort
from libs.phantom.writer import sampled_demographics, write_phantom_cohort

ROOT = Path(__file__).resolve().parents[1]
TINY_LOW = {"in_plane_mm": 14.0, "data": {"grid": [32, 32, 64], "factor": 4, "load_workers": 1},
            "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "channels_per_head": 8},
            "optim": {"batch": 4, "ref_steps": 100, "warmup_steps": 2},
            "loop": {"steps": 3, "report_every": 3, "checkpoint_every": 3, "loader_workers": 0},
            "sample": {"steps": 2}}
TINY_SR = {"data": {"patch": [16, 16, 32], "load_workers": 1},
           "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_levels": [],
                     "channels_per_head": 8},
           "diffusion": {"sigma_data_samples": 8}, "optim": {"batch": 4, "ref_steps": 100, "warmup_steps": 2},
           "loop": {"steps": 3, "report_every": 3, "checkpoint_every": 3, "loader_workers": 0},
           "sample": {"steps": 2}, "window": {"batch": 8}}


def run(folder: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """``cd <folder> && python <script> <args>`` as the Quick Start writes it."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT / folder, capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    write_phantom_cohort(root / "processed", sampled_demographics(3, seed=8), seed=8, spacing_mm=14.0,
                         progress=False)
    low = {**TINY_LOW, "run_dir": str(root / "checkpoints" / "lowres")}
    low["data"] = {**TINY_LOW["data"], "cohort": str(root / "processed")}
    sr = {**TINY_SR, "run_dir": str(root / "checkpoints" / "superres"), "lowres_config": str(root / "low.yaml")}
    sr["data"] = {**TINY_SR["data"], "cohort": str(root / "processed")}
    (root / "low.yaml").write_text(yaml.safe_dump(low))
    (root / "sr.yaml").write_text(yaml.safe_dump(sr))
    res = run("1_Trainings", "train_diffusion.py", "--config", str(root / "low.yaml"), "--quiet", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    res = run("1_Trainings", "train_superres.py", "--config", str(root / "sr.yaml"), "--quiet", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    return root


def test_training_presets_resolve_from_inside_the_stage_folder(tmp_path):
    res = run("1_Trainings", "train_diffusion.py", "--config", "config_lowres.yaml", "--dry-run",
              "--run-dir", str(tmp_path / "a"))
    assert res.returncode == 0 and "model_channels: 64" in res.stdout, res.stderr
    res = run("1_Trainings", "train_superres.py", "--config", "config_superres.yaml", "--dry-run",
              "--run-dir", str(tmp_path / "b"))
    assert res.returncode == 0 and "lowres_config:" in res.stdout, res.stderr


def test_infer_with_model_dir_and_evaluate(trained, tmp_path):
    csv = trained / "processed" / "demographics.csv"
    out = tmp_path / "results"
    res = run("2_Tests", "infer.py", "--model_dir", str(trained / "checkpoints"), "--demo_csv", str(csv),
              "--output_dir", str(out), "--quiet", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "low-res checkpoint:" in res.stderr and "super-res checkpoint:" in res.stderr, res.stderr
    ids = [d.subject_id for d in Cohort(out).demographics()]
    assert ids == [d.subject_id for d in Cohort(trained / "processed").demographics()]
    meta = json.loads(Cohort(out).path("meta", ids[0]).read_text())
    assert set(meta["checkpoints"]) == {"lowres", "superres"}

    ev = tmp_path / "eval"
    res = run("3_Evaluations", "evaluate.py", "--pred_dir", str(out), "--gt_dir", str(trained / "processed"),
              "--metrics", "dice", "hausdorff", "psnr", "--out", str(ev), "--quiet")
    assert res.returncode == 0, res.stderr
    rows = (ev / "paired_metrics.csv").read_text().splitlines()
    assert len(rows) > 1 and any("psnr" in r for r in rows), rows[:3]

    other = tmp_path / "other"
    write_phantom_cohort(other, sampled_demographics(3, seed=9, prefix="other"), seed=9, spacing_mm=14.0,
                         progress=False)
    res = run("3_Evaluations", "evaluate.py", "--pred_dir", str(out), "--gt_dir", str(other), "--metrics", "dice",
              "--out", str(tmp_path / "eval2"), "--quiet")
    assert "share no subject id" in res.stderr, res.stderr
    assert (tmp_path / "eval2" / "comparison" / "comparison.md").is_file()


def test_model_dir_without_checkpoints_and_height_header(tmp_path, trained):
    res = run("2_Tests", "infer.py", "--model_dir", str(tmp_path), "--demo_csv", "x.csv", "--output_dir",
              str(tmp_path / "o"))
    assert res.returncode != 0 and "no low-resolution checkpoint" in res.stderr, res.stderr
    bad = tmp_path / "demo.csv"
    bad.write_text("subject_id,height,weight_kg,sex,age_years\na,175,80,M,50\n")
    res = run("2_Tests", "infer.py", "--model_dir", str(trained / "checkpoints"), "--demo_csv", str(bad),
              "--output_dir", str(tmp_path / "o"), "--quiet", "--device", "cpu")
    assert res.returncode != 0 and "height_m (metres" in res.stderr, res.stderr


def test_run_preprocessing_on_an_autopet_style_release(tmp_path):
    """Line 1: AutoPET NIfTI layout (detected) → work → labels (--labels_from) → cohort → height law."""
    from libs.phantom.build import make_phantom
    from libs.preprocess.autopet import find_studies
    from libs.volumes import write_volume

    raw, seg = tmp_path / "raw_data", tmp_path / "seg"
    demos = sampled_demographics(10, seed=4)
    meta, body, labels = ["Subject ID,Study Date,age,sex"], ["study,height_m,weight_kg"], {}
    for k, demo in enumerate(demos):
        ph = make_phantom(demo, seed=4, spacing_mm=8.0)
        study = raw / f"PETCT_{k:04x}" / "01-02-2003-NA-PET-CT-1"
        write_volume(study / "CT.nii.gz", ph.ct, ph.affine, "ct")
        write_volume(study / "SUV.nii.gz", ph.suv, ph.affine, "suv")
        labels[study.relative_to(raw).as_posix()] = (ph.labels, ph.affine)
        meta.append(f"PETCT_{k:04x},01-02-2003,{demo.age_years:.0f},{demo.sex}")
        body.append(f"PETCT_{k:04x},{demo.height_m},{demo.weight_kg}")
    (raw / "Metadata.csv").write_text("\n".join(meta) + "\n")
    (tmp_path / "body.csv").write_text("\n".join(body) + "\n")
    for study in find_studies(raw):
        write_volume(seg / f"{study.subject_id}.nii.gz", *labels[study.key], "labels")

    out = tmp_path / "processed"
    res = subprocess.run(["bash", "run_preprocessing.sh", "--input_dir", str(raw), "--output_dir", str(out),
                          "--demographics", str(tmp_path / "body.csv"), "--labels_from", str(seg),
                          "--spacing_mm", "8", "--size", "48", "--margin", "2", "--workers", "2", "--quiet"],
                         cwd=ROOT / "0_Preprocess", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "input: autopet" in res.stderr and "== step 1b:" in res.stderr and "== step 4:" in res.stderr
    cohort = Cohort(out / "cohort")
    got = {d.subject_id: d for d in cohort.demographics()}
    assert sorted(got) == sorted(s.subject_id for s in find_studies(raw))
    assert sorted(round(d.height_m, 3) for d in got.values()) == sorted(round(d.height_m, 3) for d in demos)
    law = yaml.safe_load((out / "cohort" / "height_law.yaml").read_text())["height_law"]
    assert 120.0 < law["a"] < 175.0, law  # the phantom's torso follows 146.6 slices per metre


def test_lowres_quality_bench_on_the_tiny_run(trained, tmp_path):
    out = tmp_path / "q.json"
    run_dir = trained / "checkpoints" / "lowres"
    res = subprocess.run([sys.executable, "bench/lowres_quality.py", "--lowres", str(run_dir),
                          "--cohort", str(trained / "processed"), "--subjects", "2", "--weight-sweep", "6",
                          "--json-out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    q = json.loads(out.read_text())
    assert q["subjects"] == 2 and q["sample_steps"] == 2
    # the training cohort, standardized with its own channel statistics: RMS ≈ σ_data = 0.5
    assert q["data_rms"] == pytest.approx(0.5, rel=0.2)
    rmse = {float(k): v for k, v in q["denoising_rmse"].items()}
    assert sorted(rmse) == [0.05, 0.2, 0.5, 1.0, 2.0, 5.0]
    # EDM preconditioning bounds the error at large σ whatever the weights: far below the noise itself
    assert rmse[5.0] < 2.0 and rmse[2.0] < 2.0
    assert 0 < q["roughness_reference_hu"] < 1000 and 0 < q["roughness_generated_hu"] < 1000
    # lungs and rim per sex present in the held-out subjects; the processed phantoms have lungs
    lungs = q["lungs_by_sex"]
    assert sum(r["n"] for r in lungs.values()) == 2
    assert all(r["heldout"]["lung_voxels"] > 0 and r["heldout"]["body_suv"] > 0 for r in lungs.values())
    # phantoms of 50 → 100 kg through the same grid: girth grows with weight (the reference the generated
    # girth is compared with)
    ph = q["weight_sweep"]["phantom"]
    assert ph["pearson_r"] > 0.8 and ph["girth_cm2_at_50kg_100kg"][1] > 1.2 * ph["girth_cm2_at_50kg_100kg"][0]
    assert set(q["weight_sweep"]["generated"]) == set(ph)
