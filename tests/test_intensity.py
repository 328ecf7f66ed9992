"""Intensity maps (DESIGN.md): analytic values, clipping, exact inverses, numpy/torch type handling."""

import math

import numpy as np
import pytest
import torch

from libs.intensity import ct_to_unit, suv_to_unit, unit_to_ct, unit_to_suv

EPS32 = float(np.finfo(np.float32).eps)
HU = np.linspace(-500.0, 500.0, 2001)
SUV = np.concatenate([np.linspace(0.0, 1.0, 501), np.linspace(1.0, 25.0, 1201)])


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("to_tensor", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ct_round_trip_is_exact(to_tensor, dtype):
    hu = to_tensor(HU.astype(dtype))
    back = _np(unit_to_ct(ct_to_unit(hu)))
    err = np.abs(back.astype(np.float64) - HU.astype(dtype)).max()
    tol = 4 * 500 * (EPS32 if dtype == np.float32 else np.finfo(np.float64).eps)
    assert err <= tol, f"CT round trip ({dtype.__name__}): max error {err} HU, expected ≤ {tol}"


@pytest.mark.parametrize("to_tensor", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_suv_round_trip_is_exact(to_tensor, dtype):
    suv = SUV.astype(dtype)
    back = _np(unit_to_suv(suv_to_unit(to_tensor(suv)))).astype(np.float64)
    eps = EPS32 if dtype == np.float32 else np.finfo(np.float64).eps
    # error of one rounding in u (≈ eps·u) amplified by d(26^u − 1)/du = ln 26 · (SUV + 1)
    tol = 8 * eps * (suv.astype(np.float64) + 1.0) * math.log(26.0)
    err = np.abs(back - suv)
    worst = int(np.argmax(err / tol))
    assert (err <= tol).all(), \
        f"SUV round trip ({dtype.__name__}): at SUV {suv[worst]} got {back[worst]}, " \
        f"error {err[worst]} > {tol[worst]}"


def test_unit_round_trip_other_direction():
    u = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_allclose(ct_to_unit(unit_to_ct(u)), u, atol=1e-12, err_msg="u → HU → u")
    np.testing.assert_allclose(suv_to_unit(unit_to_suv(u)), u, atol=1e-12, err_msg="u → SUV → u")


def test_specific_values():
    cases = [
        (ct_to_unit, -500.0, 0.0), (ct_to_unit, 500.0, 1.0), (ct_to_unit, 0.0, 0.5),
        (ct_to_unit, -250.0, 0.25), (suv_to_unit, 0.0, 0.0), (suv_to_unit, 25.0, 1.0),
        (suv_to_unit, 1.0, math.log2(2.0) / math.log2(26.0)), (suv_to_unit, 3.0, 2.0 / math.log2(26.0)),
        (unit_to_ct, 0.5, 0.0), (unit_to_suv, 1.0, 25.0), (unit_to_suv, 0.0, 0.0),
        (unit_to_suv, 0.5, math.sqrt(26.0) - 1.0),
    ]
    for fn, x, want in cases:
        got = float(fn(np.float64(x)))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), \
            f"{fn.__name__}({x}): expected {want}, got {got}"


def test_inverse_is_a_single_exponentiation():
    u = np.linspace(0.0, 1.0, 101)
    want = 26.0**u - 1.0
    got = unit_to_suv(u)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg="unit_to_suv(u) must be 26**u − 1")
    got_t = unit_to_suv(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(got_t, want, rtol=1e-12, atol=1e-12,
                               err_msg="torch unit_to_suv(u) must be 26**u − 1")


def test_clipping_outside_range():
    assert float(ct_to_unit(np.float64(-1000.0))) == 0.0, "−1000 HU (air) should clip to 0"
    assert float(ct_to_unit(np.float64(3000.0))) == 1.0, "3000 HU (metal) should clip to 1"
    assert float(suv_to_unit(np.float64(-0.3))) == 0.0, "negative SUV should clip to 0"
    assert float(suv_to_unit(np.float64(60.0))) == 1.0, "SUV 60 should clip to 1"
    assert float(unit_to_ct(np.float64(1.7))) == 500.0, "u > 1 should clip to 500 HU"
    assert float(unit_to_ct(np.float64(-0.2))) == -500.0, "u < 0 should clip to −500 HU"
    assert float(unit_to_suv(np.float64(1.5))) == pytest.approx(25.0), "u > 1 should clip to SUV 25"
    assert float(unit_to_suv(np.float64(-0.5))) == 0.0, "u < 0 should clip to SUV 0"
    t = torch.tensor([-2000.0, 2000.0])
    assert ct_to_unit(t).tolist() == [0.0, 1.0], f"torch CT clip: got {ct_to_unit(t).tolist()}"
    assert suv_to_unit(torch.tensor([-1.0, 100.0])).tolist() == [0.0, 1.0], "torch SUV clip"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fn, x", [(ct_to_unit, 100.0), (unit_to_ct, 0.3), (suv_to_unit, 2.0),
                                   (unit_to_suv, 0.3)])
def test_torch_type_and_dtype_preserved(dtype, fn, x):
    t = torch.full((1, 2, 3, 4, 5), x, dtype=dtype)
    out = fn(t)
    assert isinstance(out, torch.Tensor), f"{fn.__name__}: expected a torch.Tensor back, got {type(out)}"
    assert out.dtype == dtype, f"{fn.__name__}: expected dtype {dtype}, got {out.dtype}"
    assert out.shape == t.shape, f"{fn.__name__}: expected shape {tuple(t.shape)}, got {tuple(out.shape)}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_dtype_preserved(dtype):
    for fn in (ct_to_unit, unit_to_ct, suv_to_unit, unit_to_suv):
        out = fn(np.zeros((2, 3), dtype=dtype))
        assert isinstance(out, np.ndarray) and out.dtype == dtype, \
            f"{fn.__name__}: expected ndarray {np.dtype(dtype)}, " \
            f"got {type(out).__name__} {getattr(out, 'dtype', '')}"


def test_integer_inputs_accepted():
    hu = np.array([-1000, -500, 0, 500, 2000], dtype=np.int16)
    got = ct_to_unit(hu)
    assert got.dtype.kind == "f", f"integer HU should give floats, got {got.dtype}"
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0], err_msg="int16 HU → unit")
    got_t = ct_to_unit(torch.tensor([-500, 0, 500], dtype=torch.int16))
    assert got_t.is_floating_point(), f"torch int16 HU should give a float tensor, got {got_t.dtype}"
    assert got_t.tolist() == [0.0, 0.5, 1.0], f"torch int16 HU → unit: got {got_t.tolist()}"
    suv = suv_to_unit(np.array([0, 1, 25, 40], dtype=np.int64))
    np.testing.assert_allclose(suv, [0.0, 1.0 / math.log2(26.0), 1.0, 1.0], rtol=1e-6,
                               err_msg="int SUV → unit")
    assert float(suv_to_unit(3)) == pytest.approx(2.0 / math.log2(26.0), rel=1e-6), "python int SUV"
    np.testing.assert_allclose(unit_to_suv(np.array([0, 1])), [0.0, 25.0], rtol=1e-6, err_msg="int u → SUV")
