"""End-to-end runs of 0_Preprocess/0_make_phantom_cohort.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from libs.cohort import Cohort

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "0_Preprocess" / "0_make_phantom_cohort.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_help():
    out = run("--help")
    assert out.returncode == 0 and "--spacing-mm" in out.stdout


def test_cohort_written_resumed_and_repaired(tmp_path):
    out, prev, fig = tmp_path / "coh", tmp_path / "prev", tmp_path / "dist.png"
    res = run("--out", str(out), "--n", "3", "--seed", "4", "--spacing-mm", "8", "--previews", str(prev),
              "--distribution-figure", str(fig), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "3 written" in res.stdout
    cohort = Cohort(out)
    ids = [d.subject_id for d in cohort.demographics()]
    assert ids == ["phantom_00000", "phantom_00001", "phantom_00002"]
    for sid in ids:
        subj = cohort.load(sid)
        assert subj.labels is not None and subj.ct.shape == subj.suv.shape == subj.labels.shape
        assert (prev / f"{sid}.png").stat().st_size > 10_000
        assert cohort.path("meta", sid).is_file()
    assert fig.stat().st_size > 10_000
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"

    before = nib.load(str(cohort.path("ct", ids[0]))).get_fdata()
    res = run("--out", str(out), "--n", "3", "--seed", "4", "--spacing-mm", "8", "--previews", str(prev), "--quiet")
    assert res.returncode == 0 and "0 written, 3 already complete" in res.stdout, res.stdout

    ct1 = cohort.path("ct", ids[1])
    ct1.write_bytes(ct1.read_bytes()[:200])          # a truncated file, as after a crash
    res = run("--out", str(out), "--n", "3", "--seed", "4", "--spacing-mm", "8", "--previews", str(prev), "--quiet")
    assert res.returncode == 0 and "1 written, 2 already complete" in res.stdout, res.stdout
    assert cohort.is_complete(ids[1], labels=True)
    np.testing.assert_array_equal(nib.load(str(cohort.path("ct", ids[0]))).get_fdata(), before)


def test_refuses_to_mix_cohorts(tmp_path):
    out = tmp_path / "coh"
    assert run("--out", str(out), "--n", "1", "--spacing-mm", "16", "--quiet").returncode == 0
    res = run("--out", str(out), "--n", "1", "--seed", "9", "--spacing-mm", "16", "--quiet")
    assert res.returncode != 0 and "different cohort" in res.stderr


def test_demographics_csv_input_and_bad_row(tmp_path):
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\ntwin_a,1.80,85,M,61\ntwin_b,1.62,58,F,44\n")
    out = tmp_path / "coh"
    res = run("--out", str(out), "--demographics", str(csv), "--spacing-mm", "16", "--quiet")
    assert res.returncode == 0, res.stderr
    assert [d.subject_id for d in Cohort(out).demographics()] == ["twin_a", "twin_b"]

    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,height_m,weight_kg,sex,age_years\ntwin_a,1.80,85,M,61\ntwin_b,162,58,F,44\n")
    res = run("--out", str(tmp_path / "coh2"), "--demographics", str(bad), "--quiet")
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert "line 3" in err and "height_m" in err and "centimetres" in err, err
    assert not (tmp_path / "coh2" / "ct").exists(), "nothing must be written for a bad CSV"
