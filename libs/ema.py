"""Power-function EMA of network weights (Karras et al. 2024, EDM2, Sec. 3.1 and Appendix C).

Why this EMA: a classic EMA with a fixed β forgets a fixed number of steps, so its averaging length in
*relative* terms depends on how long training runs and its start is dominated by the random
initialization.  EDM2's power-function profile weights the snapshot at step τ by ∝ τ^γ, so the average
always spans the same fraction of the run; its width is given as σ_rel, the standard deviation of the
profile relative to the training length (EDM2's good values are 0.05–0.10 for mid-size models).  It is
tracked online with

    β_t = (1 − 1/t)^(γ+1)                                        (EDM2 Eq. 127, one step per update)
    θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t

which gives exactly θ̂_T = Σ_τ [τ^(γ+1) − (τ−1)^(γ+1)] θ_τ / T^(γ+1) (β_1 = 0 starts from the first
weights), and γ follows from σ_rel via σ_rel² = (γ+1) / ((γ+2)²(γ+3)) (Eq. 123, solved as in Eq. 126
and Algorithm 2).  Several σ_rel are tracked at once; post-hoc EMA reconstruction is not implemented.
Only parameters are averaged; buffers are left to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

SIGMA_REL_MAX = math.sqrt(1 / 12)  # σ_rel at γ = 0 (flat profile); larger σ_rel would need γ < 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile (EDM2 Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ for a given σ_rel (EDM2 Eq. 126 / Alg. 2): the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_function_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) for the t-th update, t ≥ 1 (EDM2 Eq. 127 with t_δ / t = 1 / t)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return (1 - 1 / step) ** (gamma + 1)


class PowerFunctionEMA:
    """Power-function EMAs of ``model``'s parameters, one per σ_rel, kept in float32.

    Call :meth:`update` once after every optimizer step; :meth:`copy_to` loads one EMA into a network of
    the same architecture (pass the bare module, not a DDP / compiled wrapper).
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels:
            raise ValueError("sigma_rels must name at least one EMA")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.step = 0
        self.shadows = [self._snapshot(model) for _ in self.sigma_rels]

    @staticmethod
    def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> list[float]:
        """Fold the current parameters into every EMA; returns the β used for each σ_rel."""
        self.step += 1
        params = dict(model.named_parameters())
        betas = [power_function_beta(self.step, g) for g in self.gammas]
        current = [params[name].detach().float() for name in self.shadows[0]]
        for shadow, beta in zip(self.shadows, betas, strict=True):
            torch._foreach_lerp_(list(shadow.values()), current, 1 - beta)      # one fused kernel per EMA on CUDA
        return betas

    def _index(self, sigma_rel: float | None) -> int:
        if sigma_rel is None:
            return 0
        for i, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel):
                return i
        raise KeyError(f"no EMA with sigma_rel {sigma_rel}; tracked: {self.sigma_rels}")

    @torch.no_grad()
    def copy_to(self, model: nn.Module, sigma_rel: float | None = None) -> None:
        """Overwrite ``model``'s parameters with the EMA for ``sigma_rel`` (default: the first one)."""
        shadow = self.shadows[self._index(sigma_rel)]
        for name, p in model.named_parameters():
            if name in shadow:
                p.copy_(shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        """Plain tensors, numbers and lists only (loadable with ``torch.load(weights_only=True)``)."""
        return {"step": self.step, "sigma_rels": list(self.sigma_rels),
                "shadows": [{n: v.clone() for n, v in s.items()} for s in self.shadows]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"EMA state tracks sigma_rels {state['sigma_rels']}, expected {self.sigma_rels}")
        for mine, theirs in zip(self.shadows, state["shadows"], strict=True):
            if mine.keys() != theirs.keys():
                raise ValueError(f"EMA state parameters differ: {sorted(mine.keys() ^ theirs.keys())[:5]}")
            for name, value in mine.items():
                value.copy_(theirs[name])
        self.step = int(state["step"])
