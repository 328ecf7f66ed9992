"""AutoPET NIfTI release import: metadata + height/weight CSV → work directory; incomplete rows skipped."""

from __future__ import annotations

import numpy as np

from libs.preprocess.autopet import import_autopet
from libs.volumes import read_volume, write_volume


def test_import_with_user_csv(tmp_path):
    root = tmp_path / "nifti"
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for subject in ("PETCT_aaa", "PETCT_bbb"):
        study = root / subject / "01-02-2003-NA-PET-CT-123"
        write_volume(study / "CT.nii.gz", np.full((4, 4, 5), 40), affine, "ct")
        write_volume(study / "SUV.nii.gz", np.full((4, 4, 5), 2.5), affine, "suv")
    (tmp_path / "meta.csv").write_text("Subject ID,Study Date,age,sex,diagnosis\n"
                                       "PETCT_aaa,01-02-2003,061Y,M,LUNG\nPETCT_bbb,01-02-2003,70,F,NEGATIVE\n")
    (tmp_path / "body.csv").write_text("study,height_m,weight_kg\nPETCT_aaa,1.81,88\n")
    report = import_autopet(root, tmp_path / "work", tmp_path / "meta.csv", tmp_path / "body.csv", progress=False)
    assert len(report.written) == 1 and len(report.skipped) == 1
    assert "no height/weight row" in next(iter(report.skipped.values()))
    sid = report.written[0]
    assert (tmp_path / "work" / "demographics.csv").read_text().splitlines()[1] == f"{sid},1.810,88.0,M,61.0"
    assert read_volume(tmp_path / "work" / "suv" / f"{sid}.nii.gz", "suv").array.max() == np.float32(2.5)
    assert "PETCT_bbb" not in (tmp_path / "work" / "skipped.csv").read_text()
    again = import_autopet(root, tmp_path / "work", tmp_path / "meta.csv", tmp_path / "body.csv", progress=False)
    assert again.complete == [sid]


def test_segment_without_weights_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "nifti" / "PETCT_aaa" / "s"
    write_volume(root / "CT.nii.gz", np.full((4, 4, 5), 40), np.eye(4), "ct")
    write_volume(root / "SUV.nii.gz", np.full((4, 4, 5), 1.0), np.eye(4), "suv")
    (tmp_path / "meta.csv").write_text("Subject ID,age,sex\nPETCT_aaa,50,F\n")
    (tmp_path / "body.csv").write_text("study,height_m,weight_kg\nPETCT_aaa,1.6,60\n")
    import_autopet(tmp_path / "nifti", tmp_path / "w", tmp_path / "meta.csv", tmp_path / "body.csv", progress=False)
    env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(tmp_path / "no_weights")}
    script = Path(__file__).resolve().parents[1] / "0_Preprocess" / "2_segment_organs.py"
    run = subprocess.run([sys.executable, str(script), "--work", str(tmp_path / "w"), "--device", "cpu"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "weights" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_import_redoes_changed_studies_and_refuses_a_foreign_folder(tmp_path):
    """Issue 13 (found beyond its list): a study counted as complete because its files existed, even after its
    source volume or demographics row changed."""
    import pytest

    from libs.manifest import ManifestError

    study = tmp_path / "nifti" / "PETCT_aaa" / "01-02-2003-NA-PET-CT-123"
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write_volume(study / "CT.nii.gz", np.full((4, 4, 5), 40), affine, "ct")
    write_volume(study / "SUV.nii.gz", np.full((4, 4, 5), 2.5), affine, "suv")
    (tmp_path / "meta.csv").write_text("Subject ID,Study Date,age,sex\nPETCT_aaa,01-02-2003,61,M\n")
    (tmp_path / "body.csv").write_text("study,height_m,weight_kg\nPETCT_aaa,1.81,88\n")
    work = tmp_path / "work"

    def run(**kw):
        return import_autopet(tmp_path / "nifti", work, tmp_path / "meta.csv", tmp_path / "body.csv", progress=False,
                              **kw)

    sid = run().written[0]
    assert run().complete == [sid]
    write_volume(study / "SUV.nii.gz", np.full((4, 4, 5), 3.0), affine, "suv")       # a corrected release file
    assert run().written == [sid]
    assert read_volume(work / "suv" / f"{sid}.nii.gz", "suv").array.max() == np.float32(3.0)
    (tmp_path / "body.csv").write_text("study,height_m,weight_kg\nPETCT_aaa,1.81,90\n")  # a corrected weight
    assert run().written == [sid]
    assert (work / "demographics.csv").read_text().splitlines()[1] == f"{sid},1.810,90.0,M,61.0"
    (tmp_path / "body.csv").write_text("study,height_m,weight_kg\nPETCT_zzz,1.7,70\n")      # the row is withdrawn
    assert list(run().skipped) == [sid]
    assert (work / "demographics.csv").read_text().splitlines()[1:] == [], "a withdrawn study leaves the table"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ManifestError, match="--overwrite"):
        import_autopet(tmp_path / "nifti", tmp_path / "mine", tmp_path / "meta.csv", tmp_path / "body.csv",
                       progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
