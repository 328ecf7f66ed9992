"""Samplers: Karras schedule, exact-Gaussian-denoiser statistics, convergence, per-sample seeds."""

import math

import pytest
import torch

from libs.diffusion import Denoiser
from libs.nn import UNet
from libs.samplers import (
    initial_noise,
    karras_sigmas,
    network_calls,
    per_sample_generators,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)

MU, S = 0.3, 0.5  # data distribution N(MU, S²) per voxel
SIGMA_MAX = 80.0


def gaussian_denoiser(x, sigma, cond=None):
    """Exact D(x; σ) = E[x0 | x] = (s² x + σ² μ) / (s² + σ²) for x0 ~ N(μ, s²)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def exact_ode_solution(x_T):
    """Probability-flow ODE of N(μ, s²) is linear: x(σ) − μ ∝ √(s² + σ²), so x(0) follows from x(σ_max)."""
    return MU + (x_T - MU) * S / math.sqrt(S**2 + SIGMA_MAX**2)


def test_karras_schedule_endpoints_and_monotone():
    sigmas = karras_sigmas(32, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (33,), f"expected 33 sigmas, got {tuple(sigmas.shape)}"
    assert sigmas[0].item() == pytest.approx(80.0), f"first sigma {sigmas[0].item()}, expected 80"
    assert sigmas[-2].item() == pytest.approx(0.002), f"last nonzero sigma {sigmas[-2].item()}, not 0.002"
    assert sigmas[-1].item() == 0.0, f"schedule must end with 0, got {sigmas[-1].item()}"
    assert bool((sigmas[1:] < sigmas[:-1]).all()), f"schedule not strictly decreasing: {sigmas.tolist()}"
    i, n = 10, 32  # EDM Eq. 5 at one interior index
    want = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(want, rel=1e-12), f"sigma_{i} {sigmas[i].item()} != {want}"
    assert karras_sigmas(1).tolist() == [80.0, 0.0], "one step goes from sigma_max straight to 0"


def test_heun_gaussian_statistics():
    torch.manual_seed(0)
    x = torch.randn(2048, 1, 4, 4, 4) * SIGMA_MAX
    out = sample_heun(gaussian_denoiser, x, karras_sigmas(32))
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean - MU) < 0.01, f"Heun sample mean {mean:.4f}, expected {MU}"
    assert abs(std - S) < 0.015, f"Heun sample std {std:.4f}, expected {S}"


def _max_error(sampler, x, steps):
    return (sampler(gaussian_denoiser, x, karras_sigmas(steps)) - exact_ode_solution(x)).abs().max().item()


def test_heun_is_second_order_on_exact_ode():
    torch.manual_seed(1)
    x = torch.randn(64, 1, 2, 2, 2) * SIGMA_MAX
    errs = [_max_error(sample_heun, x, n) for n in (32, 64, 128)]
    assert errs[0] < 0.05, f"Heun (32 steps) deviates from the exact ODE solution by {errs[0]:.2e}"
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(3.0 < r < 5.0 for r in ratios), f"Heun error should drop ~4x per doubling, ratios {ratios}"


def test_euler_converges_first_order():
    torch.manual_seed(2)
    x = torch.randn(64, 1, 2, 2, 2) * SIGMA_MAX
    errs = [_max_error(sample_euler, x, n) for n in (32, 64, 128, 256)]
    assert errs == sorted(errs, reverse=True), f"Euler error should shrink with steps 32..256, got {errs}"
    ratios = [a / b for a, b in zip(errs[:-1], errs[1:], strict=True)]
    assert all(1.6 < r < 2.5 for r in ratios), f"Euler error should halve per doubling, ratios {ratios}"
    assert errs[-1] < 0.03, f"Euler (256 steps) error {errs[-1]:.3e} too large"
    heun = _max_error(sample_heun, x, 32)
    assert heun < errs[0], f"Heun error {heun:.2e} should beat Euler's {errs[0]:.2e} at 32 steps"


def test_dpmpp_2m_is_second_order_and_beats_euler_and_heun_at_equal_calls():
    torch.manual_seed(4)
    x = torch.randn(64, 1, 2, 2, 2) * SIGMA_MAX
    errs = [_max_error(sample_dpmpp_2m, x, n) for n in (16, 32, 64, 128)]
    ratios = [a / b for a, b in zip(errs[:-1], errs[1:], strict=True)]
    assert all(3.0 < r < 5.5 for r in ratios), f"DPM-Solver++(2M) error should drop ~4x per doubling, {ratios}"
    euler = _max_error(sample_euler, x, 32)
    heun = _max_error(sample_heun, x, 16)                  # 31 calls against 32
    assert errs[1] < euler / 5 and errs[1] < heun, f"2M {errs[1]:.2e}, Euler {euler:.2e}, Heun {heun:.2e}"
    assert network_calls("dpmpp_2m", 32) == network_calls("euler", 32) == 32 and network_calls("heun", 16) == 31
    calls = []

    def counting(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma, cond)

    sample_dpmpp_2m(counting, x, karras_sigmas(12))
    assert len(calls) == 12, "one denoiser call per step"


def test_dpmpp_2m_same_in_both_ode_spaces_gaussian_statistics_and_no_churn():
    torch.manual_seed(5)
    x = torch.randn(512, 1, 4, 4, 4) * SIGMA_MAX
    sigmas = karras_sigmas(24)
    torch.testing.assert_close(sample_dpmpp_2m(gaussian_denoiser, x, sigmas, space="flow"),
                               sample_dpmpp_2m(gaussian_denoiser, x, sigmas, space="sigma"))
    out = sample_dpmpp_2m(gaussian_denoiser, x, karras_sigmas(64))
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.015, (out.mean(), out.std())
    with pytest.raises(ValueError, match="space must be one of"):
        sample_dpmpp_2m(gaussian_denoiser, x, sigmas, space="time")
    with pytest.raises(ValueError, match="churn must be 0"):
        sample_dpmpp_2m(gaussian_denoiser, x, sigmas, churn=1.0)
    from libs.lowres import SampleConfig
    with pytest.raises(ValueError, match="dpmpp_2m is deterministic"):
        SampleConfig(solver="dpmpp_2m", churn=4.0)
    assert SampleConfig(solver="dpmpp_2m").solver == "dpmpp_2m"


def test_stochastic_heun_gaussian_statistics():
    torch.manual_seed(3)
    x = torch.randn(1024, 1, 4, 4, 4) * SIGMA_MAX
    out = sample_heun(gaussian_denoiser, x, karras_sigmas(64), churn=40.0, s_tmin=0.05, s_tmax=50.0,
                      generator=torch.Generator().manual_seed(0))
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean - MU) < 0.01, f"stochastic Heun mean {mean:.4f}, expected {MU}"
    assert abs(std - S) < 0.015, f"stochastic Heun std {std:.4f}, expected {S}"


def test_initial_noise_depends_only_on_seed():
    both = initial_noise((2, 4, 4, 8), [3, 7], sigma_max=80.0)
    alone = initial_noise((2, 4, 4, 8), [7], sigma_max=80.0)
    assert both.shape == (2, 2, 4, 4, 8), f"shape {tuple(both.shape)}"
    assert torch.equal(both[1], alone[0]), "subject 7's noise changed with its batch mates"
    assert not torch.allclose(both[0], both[1]), "different seeds gave the same noise"
    std = initial_noise((16, 16, 16), [0, 1, 2]).std().item()
    assert abs(std - 80.0) < 2.0, f"initial noise std {std:.2f}, expected sigma_max = 80"


def _tiny_denoiser():
    torch.manual_seed(0)
    net = UNet(in_channels=2, cond_channels=4, out_channels=2, model_channels=8, channel_mult=[1, 2],
               num_blocks=1, attn_levels=[1]).eval()
    with torch.no_grad():  # zero-initialized gains would make F ≡ 0 and the test vacuous
        net.out_gain.fill_(1.0)
        for block in [*net.enc.values(), *net.dec.values()]:
            if hasattr(block, "emb_gain"):
                block.emb_gain.fill_(1.0)
    return Denoiser(net)


@torch.no_grad()
def test_per_sample_seed_reproducibility():
    denoiser, shape, sigmas = _tiny_denoiser(), (2, 8, 8, 8), karras_sigmas(6)
    cond = torch.rand(1, 4, 1, 1, 1).expand(2, 4, 8, 8, 8)

    def run(seeds):
        x = initial_noise(shape, seeds, sigma_max=80.0)
        return sample_heun(denoiser, x, sigmas, cond[: len(seeds)], churn=5.0,
                           generator=per_sample_generators(seeds))

    both, alone = run([3, 7]), run([7])
    diff = (both[1] - alone[0]).abs().max().item()
    assert diff < 1e-5, f"subject 7 sampled with subject 3 differs from alone by {diff:.2e}"
    assert (both[0] - both[1]).abs().max().item() > 1e-2, "subjects 3 and 7 gave the same sample"


def test_per_sample_generators_reject_wrong_batch():
    with pytest.raises(ValueError, match="generators"):
        sample_euler(gaussian_denoiser, torch.zeros(3, 1, 2, 2, 2) + 80, karras_sigmas(2), churn=1.0,
                     generator=per_sample_generators([0, 1]))
