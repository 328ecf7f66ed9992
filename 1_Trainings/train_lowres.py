#!/usr/bin/env python
"""Train the low-resolution stage (demographics → 56×56×96 PET/CT at 8 mm for the paper preset).

    python 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_paper.yaml
    torchrun --nproc_per_node 4 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_paper.yaml

Rerunning the same command resumes from the newest checkpoint in the run folder.
"""

from __future__ import annotations

import click

from libs.cli import run_guarded, training_options
from libs.config import dump_yaml
from libs.lowres import LowresConfig, train_lowres
from libs.runs import prepare_run


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@training_options
def main(config, cohort, run_dir, overrides, device, dry_run, quiet):
    """Train (or resume) the demographics-conditioned low-resolution diffusion model."""

    def job():
        cfg = prepare_run(config, LowresConfig, cohort, run_dir, overrides, write=not dry_run)
        if dry_run:
            click.echo(dump_yaml(cfg), nl=False)
            return
        last = train_lowres(cfg, device=device, progress=not quiet)
        click.echo(f"done: {last}")

    run_guarded(job)


if __name__ == "__main__":
    main()
