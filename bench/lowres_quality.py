#!/usr/bin/env python
"""How well has a low-resolution run learned?  Two numbers a sampler cannot fake:

1. the denoising error of the trained network on a held-out cohort: for each noise level σ, the RMSE (in
   network units, σ_data-scaled) of D(x + σ·n) against x, next to the error of doing nothing (σ) and of
   predicting the mean (the data's RMS in network units). A network that has learned the data's structure
   beats both at every σ; an undertrained one sits near σ at small σ;
2. the CT roughness of samples: mean |difference| of neighbouring voxels along x within the CT window
   [−500, 500] HU, for cascade-free low-res samples of the held-out demographics and for the held-out
   volumes themselves, polyphase-subsampled to the same in-plane grid.

    .venv/bin/python bench/lowres_quality.py --lowres demo_out/runs/lowres --cohort demo_out/heldout
    .venv/bin/python bench/lowres_quality.py --lowres RUN --cohort data/test --subjects 16 --device cuda

Used for the README's "The noise is undertraining" paragraph (200- vs 600-step demo models).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.cohort import Cohort  # noqa: E402
from libs.data import normalized_volume, polyphase  # noqa: E402
from libs.demographics import encode_many  # noqa: E402
from libs.generate import load_lowres_model, pick_device, sample_lowres, subject_seed  # noqa: E402
from libs.intensity import unit_to_ct  # noqa: E402
from libs.lowres import expand_cond  # noqa: E402

SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def roughness_hu(ct_hu: np.ndarray) -> float:
    """Mean |difference| of x-neighbours of a CT clipped to the paper's [−500, 500] HU window."""
    ct = np.clip(ct_hu.astype(np.float64), -500.0, 500.0)
    return float(np.abs(np.diff(ct, axis=0)).mean())


@click.command()
@click.option("--lowres", required=True, type=click.Path(exists=True), help="Low-res checkpoint or run folder.")
@click.option("--cohort", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out cohort directory (not the training cohort).")
@click.option("--subjects", default=8, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--steps", default=None, type=click.IntRange(1, 1000), help="Sampler steps [the checkpoint's].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-ema", is_flag=True, help="Raw weights instead of the EMA.")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the numbers as JSON.")
def main(lowres, cohort, subjects, steps, seed, device, no_ema, json_out):
    dev = pick_device(device)
    model = load_lowres_model(lowres, dev, ema=not no_ema)
    cfg = model.config
    co = Cohort(cohort)
    records = co.demographics()[:subjects]
    grid = tuple(cfg.data.grid)
    u = torch.stack([polyphase(normalized_volume(co, d, grid), cfg.data.factor, (0, 0, 0)) for d in records])
    x0 = model.standardize.to_net(u).to(dev)
    cond = expand_cond(torch.from_numpy(encode_many(records)), x0.shape[2:]).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    result = {"checkpoint": str(model.path), "step": model.step, "cohort": str(cohort), "subjects": len(records),
              "data_rms": float(x0.pow(2).mean().sqrt()), "denoising_rmse": {}}
    click.echo(f"{model.path} (step {model.step}) on {len(records)} subjects of {cohort}")
    click.echo(f"  data RMS in network units (error of predicting the mean): {result['data_rms']:.4f}")
    click.echo("  sigma   denoised RMSE   noisy input RMSE")
    with torch.no_grad():
        for s in SIGMAS:
            noise = torch.randn(x0.shape, generator=gen).to(dev) * s
            d = model.denoiser(x0 + noise, torch.full((len(records),), s, device=dev), cond)
            rmse = float((d.float() - x0).pow(2).mean().sqrt())
            result["denoising_rmse"][str(s)] = rmse
            click.echo(f"  {s:5.2f}   {rmse:13.4f}   {s:16.4f}")

    sample = cfg.sample if steps is None else dataclasses.replace(cfg.sample, steps=steps)
    seeds = [subject_seed(seed, d.subject_id) for d in records]
    samples = sample_lowres(model, records, seeds, sample, dev)
    rough_gen = [roughness_hu(unit_to_ct(s[0].cpu().numpy())) for s in samples]
    rough_ref = [roughness_hu(unit_to_ct(v[0].numpy())) for v in u]
    result.update(sample_steps=sample.steps, roughness_generated_hu=float(np.mean(rough_gen)),
                  roughness_reference_hu=float(np.mean(rough_ref)))
    click.echo(f"  CT roughness (HU, {sample.steps}-step samples): generated {np.mean(rough_gen):.1f}, "
               f"held-out {np.mean(rough_ref):.1f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
