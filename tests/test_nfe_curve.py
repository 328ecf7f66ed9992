"""bench/nfe_curve.py: fidelity runs of other samplers against a many-step reference, with the run-to-run noise
measured from two sampling seeds (synthetic fidelity folders, no training)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("volume_ml", "length_mm", "fat_volume_ml", "lung_volume_ml", "suv_mean", "ct_roughness_hu")
FIELDS = ("region", "measure", "subgroup", "n_ref", "ref_mean", "ref_sd", "generated_mean", "generated_sd",
          "generated_pct", "generated_p", "generated_se", "floor_mean", "floor_sd", "floor_pct", "floor_p",
          "floor_se")


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("nfe_curve", ROOT / "bench" / "nfe_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, means: dict, sr_steps: int = 10, seed: int = 0, sr_hash: str = "b" * 64,
         ref_mean: float = 100.0) -> Path:
    """A fidelity output folder: fidelity.csv (every measure × sex, held-out mean ``ref_mean``, SD 10, n 25;
    generated SD 10 and mean ``means[(measure, sex)]`` or 100) and two generated sidecars."""
    d = root / name
    (d / "generated" / "meta").mkdir(parents=True)
    with open(d / "fidelity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for m in MEASURES:
            for g in ("sex=F", "sex=M", "age<=65"):
                mean = means.get((m, g), 100.0)
                w.writerow({"region": "body", "measure": m, "subgroup": g, "n_ref": 25, "ref_mean": ref_mean,
                            "ref_sd": 10.0, "generated_mean": mean, "generated_sd": 10.0,
                            "generated_pct": 100.0 * (mean - ref_mean) / ref_mean, "generated_p": 0.5,
                            "generated_se": (mean - ref_mean) / (10.0 * math.sqrt(2 / 25)), "floor_mean": 100.0,
                            "floor_sd": 10.0, "floor_pct": 0.0, "floor_p": 1.0, "floor_se": 0.0})
    for k in range(2):
        meta = {"subject_id": f"s{k}", "seed": 1000 * seed + k, "seed_superres": 2000 * seed + k,
                "sampler": {"solver": "heun", "steps": 24, "churn": 10.0},
                "sampler_superres": {"solver": "euler", "steps": sr_steps, "churn": 4.0, "sigma_max": 10.0,
                                     "cond_noise": 0.05},
                "checkpoints": {"lowres": {"sha256": "a" * 64}, "superres": {"sha256": sr_hash}}}
        (d / "generated" / "meta" / f"s{k}.json").write_text(json.dumps(meta))
    return d


def test_seed_noise_pools_the_between_seed_spread_in_standard_errors(tmp_path):
    nfe = _module()
    # one measure × sex row differs between the seeds by 2·√2 standard errors, the other 9 drawn rows not at all
    # (the two length rows, set by the height law, stay out of the pool): c = √(4 / 10); σ_seed = c·SE, SE = 2
    se = 10.0 / math.sqrt(25)
    a = nfe.read_rows(_run(tmp_path, "a", {}) / "fidelity.csv")
    b = nfe.read_rows(_run(tmp_path, "b", {("lung_volume_ml", "sex=M"): 100.0 + 2 * math.sqrt(2) * se})
                      / "fidelity.csv")
    c, sigma = nfe.seed_noise(a, b)
    assert c == pytest.approx(math.sqrt(4 / 10))
    assert sigma[("body", "volume_ml", "sex=F")] == pytest.approx(c * se)
    assert set(sigma) == set(nfe.KEYS) and len(nfe.KEYS) == 12, "body measures × sex only, not the age groups"


def test_runs_hold_or_fail_against_the_reference_and_the_report_says_which(tmp_path):
    se = 2.0
    ref = _run(tmp_path, "ref", {}, sr_steps=32)
    noise_a = _run(tmp_path, "preset", {}, sr_steps=10)
    noise_b = _run(tmp_path, "preset_g1", {("fat_volume_ml", "sex=F"): 100.0 + math.sqrt(2) * se}, sr_steps=10,
                   seed=1)
    # c = √(1 / 10) → tolerance 2·√2·c·SE = 1.79 % of the mean: the lungs 3 % off fail, the rest hold
    far = _run(tmp_path, "sr5", {("lung_volume_ml", "sex=M"): 97.0}, sr_steps=5)
    out = tmp_path / "nfe.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "nfe_curve.py"), str(ref), str(noise_a), str(far),
                          "--noise", str(noise_a), str(noise_b), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    tol = 100 * 2 * math.sqrt(2) * math.sqrt(1 / 10) * se / 100.0
    assert res.stdout.strip().splitlines()[-1] == (f"{out}: reference 79 calls; seed noise 0.32 SE; measures "
                                                   "holding: 52 calls 11/12, 57 calls 12/12")
    md = out.read_text()
    assert "| lung_volume_ml | M | +0.0 | +0.0 (+0.0) | -3.0 (-3.0 ✗) |" + f" ±{tol:.1f} |" in md, md
    assert "low-res heun 24 (churn 10) + SR euler 5 (churn 4, σ_max 10) | 52 (47 + 5) | 11/12 |" in md
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("problem", ["other_models", "other_cohort", "same_seeds", "other_recipe"])
def test_refuses_runs_that_are_not_comparable(tmp_path, problem):
    ref = _run(tmp_path, "ref", {}, sr_steps=32)
    a = _run(tmp_path, "a", {})
    b = _run(tmp_path, "b", {}, seed=0 if problem == "same_seeds" else 1,
             sr_steps=5 if problem == "other_recipe" else 10)
    run = _run(tmp_path, "run", {}, sr_steps=5, sr_hash="c" * 64 if problem == "other_models" else "b" * 64,
               ref_mean=90.0 if problem == "other_cohort" else 100.0)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "nfe_curve.py"), str(ref), str(run), "--noise",
                          str(a), str(b), "--out", str(tmp_path / "x.md")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0
    expected = {"other_models": "other trained stages", "other_cohort": "another held-out cohort",
                "same_seeds": "same sampling seeds", "other_recipe": "two runs of one sampler recipe"}[problem]
    assert expected in res.stderr, res.stderr
    assert not (tmp_path / "x.md").exists()
