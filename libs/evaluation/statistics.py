"""Two-sample and k-sample statistics of the cohort comparison, written out from their formulas.

Every function takes plain sequences of finite numbers and returns NaN where the statistic is
undefined (too few values, zero variance), instead of raising.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


def _arr(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


@dataclass(frozen=True)
class TTest:
    """Welch's t statistic, its Welch–Satterthwaite degrees of freedom and the two-sided p-value."""

    t: float
    df: float
    p: float


def _no_variance(var: float, *groups: np.ndarray) -> bool:
    """A variance that is zero up to floating-point rounding of the values (SD below 1e-9 of their scale):
    the groups are constant, and a test statistic would only divide rounding noise."""
    scale = max(float(np.abs(g).max()) for g in groups if g.size) or 1.0
    return not var > (1e-9 * scale) ** 2


def welch_ttest(a, b) -> TTest:
    """Welch's unequal-variance t-test of mean(a) − mean(b).

    t = (m_a − m_b) / √(v_a/n_a + v_b/n_b),  df = (v_a/n_a + v_b/n_b)² / Σ (v/n)² / (n − 1),
    p = 2 · P(T_df > |t|); sample variances with n − 1.
    """
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2:
        return TTest(math.nan, math.nan, math.nan)
    qa, qb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se2 = qa + qb
    if _no_variance(se2, a, b):
        return TTest(math.nan, math.nan, math.nan)
    t = (a.mean() - b.mean()) / math.sqrt(se2)
    df = se2**2 / (qa**2 / (a.size - 1) + qb**2 / (b.size - 1))
    return TTest(float(t), float(df), float(2.0 * sps.t.sf(abs(t), df)))


@dataclass(frozen=True)
class Anova:
    """One-way ANOVA: F statistic, its degrees of freedom (between, within) and the p-value."""

    f: float
    df_between: int
    df_within: int
    p: float


def one_way_anova(*groups) -> Anova:
    """One-way ANOVA of k groups: F = [SS_between / (k − 1)] / [SS_within / (N − k)].

    Empty groups are ignored; NaN when fewer than two groups remain, N ≤ k, or SS_within = 0.
    """
    groups = [g for g in (_arr(g) for g in groups) if g.size]
    k, n = len(groups), sum(g.size for g in groups)
    if k < 2 or n <= k:
        return Anova(math.nan, max(k - 1, 0), max(n - k, 0), math.nan)
    grand = np.concatenate(groups).mean()
    ss_between = sum(g.size * (g.mean() - grand) ** 2 for g in groups)
    ss_within = sum(((g - g.mean()) ** 2).sum() for g in groups)
    if _no_variance(ss_within / n, *groups):
        return Anova(math.nan, k - 1, n - k, math.nan)
    f = (ss_between / (k - 1)) / (ss_within / (n - k))
    return Anova(float(f), k - 1, n - k, float(sps.f.sf(f, k - 1, n - k)))


def cohens_d(a, b) -> float:
    """Cohen's d of mean(a) − mean(b) with the pooled SD √[((n_a−1)v_a + (n_b−1)v_b) / (n_a+n_b−2)]."""
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2:
        return math.nan
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return math.nan if _no_variance(pooled, a, b) else float((a.mean() - b.mean()) / math.sqrt(pooled))


def ks_test(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic D and p-value (scipy's exact/asymptotic choice)."""
    a, b = _arr(a), _arr(b)
    if a.size < 1 or b.size < 1:
        return math.nan, math.nan
    res = sps.ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def percent_difference(synthetic_mean: float, reference_mean: float) -> float:
    """100 · (synthetic − reference) / reference; NaN when the reference mean is 0 or NaN."""
    if not math.isfinite(reference_mean) or reference_mean == 0:
        return math.nan
    return 100.0 * (synthetic_mean - reference_mean) / reference_mean


@dataclass(frozen=True)
class LinearFit:
    """Ordinary least squares y = X β: coefficients, standard errors, two-sided p, n and R²."""

    coef: np.ndarray
    se: np.ndarray
    p: np.ndarray
    n: int
    r2: float


def least_squares(y, x) -> LinearFit:
    """OLS of ``y`` (n,) on an intercept and the columns of ``x`` (n, k); returns k + 1 coefficients.

    σ² = RSS / (n − k − 1), cov(β) = σ² (XᵀX)⁻¹, t = β / se with n − k − 1 degrees of freedom.
    All outputs are NaN when n ≤ k + 1 or the design is singular.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    design = np.column_stack([np.ones(y.size), np.asarray(x, dtype=np.float64).reshape(y.size, -1)])
    n, p = design.shape
    nan = np.full(p, np.nan)
    if n <= p or np.linalg.matrix_rank(design) < p:
        return LinearFit(nan, nan, nan, n, math.nan)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    dof = n - p
    sigma2 = float(resid @ resid) / dof
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = coef / se
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / tss if tss > 0 else math.nan
    return LinearFit(coef, se, 2.0 * sps.t.sf(np.abs(t), dof), n, r2)


def slope_difference_p(b1: float, se1: float, b2: float, se2: float) -> float:
    """Two-sided p of H0: β1 = β2 for slopes of independent samples, z = (β1 − β2) / √(se1² + se2²)."""
    s = math.hypot(se1, se2)
    if not (math.isfinite(s) and s > 0 and math.isfinite(b1) and math.isfinite(b2)):
        return math.nan
    return float(2.0 * sps.norm.sf(abs(b1 - b2) / s))
