#!/usr/bin/env python
"""Segment every CT of a cohort with TotalSegmentator and write labels/<id>.nii.gz on the CT grid.

    python 3_Evaluations/1_segment.py --cohort results/synthetic                 # the paper: fast, 5 organs
    python 3_Evaluations/1_segment.py --cohort data/cohort --full --roi all --device cuda:1

Offline: the model weights must already be on this machine (the script checks before it starts and
says where they are looked for and how to install them). Usage statistics are switched off. Rerunning
resumes: a subject is left alone when labels/manifest.json shows its labels were made from this very CT
with the same model, ROI and TotalSegmentator version; otherwise it is segmented again. A labels/ folder
this script did not write (a phantom's truth, preprocessing's labels) is refused unless --overwrite.
"""

from __future__ import annotations

import sys

import click

from libs.evaluation import guarded
from libs.evaluation.segment import PAPER_ROI, segment_cohort


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cohort", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Cohort directory (demographics.csv, ct/); labels/ is written into it.")
@click.option("--fast/--full", default=True,
              help="3 mm 'total' model (the paper's choice) or the 1.5 mm five-part model.")
@click.option("--roi", default=",".join(PAPER_ROI), metavar="NAMES",
              help="Comma-separated TotalSegmentator 'total' classes to segment, or 'all'.")
@click.option("--device", default="auto", metavar="DEV",
              help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")
@click.option("--overwrite", is_flag=True,
              help="Segment every subject again; also replace labels this script did not write.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(cohort, fast, roi, device, overwrite, quiet):
    """Run TotalSegmentator (Python API) on every CT of a cohort, resumably and without network access."""
    report = {}

    def job():
        names = [] if roi.strip().lower() == "all" else roi.split(",")
        report["r"] = segment_cohort(cohort, fast=fast, roi=names, device=device, overwrite=overwrite,
                                     progress=not quiet)

    guarded(job)
    r = report["r"]
    where = f" on {r.device}" if r.device else ""
    click.echo(f"{cohort}: {len(r.written)} segmented{where}, {len(r.skipped)} already labelled, "
               f"{len(r.failed)} failed in {r.seconds:.1f} s")
    for sid, reason in r.failed.items():
        click.echo(f"  failed {sid}: {reason}", err=True)
    sys.exit(1 if r.failed else 0)


if __name__ == "__main__":
    main()
