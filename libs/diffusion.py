"""EDM preconditioning and training losses (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1; Karras et al. 2024, EDM2, Sec. 5 and Appendix).

Noise model: x_σ = x + σ n with n ~ N(0, I); volumes are (B, C, X, Y, Z) in the networks' [0, 1] units.
The denoiser D(x; σ) estimates E[x | x_σ]; losses are callables ``loss(denoiser, x, cond)`` returning
one value per sample, (B,).
"""

from __future__ import annotations

import torch
from torch import nn

Generators = torch.Generator | list[torch.Generator] | None


def append_dims(x: torch.Tensor, n: int) -> torch.Tensor:
    """Append trailing singleton dims until ``x`` has ``n`` dims: sigma (B,) → (B, 1, 1, 1, 1)."""
    if x.ndim > n:
        raise ValueError(f"cannot append dims to shape {tuple(x.shape)} to reach {n} dims")
    return x[(...,) + (None,) * (n - x.ndim)]


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (float32, on ``x.device``).

    ``generator``: None (global RNG), one torch.Generator for the whole batch, or a list with one
    generator per sample, so sample k's noise depends only on generator k.  Noise is drawn on the
    generator's device and moved, so CPU generators give device-independent results.
    """
    if generator is None:
        return torch.randn(x.shape, device=x.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    noise = [torch.randn(x.shape[1:], generator=g, device=g.device).to(x.device) for g in generator]
    return torch.stack(noise)


def precondition(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM Table 1 preconditioning for sigma (B,) → (c_skip, c_out, c_in, c_noise), each (B,)."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ), cond)   (EDM Eq. 7, Table 1).

    ``net(x, c_noise, cond)`` is the raw network F, e.g. :class:`libs.nn.UNet`.  The network runs in
    the dtype of ``x`` (bf16 under the caller's autocast is fine); the preconditioning and the output are
    float32.  forward(x (B, C, X, Y, Z), sigma (B,) or scalar, cond (B, Cc, X, Y, Z) | None)
    → D (B, C, X, Y, Z) float32 [, logvar (B,) with ``return_logvar=True``].
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None, return_logvar: bool = False):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = precondition(sigma, self.sigma_data)
        xf = x.float()
        net_in = (append_dims(c_in, x.ndim) * xf).to(x.dtype)
        cond = None if cond is None else cond.to(x.dtype)
        if return_logvar:
            f_x, logvar = self.net(net_in, c_noise, cond, return_logvar=True)
        else:
            f_x = self.net(net_in, c_noise, cond)
        d_x = append_dims(c_skip, x.ndim) * xf + append_dims(c_out, x.ndim) * f_x.float()
        return (d_x, logvar.float().reshape(-1)) if return_logvar else d_x


def sample_training_sigma(batch: int, P_mean: float = -0.4, P_std: float = 1.0,
                          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Log-normal training noise levels, ln σ ~ N(P_mean, P_std²) (EDM Table 1) → (batch,) float32."""
    gen_device = generator.device if generator is not None else device
    rnd = torch.randn(batch, generator=generator, device=gen_device)
    return (rnd * P_std + P_mean).exp().to(device if device is not None else rnd.device)


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)² (Table 1), which makes the effective network
    target unit-variance at every σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMLoss:
    """EDM loss (Eq. 2 with Table 1 weighting): λ(σ) · mean‖D(x + σn; σ) − x‖² per sample.

    Defaults are the EDM paper's (P_mean −1.2, P_std 1.2); the TotalGen preset uses :class:`EDM2Loss`.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def noisy(self, x: torch.Tensor, generator: torch.Generator | None):
        """Draw σ (B,) then x + σ n; returns (x_noisy, sigma)."""
        sigma = sample_training_sigma(x.shape[0], self.P_mean, self.P_std, generator, x.device)
        return x + append_dims(sigma, x.ndim) * randn_like(x, generator), sigma

    def __call__(self, denoiser, x: torch.Tensor, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, X, Y, Z) clean data, cond as for the denoiser → loss (B,)."""
        x_noisy, sigma = self.noisy(x.float(), generator)
        mse = (denoiser(x_noisy, sigma, cond) - x.float()).square().mean(dim=tuple(range(1, x.ndim)))
        return edm_weight(sigma, self.sigma_data) * mse


class EDM2Loss(EDMLoss):
    """EDM2 uncertainty-weighted loss (EDM2 Eq. 14–16, 21; Kendall et al. multi-task weighting):

        L(x) = λ(σ) / exp(u(σ)) · mean‖D(x + σn; σ) − x‖² + u(σ)

    with u(σ) the network's learned log-variance (``denoiser(..., return_logvar=True)``).  At its optimum
    exp(u) equals the expected weighted error at σ, which keeps the loss magnitude equal across σ.
    The mean over voxels (EDM2 sums over pixels) only rescales the loss; Adam is invariant to that.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)

    def __call__(self, denoiser, x: torch.Tensor, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, X, Y, Z) clean data, cond as for the denoiser → loss (B,)."""
        x_noisy, sigma = self.noisy(x.float(), generator)
        d_x, logvar = denoiser(x_noisy, sigma, cond, return_logvar=True)
        mse = (d_x - x.float()).square().mean(dim=tuple(range(1, x.ndim)))
        return edm_weight(sigma, self.sigma_data) / logvar.exp() * mse + logvar

