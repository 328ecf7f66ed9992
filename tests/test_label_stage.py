"""The label stage (libs/labelstage.py): input degradation, loss, training, prediction on a subject's own grid,
the cascade writing its labels under the cohort contract, export, discovery and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from libs.channels import DEFAULT_LABEL_GROUPS, ChannelSet
from libs.checkpoint import CheckpointError
from libs.cohort import Cohort
from libs.config import ConfigError, load_config
from libs.labelstage import (
    LabelConfig,
    SegmentationLoss,
    SegmentConfig,
    check_label_pairing,
    degrade,
    gaussian_blur,
    load_label_model,
    soft_dice_loss,
    train_labels,
)
from libs.lowres import LowresConfig, train_lowres
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.superres import SRConfig, train_superres
from libs.volumes import read_volume
from tests.test_superres import write_pair

ROOT = Path(__file__).resolve().parents[1]
CS = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
LABELS = {"in_plane_mm": 14.0, "data": {"grid": [32, 32, 64], "patch": [32, 32, 32], "load_workers": 1},
          "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_levels": [],
                    "channels_per_head": 8, "standardize_demographics": True},
          "optim": {"batch": 2, "lr_ref": 0.01, "ref_steps": 100, "warmup_steps": 2},
          "loop": {"steps": 40, "report_every": 10, "checkpoint_every": 40, "loader_workers": 0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 14 mm phantom cohort, a tiny CT + PET cascade trained on it and a label stage trained on it."""
    root = tmp_path_factory.mktemp("labstage")
    write_phantom_cohort(root / "cohort", sampled_demographics(3, seed=8), seed=8, spacing_mm=14.0, progress=False)
    write_pair(root, root / "cohort")
    cfg = json.loads(json.dumps(LABELS))
    cfg["data"]["cohort"], cfg["run_dir"] = str(root / "cohort"), str(root / "runs" / "labels")
    (root / "labels.yaml").write_text(yaml.safe_dump(cfg))
    low = train_lowres(load_config(root / "low.yaml", LowresConfig), device="cpu", progress=False)
    sr = train_superres(load_config(root / "sr.yaml", SRConfig), device="cpu", progress=False)
    lab = train_labels(load_config(root / "labels.yaml", LabelConfig), device="cpu", progress=False)
    return {"root": root, "low": low, "sr": sr, "labels": lab}


def test_blur_keeps_constants_and_smooths():
    flat = torch.full((2, 8, 9, 10), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 1.3), flat)
    x = torch.randn(2, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(x, 0.0) is x
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and float(y.std()) < 0.5 * float(x.std())
    spike = torch.zeros(1, 15, 15, 15)
    spike[0, 7, 7, 7] = 1
    blurred = gaussian_blur(spike, 1.5)
    assert abs(float(blurred.sum()) - 1) < 1e-5, "an interior impulse keeps its mass"
    profile = blurred[0, 7, 7, 4:11] / blurred[0, 7, 7, 7]
    want = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float32) / 1.5) ** 2)
    torch.testing.assert_close(profile, want, atol=0.02, rtol=0.02)


def test_degrade_is_seeded_and_respects_its_switches():
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = SegmentConfig(degrade_probability=1.0, noise_max=0.3, blur_max=1.0)
    a = degrade(x, cfg, torch.Generator().manual_seed(5))
    b = degrade(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)
    off = SegmentConfig(degrade_probability=0.0)
    assert torch.equal(degrade(x, off, torch.Generator().manual_seed(5)), x)
    with pytest.raises(ValueError, match="degrade_probability"):
        SegmentConfig(degrade_probability=1.5)


def test_dice_and_loss_reward_the_right_labels():
    groups = torch.randint(0, 4, (2, 6, 6, 6), generator=torch.Generator().manual_seed(2))
    right = 30.0 * torch.nn.functional.one_hot(groups, 4).movedim(-1, 1).float()
    wrong = 30.0 * torch.nn.functional.one_hot((groups + 1) % 4, 4).movedim(-1, 1).float()
    assert float(soft_dice_loss(right, groups, 4).max()) < 1e-3
    assert float(soft_dice_loss(wrong, groups, 4).min()) > 0.95
    loss = SegmentationLoss(4, dice_weight=1.0)
    x = torch.cat([torch.zeros(2, 2, 6, 6, 6), groups[:, None].float()], 1)

    def model(logits):
        return lambda images, c_noise, cond: logits

    good, bad = loss(model(right), x, None), loss(model(wrong), x, None)
    assert good.shape == (2,) and float(good.max()) < 1e-3 and float(bad.min()) > 25


def test_training_lowers_the_loss_and_records_the_label_set(setup):
    rows = [json.loads(line) for line in (setup["root"] / "runs" / "labels" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    norm = torch.load(setup["labels"], weights_only=True)["normalization"]
    assert ChannelSet.from_record(norm) == CS and norm["grid"] == [32, 32, 64] and "cond_mean" in norm


def test_prediction_on_the_subjects_own_grid(setup):
    model = load_label_model(setup["labels"], "cpu")
    cohort = Cohort(setup["root"] / "cohort")
    d = cohort.demographics()[0]
    s = cohort.load(d)
    lab = model.predict(s.ct.array, s.suv.array, d)
    assert lab.dtype == np.uint8 and lab.shape == s.ct.shape
    assert set(np.unique(lab).tolist()) <= set(CS.written_ids())
    # a volume of another length (z ≠ the network grid's 64) is labelled on its own grid
    ct, suv = s.ct.array[:, :, :50], s.suv.array[:, :, :50]
    assert model.predict(ct, suv, d).shape == ct.shape
    with pytest.raises(ValueError, match="in-plane"):
        model.predict(s.ct.array[:16], s.suv.array[:16], d)


def test_cascade_writes_contract_labels_from_the_label_stage(setup, tmp_path):
    from libs.cascade import generate_cascade_cohort
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nb,1.85,90,M,70\n")
    args = (setup["low"], setup["sr"], csv, tmp_path / "gen")
    report = generate_cascade_cohort(*args, device="cpu", progress=False, labels=setup["labels"])
    assert sorted(report.written) == ["a", "b"], report.failed
    cohort = Cohort(tmp_path / "gen")
    sha = load_label_model(setup["labels"]).sha256
    for sid in ("a", "b"):
        ct = read_volume(cohort.path("ct", sid), "ct")
        lab = read_volume(cohort.path("labels", sid), "labels")
        assert lab.array.dtype == np.uint8 and lab.shape == ct.shape
        np.testing.assert_allclose(lab.affine, ct.affine)
        assert set(np.unique(lab.array).tolist()) <= set(CS.written_ids())
        meta = json.loads(cohort.path("meta", sid).read_text())
        assert meta["labels"]["source"] == "generated" and meta["labels"]["label_stage"]["sha256"] == sha
        assert [g["name"] for g in meta["labels"]["groups"]] == list(DEFAULT_LABEL_GROUPS)
    again = generate_cascade_cohort(*args, device="cpu", progress=False, labels=setup["labels"])
    assert sorted(again.skipped) == ["a", "b"]
    cohort.path("labels", "b").unlink()
    again = generate_cascade_cohort(*args, device="cpu", progress=False, labels=setup["labels"])
    assert again.written == ["b"], "a subject whose labels are gone is made again"
    from libs.manifest import ManifestError
    with pytest.raises(ManifestError, match="other demographics, seeds"):
        generate_cascade_cohort(*args, device="cpu", progress=False)     # same folder, without the label stage


def test_pairing_refusals(setup):
    model = load_label_model(setup["labels"])
    sr_norm = torch.load(setup["sr"], weights_only=True)["normalization"]
    check_label_pairing(model, sr_norm, False)
    with pytest.raises(ConfigError, match="grid"):
        check_label_pairing(model, {**sr_norm, "grid": [64, 64, 128]}, False)
    with pytest.raises(ConfigError, match="own channels"):
        check_label_pairing(model, sr_norm, True)
    with pytest.raises(CheckpointError, match="not a label-stage"):
        load_label_model(setup["low"])


def test_export_discovery_and_fine_tune_start(setup, tmp_path):
    from libs.generate import export_stage_safetensors, find_label_stage, find_stage_checkpoints
    root = setup["root"]
    out = export_stage_safetensors(setup["labels"], tmp_path / "w" / "labels.safetensors")
    exported, trained = load_label_model(out), load_label_model(setup["labels"])
    cohort = Cohort(root / "cohort")
    d = cohort.demographics()[1]
    s = cohort.load(d, labels=False)
    assert torch.equal(exported.logits(s.ct.array, s.suv.array, d), trained.logits(s.ct.array, s.suv.array, d))
    low, sr, _ = find_stage_checkpoints(root / "runs")
    assert low.parent.name == "low" and sr.parent.name == "sr", "a label run is neither image stage"
    assert find_label_stage(root / "runs").parent.name == "labels"
    assert find_label_stage(tmp_path / "w") == out
    assert find_label_stage(tmp_path) == out and find_label_stage(root / "cohort") is None
    cfg = json.loads(json.dumps(LABELS))
    cfg.update(run_dir=str(tmp_path / "ft"), data={**cfg["data"], "cohort": str(root / "cohort")})
    cfg["loop"].update(steps=2, init_from=str(out), report_every=1, checkpoint_every=2)
    ft = train_labels(load_config(cfg, LabelConfig), device="cpu", progress=False)
    assert torch.load(ft, weights_only=True)["normalization"]["channel_mean"] == exported.normalization["channel_mean"]
    cfg["data"]["labels"] = {"liver": ["liver"]}
    cfg["run_dir"] = str(tmp_path / "ft2")
    with pytest.raises(Exception, match="label"):
        train_labels(load_config(cfg, LabelConfig), device="cpu", progress=False)


def test_infer_cli_takes_the_label_stage(setup, tmp_path):
    import importlib.util

    from click.testing import CliRunner
    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "2_Tests" / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\nc,1.70,70,F,50\n")
    res = CliRunner().invoke(infer.main, ["--model_dir", str(setup["root"] / "runs"), "--demographics", str(csv),
                                          "--out", str(tmp_path / "g"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "label stage:" in res.output and Cohort(tmp_path / "g").path("labels", "c").is_file()
    res = CliRunner().invoke(infer.main, ["--lowres", str(setup["low"]), "--labels", str(setup["labels"]),
                                          "--demographics", str(csv), "--out", str(tmp_path / "h"), "--quiet"])
    assert res.exit_code != 0 and "whole cascade" in res.output


@pytest.mark.parametrize("size", ["bench", "paper"])
def test_label_presets_fit_their_cascade(size):
    """labels_<size>.yaml labels the output grid of lowres_<size>.yaml's cascade, with the default groups."""
    configs = ROOT / "1_Trainings" / "configs"
    lab = load_config(configs / f"labels_{size}.yaml", LabelConfig)
    low = load_config(configs / f"lowres_{size}.yaml", LowresConfig)
    assert lab.data.grid == low.data.grid and lab.in_plane_mm == low.in_plane_mm
    assert lab.data.channel_set == CS and lab.data.crop[:2] == tuple(lab.data.grid[:2]), "whole axial plane"
    levels = 2 ** (len(lab.model.channel_mult) - 1)
    assert all(c % levels == 0 for c in (*lab.data.crop, *lab.data.grid))
