#!/usr/bin/env python
"""Fit the cascade's height law (body length in slices = a · height_m + b) on a cohort, robustly (RANSAC).

Example:
    python 0_Preprocess/4_fit_height_scaler.py --cohort data/cohort --out data/cohort/height_law.yaml
"""

from __future__ import annotations

from pathlib import Path

import click

from libs.preprocess.cli import CONTEXT, guarded
from libs.preprocess.height_fit import cohort_lengths, fit_height_law, scatter_plot, write_height_yaml


@click.command(context_settings=CONTEXT)
@click.option("--cohort", "cohort", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Cohort directory (cropped by 3_crop_and_resample.py).")
@click.option("--out", "out", type=click.Path(dir_okay=False), metavar="YAML",
              help="Where to write the height_law section  [default: DIR/height_law.yaml]")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="PNG",
              help="Scatter plot with the fit  [default: next to the YAML, .png]")
@click.option("--slice-mm", default=2.0, type=click.FloatRange(0.1, 20.0), metavar="MM",
              help="Slice thickness the law counts in (the cascade's grid).")
@click.option("--threshold", type=click.FloatRange(0.0, min_open=True), metavar="SLICES",
              help="RANSAC inlier threshold  [default: median absolute deviation of the lengths]")
@click.option("--seed", default=0, type=click.IntRange(0), metavar="S", help="RANSAC seed.")
def main(cohort, out, plot, slice_mm, threshold, seed):
    """Fit slices = a · height_m + b; write the YAML the low-resolution config reads; print R² on inliers."""
    out = Path(out or Path(cohort) / "height_law.yaml")
    plot = Path(plot or out.with_suffix(".png"))

    def job():
        heights, lengths, _ = cohort_lengths(cohort, slice_mm)
        fit = fit_height_law(heights, lengths, slice_mm, threshold, seed)
        write_height_yaml(out, fit)
        scatter_plot(plot, heights, lengths, fit)
        click.echo(f"slices = {fit.a:.3f} · height_m + {fit.b:.3f} (slices of {slice_mm:g} mm); "
                   f"R² on inliers {fit.r2_inliers:.3f}; {int(fit.inliers.sum())}/{len(heights)} inliers")
        click.echo(f"wrote {out} and {plot}")

    guarded(job)


if __name__ == "__main__":
    main()
