#!/usr/bin/env python
"""Train the residual super-resolution stage (paper: 56×56×96 patches of 224×224×384 volumes).

    python 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_paper.yaml
    torchrun --nproc_per_node 4 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_paper.yaml

The config names the low-resolution preset it pairs with (`lowres_config`); grid, polyphase factor, voxel
size, intensity standardization and height law come from there. Rerunning the same command resumes.
"""

from __future__ import annotations

import click

from libs.cli import run_guarded, training_options
from libs.config import dump_yaml
from libs.runs import prepare_run
from libs.superres import SRConfig, load_pairing, train_superres


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@training_options
def main(config, cohort, run_dir, overrides, device, dry_run, quiet):
    """Train (or resume) the residual super-resolution diffusion model."""

    def job():
        cfg = prepare_run(config, SRConfig, cohort, run_dir, overrides, write=not dry_run)
        load_pairing(cfg)                      # fails early, naming the low-res preset, if it is missing
        if dry_run:
            click.echo(dump_yaml(cfg), nl=False)
            return
        click.echo(f"done: {train_superres(cfg, device=device, progress=not quiet)}")

    run_guarded(job)


if __name__ == "__main__":
    main()
