#!/usr/bin/env python
"""Organ and whole-body statistics of one cohort as a tidy CSV (one row per subject × region).

    python 3_Evaluations/2_organ_stats.py --cohort results/synthetic --out results/synthetic_stats.csv

Organ rows (liver, spleen, kidney_left, kidney_right, kidneys, heart: volume mL, SUVmean, SUVmax,
SUVpeak, mean HU; SUV clipped to [0, 25]) need labels/<id>.nii.gz; the label-free 'body' row (volume,
length, fat, subcutaneous fat, lung air, SUV distribution) needs only CT and SUV. Rerunning resumes.
"""

from __future__ import annotations

import sys

import click

from libs.evaluation import guarded
from libs.evaluation.organ_stats import cohort_stats, describe_report


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cohort", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Cohort directory (read only).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="CSV", help="Statistics CSV to write.")
@click.option("--overwrite", is_flag=True, help="Recompute every subject instead of reusing rows of --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(cohort, out, overwrite, quiet):
    """Per-organ volume / SUVmean / SUVmax / SUVpeak / HU and label-free whole-body measures of a cohort."""
    report = {}

    def job():
        from libs.cohort import Cohort

        report["r"] = cohort_stats(cohort, out, overwrite=overwrite, progress=not quiet)
        report["n"] = len(Cohort(cohort).demographics())

    guarded(job)
    for line in describe_report(report["r"], out, report["n"]):
        click.echo(line, err=line.startswith("  failed"))
    sys.exit(1 if report["r"].failed else 0)


if __name__ == "__main__":
    main()
