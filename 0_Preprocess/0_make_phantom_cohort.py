#!/usr/bin/env python
"""Build a phantom cohort directory (demographics.csv, ct/, suv/, labels/, meta/) from demographics.

Examples:
    python 0_Preprocess/0_make_phantom_cohort.py --out data/phantom --n 100 --seed 0
    python 0_Preprocess/0_make_phantom_cohort.py --out data/twins --demographics my_cohort.csv --spacing-mm 2
"""

from __future__ import annotations

import sys

import click

from libs.demographics import DemographicsError
from libs.phantom.writer import load_records, write_phantom_cohort
from libs.previews import distribution_figure


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Cohort directory to write (created if missing).")
@click.option("--n", "n", default=10, type=click.IntRange(1, 100_000), metavar="N",
              help="Number of subjects to sample (ignored with --demographics).")
@click.option("--seed", default=0, type=click.IntRange(0, 2**31 - 1), metavar="S",
              help="Cohort seed; subject k is identical for any N.")
@click.option("--spacing-mm", default=2.0, type=click.FloatRange(0.5, 16.0), metavar="MM",
              help="Isotropic voxel size. 2 mm gives 224×224×Z grids like the preprocessed real data.")
@click.option("--demographics", "demographics_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="Use these subjects (cohort CSV: subject_id,height_m,weight_kg,sex,age_years).")
@click.option("--prefix", default="phantom", metavar="TEXT",
              help="Subject ids <prefix>_00000, … (sampled subjects only).")
@click.option("--workers", default=1, type=click.IntRange(1, 256), metavar="N", help="Parallel processes.")
@click.option("--overwrite", is_flag=True, help="Regenerate subjects that are already complete.")
@click.option("--previews", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write a preview PNG per subject (coronal CT + PET MIP) into DIR.")
@click.option("--distribution-figure", "figure_path", type=click.Path(dir_okay=False), metavar="PNG",
              help="Also write the cohort's height/weight/BMI-by-sex figure.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(out, n, seed, spacing_mm, demographics_csv, prefix, workers, overwrite, previews, figure_path, quiet):
    """Generate a parametric digital-phantom PET/CT cohort (clavicles to pelvis, with organ labels)."""
    try:
        records = load_records(demographics_csv, n, seed, prefix)
        report = write_phantom_cohort(out, records, seed, spacing_mm, workers, overwrite, previews,
                                      progress=not quiet)
    except DemographicsError as exc:
        raise click.ClickException(str(exc)) from None
    if figure_path:
        distribution_figure(figure_path, {"phantom": records})
    click.echo(f"{out}: {len(report.written)} written, {len(report.skipped)} already complete, "
               f"{len(report.failed)} failed in {report.seconds:.1f} s")
    for sid, reason in report.failed.items():
        click.echo(f"  failed {sid}: {reason}", err=True)
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
