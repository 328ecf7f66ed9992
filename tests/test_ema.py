"""Power-function EMA (EDM2): γ(σ_rel), β_t, the closed-form average, state round trip."""

import io

import pytest
import torch

from libs.ema import PowerFunctionEMA, gamma_to_sigma_rel, power_function_beta, sigma_rel_to_gamma


def test_gamma_from_sigma_rel():
    # EDM2 Sec. 3.1: σ_rel = 0.05 ↔ γ ≈ 16.97, σ_rel = 0.10 ↔ γ ≈ 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01), f"γ(0.05) = {sigma_rel_to_gamma(0.05)}"
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01), f"γ(0.10) = {sigma_rel_to_gamma(0.10)}"
    for s in (0.01, 0.05, 0.1, 0.2):
        back = gamma_to_sigma_rel(sigma_rel_to_gamma(s))
        assert back == pytest.approx(s, rel=1e-9), f"σ_rel round trip {s} → {back}"
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.3)


def test_beta_closed_form():
    g = 6.94
    assert power_function_beta(1, g) == 0.0, "the first update must copy the weights (β_1 = 0)"
    for t in (2, 10, 1000):
        assert power_function_beta(t, g) == pytest.approx((1 - 1 / t) ** (g + 1)), f"β_{t}"
    assert power_function_beta(10, g) < power_function_beta(1000, g), "β_t must grow with t"


def _scalar_model(value):
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_constant_parameter_stays_constant():
    model = _scalar_model(1.2345)
    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(50):
        ema.update(model)
    for s in (0.05, 0.10):
        target = _scalar_model(0.0)
        ema.copy_to(target, s)
        assert target.weight.item() == pytest.approx(1.2345, rel=1e-6), f"EMA(σ_rel={s}) drifted"


def test_average_matches_power_function_weights():
    # θ̂_T = Σ_τ [τ^(γ+1) − (τ−1)^(γ+1)] θ_τ / T^(γ+1) for β_t = (1 − 1/t)^(γ+1).
    model, steps = _scalar_model(0.0), 40
    ema = PowerFunctionEMA(model, sigma_rels=(0.10,))
    g = sigma_rel_to_gamma(0.10)
    thetas = [0.1 * t + (-1) ** t for t in range(1, steps + 1)]
    for theta in thetas:
        with torch.no_grad():
            model.weight.fill_(theta)
        ema.update(model)
    want = sum(((t / steps) ** (g + 1) - ((t - 1) / steps) ** (g + 1)) * th
               for t, th in enumerate(thetas, start=1))
    got = ema.shadows[0]["weight"].item()
    assert got == pytest.approx(want, rel=1e-5), f"EMA {got:.6f}, closed form {want:.6f}"


def test_state_dict_round_trip_and_copy_to():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = PowerFunctionEMA(model)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    restored = PowerFunctionEMA(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.step == 5, f"step {restored.step}, expected 5"
    a, b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema.copy_to(a, 0.10)
    restored.copy_to(b, 0.10)
    for (name, pa), pb, pm in zip(a.named_parameters(), b.parameters(), model.parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs after the state round trip"
        assert not torch.equal(pa, pm), f"{name}: the EMA should differ from the moving weights"
    with pytest.raises(ValueError):
        PowerFunctionEMA(model, sigma_rels=(0.05,)).load_state_dict(ema.state_dict())
