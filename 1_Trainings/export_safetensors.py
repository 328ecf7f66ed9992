#!/usr/bin/env python
"""Export a trained stage's EMA weights to safetensors (config and provenance in the metadata).

    python 1_Trainings/export_safetensors.py --checkpoint runs/lowres_paper --out lowres_ema.safetensors

``--sample-from PRESET`` records that preset's ``sample:`` section as the weights' default sampler; given an
exported ``.safetensors`` as ``--checkpoint`` it changes only that (the tensors are copied unchanged):

    python 1_Trainings/export_safetensors.py --checkpoint Resource/demo_weights/superres.safetensors \\
        --sample-from 1_Trainings/configs/superres_bench.yaml --out Resource/demo_weights/superres.safetensors
"""

from __future__ import annotations

from pathlib import Path

import click

from libs.cli import run_guarded
from libs.generate import export_stage_safetensors, set_sampler_defaults


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", required=True, type=click.Path(), metavar="CKPT",
              help="ckpt-*.pt or a run folder (its newest checkpoint); or exported weights (.safetensors) with "
                   "--sample-from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE", help="Output .safetensors.")
@click.option("--raw", is_flag=True, help="Export the raw training weights instead of the EMA.")
@click.option("--sample-from", default=None, type=click.Path(dir_okay=False, exists=True), metavar="PRESET",
              help="Record this preset's sample: section as the weights' default sampler [the training config's].")
@click.option("--made-by", default="1_Trainings/export_safetensors.py", metavar="TEXT",
              help="The command that trained and exported these weights (recorded in the metadata).")
def main(checkpoint, out, raw, sample_from, made_by):
    """Write the network weights (either stage) as a plain UNet state_dict in safetensors."""

    def job():
        if Path(checkpoint).suffix == ".safetensors":
            if not sample_from or raw:
                raise click.UsageError("exported weights as --checkpoint: give --sample-from PRESET (and no --raw); "
                                       "to export again, give the training checkpoint")
            written = set_sampler_defaults(checkpoint, sample_from, out, made_by)
        else:
            written = export_stage_safetensors(checkpoint, out, not raw, {"made_by": made_by,
                                                                          "checkpoint": str(checkpoint)})
            if sample_from:
                written = set_sampler_defaults(written, sample_from, written, made_by)
        click.echo(f"wrote {written}")

    run_guarded(job)


if __name__ == "__main__":
    main()
