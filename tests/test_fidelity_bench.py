"""bench/fidelity.py end to end on tiny presets: train, generate, compare with the noise floor; then the same
trained stages evaluated on another held-out cohort without training (--runs-from)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from libs.generate import subject_seed
from tests.test_superres import LOWRES, SR

ROOT = Path(__file__).resolve().parents[1]


def _presets(root: Path) -> tuple[Path, Path]:
    low, sr = json.loads(json.dumps(LOWRES)), json.loads(json.dumps(SR))
    low["data"]["factor"] = 2
    (root / "low.yaml").write_text(yaml.safe_dump(low))
    sr["lowres_config"] = str(root / "low.yaml")
    (root / "sr.yaml").write_text(yaml.safe_dump(sr))
    return root / "low.yaml", root / "sr.yaml"


def _bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "fidelity.py"), *args, "--device", "cpu",
                           "--quiet"], capture_output=True, text=True, cwd=ROOT)


def _ids_and_heights(cohort: Path) -> list[tuple[str, str]]:
    with open(cohort / "demographics.csv", newline="") as fh:
        return [(r["subject_id"], r["height_m"]) for r in csv.DictReader(fh)]


def test_fidelity_bench_trains_compares_and_reevaluates_trained_stages(tmp_path):
    low, sr = _presets(tmp_path)
    out = tmp_path / "bench"
    res = _bench("--out", str(out), "--train-subjects", "8", "--subjects", "12", "--lowres-config", str(low),
                 "--superres-config", str(sr))
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{out}/fidelity.md: body measures within target"), last
    for name in ("fidelity.md", "fidelity.csv", "fidelity.png", "previews.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "fidelity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["measure"] for r in rows} >= {"volume_ml", "length_mm", "lung_volume_ml", "ct_roughness_hu"}
    assert _ids_and_heights(out / "heldout") == _ids_and_heights(out / "floor") == _ids_and_heights(
        out / "generated"), "reference, floor and generated cohorts share one demographics table"
    assert not set(_ids_and_heights(out / "train")) & set(_ids_and_heights(out / "heldout"))
    md = (out / "fidelity.md").read_text()
    assert "seeds: training 0, held-out 1, floor 2, generation 0" in md, md[:600]
    assert "| lung_volume_ml | height_m (per 10 cm) |" in md, "the lungs-on-height slope is reported"

    assert "samplers: low-res heun 3 steps" in md, md[:800]
    assert "## Organs" not in md and "organs within target" not in last, "a CT + PET model has no organ table"

    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ckpt-*.pt")}
    again = tmp_path / "again"
    res = _bench("--out", str(again), "--subjects", "12", "--lowres-config", str(low), "--superres-config", str(sr),
                 "--runs-from", str(out / "runs"), "--heldout-seed", "7", "--sampler-sr", "dpmpp_2m:2",
                 "--gen-seed", "3", "--sr-sigma-max-ratio", "7")
    assert res.returncode == 0, res.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ckpt-*.pt")} == ckpts, "no training"
    assert not (again / "train").exists() and not (again / "runs").exists()
    assert _ids_and_heights(again / "heldout") != _ids_and_heights(out / "heldout")
    text = (again / "fidelity.md").read_text()
    assert "held-out 7, floor 8, generation 3; trained stages from" in text, text[:600]
    first = _ids_and_heights(again / "heldout")[0][0]
    sidecar = json.loads((again / "generated" / "meta" / f"{first}.json").read_text())
    assert sidecar["seed"] == subject_seed(3, first) != subject_seed(7, first), "--gen-seed seeds the sampling"
    assert "SR dpmpp_2m 2 steps (churn 0) from σ 7·σ_data" in text, text[:800]
    assert sidecar["sampler_superres"]["sigma_max_ratio"] == 7.0, "--sr-sigma-max-ratio reaches the sampler"

    # exported weights (as committed in Resource/demo_weights) evaluate like the run folders they came from
    from libs.generate import export_stage_safetensors
    weights = tmp_path / "weights"
    for stage in ("lowres", "superres"):
        export_stage_safetensors(out / "runs" / stage, weights / f"{stage}.safetensors")
    exported = tmp_path / "exported"
    res = _bench("--out", str(exported), "--subjects", "12", "--lowres-config", str(low), "--superres-config",
                 str(sr), "--runs-from", str(weights))
    assert res.returncode == 0, res.stderr[-2000:]
    with open(exported / "fidelity.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows, "the same models on the same cohorts: the same table"


def test_fidelity_bench_with_label_channels_reports_the_organ_table(tmp_path):
    low, sr = _presets(tmp_path)
    raw = yaml.safe_load(low.read_text())
    raw["data"]["labels"] = "default"
    low.write_text(yaml.safe_dump(raw))
    out = tmp_path / "bench"
    res = _bench("--out", str(out), "--train-subjects", "8", "--subjects", "12", "--lowres-config", str(low),
                 "--superres-config", str(sr))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "organs within target" in res.stdout.strip().splitlines()[-1]
    ids = [sid for sid, _ in _ids_and_heights(out / "heldout")]
    assert all((out / "generated" / "labels" / f"{sid}.nii.gz").is_file() for sid in ids)
    with open(out / "fidelity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    organ = {(r["region"], r["measure"]) for r in rows if r["region"] != "body"}
    assert {("liver", "volume_ml"), ("heart", "suv_mean"), ("kidneys", "suv_max")} <= organ, organ
    md = (out / "fidelity.md").read_text()
    assert "## Organs: generated labels" in md and "Image–label consistency" in md
    comparison = (out / "comparison" / "comparison.md").read_text()
    assert "## Label sources" in comparison and "generated 12" in comparison and "provided 12" in comparison


def test_fidelity_bench_with_the_label_stage(tmp_path):
    """--labels-config: the label stage trains beside the CT + PET cascade and labels every generated subject; with
    --runs-from its run is reused (no training); --no-labels leaves the cohort unlabelled."""
    from tests.test_label_stage import LABELS
    low, sr = _presets(tmp_path)
    lab = json.loads(json.dumps(LABELS))
    lab["loop"].update(steps=10, checkpoint_every=10)
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump(lab))
    out = tmp_path / "bench"
    common = ("--subjects", "8", "--lowres-config", str(low), "--superres-config", str(sr))
    res = _bench("--out", str(out), "--train-subjects", "8", *common, "--labels-config", str(tmp_path / "lab.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "organs within target" in res.stdout.strip().splitlines()[-1]
    ids = [sid for sid, _ in _ids_and_heights(out / "heldout")]
    assert all((out / "generated" / "labels" / f"{sid}.nii.gz").is_file() for sid in ids)
    sidecar = json.loads((out / "generated" / "meta" / f"{ids[0]}.json").read_text())
    assert sidecar["labels"]["label_stage"]["step"] == 10
    md = (out / "fidelity.md").read_text()
    assert "## Organs: generated labels" in md and "label stage 10" in md, md[:900]
    assert "generated 8" in (out / "comparison" / "comparison.md").read_text()

    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ckpt-*.pt")}
    again = tmp_path / "again"
    res = _bench("--out", str(again), *common, "--runs-from", str(out / "runs"), "--labels-config",
                 str(tmp_path / "lab.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ckpt-*.pt")} == ckpts, "no training"
    assert "## Organs: generated labels" in (again / "fidelity.md").read_text()
    res = _bench("--out", str(tmp_path / "x"), *common, "--labels-config", str(tmp_path / "lab.yaml"), "--no-labels")
    assert res.returncode != 0 and "--no-labels" in res.stderr


def test_flow_arm_and_the_side_by_side_table(tmp_path):
    """--objective flow with flow presets, then bench/compare_arms.py against an EDM run of the same seeds."""
    low, sr = _presets(tmp_path)
    for raw_path, section in ((low, "diffusion"), (sr, "diffusion")):
        raw = yaml.safe_load(raw_path.read_text())
        raw.setdefault(section, {})["objective"] = "flow"
        flow_path = raw_path.with_name(raw_path.stem + "_flow.yaml")
        if raw_path == sr:
            raw["lowres_config"] = str(low.with_name("low_flow.yaml"))
        flow_path.write_text(yaml.safe_dump(raw))
    runs = {}
    for arm, (lo, s) in {"edm": (low, sr), "flow": (tmp_path / "low_flow.yaml", tmp_path / "sr_flow.yaml")}.items():
        runs[arm] = tmp_path / arm
        res = _bench("--out", str(runs[arm]), "--train-subjects", "8", "--subjects", "8", "--objective", arm,
                     "--lowres-config", str(lo), "--superres-config", str(s))
        assert res.returncode == 0, res.stderr[-2000:]
    assert "(objectives flow + flow)" in (runs["flow"] / "fidelity.md").read_text()
    out = tmp_path / "arms.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_arms.py"), str(runs["edm"]),
                          str(runs["flow"]), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith(f"{out}: body: p<0.05 EDM ")
    md = out.read_text()
    assert "the same held-out reference and noise floor" in md
    assert "| volume_ml | weight_kg (per 10 kg) |" in md, "the demographic slopes of both arms"
    assert "| lowres: objective, sampler | edm, heun 3 steps in sigma | flow, heun 3 steps in flow |" in md, md
    assert "| network evaluations per subject" in md and "| body | volume_ml | sex=F |" in md


def _fidelity_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fidelity_bench", ROOT / "bench" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_gives_the_steps_a_time_budget_left_a_stage_at():
    """fidelity.py --train-minutes generates with what training reached; its report says so."""
    fidelity = _fidelity_module()
    weights = ROOT / "Resource" / "demo_weights" / "lowres.safetensors"       # recorded step 2000
    assert fidelity.trained_steps(weights, "lowres", 2000) == "2000"
    assert fidelity.trained_steps(weights, "lowres", 20000) == "2000 (of 20000)"


@pytest.mark.parametrize("stage", ["lowres", "superres"])
def test_gpu_bench_presets_change_only_network_size_batch_and_speed_settings(stage):
    """*_bench_gpu.yaml are the bench presets (data, diffusion, sampler) with a larger network, batch and
    schedule: a GPU run measures the same benchmark."""
    from libs.config import load_config, to_dict
    from libs.lowres import LowresConfig
    from libs.superres import SRConfig
    cls = LowresConfig if stage == "lowres" else SRConfig
    configs = ROOT / "1_Trainings" / "configs"
    bench = to_dict(load_config(configs / f"{stage}_bench.yaml", cls))
    gpu = to_dict(load_config(configs / f"{stage}_bench_gpu.yaml", cls))
    assert gpu["model"]["model_channels"] > bench["model"]["model_channels"]
    for key in ("diffusion", "sample", "in_plane_mm"):
        if key in bench:
            assert gpu[key] == bench[key], key
    for key in ("grid", "factor", "patch"):
        assert gpu["data"].get(key) == bench["data"].get(key), key
    if stage == "superres":
        assert Path(gpu["lowres_config"]).name == "lowres_bench_gpu.yaml"
        assert gpu["augment"] == bench["augment"]
