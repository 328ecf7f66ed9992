"""Intensity transforms between physical units and the networks' [0, 1] range (DESIGN.md).

* CT: HU clipped to [-500, 500], mapped linearly to [0, 1].
* PET: SUV clipped to [0, 25], mapped with log2(SUV + 1) / log2(26) to [0, 1].

Each forward map has an exact inverse on the clipped range (``26**u - 1`` for PET: one
exponentiation, not the reference code's squaring).  Functions accept numpy arrays and torch
tensors alike and return the same type.
"""

from __future__ import annotations

import math

import numpy as np

CT_MIN_HU, CT_MAX_HU = -500.0, 500.0
SUV_MAX = 25.0
CT_BACKGROUND_HU = -1000.0
SUV_BACKGROUND = 0.0
_LOG2_26 = math.log2(SUV_MAX + 1.0)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _clip(x, lo: float, hi: float):
    return x.clamp(lo, hi) if _is_torch(x) else np.clip(x, lo, hi)


def _float(x):
    if _is_torch(x):
        return x if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x if x.dtype.kind == "f" else x.astype(np.float32)


def ct_to_unit(hu):
    """HU → [0, 1]: clip to [-500, 500], then (HU + 500) / 1000."""
    return (_clip(_float(hu), CT_MIN_HU, CT_MAX_HU) - CT_MIN_HU) / (CT_MAX_HU - CT_MIN_HU)


def unit_to_ct(u):
    """[0, 1] → HU in [-500, 500] (exact inverse of :func:`ct_to_unit` on the clipped range)."""
    return _clip(_float(u), 0.0, 1.0) * (CT_MAX_HU - CT_MIN_HU) + CT_MIN_HU


def suv_to_unit(suv):
    """SUV → [0, 1]: clip to [0, 25], then log2(SUV + 1) / log2(26)."""
    s = _clip(_float(suv), 0.0, SUV_MAX)
    return (s.log1p() if _is_torch(s) else np.log1p(s)) / math.log(SUV_MAX + 1.0)


def unit_to_suv(u):
    """[0, 1] → SUV in [0, 25]: 26**u - 1 (exact inverse of :func:`suv_to_unit` on the clipped range)."""
    u = _clip(_float(u), 0.0, 1.0) * math.log(SUV_MAX + 1.0)
    return u.expm1() if _is_torch(u) else np.expm1(u)
