"""The cohort-comparison job: statistics of every cohort, tables, Markdown report and figures.

Output folder (cohort directories are only read)::

    OUT/stats/<cohort>.csv        organ + whole-body statistics per cohort (resumable, reused on rerun)
    OUT/comparison.csv            tidy: region × measure × subgroup × cohort (see compare.COMPARISON_COLUMNS)
    OUT/response.csv              demographic-response slopes per cohort
    OUT/exclusions.csv            records dropped by the volume rule, per cohort × region
    OUT/comparison.md             the same as readable tables
    OUT/figures/violins_organs.png, violins_body.png, demographics.png, previews.png
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..cohort import Cohort
from ..files import atomic_write_text
from .compare import (
    COMPARISON_COLUMNS,
    EXCLUSION_COLUMNS,
    RESPONSE_COLUMNS,
    SUBGROUPS,
    CohortRecords,
    build_records,
    comparison_rows,
    ordered_keys,
    response_rows,
)
from .errors import EvaluationError
from .figures import demographics_figure, preview_grid, violin_figure
from .measures import ORGAN_REGIONS
from .organ_stats import cohort_stats, describe_report, label_sources
from .tables import markdown_table, write_csv

PAPER_ORGANS = ("liver", "heart", "kidneys", "spleen")
PAPER_MEASURES = ("volume_ml", "suv_mean", "suv_max", "suv_peak")
BODY_PANELS = ("volume_ml", "length_mm", "fat_volume_ml", "lung_volume_ml", "hu_mean", "ct_roughness_hu",
               "suv_mean", "suv_p90")


@dataclass
class ComparisonResult:
    """Paths written and per-cohort messages of a comparison job."""

    files: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    failed: int = 0


def cohort_names(dirs: list[str | os.PathLike]) -> list[str]:
    """Unique, file-name-safe names from the directories' base names (``name``, ``name_2``, ...)."""
    names: list[str] = []
    for d in dirs:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(d).resolve().name) or "cohort"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def fmt(value: float, digits: int = 3) -> str:
    """A number for a Markdown cell: ``digits`` significant digits, no exponent below 1e6; '–' for NaN."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value))))) if value else digits - 1
    return f"{value:.{decimals}f}"


def _subgroup_table(rows: list[dict], subgroup: str, names: list[str]) -> str:
    header = ["region", "measure", f"{names[0]} (reference)"]
    for n in names[1:]:
        header += [n, "Δ %", "Welch p", "KS p", "d"]
    header.append("ANOVA p")
    cells = {}
    for r in rows:
        if r["subgroup"] == subgroup:
            cells.setdefault((r["region"], r["measure"]), {})[r["cohort"]] = r
    body = []
    for (region, measure), by in cells.items():
        line = [region, measure]
        for i, n in enumerate(names):
            r = by[n]
            line.append(f"{fmt(r['mean'])} ± {fmt(r['sd'])} ({r['n']})")
            if i:
                line += [fmt(r["pct_diff"], 2), fmt(r["welch_p"], 2), fmt(r["ks_p"], 2), fmt(r["cohens_d"], 2)]
        line.append(fmt(by[names[0]]["anova_p"], 2))
        body.append(line)
    return markdown_table(header, body)


def _response_table(rows: list[dict], names: list[str]) -> str:
    header = ["region", "measure", "covariate"] + [f"{n} slope ± se" for n in names] + \
             [f"{n} p(≠ ref)" for n in names[1:]]
    cells = {}
    for r in rows:
        cells.setdefault((r["region"], r["measure"], f"{r['covariate']} ({r['per']})"), {})[r["cohort"]] = r
    body = [[*key] + [f"{fmt(by[n]['slope'])} ± {fmt(by[n]['se'])}" for n in names] +
            [fmt(by[n]["diff_vs_reference_p"], 2) for n in names[1:]] for key, by in cells.items()]
    return markdown_table(header, body)


def markdown_report(cohorts: list[CohortRecords], n_subjects: dict[str, int], comparison: list[dict],
                    response: list[dict], min_volume_ml: float,
                    sources: dict[str, dict[str, int]] | None = None) -> str:
    """The Markdown report: cohorts, label sources, exclusion rule and counts, one table per subgroup, response
    slopes."""
    names = [c.name for c in cohorts]
    rule = (f"organ records with volume < {min_volume_ml:g} mL dropped (the paper's rule)" if min_volume_ml > 0
            else "no volume exclusion")
    out = ["# Cohort comparison", "",
           f"Reference: **{names[0]}** ({n_subjects[names[0]]} subjects); synthetic: "
           + ", ".join(f"**{n}** ({n_subjects[n]})" for n in names[1:]) + ".", "",
           f"Exclusion: {rule}. SUV clipped to [0, 25]. Δ % = 100·(synthetic − reference)/reference; "
           "Welch = unequal-variance t-test; KS = two-sample Kolmogorov–Smirnov; d = Cohen's d (pooled SD); "
           "ANOVA = one-way across all cohorts. Values are mean ± SD (n).", ""]
    if sources:
        out += ["## Label sources", "", "Organ rows come from each cohort's labels/: generated with the subjects (the "
                "cascade's label stage, or its label channels; each sidecar says which), made by a segmenter "
                "(3_Evaluations/1_segment.py) or provided with the cohort (ground truth, preprocessing).", "",
                markdown_table(
                    ["cohort", "subjects by label source"],
                    [[n, ", ".join(f"{k} {v}" for k, v in sorted(sources[n].items()))] for n in names if n in sources]),
                ""]
    out += ["## Excluded records", "", markdown_table(
        ["cohort", "region", "records", "excluded"],
        [[e["cohort"], e["region"], str(e["records"]), str(e["excluded"])]
         for c in cohorts for e in c.exclusions if e["region"] != "body"]) if any(
        e["region"] != "body" for c in cohorts for e in c.exclusions) else "No organ records (no labels).\n"]
    if not any(k[0] in ORGAN_REGIONS for k in ordered_keys(cohorts)):
        out += ["No cohort has organ labels: only the label-free whole-body measures are compared "
                "(run 3_Evaluations/1_segment.py for organ statistics).", ""]
    for subgroup in SUBGROUPS:
        out += [f"## Subgroup: {subgroup}", "", _subgroup_table(comparison, subgroup, names)]
    out += ["## Demographic response", "",
            "Least-squares slopes of each measure on weight, height and age (adjusted for each other and "
            "for sex when both sexes are present); p(≠ ref) tests equality with the reference slope.", "",
            _response_table(response, names)]
    return "\n".join(out)


def _figures(out: Path, cohorts: list[CohortRecords], dirs: dict[str, Cohort], preview_subjects: int) -> list[Path]:
    figs = out / "figures"
    keys = set(ordered_keys(cohorts))
    organ_panels = [(r, m) for r in PAPER_ORGANS for m in PAPER_MEASURES if (r, m) in keys]
    body_panels = [("body", m) for m in BODY_PANELS if ("body", m) in keys]
    written = []
    if organ_panels:
        written.append(violin_figure(figs / "violins_organs.png", cohorts, organ_panels, len(PAPER_MEASURES)))
    if body_panels:
        written.append(violin_figure(figs / "violins_body.png", cohorts, body_panels, 4))
    written.append(demographics_figure(figs / "demographics.png", {n: c.demographics() for n, c in dirs.items()}))
    if preview_subjects > 0:
        written.append(preview_grid(figs / "previews.png", dirs, preview_subjects))
    return written


def _collect_stats(dirs: dict[str, Cohort], out: Path, overwrite: bool, progress: bool, result: ComparisonResult):
    """Statistics rows of each cohort (computed or resumed into OUT/stats/<name>.csv)."""
    rows = {}
    for name, cohort in dirs.items():
        csv_path = out / "stats" / f"{name}.csv"
        report = cohort_stats(cohort.root, csv_path, overwrite=overwrite, progress=progress, desc=f"stats {name}")
        result.messages += describe_report(report, csv_path, len(cohort.demographics()))
        result.failed += len(report.failed)
        result.files.append(csv_path)
        rows[name] = report.rows
    return rows


def run_comparison(reference: str | os.PathLike, synthetic: list[str | os.PathLike], out: str | os.PathLike,
                   min_volume_ml: float = 50.0, preview_subjects: int = 3, overwrite: bool = False,
                   progress: bool = True) -> ComparisonResult:
    """Compare ``synthetic`` cohorts with the ``reference`` cohort; write everything under ``out``."""
    if not synthetic:
        raise EvaluationError("give at least one --synthetic cohort")
    paths = [Path(reference), *map(Path, synthetic)]
    for p in paths:
        if not (p / "demographics.csv").is_file():
            raise EvaluationError(f"{p / 'demographics.csv'}: not found; is {p} a cohort directory?")
    out, result = Path(out), ComparisonResult()
    dirs = dict(zip(cohort_names(paths), map(Cohort, paths)))
    stats = _collect_stats(dirs, out, overwrite, progress, result)
    cohorts = [build_records(n, "reference" if i == 0 else "synthetic", stats[n], min_volume_ml)
               for i, n in enumerate(dirs)]
    comparison, response = comparison_rows(cohorts), response_rows(cohorts)
    result.files += [write_csv(out / "comparison.csv", comparison, COMPARISON_COLUMNS),
                     write_csv(out / "response.csv", response, RESPONSE_COLUMNS),
                     write_csv(out / "exclusions.csv", [e for c in cohorts for e in c.exclusions], EXCLUSION_COLUMNS)]
    n_subjects = {n: len({r["subject_id"] for r in stats[n]}) for n in dirs}
    sources = {n: label_sources(c) for n, c in dirs.items()}
    atomic_write_text(out / "comparison.md", markdown_report(cohorts, n_subjects, comparison, response, min_volume_ml,
                                                             sources))
    result.files.append(out / "comparison.md")
    result.files += _figures(out, cohorts, dirs, preview_subjects)
    return result
