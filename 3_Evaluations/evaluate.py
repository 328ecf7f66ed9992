#!/usr/bin/env python
"""The original project's evaluation entry point (its Quick Start line), over the numbered scripts' code:

    cd 3_Evaluations && python evaluate.py --pred_dir results/ --gt_dir ground_truth/ --metrics dice hausdorff

Metric names: dice hausdorff psnr ssim mae (paired: need the same subject ids in both cohorts, as
4_paired_metrics.py), organ_stats (2_organ_stats.py on both cohorts) and compare (3_compare_cohorts.py with
--gt_dir as the reference). When the cohorts share no subject id, paired metrics are impossible and the
organ statistics and the cohort comparison run instead, as the message says.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from libs.cohort import Cohort
from libs.evaluation import guarded
from libs.evaluation.organ_stats import cohort_stats
from libs.evaluation.paired import METRICS
from libs.evaluation.paired_job import run_paired
from libs.evaluation.report import run_comparison

COHORT_METRICS = ("organ_stats", "compare")


def split_metrics(first: str, more: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``--metrics dice hausdorff`` (words after the option) or ``--metrics dice,hausdorff`` → (paired, cohort)."""
    names = [m.strip().lower() for part in (first, *more) for m in part.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS and m not in COHORT_METRICS]
    if unknown:
        raise click.UsageError(f"unknown metric {unknown[0]!r}; choose from {', '.join((*METRICS, *COHORT_METRICS))}")
    return [m for m in names if m in METRICS], [m for m in names if m in COHORT_METRICS]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--pred_dir", "--pred-dir", "pred_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Generated (predicted) cohort directory.")
@click.option("--gt_dir", "--gt-dir", "gt_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Ground-truth / reference cohort directory.")
@click.option("--metrics", default="dice,hausdorff,psnr,ssim,mae", metavar="NAME ...",
              help="Metric names, space- or comma-separated: dice hausdorff psnr ssim mae organ_stats compare.")
@click.option("--out", "--output_dir", "out", default="evaluation", type=click.Path(file_okay=False), metavar="DIR",
              help="Where tables and figures go (the cohorts are only read).")
@click.option("--overwrite", is_flag=True, help="Recompute instead of reusing earlier results in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("more_metrics", nargs=-1, metavar="")
def main(pred_dir, gt_dir, metrics, out, overwrite, quiet, more_metrics):
    """Evaluate a generated cohort against a reference: paired metrics, organ statistics, comparison."""
    paired, cohort_level = split_metrics(metrics, more_metrics)
    failed = []

    def job():
        pred_ids = {d.subject_id for d in Cohort(pred_dir).demographics()}
        ids = pred_ids & {d.subject_id for d in Cohort(gt_dir).demographics()}
        todo = list(cohort_level)
        if paired and not ids:
            click.echo(f"{pred_dir} and {gt_dir} share no subject id: paired metrics ({', '.join(paired)}) need "
                       "matching ids; running organ_stats and compare instead", err=True)
            todo = sorted(set(todo) | set(COHORT_METRICS), key=COHORT_METRICS.index)
        elif paired:
            report = run_paired(gt_dir, pred_dir, Path(out) / "paired_metrics.csv", metrics=tuple(paired),
                                overwrite=overwrite, progress=not quiet)
            failed.extend(report.failed)
            click.echo(f"paired metrics of {len(ids)} matching subjects: {Path(out) / 'paired_metrics.csv'}")
        for name, cohort in (("pred", pred_dir), ("gt", gt_dir)) if "organ_stats" in todo else ():
            rep = cohort_stats(cohort, Path(out) / f"organ_stats_{name}.csv", overwrite, progress=not quiet)
            failed.extend(rep.failed)
            click.echo(f"organ statistics of {cohort}: {Path(out) / f'organ_stats_{name}.csv'}")
        if "compare" in todo:
            res = run_comparison(gt_dir, [pred_dir], Path(out) / "comparison", overwrite=overwrite,
                                 progress=not quiet)
            failed.extend(["comparison"] * res.failed)
            click.echo(f"cohort comparison: {Path(out) / 'comparison' / 'comparison.md'}")

    guarded(job)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
