"""No silent wrong answers, no lost input (issue 13): stale results, outputs onto inputs, changed inputs on
resume, other data under a resumed run, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from libs.checkpoint import CheckpointError, latest_checkpoint
from libs.cohort import Cohort
from libs.config import ConfigError, load_config, to_dict
from libs.demographics import DemographicsError, read_demographics_rows
from libs.evaluation.errors import EvaluationError
from libs.evaluation.organ_stats import cohort_stats
from libs.generate import generate_lowres_cohort, load_lowres_model
from libs.lowres import LowresConfig, train_lowres
from libs.manifest import ManifestError, claim, fingerprint
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.training import pick_device
from tests.test_lowres import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def _one_line_error(res) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr[-1500:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.stderr[-1500:]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-subject 14 mm phantom cohort and a tiny trained low-res run on it."""
    root = tmp_path_factory.mktemp("safety")
    write_phantom_cohort(root / "cohort", sampled_demographics(3, seed=4), seed=4, spacing_mm=14.0, progress=False)
    train_lowres(tiny_config(root / "cohort", root / "run", steps=2, checkpoint_every=2), device="cpu",
                 progress=False)
    return root


def _generate(world, csv, out, **kw):
    return generate_lowres_cohort(world / "run", csv, out, batch=2, device="cpu", previews=False, progress=False,
                                  **kw)


# -- 1. statistics are reused only when provably current ---------------------------------------------------
def test_stats_recomputed_when_a_volume_changes(world, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(world / "cohort", cohort)
    out = tmp_path / "stats.csv"
    first = cohort_stats(cohort, out, progress=False)
    assert len(first.computed) == 3
    again = cohort_stats(cohort, out, progress=False)
    assert len(again.reused) == 3 and not again.computed, "unchanged inputs are reused"
    sid = Cohort(cohort).demographics()[0].subject_id
    img = nib.load(str(Cohort(cohort).path("suv", sid)))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(Cohort(cohort).path("suv", sid)))
    third = cohort_stats(cohort, out, progress=False)
    assert third.computed == [sid] and len(third.reused) == 2
    body = next(r for r in third.rows if r["subject_id"] == sid and r["region"] == "body")
    assert body["suv_mean"] == 0.0, f"the zeroed SUV must be measured, got {body['suv_mean']}"


def test_stats_refuse_the_cohorts_own_files_and_foreign_csvs(world, tmp_path):
    cohort = world / "cohort"
    before = (cohort / "demographics.csv").read_bytes()
    with pytest.raises(EvaluationError, match="file of the cohort"):
        cohort_stats(cohort, cohort / "demographics.csv", overwrite=True, progress=False)
    assert (cohort / "demographics.csv").read_bytes() == before
    foreign = tmp_path / "mine.csv"
    foreign.write_text("my,own\n1,2\n")
    with pytest.raises(ManifestError, match="not written by a TotalGen organ-stats job"):
        cohort_stats(cohort, foreign, progress=False)
    assert foreign.read_text() == "my,own\n1,2\n"
    res = _run("3_Evaluations/2_organ_stats.py", "--cohort", str(cohort), "--out", str(foreign), "--quiet")
    assert "--overwrite" in _one_line_error(res)
    assert len(cohort_stats(cohort, foreign, overwrite=True, progress=False).computed) == 3


# -- 2-4. generation owns its folder and resumes only onto its own, unchanged outputs -----------------------
def test_generation_refuses_a_folder_it_did_not_create(world, tmp_path):
    copy = tmp_path / "heldout"
    shutil.copytree(world / "cohort", copy)
    before = (copy / "demographics.csv").read_bytes()
    csv = tmp_path / "two.csv"
    csv.write_text("\n".join((copy / "demographics.csv").read_text().splitlines()[:3]) + "\n")
    res = _run("2_Tests/infer.py", "--lowres", str(world / "run"), "--demographics", str(csv), "--out", str(copy),
               "--device", "cpu", "--quiet")
    assert "not written by a TotalGen generate job" in _one_line_error(res)
    assert (copy / "demographics.csv").read_bytes() == before, "the cohort's table is untouched"


def test_generation_never_rewrites_its_input_csv(world, tmp_path):
    out = tmp_path / "gen"
    src = tmp_path / "in.csv"
    src.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40\n")
    _generate(world, src, out)
    own = out / "demographics.csv"
    own.write_text("subject_id,height_m,weight_kg,sex,age_years,note\na,1.70,70,F,40,x\nb,9,70,F,40,\n")
    before = own.read_bytes()
    with pytest.raises(ManifestError, match="own demographics.csv"):
        _generate(world, own, out)
    assert own.read_bytes() == before


def test_resume_refuses_changed_demographics_or_seed_and_overwrite_redoes(world, tmp_path):
    out = tmp_path / "gen"
    csv = tmp_path / "in.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40\nb,1.8,80,M,60\n")
    assert len(_generate(world, csv, out).written) == 2
    assert len(_generate(world, csv, out).skipped) == 2, "an unchanged job resumes"
    meta_b = (out / "meta" / "b.json").read_text()
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40\nb,1.8,95,M,60\n")
    with pytest.raises(ManifestError, match="subject b"):
        _generate(world, csv, out)
    assert (out / "meta" / "b.json").read_text() == meta_b and "80" in (out / "demographics.csv").read_text()
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40\nb,1.8,80,M,60\n")
    with pytest.raises(ManifestError, match="subject a"):
        _generate(world, csv, out, seed=5)
    redone = _generate(world, csv, out, seed=5, overwrite=True)
    assert sorted(redone.written) == ["a", "b"]
    assert json.loads((out / "meta" / "a.json").read_text())["seed"] != json.loads(meta_b)["seed"]
    assert len(_generate(world, csv, out, seed=5).skipped) == 2


def test_claim_rules(tmp_path):
    folder = tmp_path / "f"
    made = claim(folder, "job", folder=True)
    made.record("x", fingerprint({"a": 1}))
    again = claim(folder, "job", folder=True)
    assert again.current("x", fingerprint({"a": 1})) and not again.current("x", fingerprint({"a": 2}))
    assert not claim(folder, "job", folder=True, overwrite=True).entries, "overwrite reuses nothing"
    with pytest.raises(ManifestError):
        claim(folder, "other-job", folder=True)
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", "job", folder=True)


# -- 5. a resumed run must see the data it started on ------------------------------------------------------
def test_training_resume_on_another_cohort_is_refused(world, tmp_path):
    other = tmp_path / "other"
    write_phantom_cohort(other, sampled_demographics(3, seed=9), seed=9, spacing_mm=14.0, progress=False)
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    with pytest.raises(ConfigError, match="the run started on other data"):
        train_lowres(tiny_config(other, run, steps=4, checkpoint_every=2), device="cpu", progress=False)
    train_lowres(tiny_config(world / "cohort", run, steps=3, checkpoint_every=3), device="cpu", progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"no duplicate log rows after resume: {steps}"


# -- 9. one line, not a traceback -------------------------------------------------------------------------
def test_non_utf8_and_extra_field_csvs(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("subject_id,height_m,weight_kg,sex,age_years\nJosé,1.7,70,F,40\n".encode("latin-1"))
    with pytest.raises(DemographicsError, match="not UTF-8"):
        read_demographics_rows(bad)
    extra = tmp_path / "extra.csv"
    extra.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40,oops\nb,1.8,80,M,50\n")
    records, errors = read_demographics_rows(extra)
    assert [r.subject_id for r in records] == ["b"] and "more fields than the header" in errors[0]


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x"])
def test_bad_device_names(name):
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_one_line(world, tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.7,70,F,40\n")
    res = _run("2_Tests/infer.py", "--lowres", str(world / "run"), "--demographics", str(csv), "--out",
               str(tmp_path / "g"), "--device", "cuda", "--quiet")
    assert "no CUDA device" in _one_line_error(res)


def test_tampered_checkpoints_are_one_line(world, tmp_path):
    ckpt = torch.load(latest_checkpoint(world / "run"), weights_only=True)
    for name in ("nonorm", "shapes"):
        c = dict(ckpt, model=dict(ckpt["model"]))
        if name == "nonorm":
            del c["normalization"]
        else:
            c["model"]["out_conv.weight"] = torch.zeros(1, 1, 1)
        path = tmp_path / f"{name}.pt"
        torch.save(c, path)
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_lowres_model(path, torch.device("cpu"))


def test_run_folder_of_another_architecture_is_one_line(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    raw = to_dict(tiny_config(world / "cohort", run, steps=4))
    raw["model"]["model_channels"] = 16
    with pytest.raises(CheckpointError, match="does not fit this run's network"):
        train_lowres(load_config(raw, LowresConfig), device="cpu", progress=False)


# -- 10. a refused config leaves nothing that refuses the corrected one ----------------------------------
def test_untrained_run_folder_does_not_bind_the_config(world, tmp_path):
    cfg = tmp_path / "low.yaml"
    raw = to_dict(tiny_config(tmp_path / "missing", tmp_path / "run"))
    cfg.write_text(yaml.safe_dump(raw))
    res = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--device", "cpu", "--quiet")
    _one_line_error(res)
    raw["data"]["cohort"], raw["model"]["model_channels"] = str(world / "cohort"), 16
    cfg.write_text(yaml.safe_dump(raw))
    res = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--device", "cpu", "--quiet",
               "--set", "loop.steps=1")
    assert res.returncode == 0, res.stderr[-1500:]


def test_constant_groups_have_no_variance_not_a_tiny_p():
    from libs.evaluation.statistics import cohens_d, one_way_anova, welch_ttest
    a = np.full(10, 5.0) + np.r_[1e-11, np.zeros(9)]
    b = np.full(10, 4.0)
    assert np.isnan(welch_ttest(a, b).p) and np.isnan(cohens_d(a, b)) and np.isnan(one_way_anova(a, b).p)
    assert np.isfinite(welch_ttest(a + np.linspace(0, 1, 10), b).p), "real spread still gives a p-value"


def test_mixed_voxel_sizes_are_refused(world, tmp_path):
    from libs.data import DataError
    mixed = tmp_path / "mixed"
    shutil.copytree(world / "cohort", mixed)
    sid = Cohort(mixed).demographics()[1].subject_id
    for kind in ("ct", "suv"):
        path = Cohort(mixed).path(kind, sid)
        img = nib.load(str(path))
        affine = img.affine.copy()
        affine[:2, :2] *= 0.5
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), str(path))
    with pytest.raises(DataError, match=f"{sid}.*in-plane voxel size 7 × 7 mm"):
        train_lowres(tiny_config(mixed, tmp_path / "run", steps=1), device="cpu", progress=False)


def test_temp_files_of_a_killed_run_are_removed(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    stale = run / ".ckpt-000000004.pt.abc123.tmp.pt"
    stale.write_bytes(b"half")
    train_lowres(tiny_config(world / "cohort", run, steps=2), device="cpu", progress=False)
    assert not stale.exists()


def test_paired_metrics_space_separated_and_recomputed_when_a_volume_changes(world, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(world / "cohort", b)
    out = tmp_path / "paired.csv"
    args = ["3_Evaluations/4_paired_metrics.py", "--a", str(world / "cohort"), "--b", str(b), "--out", str(out),
            "--quiet", "--metrics", "mae", "psnr"]
    res = _run(*args)
    assert res.returncode == 0 and "3 computed" in res.stdout, res.stdout + res.stderr[-1500:]
    assert {line.split(",")[2] for line in out.read_text().splitlines()[1:]} == {"mae", "psnr"}
    assert "3 reused" in _run(*args).stdout
    sid = Cohort(b).demographics()[2].subject_id
    img = nib.load(str(Cohort(b).path("ct", sid)))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 10, img.affine, img.header), str(Cohort(b).path("ct", sid)))
    res = _run(*args)
    assert "1 computed, 2 reused" in res.stdout, res.stdout
    mae = [ln for ln in out.read_text().splitlines() if ln.startswith(f"{sid},ct,mae")]
    assert float(mae[0].split(",")[3]) > 0, mae


def test_volume_cache_follows_the_files(world, tmp_path):
    from libs.data import CohortVolumes
    cohort = tmp_path / "cohort"
    shutil.copytree(world / "cohort", cohort)
    first = CohortVolumes(cohort, (32, 32, 64), cache_dir=tmp_path / "cache", workers=1, progress=False)
    sid = Cohort(cohort).demographics()[0].subject_id
    path = Cohort(cohort).path("suv", sid)
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(path))
    again = CohortVolumes(cohort, (32, 32, 64), cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert float(first.volumes[0][1].float().max()) > 0 and float(again.volumes[0][1].float().max()) == 0.0
    assert torch.equal(first.volumes[1], again.volumes[1]), "unchanged subjects still come from the cache"
