"""End-to-end runs of 3_Evaluations/2_organ_stats.py, 3_compare_cohorts.py and 4_paired_metrics.py on tiny
phantom cohorts (16 mm; the 'reference' and the 'synthetic' cohort differ in their seed)."""

from __future__ import annotations

import csv
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from libs.demographics import Demographics
from libs.phantom.writer import write_phantom_cohort

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = [Demographics(f"s{i}", h, w, sex, age) for i, (h, w, sex, age) in enumerate([
    (1.80, 70.0, "M", 40.0), (1.75, 95.0, "M", 72.0), (1.85, 88.0, "M", 55.0), (1.70, 62.0, "M", 80.0),
    (1.62, 55.0, "F", 35.0), (1.60, 82.0, "F", 68.0), (1.68, 74.0, "F", 50.0), (1.55, 58.0, "F", 77.0)])]


def script(name: str):
    """The click command of a stage script (file names start with a digit, so load them by path)."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "3_Evaluations" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def invoke(name: str, *args: str):
    return CliRunner().invoke(script(name), [*args, "--quiet"], catch_exceptions=False)


def read(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    for name, seed, spacing in (("reference", 1, 16.0), ("synthetic", 2, 16.0), ("reference8", 1, 8.0)):
        report = write_phantom_cohort(root / name, SUBJECTS, seed, spacing, progress=False)
        assert not report.failed, report.failed
    shutil.copytree(root / "synthetic", root / "unlabelled")
    shutil.rmtree(root / "unlabelled" / "labels")
    return root


def test_help_of_every_script():
    for name in ("1_segment.py", "2_organ_stats.py", "3_compare_cohorts.py", "4_paired_metrics.py"):
        res = CliRunner().invoke(script(name), ["--help"])
        assert res.exit_code == 0 and "--quiet" in res.output, res.output
        assert name == "2_organ_stats.py" or "default:" in res.output, f"{name}: options show their defaults"


def test_organ_stats_end_to_end_and_resume(cohorts, tmp_path):
    out = tmp_path / "stats.csv"
    res = invoke("2_organ_stats.py", "--cohort", str(cohorts / "reference"), "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = read(out)
    assert len(rows) == 7 * len(SUBJECTS), "body + 6 organ regions per subject"
    liver = [r for r in rows if r["region"] == "liver"]
    assert all(800 < float(r["volume_ml"]) < 3500 and 1.0 < float(r["suv_mean"]) < 4.0 for r in liver)
    kid = {r["subject_id"] + r["region"]: float(r["volume_ml"]) for r in rows if r["region"].startswith("kidney")}
    assert kid["s0kidneys"] == pytest.approx(kid["s0kidney_left"] + kid["s0kidney_right"])
    body = [r for r in rows if r["region"] == "body"]
    assert all(r["suv_peak"] == "" and float(r["length_mm"]) > 500 for r in body)
    res = invoke("2_organ_stats.py", "--cohort", str(cohorts / "reference"), "--out", str(out))
    assert "0 computed, 8 reused" in res.output


def test_organ_stats_without_labels_says_so(cohorts, tmp_path):
    out = tmp_path / "stats.csv"
    res = invoke("2_organ_stats.py", "--cohort", str(cohorts / "unlabelled"), "--out", str(out))
    assert res.exit_code == 0 and "no labels" in res.output and "whole-body" in res.output
    assert {r["region"] for r in read(out)} == {"body"}


def test_compare_cohorts_end_to_end(cohorts, tmp_path):
    out = tmp_path / "cmp"
    res = invoke("3_compare_cohorts.py", "--reference", str(cohorts / "reference"), "--synthetic",
                 str(cohorts / "synthetic"), "--synthetic", str(cohorts / "unlabelled"), "--out", str(out),
                 "--min-volume-ml", "150", "--preview-subjects", "2")
    assert res.exit_code == 0, res.output
    rows = read(out / "comparison.csv")
    spleen = [r for r in rows if r["region"] == "spleen" and r["measure"] == "suv_mean" and r["subgroup"] == "all"]
    excl = {(r["cohort"], r["region"]): r for r in read(out / "exclusions.csv")}
    assert int(excl[("reference", "spleen")]["excluded"]) == sum(1 for r in read(out / "stats" / "reference.csv")
                                                                 if r["region"] == "spleen"
                                                                 and float(r["volume_ml"]) < 150)
    assert int(spleen[0]["n"]) == 8 - int(excl[("reference", "spleen")]["excluded"])
    liver = {r["cohort"]: r for r in rows if r["region"] == "liver" and r["measure"] == "volume_ml"
             and r["subgroup"] == "sex=F"}
    assert int(liver["reference"]["n"]) == 4 and 0 <= float(liver["synthetic"]["welch_p"]) <= 1
    assert liver["unlabelled"]["n"] == "0", "a cohort without labels has no organ values"
    md = (out / "comparison.md").read_text()
    assert "## Subgroup: age>65" in md and "## Demographic response" in md and "< 150 mL" in md
    assert {r["covariate"] for r in read(out / "response.csv")} == {"weight_kg", "height_m", "age_years"}
    for fig in ("violins_organs.png", "violins_body.png", "demographics.png", "previews.png"):
        data = (out / "figures" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{fig}: {len(data)} bytes"
    assert not list((cohorts / "reference").rglob("stats*")), "cohorts stay read-only"


def test_compare_refuses_a_non_cohort(cohorts, tmp_path):
    res = invoke("3_compare_cohorts.py", "--reference", str(tmp_path), "--synthetic", str(cohorts / "synthetic"),
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "demographics.csv: not found" in res.output
    assert len(res.output.strip().splitlines()) == 1


def metrics_by(path: Path) -> dict:
    return {(r["subject_id"], r["target"], r["metric"]): r for r in read(path)}


def test_paired_metrics_identical_cohorts(cohorts, tmp_path):
    out = tmp_path / "same.csv"
    res = invoke("4_paired_metrics.py", "--a", str(cohorts / "reference"), "--b", str(cohorts / "reference"),
                 "--out", str(out))
    assert res.exit_code == 0, res.output
    got = metrics_by(out)
    assert float(got[("s0", "liver", "dice")]["value"]) == 1.0
    assert float(got[("s0", "heart", "hausdorff")]["value"]) == 0.0
    assert got[("s3", "ct", "psnr")]["value"] == "inf" and float(got[("s3", "suv", "ssim")]["value"]) == 1.0
    assert float(got[("s5", "suv", "mae")]["value"]) == 0.0 and got[("s5", "ct", "mae")]["unit"] == "HU"
    summary = {(r["target"], r["metric"]): r for r in read(tmp_path / "same_summary.csv")}
    assert summary[("ct", "psnr")]["n_infinite"] == "8"


def test_paired_metrics_resample_other_grid_and_subset(cohorts, tmp_path):
    out = tmp_path / "grid.csv"
    res = invoke("4_paired_metrics.py", "--a", str(cohorts / "reference"), "--b", str(cohorts / "reference8"),
                 "--out", str(out), "--metrics", "dice,hausdorff,mae", "--organs", "liver,heart")
    assert res.exit_code == 0, res.output
    assert "resampled onto a's grid" in res.output
    rows = read(out)
    assert {r["metric"] for r in rows} == {"dice", "hausdorff", "mae"}
    assert all(r["resampled"] == "True" for r in rows)
    liver = [float(r["value"]) for r in rows if r["target"] == "liver" and r["metric"] == "dice"]
    assert len(liver) == 8 and min(liver) > 0.7, f"same anatomy on two grids: Dice {liver}"
    hd = [float(r["value"]) for r in rows if r["target"] == "heart" and r["metric"] == "hausdorff"]
    assert all(math.isfinite(v) and v <= 32.0 for v in hd), hd


def test_paired_metrics_without_labels_and_errors(cohorts, tmp_path):
    out = tmp_path / "nl.csv"
    res = invoke("4_paired_metrics.py", "--a", str(cohorts / "reference"), "--b", str(cohorts / "unlabelled"),
                 "--out", str(out), "--metrics", "dice", "--metrics", "psnr")
    assert res.exit_code == 0, res.output
    dice_rows = [r for r in read(out) if r["metric"] == "dice"]
    assert dice_rows and all(r["value"] == "" and r["note"] == "no labels in b" for r in dice_rows)
    bad = invoke("4_paired_metrics.py", "--a", str(cohorts / "reference"), "--b", str(cohorts / "synthetic"),
                 "--out", str(out), "--metrics", "dice,iou")
    assert bad.exit_code == 1 and "unknown metric 'iou'" in bad.output
