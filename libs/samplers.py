"""Samplers for the EDM probability-flow ODE / SDE (Karras et al. 2022), k-diffusion style.

Every sampler is a pure function with one signature::

    sample_x(denoiser, x, sigmas, cond=None, churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0,
             generator=None, progress=False) -> x0

``denoiser(x, sigma_batch, cond)`` returns D(x; σ) (e.g. :class:`libs.diffusion.Denoiser`); ``x`` is the
initial noise already scaled by ``sigmas[0]``, shape (B, C, X, Y, Z); ``sigmas`` is a decreasing schedule
ending in 0 (:func:`karras_sigmas`).  ``generator`` drives the churn noise: None, one generator, or one per
sample (see :func:`per_sample_generators`) so that subject k's result depends only on its own seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from libs.diffusion import Generators, randn_like


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """EDM Eq. 5 schedule: σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i < N, plus a
    final 0.  Returns (steps + 1,) float64, from σ_max down to σ_min, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def per_sample_generators(seeds: Sequence[int], stream: int = 1, device="cpu") -> list[torch.Generator]:
    """One torch.Generator per seed.  ``stream`` separates independent uses of the same seed (0 = initial
    noise, 1 = churn noise) through numpy's SeedSequence, so no stream of one subject ever equals a
    stream of another."""
    gens = []
    for seed in seeds:
        state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator(device=device).manual_seed(int(state)))
    return gens


def initial_noise(shape_per_sample: Sequence[int], seeds: Sequence[int], sigma_max: float = 80.0,
                  device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """σ_max · N(0, I) of shape (len(seeds), *shape_per_sample); sample k depends only on seeds[k]
    (drawn on the CPU, so it is also the same on every device)."""
    gens = per_sample_generators(seeds, stream=0)
    noise = torch.stack([torch.randn(tuple(shape_per_sample), generator=g) for g in gens])
    return (noise * sigma_max).to(device=device, dtype=dtype)


def _churn(x, sigma, gamma, s_noise, generator):
    """EDM Alg. 2 lines 5–6: raise the noise level to σ̂ = σ(1 + γ) by adding fresh noise."""
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, generator)
    return x, sigma_hat


def _gamma(sigma, churn, steps, s_tmin, s_tmax):
    """EDM Alg. 2 line 4: γ_i = min(S_churn / N, √2 − 1) inside [S_tmin, S_tmax], else 0."""
    return min(churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, heun):
    ts = [float(s) for s in sigmas]
    steps = len(ts) - 1
    x = x.float()

    def d(x_, t):  # the ODE derivative dx/dσ = (x − D(x; σ)) / σ  (EDM Eq. 4)
        return (x_ - denoiser(x_, x_.new_full((x_.shape[0],), t), cond).float()) / t

    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        t_cur, t_next = ts[i], ts[i + 1]
        gamma = _gamma(t_cur, churn, steps, s_tmin, s_tmax)
        x_hat, t_hat = _churn(x, t_cur, gamma, s_noise, generator)
        d_cur = d(x_hat, t_hat)
        x = x_hat + (t_next - t_hat) * d_cur  # Euler step (Alg. 2 line 8)
        if heun and t_next > 0:  # 2nd-order correction (Alg. 2 lines 9–11)
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d(x, t_next))
    return x


def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor | None = None,
                churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn (deterministic EDM
    Alg. 1 when ``churn`` = 0).  x (B, C, X, Y, Z) noise at sigmas[0] → sample (B, C, X, Y, Z) float32;
    2·N − 1 denoiser calls for N steps."""
    return _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, True)


def sample_euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor | None = None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """First-order Euler version of :func:`sample_heun` (same churn); N denoiser calls for N steps."""
    return _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, False)
