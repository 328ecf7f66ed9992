#!/usr/bin/env python
"""The paper's comparison of synthetic cohorts with a reference cohort, with tables and figures.

    python 3_Evaluations/3_compare_cohorts.py --reference data/autopet_test --synthetic results/synthetic \
        --synthetic results/phantom --out results/comparison

Per region × measure × subgroup (all; sex; age <= 65 / > 65; BMI < 25 / >= 25): n, mean ± SD, % mean
difference, Welch t-test, Kolmogorov-Smirnov, Cohen's d and a one-way ANOVA across cohorts, after
dropping organ records below --min-volume-ml (the paper: 50 mL). Also the demographic-response slopes
(measure vs weight, height, age per cohort). Cohorts are only read; their statistics are computed into
OUT/stats/ (and reused on rerun). Writes comparison.csv / .md, response.csv, exclusions.csv, figures/.
"""

from __future__ import annotations

import sys

import click

from libs.evaluation import guarded
from libs.evaluation.report import run_comparison


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--reference", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Reference cohort (real data).")
@click.option("--synthetic", required=True, multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Synthetic cohort to compare (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Output folder.")
@click.option("--min-volume-ml", default=50.0, type=click.FloatRange(0.0), metavar="ML",
              help="Drop organ records below this volume (0 keeps all).")
@click.option("--preview-subjects", default=3, type=click.IntRange(0, 12), metavar="K",
              help="Subjects per cohort on the preview sheet (0: no sheet).")
@click.option("--overwrite", is_flag=True, help="Recompute the cohorts' statistics instead of reusing OUT/stats/.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(reference, synthetic, out, min_volume_ml, preview_subjects, overwrite, quiet):
    """Compare synthetic cohorts with a reference cohort by sex, age and BMI (tables, Markdown, figures)."""
    result = {}

    def job():
        result["r"] = run_comparison(reference, list(synthetic), out, min_volume_ml=min_volume_ml,
                                     preview_subjects=preview_subjects, overwrite=overwrite, progress=not quiet)

    guarded(job)
    r = result["r"]
    for line in r.messages:
        click.echo(line, err=line.startswith("  failed"))
    click.echo(f"{out}: wrote {len(r.files)} files (comparison.md, comparison.csv, response.csv, figures/)")
    sys.exit(1 if r.failed else 0)


if __name__ == "__main__":
    main()
