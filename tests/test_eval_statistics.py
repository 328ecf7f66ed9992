"""Comparison statistics against scipy and closed forms; the exclusion rule; subgroups; response slopes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from libs.evaluation.compare import SUBGROUPS, build_records, comparison_rows, response_rows
from libs.evaluation.statistics import (
    cohens_d,
    least_squares,
    one_way_anova,
    percent_difference,
    slope_difference_p,
    welch_ttest,
)

RNG = np.random.default_rng(7)
A = RNG.normal(2.2, 0.4, 23)
B = RNG.normal(2.5, 0.9, 31)
C = RNG.normal(2.0, 0.2, 12)


def test_welch_t_equals_scipy():
    ours, ref = welch_ttest(A, B), sps.ttest_ind(A, B, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert ours.df == pytest.approx(ref.df, rel=1e-12)


def test_one_way_anova_equals_scipy():
    ours, ref = one_way_anova(A, B, C), sps.f_oneway(A, B, C)
    assert ours.f == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert (ours.df_between, ours.df_within) == (2, A.size + B.size + C.size - 3)


def test_undefined_statistics_are_nan_not_errors():
    assert math.isnan(welch_ttest([1.0], [2.0, 3.0]).p)
    assert math.isnan(welch_ttest([1.0, 1.0], [1.0, 1.0]).t)
    assert math.isnan(one_way_anova([1.0, 2.0], []).f)
    assert math.isnan(cohens_d([1.0], [1.0, 2.0]))
    assert math.isnan(percent_difference(2.0, 0.0))


def test_cohens_d_closed_form():
    # means 2 and 1, both sample SDs 1 → d = 1
    assert cohens_d([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(1.0)
    assert percent_difference(2.2, 2.0) == pytest.approx(10.0)


def test_least_squares_equals_linregress_and_recovers_known_slopes():
    x = RNG.uniform(50, 100, 40)
    y = 3.0 + 0.02 * x + RNG.normal(0, 0.1, 40)
    fit, ref = least_squares(y, x[:, None]), sps.linregress(x, y)
    assert fit.coef[1] == pytest.approx(ref.slope, rel=1e-10)
    assert fit.se[1] == pytest.approx(ref.stderr, rel=1e-10)
    assert fit.p[1] == pytest.approx(ref.pvalue, rel=1e-6)
    x2 = np.column_stack([x, RNG.uniform(1.5, 2.0, 40)])
    exact = least_squares(1.0 + 0.5 * x2[:, 0] - 2.0 * x2[:, 1], x2)
    np.testing.assert_allclose(exact.coef, [1.0, 0.5, -2.0], atol=1e-9)
    assert math.isnan(least_squares([1.0, 2.0], [[1.0], [2.0]]).se[1]), "no residual degrees of freedom"


def test_slope_difference_p():
    assert slope_difference_p(1.0, 0.5, 1.0, 0.5) == pytest.approx(1.0)
    assert slope_difference_p(1.96 * math.sqrt(2), 1.0, 0.0, 1.0) == pytest.approx(0.05, abs=1e-3)


def row(sid, region, volume, suv, sex="M", age=50.0, weight=70.0, height=1.75):
    return {"subject_id": sid, "sex": sex, "age_years": age, "height_m": height, "weight_kg": weight,
            "bmi": weight / height**2, "region": region, "volume_ml": volume, "suv_mean": suv, "suv_max": suv,
            "suv_peak": suv, "hu_mean": 50.0}


def test_volume_exclusion_rule():
    rows = [row("s1", "spleen", 40.0, 2.0), row("s2", "spleen", 60.0, 2.0), row("s3", "spleen", 50.0, 2.0),
            row("s1", "body", 10.0, 1.0) | {"length_mm": 700.0}]
    kept = build_records("c", "reference", rows)
    assert [r["subject_id"] for r in kept.values[("spleen", "suv_mean")]] == ["s2", "s3"], "< 50 mL is dropped"
    assert len(kept.values[("body", "volume_ml")]) == 1, "the body is never excluded"
    spleen = next(e for e in kept.exclusions if e["region"] == "spleen")
    assert (spleen["records"], spleen["excluded"]) == (3, 1)
    assert len(build_records("c", "reference", rows, min_volume_ml=0).values[("spleen", "volume_ml")]) == 3


def test_comparison_rows_by_subgroup():
    ref = [row(f"r{i}", "liver", 1500 + 10 * i, 2.0 + 0.1 * i, sex="MF"[i % 2], age=35 + 10 * i) for i in range(6)]
    syn = [row(f"s{i}", "liver", 1600 + 10 * i, 2.2 + 0.1 * i, sex="MF"[i % 2], age=35 + 10 * i) for i in range(6)]
    cohorts = [build_records("ref", "reference", ref), build_records("syn", "synthetic", syn)]
    rows = comparison_rows(cohorts)
    got = {(r["subgroup"], r["cohort"]): r for r in rows if r["measure"] == "suv_mean"}
    assert set(s for s, _ in got) == set(SUBGROUPS)
    assert got[("age<=65", "ref")]["n"] == 4, "65 itself belongs to <= 65"
    assert got[("age>65", "ref")]["n"] == 2 and got[("sex=F", "syn")]["n"] == 3
    a, b = [2.2 + 0.1 * i for i in range(6)], [2.0 + 0.1 * i for i in range(6)]
    assert got[("all", "syn")]["welch_p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert got[("all", "syn")]["pct_diff"] == pytest.approx(100 * (np.mean(a) - np.mean(b)) / np.mean(b))
    assert got[("all", "ref")]["anova_p"] == pytest.approx(sps.f_oneway(a, b).pvalue)


def test_response_slopes_recover_the_generating_law():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(30):
        w, h, age, sex = rng.uniform(50, 100), rng.uniform(1.5, 2.0), rng.uniform(20, 90), "MF"[i % 2]
        vol = 300 + 12.0 * w + 500.0 * h - 3.0 * age + (80.0 if sex == "M" else 0.0)
        rows.append(row(f"x{i}", "liver", vol, 2.0, sex=sex, age=age, weight=w, height=h))
    out = response_rows([build_records("ref", "reference", rows), build_records("syn", "synthetic", rows)])
    slopes = {r["covariate"]: r for r in out if r["measure"] == "volume_ml" and r["cohort"] == "syn"}
    assert slopes["weight_kg"]["slope"] == pytest.approx(120.0) and slopes["weight_kg"]["per"] == "per 10 kg"
    assert slopes["height_m"]["slope"] == pytest.approx(50.0)
    assert slopes["age_years"]["slope"] == pytest.approx(-30.0)
    assert slopes["age_years"]["adjusted_for"].endswith("sex")
