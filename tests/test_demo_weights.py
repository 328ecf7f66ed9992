"""The committed demo weights (Resource/demo_weights/, made by `make demo-weights`) and fine-tuning from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from libs.channels import ChannelSet
from libs.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_safetensors_weights
from libs.config import ConfigError, load_config, to_dict
from libs.generate import export_stage_safetensors, load_init_weights, set_sampler_defaults, stage_channels
from libs.lowres import LowresConfig, train_lowres
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.superres import SRConfig, load_pairing, sr_cond_channels, train_superres

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "1_Trainings" / "configs"
WEIGHTS = ROOT / "Resource" / "demo_weights"
STAGES = {"lowres": LowresConfig, "superres": SRConfig}
# what the weights are: everything but where the data and runs live, how long and how fast they trained
SAME_AS_DEMO = {"lowres": ("in_plane_mm", "model", "diffusion", "sample", "height_law"),
                "superres": ("model", "diffusion", "augment", "sample", "window")}
PATHS = ("run_dir", "cohort", "lowres_config", "init_from")


def _without_paths(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in PATHS}
    return {k: _without_paths(v) if isinstance(v, dict) else v for k, v in out.items()}


@pytest.mark.parametrize("stage", STAGES)
def test_demo_weights_load_into_the_demo_preset_network(stage):
    cls = STAGES[stage]
    path = WEIGHTS / f"{stage}.safetensors"
    assert path.stat().st_size <= 10 * 2**20, f"{path}: {path.stat().st_size} bytes (limit 10 MB)"
    demo = load_config(CONFIGS / f"{stage}_demo.yaml", cls)
    assert Path(demo.loop.init_from).name == path.name, "the demo preset starts from these weights"
    tensors, meta = load_safetensors_weights(path)
    channels = demo.data.channel_set if stage == "lowres" else load_pairing(demo).channels
    assert ChannelSet.from_record(meta["normalization"]) == channels, "the demo preset generates these channels"
    net = demo.model.build(*stage_channels(stage, meta["normalization"]))
    norm = load_init_weights(path, stage, net)
    for key, value in net.state_dict().items():
        assert torch.equal(value, tensors[key]), key
    assert meta["weights"] == "ema" and meta["provenance"]["made_by"] == "make demo-weights"
    assert len(norm["channel_mean"]) == channels.count
    assert stage == "lowres" or len(norm["residual_std"]) == channels.count


@pytest.mark.parametrize("stage", STAGES)
def test_demo_weights_record_the_current_presets(stage):
    """The recorded config is the current bench preset (the one `make demo-weights` trains), paths aside,
    and the demo preset describes the same network, diffusion and sampler."""
    cls = STAGES[stage]
    _, meta = load_safetensors_weights(WEIGHTS / f"{stage}.safetensors")
    recorded = to_dict(load_config(meta["config"], cls))
    bench = to_dict(load_config(CONFIGS / f"{stage}_bench.yaml", cls))
    assert _without_paths(recorded) == _without_paths(bench), "re-run `make demo-weights` after changing the preset"
    demo = to_dict(load_config(CONFIGS / f"{stage}_demo.yaml", cls))
    for key in SAME_AS_DEMO[stage]:
        assert demo[key] == recorded[key], f"{stage}_demo.yaml '{key}' differs from the demo weights'"
    assert demo["data"].get("grid", recorded["data"].get("grid")) == recorded["data"].get("grid")
    assert demo["data"].get("patch", recorded["data"].get("patch")) == recorded["data"].get("patch")
    assert demo["data"].get("lr_anchors") == recorded["data"].get("lr_anchors"), "LR anchors: demo vs weights"


def _tiny(root: Path) -> dict:
    return {"run_dir": str(root / "run"), "in_plane_mm": 14.0,
            "data": {"cohort": str(root / "cohort"), "grid": [32, 32, 64], "factor": 4, "load_workers": 1},
            "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "channels_per_head": 8},
            "optim": {"batch": 2, "lr_ref": 0.01, "ref_steps": 100, "warmup_steps": 0},
            "loop": {"steps": 3, "checkpoint_every": 3, "report_every": 1, "loader_workers": 0}}


def test_fine_tune_starts_from_exported_weights_and_refuses_the_other_stage(tmp_path):
    write_phantom_cohort(tmp_path / "cohort", sampled_demographics(2, seed=3), seed=3, spacing_mm=14.0,
                         progress=False)
    base = _tiny(tmp_path)
    train_lowres(load_config(base, LowresConfig), device="cpu", progress=False)
    exported = export_stage_safetensors(tmp_path / "run", tmp_path / "w.safetensors",
                                        provenance={"made_by": "test"})
    tensors, meta = load_safetensors_weights(exported)
    assert meta["stage"] == "lowres" and meta["step"] == 3
    tuned = json.loads(json.dumps(base))
    tuned["run_dir"] = str(tmp_path / "tuned")
    tuned["optim"]["lr_ref"] = 1e-9
    tuned["loop"].update(steps=1, init_from=str(exported), seed=7)      # another seed: another random init
    train_lowres(load_config(tuned, LowresConfig), device="cpu", progress=False)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "tuned"))
    weight = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 5)
    start, after = tensors[weight].float(), ckpt["model"][weight].float()
    cosine = float((start * after).sum() / (start.norm() * after.norm()))
    assert cosine > 0.999, f"the fine-tune did not start from the exported weights (cosine {cosine:.4f})"
    assert ckpt["normalization"]["channel_mean"] == meta["normalization"]["channel_mean"]
    sr = load_config(yaml.safe_load((CONFIGS / "superres_demo.yaml").read_text()), SRConfig)
    with pytest.raises(CheckpointError, match="'lowres' weights, this is the superres stage"):
        cond = sr_cond_channels(ChannelSet(), sr.data.lr_anchors)
        load_init_weights(exported, "superres", sr.model.build(in_channels=2, cond_channels=cond))
    other = load_config({**base, "model": {**base["model"], "model_channels": 16, "channels_per_head": 16}},
                        LowresConfig)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_init_weights(exported, "lowres", other.model.build(in_channels=2, cond_channels=4))


def test_generation_from_exported_weights_equals_the_training_runs(tmp_path):
    """infer.py / the cascade take exported weights (``*.safetensors``, as committed in Resource/demo_weights) in
    place of run folders: same EMA network, same subjects bit for bit; a folder of them is found by --model_dir."""
    import numpy as np

    from libs.cascade import generate_cascade_cohort
    from libs.cohort import Cohort
    from libs.generate import find_stage_checkpoints, read_stage_file, stage_source
    from libs.volumes import read_volume
    from tests.test_superres import write_pair

    write_phantom_cohort(tmp_path / "cohort", sampled_demographics(3, seed=6), seed=6, spacing_mm=14.0,
                         progress=False)
    write_pair(tmp_path, tmp_path / "cohort")
    train_lowres(load_config(tmp_path / "low.yaml", LowresConfig), device="cpu", progress=False)
    train_superres(load_config(tmp_path / "sr.yaml", SRConfig), device="cpu", progress=False)
    weights = tmp_path / "weights"
    for stage, run in (("lowres", "low"), ("superres", "sr")):
        export_stage_safetensors(tmp_path / "runs" / run, weights / f"{stage}.safetensors")
    csv_path = tmp_path / "demo.csv"
    csv_path.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nc,1.90,98,M,70\n")
    outs = {}
    for name, (low, sr) in {"runs": (tmp_path / "runs" / "low", tmp_path / "runs" / "sr"),
                            "exported": (stage_source(weights, "lowres"), stage_source(weights, "superres"))}.items():
        outs[name] = tmp_path / f"gen_{name}"
        report = generate_cascade_cohort(low, sr, csv_path, outs[name], batch=2, device="cpu", previews=False,
                                         progress=False)
        assert not report.failed, report.failed
    for sid in ("a", "c"):
        for kind in ("ct", "suv"):
            a = read_volume(Cohort(outs["runs"]).path(kind, sid), kind)
            b = read_volume(Cohort(outs["exported"]).path(kind, sid), kind)
            assert np.array_equal(a.array, b.array), f"{sid} {kind}"
    meta = json.loads(Cohort(outs["exported"]).path("meta", "a").read_text())
    assert "lowres.safetensors" in json.dumps(meta["checkpoints"]), meta["checkpoints"]
    low, sr, _ = find_stage_checkpoints(weights)
    assert (low.name, sr.name) == ("lowres.safetensors", "superres.safetensors")
    with pytest.raises(CheckpointError, match="'lowres' weights, this is the superres stage"):
        read_stage_file(weights / "lowres.safetensors", "superres")
    with pytest.raises(FileNotFoundError, match="neither a superres/ run folder"):
        stage_source(tmp_path / "runs", "superres")


def test_a_measured_sampler_is_recorded_in_exported_weights_without_touching_the_tensors(tmp_path):
    """export_safetensors.py --sample-from (how the committed weights got a sampler measured after training): the
    new default sampler reaches the loaded model, the tensors stay bit for bit, the earlier sampler stays in the
    provenance; a preset of the other stage or of another network is refused, and so is a plain re-export."""
    import subprocess
    import sys

    from libs.cascade import load_sr_model

    source = WEIGHTS / "superres.safetensors"
    preset = yaml.safe_load((CONFIGS / "superres_bench.yaml").read_text())
    preset["sample"].update(steps=7, sigma_max_ratio=33.0)
    (tmp_path / "sr.yaml").write_text(yaml.safe_dump(preset))
    other = json.loads(json.dumps(preset))
    other["model"]["model_channels"] = 24
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))

    def export(*args):
        return subprocess.run([sys.executable, str(ROOT / "1_Trainings" / "export_safetensors.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)

    out = tmp_path / "superres.safetensors"
    res = export("--checkpoint", str(source), "--sample-from", str(tmp_path / "sr.yaml"), "--out", str(out),
                 "--made-by", "test")
    assert res.returncode == 0, res.stderr
    before, old = load_safetensors_weights(source)
    after, new = load_safetensors_weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v for k, v in new.items() if k not in ("config", "provenance")} == \
        {k: v for k, v in old.items() if k not in ("config", "provenance")}
    sample = load_sr_model(out, torch.device("cpu"), ema=False).config.sample
    assert (sample.steps, sample.sigma_max_ratio, sample.solver) == (7, 33.0, preset["sample"]["solver"])
    assert new["provenance"]["sampler_before"] == old["config"]["sample"]
    assert new["provenance"]["made_by"] == old["provenance"]["made_by"]
    assert new["provenance"]["sampler_set_by"] == "test"
    for bad, message in ((CONFIGS / "lowres_bench.yaml", "not a superres preset"),
                         (tmp_path / "other.yaml", "'model' differs")):
        with pytest.raises(ConfigError, match=message):
            set_sampler_defaults(source, bad, tmp_path / "x.safetensors", "test")
    res = export("--checkpoint", str(source), "--out", str(tmp_path / "x.safetensors"))
    assert res.returncode == 2 and "--sample-from" in res.stderr, res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_demo_label_stage_is_the_bench_preset_and_loads():
    """Resource/demo_weights/labels.safetensors: small, made by a project command from labels_bench.yaml (paths
    aside), and labels_demo.yaml fine-tunes that very network on the same grid and label set."""
    from libs.labelstage import LabelConfig, load_label_model
    path = WEIGHTS / "labels.safetensors"
    assert path.stat().st_size <= 10 * 2**20, f"{path}: {path.stat().st_size} bytes (limit 10 MB)"
    _, meta = load_safetensors_weights(path)
    assert meta["stage"] == "labels" and meta["weights"] == "ema"
    assert meta["provenance"]["made_by"] in ("make demo-weights", "make demo-weights-labels")
    recorded = to_dict(load_config(meta["config"], LabelConfig))
    bench = to_dict(load_config(CONFIGS / "labels_bench.yaml", LabelConfig))
    assert _without_paths(recorded) == _without_paths(bench), "re-run `make demo-weights-labels` after changing it"
    demo = to_dict(load_config(CONFIGS / "labels_demo.yaml", LabelConfig))
    for key in ("in_plane_mm", "model", "segment"):
        assert demo[key] == recorded[key], f"labels_demo.yaml '{key}' differs from the demo weights'"
    for key in ("grid", "patch", "labels"):
        assert demo["data"][key] == recorded["data"][key], key
    assert Path(demo["loop"]["init_from"]).name == path.name
    model = load_label_model(path)
    assert model.channels == load_config(CONFIGS / "labels_demo.yaml", LabelConfig).data.channel_set
    assert model.grid == (56, 56, 96)
