#!/usr/bin/env python
"""Export a trained stage's EMA weights to safetensors (config and provenance in the metadata).

    python 1_Trainings/export_safetensors.py --checkpoint runs/lowres_paper --out lowres_ema.safetensors
"""

from __future__ import annotations

import click

from libs.cli import run_guarded
from libs.generate import export_stage_safetensors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", required=True, type=click.Path(), metavar="CKPT",
              help="ckpt-*.pt or a run folder (its newest checkpoint).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE", help="Output .safetensors.")
@click.option("--raw", is_flag=True, help="Export the raw training weights instead of the EMA.")
@click.option("--made-by", default="1_Trainings/export_safetensors.py", metavar="TEXT",
              help="The command that trained and exported these weights (recorded in the metadata).")
def main(checkpoint, out, raw, made_by):
    """Write the network weights (either stage) as a plain UNet state_dict in safetensors."""
    provenance = {"made_by": made_by, "checkpoint": str(checkpoint)}
    run_guarded(lambda: click.echo(f"wrote {export_stage_safetensors(checkpoint, out, not raw, provenance)}"))


if __name__ == "__main__":
    main()
