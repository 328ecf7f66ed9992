#!/usr/bin/env python
"""Paired metrics between two cohorts with the same subject ids (a = reference, b = compared).

    python 3_Evaluations/4_paired_metrics.py --a data/phantom_2mm --b results/superres --out results/sr.csv
    python 3_Evaluations/4_paired_metrics.py --a data/phantom --b data/phantom_ts --out ts.csv --metrics dice,hausdorff

Dice and 95 % Hausdorff distance (mm) per organ label; MAE, PSNR and SSIM of CT (HU, window
-1000..1000) and SUV (0..25) inside the body. When the grids differ b is resampled onto a's grid
(nearest for labels, linear for images) and the rows say so. Writes one row per subject × target ×
metric and OUT_summary.csv next to it. Rerunning resumes.
"""

from __future__ import annotations

import sys

import click

from libs.evaluation import guarded
from libs.evaluation.paired import METRICS
from libs.evaluation.paired_job import DEFAULT_ORGANS, parse_metrics, run_paired, summary_path


def _echo_summary(report, out) -> None:
    r = report
    click.echo(f"{out}: {len(r.computed)} computed, {len(r.reused)} reused, {len(r.failed)} failed "
               f"in {r.seconds:.1f} s")
    if r.resampled:
        click.echo(f"  note: {len(r.resampled)} subject(s) of b were resampled onto a's grid (rows say resampled=True)")
    for side, ids in (("a", r.only_a), ("b", r.only_b)):
        if ids:
            click.echo(f"  {len(ids)} subject(s) only in {side}, skipped: {', '.join(ids[:5])}"
                       + (" ..." if len(ids) > 5 else ""))
    click.echo(f"  summary: {summary_path(out)}")
    for sid, reason in r.failed.items():
        click.echo(f"  failed {sid}: {reason}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--a", "a_dir", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Reference cohort.")
@click.option("--b", "b_dir", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Compared cohort.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="CSV", help="Per-subject metrics CSV.")
@click.option("--metrics", multiple=True, default=[",".join(METRICS)], metavar="LIST",
              help=f"Subset of {', '.join(METRICS)}: comma- or space-separated (--metrics dice,mae or "
                   "--metrics dice mae), or repeated.")
@click.option("--organs", default=",".join(DEFAULT_ORGANS), metavar="NAMES",
              help="Comma-separated TotalSegmentator 'total' classes for Dice / HD95.")
@click.option("--overwrite", is_flag=True, help="Recompute every subject instead of reusing rows of --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("more_metrics", nargs=-1, metavar="")
def main(a_dir, b_dir, out, metrics, organs, overwrite, quiet, more_metrics):
    """Dice, HD95 (mm), PSNR, SSIM and MAE between two cohorts with the same subject ids."""
    result = {}

    def job():
        result["r"] = run_paired(a_dir, b_dir, out, metrics=parse_metrics((*metrics, *more_metrics)),
                                 organs=tuple(o.strip() for o in organs.split(",") if o.strip()),
                                 overwrite=overwrite, progress=not quiet)

    guarded(job)
    _echo_summary(result["r"], out)
    sys.exit(1 if result["r"].failed else 0)


if __name__ == "__main__":
    main()
