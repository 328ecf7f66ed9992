"""Flow matching (the paper's second arm): exact velocity ↔ denoiser, ODE samplers on Gaussian data with known
answers, the loss's irreducible value, time distributions, configs, training, resume / fine-tune refusals, and
the CLI end to end with ``objective: flow``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from libs.config import ConfigError, load_config
from libs.diffusion import (
    FlowLoss,
    VelocityDenoiser,
    append_dims,
    flow_sigma,
    flow_time,
    make_denoiser,
    sample_flow_time,
)
from libs.lowres import LowresConfig, SamplerSettings, train_lowres
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.samplers import karras_sigmas, sample_euler, sample_heun, schedule_sigmas, uniform_time_sigmas
from libs.superres import SRConfig, train_superres
from tests.test_lowres import tiny_config
from tests.test_superres import write_pair

ROOT = Path(__file__).resolve().parents[1]
MU, S = 0.3, 0.5            # data N(MU, S²) per voxel
SIGMA_MAX = 80.0


def exact_velocity(x_t, t, cond=None):
    """E[x − n | x_t] for x ~ N(μ, s²), n ~ N(0, 1), x_t = t x + (1 − t) n  (Gaussian conditioning):
    μ + (t s² − (1 − t)) / (t² s² + (1 − t)²) · (x_t − t μ)."""
    t = append_dims(torch.as_tensor(t, dtype=x_t.dtype).reshape(-1).expand(x_t.shape[0]), x_t.ndim)
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x_t - t * MU)


def exact_denoiser(y, sigma, cond=None):
    """E[x | x + σ n] = μ + s² / (s² + σ²) (y − μ), the EDM denoiser of the same data."""
    s2 = append_dims(torch.as_tensor(sigma, dtype=y.dtype).reshape(-1).expand(y.shape[0]), y.ndim) ** 2
    return MU + S**2 / (S**2 + s2) * (y - MU)


def exact_endpoint(y_T):
    """The probability-flow ODE of N(μ, s²) is linear: x_σ − μ ∝ √(s² + σ²) (the same ODE in flow time)."""
    return MU + (y_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)


FLOW_DENOISER = VelocityDenoiser(exact_velocity)


def test_velocity_denoiser_is_the_exact_change_of_variables():
    torch.manual_seed(0)
    for sigma in (0.002, 0.05, 0.5, 3.0, 80.0):
        y = MU + math.sqrt(S**2 + sigma**2) * torch.randn(4, 2, 3, 3, 3)
        got, want = FLOW_DENOISER(y, sigma), exact_denoiser(y, torch.tensor(sigma))
        err = (got - want).abs().max().item()
        assert err < 1e-5 * max(1.0, sigma), f"σ {sigma}: D through the velocity differs by {err:.2e}"
    assert flow_time(flow_sigma(torch.tensor(0.37))).item() == pytest.approx(0.37, abs=1e-7)
    assert flow_time(0.0) == 1.0, "σ = 0 is t = 1 (data)"


def test_flow_sampler_maps_noise_to_the_data_distribution():
    torch.manual_seed(1)
    x = torch.randn(1024, 1, 4, 4, 4) * SIGMA_MAX
    out = sample_heun(FLOW_DENOISER, x, karras_sigmas(64), space="flow")
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean - MU) < 0.01, f"flow Heun sample mean {mean:.4f}, expected {MU}"
    assert abs(std - S) < 0.015, f"flow Heun sample std {std:.4f}, expected {S}"


def _error(sampler, x, sigmas, space):
    return (sampler(FLOW_DENOISER, x, sigmas, space=space) - exact_endpoint(x)).abs().max().item()


@pytest.mark.parametrize("schedule, steps", [("karras", (32, 64, 128)), ("uniform_time", (16, 32, 64))])
def test_flow_time_heun_is_second_order_and_euler_first(schedule, steps):
    """(Step counts where the error is still far above float32 round-off.)"""
    torch.manual_seed(2)
    x = torch.randn(64, 1, 2, 2, 2) * SIGMA_MAX
    grids = [schedule_sigmas(schedule, n, 0.002, SIGMA_MAX) for n in steps]
    heun = [_error(sample_heun, x, g, "flow") for g in grids]
    euler = [_error(sample_euler, x, g, "flow") for g in grids]
    heun_ratios = [a / b for a, b in zip(heun[:-1], heun[1:])]
    euler_ratios = [a / b for a, b in zip(euler[:-1], euler[1:])]
    assert all(3.0 < r < 5.0 for r in heun_ratios), f"{schedule}: Heun errors {heun} should drop ~4x per doubling"
    assert all(1.6 < r < 2.5 for r in euler_ratios), f"{schedule}: Euler errors {euler} should halve per doubling"
    assert heun[0] < euler[0], f"Heun {heun[0]:.2e} should beat Euler {euler[0]:.2e}"


def test_euler_steps_coincide_in_both_variables_and_heun_steps_converge_together():
    torch.manual_seed(3)
    x = torch.randn(16, 1, 3, 3, 3) * SIGMA_MAX
    sigmas = karras_sigmas(12)
    e_sigma = sample_euler(FLOW_DENOISER, x, sigmas, space="sigma")
    e_flow = sample_euler(FLOW_DENOISER, x, sigmas, space="flow")
    assert (e_sigma - e_flow).abs().max().item() < 1e-4, "an Euler step is the same (DDIM) in σ and in t"
    gaps = []
    for n in (12, 24):
        h_sigma = sample_heun(FLOW_DENOISER, x, karras_sigmas(n), space="sigma")
        h_flow = sample_heun(FLOW_DENOISER, x, karras_sigmas(n), space="flow")
        gaps.append((h_sigma - h_flow).abs().max().item())
    assert gaps[0] > 1e-3, "Heun's correction does depend on the variables"
    assert gaps[1] < gaps[0] / 3, f"both are second order, so their gap shrinks ~4x per doubling: {gaps}"


def test_flow_loss_at_the_exact_velocity_is_its_irreducible_value():
    x = MU + S * torch.randn(256, 1, 6, 6, 6, generator=torch.Generator().manual_seed(4))
    loss = FlowLoss()(exact_velocity, x, None, torch.Generator().manual_seed(5))
    t = sample_flow_time(256, "logit_normal", -0.4, 1.0, torch.Generator().manual_seed(5))     # the same draw
    var = t**2 * S**2 + (1 - t) ** 2
    irreducible = (S**2 + 1) - (t * S**2 - (1 - t)) ** 2 / var            # Var(x − n | x_t)
    assert loss.shape == (256,)
    assert loss.mean().item() == pytest.approx(irreducible.mean().item(), rel=0.03)
    worse = FlowLoss()(lambda x_t, t, c: 1.1 * exact_velocity(x_t, t), x, None, torch.Generator().manual_seed(5))
    assert worse.mean() > loss.mean(), "any other velocity field scores worse"


def test_training_time_distributions():
    g = torch.Generator().manual_seed(6)
    t = sample_flow_time(40000, "logit_normal", -0.4, 1.0, g)
    logit = (t / (1 - t)).log()
    assert logit.mean().item() == pytest.approx(0.4, abs=0.03), "logit(t) = −ln σ ~ N(−P_mean, P_std²)"
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    u = sample_flow_time(40000, "uniform", generator=g)
    q = torch.quantile(u, torch.tensor([0.1, 0.5, 0.9])).tolist()
    assert q == pytest.approx([0.1, 0.5, 0.9], abs=0.015), f"uniform quantiles {q}"
    assert 0 < u.min() and u.max() < 1
    with pytest.raises(ValueError, match="time distribution"):
        sample_flow_time(4, "beta")


def test_uniform_time_grid():
    sigmas = uniform_time_sigmas(10, 0.002, 80.0)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and sigmas[0].item() == pytest.approx(80.0)
    t = flow_time(sigmas[:-1])
    assert torch.allclose(t.diff(), t.diff()[0].expand(9), rtol=1e-9), "equal steps in flow time"
    assert t[-1].item() == pytest.approx(1 / 1.002)


def test_objective_and_sampler_keys_are_validated():
    with pytest.raises(ConfigError, match="objective"):
        load_config({"diffusion": {"objective": "score"}}, LowresConfig)
    with pytest.raises(ConfigError, match="time_distribution"):
        load_config({"diffusion": {"objective": "flow", "time_distribution": "beta"}}, SRConfig)
    with pytest.raises(ConfigError, match="ode_space"):
        load_config({"sample": {"ode_space": "time"}}, LowresConfig)
    with pytest.raises(ConfigError, match="schedule"):
        load_config({"sample": {"schedule": "cosine"}}, LowresConfig)
    auto = SamplerSettings()
    assert auto.space("edm") == "sigma" and auto.space("flow") == "flow"
    assert SamplerSettings(ode_space="sigma").space("flow") == "sigma"
    with pytest.raises(ValueError, match="objective"):
        make_denoiser(torch.nn.Identity(), "score", 0.5)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_cohort")
    write_phantom_cohort(out, sampled_demographics(3, seed=8), seed=8, spacing_mm=14.0, progress=False)
    return out


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_flow_training_loss_falls_in_both_stages_and_records_the_objective(cohort_dir, tmp_path):
    write_pair(tmp_path, cohort_dir, objectives=("flow", "flow"))
    low = yaml.safe_load((tmp_path / "low.yaml").read_text())
    low["loop"].update(steps=60, report_every=10, checkpoint_every=60)
    train_lowres(load_config(low, LowresConfig), device="cpu", progress=False)
    sr = yaml.safe_load((tmp_path / "sr.yaml").read_text())
    sr["loop"].update(steps=60, report_every=10, checkpoint_every=60)
    train_superres(load_config(sr, SRConfig), device="cpu", progress=False)
    for stage in ("low", "sr"):
        run = tmp_path / "runs" / stage
        losses = _losses(run)
        first, last = losses[0], float(np.mean(losses[-2:]))
        assert last < 0.8 * first, f"{stage}: flow loss should fall, {first:.3f} → {last:.3f}"
        norm = torch.load(run / "ckpt-000000060.pt", weights_only=True)["normalization"]
        assert norm["objective"] == "flow", f"{stage}: the checkpoint records its objective"


def test_resume_or_fine_tune_with_another_objective_is_refused(cohort_dir, tmp_path):
    cfg = tiny_config(cohort_dir, tmp_path / "run", steps=2, checkpoint_every=2)
    cfg.diffusion.objective = "flow"
    train_lowres(cfg, device="cpu", progress=False)
    edm = tiny_config(cohort_dir, tmp_path / "run", steps=4, checkpoint_every=2)
    with pytest.raises(ConfigError, match="flow objective"):
        train_lowres(edm, device="cpu", progress=False)
    from libs.generate import export_stage_safetensors
    weights = export_stage_safetensors(tmp_path / "run", tmp_path / "flow.safetensors")
    fine = tiny_config(cohort_dir, tmp_path / "fine", steps=2, init_from=str(weights))
    with pytest.raises(ConfigError, match="flow objective"):
        train_lowres(fine, device="cpu", progress=False)


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_end_to_end_with_the_research_pairing_diffusion_then_flow(cohort_dir, tmp_path):
    """The research cascade: low-res diffusion (EDM) → super-resolution flow; each stage samples with its own."""
    write_pair(tmp_path, cohort_dir, objectives=("edm", "flow"))
    for script, cfg in (("1_Trainings/train_lowres.py", "low.yaml"), ("1_Trainings/train_superres.py", "sr.yaml")):
        res = _run(script, "--config", str(tmp_path / cfg), "--quiet", "--device", "cpu")
        assert res.returncode == 0, res.stderr
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nb,1.85,90,M,70\n")
    out = tmp_path / "gen"
    args = ["--lowres", str(tmp_path / "runs" / "low"), "--superres", str(tmp_path / "runs" / "sr"),
            "--demographics", str(csv), "--quiet", "--device", "cpu"]
    res = _run("2_Tests/infer.py", *args, "--out", str(out))
    assert res.returncode == 0, res.stderr
    for sid in ("a", "b"):
        meta = json.loads((out / "meta" / f"{sid}.json").read_text())
        assert meta["sampler"]["ode_space"] == "sigma" and meta["sampler_superres"]["ode_space"] == "flow"
        assert [meta["checkpoints"][k]["objective"] for k in ("lowres", "superres")] == ["edm", "flow"]
        assert (out / "ct" / f"{sid}.nii.gz").is_file() and (out / "suv" / f"{sid}.nii.gz").is_file()
    res = _run("2_Tests/infer.py", *args, "--out", str(tmp_path / "gen2"), "--ode-space", "sigma",
               "--schedule", "uniform_time")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "gen2" / "meta" / "a.json").read_text())
    assert meta["sampler_superres"]["ode_space"] == "sigma" and meta["sampler_superres"]["schedule"] == "uniform_time"
