#!/usr/bin/env python
"""Organ labels for every CT of a work directory: TotalSegmentator 'total', fast (3 mm) as in the paper.

Examples:
    python 0_Preprocess/2_segment_organs.py --work data/work
    python 0_Preprocess/2_segment_organs.py --work data/work --labels-from data/my_segmentations
"""

from __future__ import annotations

import click

from libs.evaluation.errors import EvaluationError
from libs.preprocess.cli import CONTEXT, guarded, report_and_exit
from libs.preprocess.segment import segment_work


@click.command(context_settings=CONTEXT)
@click.option("--work", "work", required=True, type=click.Path(exists=True, file_okay=False), metavar="WORK",
              help="Work directory written by 1_dicom_to_nifti.py or 1b_import_autopet_nifti.py.")
@click.option("--labels-from", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Reuse existing segmentations DIR/<id>.nii.gz (or DIR/labels/<id>.nii.gz) instead.")
@click.option("--device", default="auto", metavar="DEV", help="auto, cpu, cuda, cuda:N or mps (TotalSegmentator).")
@click.option("--workers", default=1, type=click.IntRange(1, 256), metavar="N",
              help="Parallel processes for --labels-from (TotalSegmentator runs one subject at a time).")
@click.option("--overwrite", is_flag=True, help="Redo subjects that already have labels.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(work, labels_from, device, workers, overwrite, quiet):
    """Write labels/<id>.nii.gz (TotalSegmentator 'total' ids, CT grid) for every work-directory subject."""
    def job():
        try:
            return segment_work(work, labels_from, device, workers, overwrite, progress=not quiet)
        except EvaluationError as exc:  # weights missing, bad device: one line
            raise click.ClickException(str(exc).splitlines()[0]) from None

    report_and_exit(guarded(job), work)


if __name__ == "__main__":
    main()
