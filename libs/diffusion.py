"""Training objectives: EDM preconditioning and losses (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Table 1; Karras et al. 2024, EDM2, Sec. 5 and Appendix) and flow
matching on the conditional optimal-transport path (Lipman et al. 2023; Liu et al. 2023, rectified flow).

Noise model (EDM): x_σ = x + σ n with n ~ N(0, I); volumes are (B, C, X, Y, Z) in network units.
The denoiser D(x; σ) estimates E[x | x_σ].

Flow: x_t = t·x + (1 − t)·n, t ∈ (0, 1] (t = 1 is data), velocity v = E[x − n | x_t].  The two are one
family: x_t = t·x_σ with t = 1 / (1 + σ), and D(x_σ; σ) = x_t + (1 − t)·v(x_t, t) exactly
(:class:`VelocityDenoiser`), so every sampler of :mod:`libs.samplers` serves both objectives.

A loss is a callable ``loss(model, x, cond, generator) -> (B,)`` with ``loss.wrap(net)`` building the
``model`` it expects around the raw network (a :class:`Denoiser` or a :class:`VelocityModel`).
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


def channel_mean(err2: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared errors (B, C, ...) → (B,): the mean over channels and voxels, or with ``weights`` (C,) the
    weighted mean over channels of each channel's voxel mean."""
    if weights is None:
        return err2.mean(dim=tuple(range(1, err2.ndim)))
    w = weights.to(device=err2.device, dtype=err2.dtype)
    return (err2.mean(dim=tuple(range(2, err2.ndim))) * w).sum(1) / w.sum()


def _weights(channel_weights) -> torch.Tensor | None:
    return None if channel_weights is None else torch.as_tensor(channel_weights, dtype=torch.float32)


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
    ``channel_weights`` (C,): a weighted mean over channels (:func:`channel_mean`) instead of the plain mean.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, channel_weights=None):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.channel_weights = _weights(channel_weights)

    def wrap(self, net: nn.Module) -> Denoiser:
        return Denoiser(net, self.sigma_data)

    def noisy(self, x: torch.Tensor, generator: torch.Generator | None):
        """Draw σ (B,) then x + σ n; returns (x_noisy, sigma)."""
        sigma = sample_training_sigma(x.shape[0], self.P_mean, self.P_std, generator, x.device)
        return x + append_dims(sigma, x.ndim) * randn_like(x, generator), sigma

    def __call__(self, denoiser, x: torch.Tensor, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, X, Y, Z) clean data, cond as for the denoiser → loss (B,)."""
        x_noisy, sigma = self.noisy(x.float(), generator)
        mse = channel_mean((denoiser(x_noisy, sigma, cond) - x.float()).square(), self.channel_weights)
        return edm_weight(sigma, self.sigma_data) * mse


class EDM2Loss(EDMLoss):
    """EDM2 uncertainty-weighted loss (EDM2 Eq. 14–16, 21; Kendall et al. multi-task weighting):

        L(x) = λ(σ) / exp(u(σ)) · mean‖D(x + σn; σ) − x‖² + u(σ)

    with u(σ) the network's learned log-variance (``denoiser(..., return_logvar=True)``).  At its optimum
    exp(u) equals the expected weighted error at σ, which keeps the loss magnitude equal across σ.
    The mean over voxels (EDM2 sums over pixels) only rescales the loss; Adam is invariant to that.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5, channel_weights=None):
        super().__init__(P_mean, P_std, sigma_data, channel_weights)

    def __call__(self, denoiser, x: torch.Tensor, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, X, Y, Z) clean data, cond as for the denoiser → loss (B,)."""
        x_noisy, sigma = self.noisy(x.float(), generator)
        d_x, logvar = denoiser(x_noisy, sigma, cond, return_logvar=True)
        mse = channel_mean((d_x - x.float()).square(), self.channel_weights)
        return edm_weight(sigma, self.sigma_data) / logvar.exp() * mse + logvar



# -- flow matching ------------------------------------------------------------------------------------

def flow_time(sigma):
    """EDM noise level σ → flow time t = 1 / (1 + σ)  (σ = 0 is t = 1, data)."""
    return 1 / (1 + sigma)


def flow_sigma(t):
    """Flow time t → EDM noise level σ = (1 − t) / t."""
    return (1 - t) / t


class VelocityModel(nn.Module):
    """v(x_t, t) = F(x_t, ln(t) / 4, cond): the raw network predicts the velocity, with no preconditioning
    (the research code's flow arm).  forward(x_t (B, C, X, Y, Z), t (B,) or scalar, cond) → v float32."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        cond = None if cond is None else cond.to(x.dtype)
        return self.net(x, t.log() / 4, cond).float()


class VelocityDenoiser(nn.Module):
    """The EDM denoiser of a velocity model, by the exact change of variables:
    t = 1 / (1 + σ), x_t = t·x_σ, D(x_σ; σ) = x_t + (1 − t)·v(x_t, t).

    ``velocity`` is a :class:`VelocityModel` (or any v(x_t, t, cond)); forward has :class:`Denoiser`'s
    signature, so the EDM samplers integrate a flow model unchanged."""

    def __init__(self, velocity: nn.Module):
        super().__init__()
        self.velocity = velocity

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        t = append_dims(flow_time(sigma), x.ndim)
        x_t = t * x.float()
        v = self.velocity(x_t.to(x.dtype), flow_time(sigma), cond).float()
        return x_t + (1 - t) * v


TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def sample_flow_time(batch: int, distribution: str = "logit_normal", P_mean: float = -0.4, P_std: float = 1.0,
                     generator: torch.Generator | None = None, device=None, eps: float = 1e-5) -> torch.Tensor:
    """Training times of the flow loss → (batch,) float32 in [eps, 1 − eps].

    ``logit_normal``: t = 1 / (1 + σ) with ln σ ~ N(P_mean, P_std²), i.e. logit(t) ~ N(−P_mean, P_std²) — the
    EDM2 noise levels mapped to flow time (the research code's default); ``uniform``: t ~ U(0, 1)."""
    if distribution == "logit_normal":
        t = flow_time(sample_training_sigma(batch, P_mean, P_std, generator, device))
    elif distribution == "uniform":
        gen_device = generator.device if generator is not None else device
        t = torch.rand(batch, generator=generator, device=gen_device).to(device if device is not None else gen_device)
    else:
        raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}")
    return t.clamp(eps, 1 - eps)


class FlowLoss:
    """Conditional flow matching: mean‖v(x_t, t) − (x − n)‖² per sample, x_t = t·x + (1 − t)·n, unweighted.

    At the exact velocity E[x − n | x_t] the loss equals E Var(x − n | x_t), its irreducible value."""

    def __init__(self, time_distribution: str = "logit_normal", P_mean: float = -0.4, P_std: float = 1.0,
                 channel_weights=None):
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, got {time_distribution!r}")
        self.time_distribution, self.P_mean, self.P_std = time_distribution, P_mean, P_std
        self.channel_weights = _weights(channel_weights)

    def wrap(self, net: nn.Module) -> VelocityModel:
        return VelocityModel(net)

    def noisy(self, x: torch.Tensor, generator: torch.Generator | None):
        """Draw t (B,) and n, → (x_t, t, target velocity x − n)."""
        t = sample_flow_time(x.shape[0], self.time_distribution, self.P_mean, self.P_std, generator, x.device)
        n = randn_like(x, generator)
        tt = append_dims(t, x.ndim)
        return tt * x + (1 - tt) * n, t, x - n

    def __call__(self, model, x: torch.Tensor, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, X, Y, Z) clean data, cond as for the model → loss (B,)."""
        x_t, t, target = self.noisy(x.float(), generator)
        return channel_mean((model(x_t, t, cond) - target).square(), self.channel_weights)


OBJECTIVES = ("edm", "flow")


def make_loss(objective: str, P_mean: float, P_std: float, sigma_data: float,
              time_distribution: str = "logit_normal", channel_weights=None):
    """The training loss of ``objective``: 'edm' (the EDM2 uncertainty-weighted loss) or 'flow'; with
    ``channel_weights`` (C,) its squared error is a weighted mean over channels."""
    if objective == "edm":
        return EDM2Loss(P_mean, P_std, sigma_data, channel_weights)
    if objective == "flow":
        return FlowLoss(time_distribution, P_mean, P_std, channel_weights)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def make_denoiser(net: nn.Module, objective: str, sigma_data: float) -> nn.Module:
    """A trained network as the EDM denoiser the samplers call: preconditioned (edm) or through its velocity
    (flow)."""
    if objective == "edm":
        return Denoiser(net, sigma_data)
    if objective == "flow":
        return VelocityDenoiser(VelocityModel(net))
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
