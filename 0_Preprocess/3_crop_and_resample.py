#!/usr/bin/env python
"""Work directory → cohort directory: 2 mm isotropic on the PET grid, body mask, clavicles→hips, 224×224.

Example:
    python 0_Preprocess/3_crop_and_resample.py --work data/work --out data/cohort --workers 4
"""

from __future__ import annotations

import click

from libs.preprocess.cli import CONTEXT, guarded, report_and_exit
from libs.preprocess.crop import CropSettings, crop_cohort


@click.command(context_settings=CONTEXT)
@click.option("--work", "work", required=True, type=click.Path(exists=True, file_okay=False), metavar="WORK",
              help="Work directory with ct/, suv/, labels/ and demographics.csv.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), metavar="COHORT",
              help="Cohort directory to write (DESIGN.md layout).")
@click.option("--spacing-mm", default=2.0, type=click.FloatRange(0.5, 16.0), metavar="MM",
              help="Isotropic output voxel size.")
@click.option("--size", default=224, type=click.IntRange(8, 4096), metavar="N", help="In-plane grid N×N.")
@click.option("--margin", default=20, type=click.IntRange(0, 1000), metavar="SLICES",
              help="Slices kept beyond the landmarks at each end.")
@click.option("--ct-threshold", default=-1000.0, metavar="HU", help="Body mask: CT above this.")
@click.option("--pet-threshold", default=0.1, type=click.FloatRange(0.0), metavar="SUV",
              help="Body mask: SUV above this (the PET background).")
@click.option("--workers", default=1, type=click.IntRange(1, 256), metavar="N", help="Parallel processes.")
@click.option("--overwrite", is_flag=True, help="Redo subjects that are already complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(work, out, spacing_mm, size, margin, ct_threshold, pet_threshold, workers, overwrite, quiet):
    """Resample, mask and crop every work-directory subject into a cohort directory."""
    settings = CropSettings(spacing_mm, size, margin, ct_threshold, pet_threshold)
    report = guarded(lambda: crop_cohort(work, out, settings, workers, overwrite, progress=not quiet))
    report_and_exit(report, out)


if __name__ == "__main__":
    main()
