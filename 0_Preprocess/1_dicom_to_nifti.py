#!/usr/bin/env python
"""DICOM PET/CT studies → work directory: CT (HU), PET as SUVbw (QIBA), one demographics row per study.

Examples:
    python 0_Preprocess/1_dicom_to_nifti.py --input data/raw --output data/work --workers 4
    python 0_Preprocess/1_dicom_to_nifti.py --study data/raw/some_study --output data/work
"""

from __future__ import annotations

import click

from libs.preprocess.cli import CONTEXT, guarded, report_and_exit
from libs.preprocess.convert import convert_single, convert_tree


@click.command(context_settings=CONTEXT)
@click.option("--input", "raw", type=click.Path(exists=True, file_okay=False), metavar="RAW",
              help="Folder holding DICOM studies at any depth (series found by tags, not folder names).")
@click.option("--study", "study", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Convert the single study in DIR instead of a whole tree.")
@click.option("--output", "out", required=True, type=click.Path(file_okay=False), metavar="WORK",
              help="Work directory: ct/, suv/, meta/, demographics.csv, skipped.csv.")
@click.option("--workers", default=1, type=click.IntRange(1, 256), metavar="N", help="Parallel processes.")
@click.option("--salt", default="", metavar="TEXT",
              help="Secret mixed into the subject-id hash (keep it to reproduce ids; never stored).")
@click.option("--overwrite", is_flag=True, help="Redo studies that are already complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(raw, study, out, workers, salt, overwrite, quiet):
    """Convert DICOM PET/CT studies to NIfTI (CT in HU, PET in SUVbw); untrusted studies go to skipped.csv."""
    if bool(raw) == bool(study):
        raise click.UsageError("give exactly one of --input RAW or --study DIR")
    if raw:
        report = guarded(lambda: convert_tree(raw, out, workers, salt, overwrite, progress=not quiet))
    else:
        report = guarded(lambda: convert_single(study, out, salt, overwrite))
    report_and_exit(report, out)


if __name__ == "__main__":
    main()
