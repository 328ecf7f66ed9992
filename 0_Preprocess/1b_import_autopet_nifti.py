#!/usr/bin/env python
"""AutoPET (TCIA FDG-PET-CT-Lesions) NIfTI release → work directory: CT (HU), SUV, demographics rows.

Example:
    python 0_Preprocess/1b_import_autopet_nifti.py --input NIFTI/FDG-PET-CT-Lesions \\
        --metadata "Clinical Metadata FDG PET_CT Lesions.csv" --demographics body.csv --output data/work
"""

from __future__ import annotations

import click

from libs.preprocess.autopet import import_autopet
from libs.preprocess.cli import CONTEXT, guarded, report_and_exit


@click.command(context_settings=CONTEXT)
@click.option("--input", "root", required=True, type=click.Path(exists=True, file_okay=False),
              metavar="AUTOPET_NIFTI", help="The release: study folders with CT.nii.gz and SUV.nii.gz.")
@click.option("--metadata", required=True, type=click.Path(dir_okay=False), metavar="CSV",
              help="The release's metadata CSV (Subject ID, age, sex; optional Study Date).")
@click.option("--demographics", "demographics_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="Height/weight per study: columns study,height_m,weight_kg.")
@click.option("--dicom-root", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Or read PatientSize/PatientWeight from the DICOM release (same folder names).")
@click.option("--output", "out", required=True, type=click.Path(file_okay=False), metavar="WORK",
              help="Work directory (same layout as 1_dicom_to_nifti.py).")
@click.option("--workers", default=1, type=click.IntRange(1, 256), metavar="N", help="Parallel processes.")
@click.option("--salt", default="", metavar="TEXT", help="Secret mixed into the subject-id hash.")
@click.option("--overwrite", is_flag=True, help="Redo studies that are already complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(root, metadata, demographics_csv, dicom_root, out, workers, salt, overwrite, quiet):
    """Import the AutoPET NIfTI release; studies lacking height, weight, age or sex go to skipped.csv."""
    report = guarded(lambda: import_autopet(root, out, metadata, demographics_csv, dicom_root, workers, salt,
                                            overwrite, progress=not quiet))
    report_and_exit(report, out)


if __name__ == "__main__":
    main()
