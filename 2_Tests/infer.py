#!/usr/bin/env python
"""Generate a synthetic PET/CT cohort from a demographics CSV.

    python 2_Tests/infer.py --lowres runs/lowres_paper/ckpt-000150000.pt \
        --demographics cohort.csv --out results/synthetic

Writes the cohort directory layout (demographics.csv, ct/, suv/, previews/, meta/). Rerunning resumes:
finished subjects are skipped; a bad CSV row or a failing subject is reported and the rest go on.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from libs.cli import run_guarded
from libs.generate import generate_lowres_cohort, load_lowres_model


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--lowres", required=True, type=click.Path(), metavar="CKPT",
              help="Low-resolution stage checkpoint (ckpt-*.pt) or its run folder (newest checkpoint).")
@click.option("--demographics", required=True, type=click.Path(dir_okay=False), metavar="CSV",
              help="subject_id,height_m,weight_kg,sex,age_years")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Output cohort directory.")
@click.option("--steps", type=click.IntRange(1, 1000), metavar="N", help="Sampler steps [default: the checkpoint's].")
@click.option("--solver", type=click.Choice(["heun", "euler"]), help="Sampler [default: the checkpoint's].")
@click.option("--churn", type=click.FloatRange(0.0), metavar="S", help="EDM stochastic churn [default: 0].")
@click.option("--seed", default=0, type=click.IntRange(0, 2**31 - 1), metavar="S",
              help="Job seed; each subject's seed derives from it and the subject id.")
@click.option("--batch", default=4, type=click.IntRange(1, 1024), metavar="N", help="Subjects per sampler batch.")
@click.option("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("--no-previews", is_flag=True, help="Do not write previews/<id>.png.")
@click.option("--overwrite", is_flag=True, help="Regenerate subjects that are already complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(lowres, demographics, out, steps, solver, churn, seed, batch, device, no_ema, no_previews, overwrite,
         quiet):
    """Sample synthetic subjects (CT in HU, PET in SUV, true NIfTI geometry) from demographics."""

    def job():
        import torch
        base = load_lowres_model(lowres, torch.device("cpu"), ema=False).config.sample
        sample = dataclasses.replace(base, **{k: v for k, v in
                                              {"steps": steps, "solver": solver, "churn": churn}.items()
                                              if v is not None})
        report = generate_lowres_cohort(lowres, demographics, out, seed, sample, batch, device, not no_ema,
                                        not no_previews, overwrite, progress=not quiet)
        click.echo(f"{out}: {len(report.written)} written, {len(report.skipped)} already complete, "
                   f"{len(report.failed)} failed in {report.seconds:.1f} s")
        for key, reason in report.failed.items():
            click.echo(f"  failed {key}: {reason}", err=True)
        if report.failed:
            sys.exit(1)

    run_guarded(job)


if __name__ == "__main__":
    main()
