"""Samplers for the EDM probability-flow ODE / SDE (Karras et al. 2022), k-diffusion style; flow-matching
models are sampled by the same functions through :class:`libs.diffusion.VelocityDenoiser`.

Every sampler (:data:`SOLVERS`: EDM's Heun, Euler, and the multistep DPM-Solver++(2M)) is a pure function with
one signature::

    sample_x(denoiser, x, sigmas, cond=None, churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0,
             generator=None, progress=False, space="sigma") -> x0

``denoiser(x, sigma_batch, cond)`` returns D(x; σ) (e.g. :class:`libs.diffusion.Denoiser`, or
:class:`libs.diffusion.VelocityDenoiser` for a flow model); ``space`` says in which variables the ODE steps
are taken ('sigma': EDM's x_σ over σ; 'flow': x_t over t = 1 / (1 + σ)); ``x`` is the
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


def uniform_time_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, device=None) -> torch.Tensor:
    """Noise levels whose flow times t = 1 / (1 + σ) are equally spaced from 1 / (1 + σ_max) to
    1 / (1 + σ_min), plus a final 0 (t = 1).  Returns (steps + 1,) float64, decreasing."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1 / (1 + sigma_max), 1 / (1 + sigma_min), steps, dtype=torch.float64, device=device)
    return torch.cat([(1 - t) / t, t.new_zeros(1)])


SCHEDULES = ("karras", "uniform_time")


def schedule_sigmas(schedule: str, steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                    device=None) -> torch.Tensor:
    """The noise levels of a named schedule: 'karras' (EDM Eq. 5; as flow times, the research code's grid)
    or 'uniform_time' (equal steps in flow time)."""
    if schedule == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max, rho, device=device)
    if schedule == "uniform_time":
        return uniform_time_sigmas(steps, sigma_min, sigma_max, device=device)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


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


SPACES = ("sigma", "flow")


def _to_space(y: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    """EDM state x_σ → the integration variable: x_σ itself ('sigma') or x_t = x_σ / (1 + σ) ('flow')."""
    return y if space == "sigma" else y / (1 + sigma)


def _from_space(z: torch.Tensor, sigma: float, space: str) -> torch.Tensor:
    return z if space == "sigma" else z * (1 + sigma)


def _time(sigma: float, space: str) -> float:
    """The integration time: σ ('sigma') or t = 1 / (1 + σ) ('flow')."""
    return sigma if space == "sigma" else 1 / (1 + sigma)


def _slope(denoiser, y, sigma, cond, space):
    """The ODE's derivative at (x_σ, σ) in the chosen variables, from one denoiser call:
    'sigma': dx_σ/dσ = (x_σ − D) / σ (EDM Eq. 4); 'flow': dx_t/dt = v = (D − x_t) / (1 − t)."""
    d = denoiser(y, y.new_full((y.shape[0],), sigma), cond).float()
    if space == "sigma":
        return (y - d) / sigma
    t = 1 / (1 + sigma)
    return (d - t * y) / (1 - t)


def _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, heun, space):
    """One loop for every sampler: Euler / Heun steps of the probability-flow ODE between the noise levels
    ``sigmas``, taken either in EDM's variables (x_σ, σ) or in flow's (x_t, t = 1 / (1 + σ)), x_t = x_σ / (1 + σ).
    The two describe the same ODE; their Euler steps coincide (both are DDIM), their Heun corrections differ
    at third order.  Churn always acts on x_σ (EDM Alg. 2)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    ts = [float(s) for s in sigmas]
    steps = len(ts) - 1
    y = x.float()
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        s_cur, s_next = ts[i], ts[i + 1]
        gamma = _gamma(s_cur, churn, steps, s_tmin, s_tmax)
        y_hat, s_hat = _churn(y, s_cur, gamma, s_noise, generator)
        z_hat, h = _to_space(y_hat, s_hat, space), _time(s_next, space) - _time(s_hat, space)
        k_cur = _slope(denoiser, y_hat, s_hat, cond, space)
        z = z_hat + h * k_cur                                  # Euler step (Alg. 2 line 8)
        if heun and s_next > 0:                                # 2nd-order correction (Alg. 2 lines 9–11)
            z = z_hat + h * (0.5 * k_cur + 0.5 * _slope(denoiser, _from_space(z, s_next, space), s_next, cond, space))
        y = _from_space(z, s_next, space)
    return y


def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor | None = None,
                churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                generator: Generators = None, progress: bool = False, space: str = "sigma") -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn (deterministic EDM
    Alg. 1 when ``churn`` = 0).  x (B, C, X, Y, Z) noise at sigmas[0] → sample (B, C, X, Y, Z) float32;
    2·N − 1 denoiser calls for N steps.  ``space='flow'`` takes the steps in flow time instead (x_t, t): the
    research code's RK2 on the times t_i = 1 / (1 + σ_i)."""
    return _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, True, space)


def sample_euler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor | None = None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 generator: Generators = None, progress: bool = False, space: str = "sigma") -> torch.Tensor:
    """First-order Euler version of :func:`sample_heun` (same churn); N denoiser calls for N steps.  Its steps
    are the same in both spaces (DDIM)."""
    return _sample(denoiser, x, sigmas, cond, churn, s_tmin, s_tmax, s_noise, generator, progress, False, space)


def sample_dpmpp_2m(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor | None = None,
                    churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                    generator: Generators = None, progress: bool = False, space: str = "sigma") -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a second-order multistep solver with one denoiser call per
    step (N calls for N steps, like Euler, against Heun's 2N − 1).

    In log-SNR time λ = −ln σ the ODE for x_σ is solved exactly for a constant denoiser,
    x_next = (σ_next / σ) x + (1 − σ_next / σ) D — Euler's (DDIM) step; this solver replaces D by the
    extrapolation D̃ = (1 + 1 / 2r) D_i − (1 / 2r) D_{i−1} through the previous step's denoised value, r the ratio
    of the previous step's λ-length to this one's.  The first step and the final step to σ = 0 use D itself.
    With the OT path x_t = x_σ / (1 + σ) the data-prediction steps are identical in both variable sets (same λ),
    so ``space`` only names the caller's choice.  Deterministic: the extrapolation through the previous step's
    denoised value is wrong after fresh noise is added, so churn is refused (measured on the exact Gaussian
    denoiser: with churn 20 over 48 steps the samples' SD came out 0.69 instead of 0.5)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if churn > 0:
        raise ValueError(f"dpmpp_2m is a deterministic multistep solver: churn must be 0, got {churn}")
    ts = [float(s) for s in sigmas]
    steps = len(ts) - 1
    y, previous = x.float(), None                          # previous: (D, λ) of the last step
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        s_cur, s_next = ts[i], ts[i + 1]
        d = denoiser(y, y.new_full((y.shape[0],), s_cur), cond).float()
        if s_next == 0:
            y = d
            break
        lam, lam_next = -math.log(s_cur), -math.log(s_next)
        d_used = d
        if previous is not None:
            r = (lam - previous[1]) / (lam_next - lam)
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous[0]
        y = (s_next / s_cur) * y + (1 - s_next / s_cur) * d_used
        previous = (d, lam)
    return y


def guided(denoiser, cond_none: torch.Tensor, weight: float, sigma_range=(0.0, float("inf"))):
    """Classifier-free guidance (Ho & Salimans 2022) around ``denoiser``: the returned denoiser gives
    D_none + w · (D_cond − D_none), D_none from ``cond_none`` (the model's "no condition" input, same shape as
    the solver's cond), while sigma_range[0] ≤ σ ≤ sigma_range[1] (Kynkäänniemi et al. 2024: guidance only in
    an interval), and D_cond alone elsewhere.  Both evaluations share one network call (batch doubled)."""
    lo, hi = sigma_range

    def denoise(x, sigma, cond):
        s = float(sigma.reshape(-1)[0])
        if weight == 1.0 or not lo <= s <= hi:
            return denoiser(x, sigma, cond)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, cond_none.to(cond)])).float()
        d_cond, d_none = both.chunk(2)
        return d_none + weight * (d_cond - d_none)

    return denoise


SOLVERS = {"heun": sample_heun, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def network_calls(solver: str, steps: int) -> int:
    """Denoiser calls of one sampling run of ``steps`` steps: Heun 2N − 1 (the step to σ = 0 is an Euler step),
    Euler and DPM-Solver++(2M) N."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return 2 * steps - 1 if solver == "heun" else steps
