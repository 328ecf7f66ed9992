"""The paper's cohort comparison: synthetic vs reference per region × measure × subgroup.

Protocol (Yoon et al. 2025, "Evaluation"): organ records whose volume is below 50 mL are dropped
(segmentation failures); for every region × measure and subgroup — all, sex, age ≤ 65 / > 65,
BMI < 25 / ≥ 25 — each cohort gets n, mean ± SD and median, and each synthetic cohort its % mean
difference to the reference, Welch's t-test, the Kolmogorov–Smirnov test and Cohen's d; a one-way
ANOVA runs across all cohorts.  Added here: the *demographic response* — per cohort, the least-squares
slopes of each measure on weight, height and age (adjusted for each other, and for sex when both
sexes are present) and the p-value of each synthetic slope differing from the reference slope.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .body import BODY_MEASURES
from .measures import MEASURES, ORGAN_REGIONS
from .statistics import (
    cohens_d,
    ks_test,
    least_squares,
    one_way_anova,
    percent_difference,
    slope_difference_p,
    welch_ttest,
)

MIN_VOLUME_ML = 50.0
BODY_REGION = "body"
SUBGROUPS: dict[str, object] = {
    "all": lambda r: True,
    "sex=F": lambda r: r["sex"] == "F",
    "sex=M": lambda r: r["sex"] == "M",
    "age<=65": lambda r: r["age_years"] <= 65.0,
    "age>65": lambda r: r["age_years"] > 65.0,
    "bmi<25": lambda r: r["bmi"] < 25.0,
    "bmi>=25": lambda r: r["bmi"] >= 25.0,
}
COVARIATES = (("weight_kg", 10.0, "per 10 kg"), ("height_m", 0.1, "per 10 cm"), ("age_years", 10.0, "per 10 y"))
COMPARISON_COLUMNS = ["region", "measure", "subgroup", "cohort", "role", "n", "mean", "sd", "median", "pct_diff",
                      "welch_t", "welch_df", "welch_p", "ks_d", "ks_p", "cohens_d", "anova_f", "anova_p"]
RESPONSE_COLUMNS = ["region", "measure", "cohort", "role", "covariate", "per", "slope", "se", "p", "n", "r2",
                    "diff_vs_reference_p", "adjusted_for"]
EXCLUSION_COLUMNS = ["cohort", "region", "records", "excluded", "min_volume_ml"]


@dataclass
class CohortRecords:
    """One cohort's measure values: ``values[(region, measure)]`` → list of record dicts."""

    name: str
    role: str
    values: dict[tuple[str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    exclusions: list[dict] = field(default_factory=list)


def region_measures(region: str) -> tuple[str, ...]:
    """Measures that apply to a region: the body's label-free set, or the organ set."""
    return BODY_MEASURES if region == BODY_REGION else MEASURES


def build_records(name: str, role: str, rows: list[dict], min_volume_ml: float = MIN_VOLUME_ML) -> CohortRecords:
    """Turn statistics rows into per-(region, measure) records, dropping organ rows below ``min_volume_ml``.

    ``min_volume_ml`` ≤ 0 keeps every record.  Exclusion counts per region land in ``exclusions``.
    """
    out = CohortRecords(name, role)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        region = row["region"]
        counts[region][0] += 1
        volume = row.get("volume_ml", math.nan)
        if region != BODY_REGION and min_volume_ml > 0 and not volume >= min_volume_ml:
            counts[region][1] += 1
            continue
        for measure in region_measures(region):
            value = row.get(measure, math.nan)
            if isinstance(value, float) and math.isfinite(value):
                out.values[(region, measure)].append({**_demographics(row), "value": value})
    out.exclusions = [{"cohort": name, "region": reg, "records": n, "excluded": x,
                       "min_volume_ml": min_volume_ml if reg != BODY_REGION else math.nan}
                      for reg, (n, x) in counts.items()]
    return out


def _demographics(row: dict) -> dict:
    return {k: row[k] for k in ("subject_id", "sex", "age_years", "height_m", "weight_kg", "bmi")}


def ordered_keys(cohorts: list[CohortRecords]) -> list[tuple[str, str]]:
    """(region, measure) pairs present in any cohort: organs in ORGAN_REGIONS order, then the body."""
    present = {k for c in cohorts for k in c.values}
    regions = [*ORGAN_REGIONS, BODY_REGION]
    return [(r, m) for r in regions for m in region_measures(r) if (r, m) in present]


def _summary(values: np.ndarray) -> dict:
    n = int(values.size)
    return {"n": n, "mean": float(values.mean()) if n else math.nan,
            "sd": float(values.std(ddof=1)) if n > 1 else math.nan,
            "median": float(np.median(values)) if n else math.nan}


def _versus(syn: np.ndarray, ref: np.ndarray, syn_mean: float, ref_mean: float) -> dict:
    t = welch_ttest(syn, ref)
    ks_d, ks_p = ks_test(syn, ref)
    return {"pct_diff": percent_difference(syn_mean, ref_mean), "welch_t": t.t, "welch_df": t.df,
            "welch_p": t.p, "ks_d": ks_d, "ks_p": ks_p, "cohens_d": cohens_d(syn, ref)}


def comparison_rows(cohorts: list[CohortRecords]) -> list[dict]:
    """Tidy comparison table (COMPARISON_COLUMNS); ``cohorts[0]`` is the reference."""
    rows = []
    for region, measure in ordered_keys(cohorts):
        for subgroup, keep in SUBGROUPS.items():
            samples = [np.array([r["value"] for r in c.values.get((region, measure), []) if keep(r)])
                       for c in cohorts]
            anova = one_way_anova(*samples)
            ref_stats = _summary(samples[0])
            for cohort, values in zip(cohorts, samples):
                stats = _summary(values)
                row = {"region": region, "measure": measure, "subgroup": subgroup, "cohort": cohort.name,
                       "role": cohort.role, **stats, "anova_f": anova.f, "anova_p": anova.p}
                if cohort is not cohorts[0]:
                    row |= _versus(values, samples[0], stats["mean"], ref_stats["mean"])
                rows.append(row)
    return rows


def _design(records: list[dict]) -> tuple[np.ndarray, list[str]]:
    """Covariate matrix (weight, height, age [, sex M = 1]) and the names of its columns."""
    cols = [np.array([r[name] for r in records], dtype=float) for name, _, _ in COVARIATES]
    names = [name for name, _, _ in COVARIATES]
    sex = np.array([1.0 if r["sex"] == "M" else 0.0 for r in records])
    if sex.size and 0.0 < sex.mean() < 1.0:
        cols.append(sex)
        names.append("sex")
    return np.column_stack(cols) if records else np.zeros((0, len(cols))), names


def response_rows(cohorts: list[CohortRecords]) -> list[dict]:
    """Demographic-response slopes (RESPONSE_COLUMNS); ``cohorts[0]`` is the reference."""
    rows = []
    for region, measure in ordered_keys(cohorts):
        reference: dict[str, tuple[float, float]] = {}
        for cohort in cohorts:
            records = cohort.values.get((region, measure), [])
            x, names = _design(records)
            fit = least_squares([r["value"] for r in records], x) if records else None
            for j, (cov, scale, per) in enumerate(COVARIATES):
                slope = float(fit.coef[j + 1]) * scale if fit else math.nan
                se = float(fit.se[j + 1]) * scale if fit else math.nan
                if cohort is cohorts[0]:
                    reference[cov] = (slope, se)
                rows.append({"region": region, "measure": measure, "cohort": cohort.name, "role": cohort.role,
                             "covariate": cov, "per": per, "slope": slope, "se": se,
                             "p": float(fit.p[j + 1]) if fit else math.nan, "n": len(records),
                             "r2": fit.r2 if fit else math.nan, "adjusted_for": "+".join(names),
                             "diff_vs_reference_p": math.nan if cohort is cohorts[0]
                             else slope_difference_p(slope, se, *reference[cov])})
    return rows
