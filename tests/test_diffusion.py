"""EDM preconditioning (Table 1), log-normal σ, EDM/EDM2 losses, and a tiny training run."""

import math

import pytest
import torch

from libs.diffusion import (
    Denoiser,
    EDM2Loss,
    EDMLoss,
    append_dims,
    precondition,
    randn_like,
    sample_training_sigma,
)
from libs.nn import UNet

SD = 0.5


class FixedNet(torch.nn.Module):
    """F(y, c_noise) = sin(3y) + 7 and u(σ) = c_noise + 0.25: an arbitrary, known network."""

    def forward(self, y, c_noise, cond=None, return_logvar=False):
        self.seen = (y, c_noise, cond)
        out = torch.sin(3 * y) + 7
        return (out, c_noise + 0.25) if return_logvar else out


def test_append_dims():
    s = torch.arange(3.0)
    assert append_dims(s, 5).shape == (3, 1, 1, 1, 1), f"got {tuple(append_dims(s, 5).shape)}"
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2, 2), 2)


def test_preconditioning_values_at_sigma_data():
    c_skip, c_out, c_in, c_noise = precondition(torch.tensor([SD]), SD)
    assert c_skip.item() == pytest.approx(0.5), f"c_skip(σd) = {c_skip.item()}, expected 1/2"
    assert c_out.item() == pytest.approx(SD / math.sqrt(2)), f"c_out(σd) = {c_out.item()}, expected σd/√2"
    assert c_in.item() == pytest.approx(1 / (SD * math.sqrt(2))), f"c_in(σd) = {c_in.item()}"
    assert c_noise.item() == pytest.approx(math.log(SD) / 4), f"c_noise(σd) = {c_noise.item()}"


def test_denoiser_passes_scaled_input_and_noise_label():
    net = FixedNet()
    x, sigma = torch.randn(3, 2, 2, 2, 4), torch.tensor([0.1, 0.5, 20.0])
    d = Denoiser(net, sigma_data=SD)(x, sigma)
    y, c_noise, _ = net.seen
    c_in = 1 / (sigma**2 + SD**2).sqrt()
    assert torch.allclose(y, append_dims(c_in, 5) * x), "net input must be c_in(σ)·x"
    assert torch.allclose(c_noise, sigma.log() / 4), f"c_noise {c_noise.tolist()} != ln(σ)/4"
    want = append_dims(SD**2 / (sigma**2 + SD**2), 5) * x + append_dims(
        sigma * SD / (sigma**2 + SD**2).sqrt(), 5) * (torch.sin(3 * y) + 7)
    assert torch.allclose(d, want, atol=1e-6), f"D differs from EDM Eq. 7 by {(d - want).abs().max():.2e}"


def test_denoiser_is_identity_as_sigma_goes_to_zero():
    x = torch.randn(2, 2, 4, 4, 4)
    err = (Denoiser(FixedNet(), SD)(x, 1e-6) - x).abs().max().item()
    assert err < 1e-4, f"D(x, σ→0) must return x (c_skip→1, c_out→0); off by {err:.2e}"


def test_denoiser_dtype_contract():
    net = FixedNet()
    d = Denoiser(net)(torch.randn(2, 1, 2, 2, 2, dtype=torch.bfloat16), torch.ones(2), torch.zeros(2, 3))
    assert net.seen[0].dtype == torch.bfloat16, f"net must run in the input dtype, got {net.seen[0].dtype}"
    assert d.dtype == torch.float32, f"D must be float32, got {d.dtype}"


def test_training_sigma_is_lognormal_and_seeded():
    s = sample_training_sigma(200_000, -0.4, 1.0, torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 0.4) < 0.01, f"mean ln σ {s.log().mean().item():.4f}, expected -0.4"
    assert abs(s.log().std().item() - 1.0) < 0.01, f"std ln σ {s.log().std().item():.4f}, expected 1.0"
    again = sample_training_sigma(200_000, -0.4, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(s, again), "the same generator seed must give the same sigmas"


def _expected_draws(x, seed, P_mean, P_std):
    """Replays the loss's own random draws: σ first, then the noise, from one generator."""
    g = torch.Generator().manual_seed(seed)
    sigma = sample_training_sigma(x.shape[0], P_mean, P_std, g)
    return sigma, x + append_dims(sigma, 5) * randn_like(x, g)


def test_edm2_loss_formula():
    x = torch.rand(3, 2, 2, 2, 4)
    loss = EDM2Loss(-0.4, 1.0, SD)(Denoiser(FixedNet(), SD), x, None, torch.Generator().manual_seed(5))
    sigma, noisy = _expected_draws(x, 5, -0.4, 1.0)
    d, u = Denoiser(FixedNet(), SD)(noisy, sigma, return_logvar=True)
    assert torch.allclose(u, sigma.log() / 4 + 0.25), "logvar must come from the net's head"
    weight = (sigma**2 + SD**2) / (sigma * SD) ** 2
    want = weight / u.exp() * (d - x).square().mean(dim=(1, 2, 3, 4)) + u
    assert loss.shape == (3,), f"per-sample loss expected, got {tuple(loss.shape)}"
    assert torch.allclose(loss, want, rtol=1e-5), f"EDM2 loss {loss.tolist()} != {want.tolist()}"


def test_edm_loss_formula():
    x = torch.rand(3, 2, 2, 2, 4)
    loss = EDMLoss(-1.2, 1.2, SD)(Denoiser(FixedNet(), SD), x, None, torch.Generator().manual_seed(6))
    sigma, noisy = _expected_draws(x, 6, -1.2, 1.2)
    d = Denoiser(FixedNet(), SD)(noisy, sigma)
    want = (sigma**2 + SD**2) / (sigma * SD) ** 2 * (d - x).square().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(loss, want, rtol=1e-5), f"EDM loss {loss.tolist()} != {want.tolist()}"


def test_training_tiny_unet_decreases_loss():
    torch.manual_seed(0)
    net = UNet(2, 4, 2, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_levels=[])
    denoiser, edm2, plain = Denoiser(net), EDM2Loss(), EDMLoss(-0.4, 1.0)
    ramp = torch.linspace(0, 1, 8).expand(8, 8, 8)
    levels = torch.tensor([0.2, 0.5, 0.8, 1.0])
    x = torch.stack([torch.stack([ramp * a, (1 - ramp) * a]) for a in levels])  # (4, 2, 8, 8, 8)
    cond = levels.reshape(4, 1, 1, 1, 1).expand(4, 4, 8, 8, 8)

    @torch.no_grad()
    def evaluate(loss_fn):  # fixed draws, so before/after see the same σ and noise
        return torch.stack([loss_fn(denoiser, x, cond, torch.Generator().manual_seed(100 + k))
                            for k in range(8)]).mean().item()

    before, before_plain = evaluate(edm2), evaluate(plain)
    opt, g = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99)), torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = edm2(denoiser, x, cond, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, after_plain = evaluate(edm2), evaluate(plain)
    assert after < before - 0.3, f"EDM2 loss went {before:.3f} → {after:.3f}; expected a clear decrease"
    assert after_plain < 0.8 * before_plain, (
        f"weighted denoising error went {before_plain:.3f} → {after_plain:.3f}; the net itself must learn")
