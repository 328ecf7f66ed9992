#!/usr/bin/env python
"""How well has a low-resolution run learned?  Two numbers a sampler cannot fake:

1. the denoising error of the trained network on a held-out cohort: for each noise level σ, the RMSE (in
   network units, σ_data-scaled) of D(x + σ·n) against x, next to the error of doing nothing (σ) and of
   predicting the mean (the data's RMS in network units). A network that has learned the data's structure
   beats both at every σ; an undertrained one sits near σ at small σ;
2. the CT roughness of samples: mean |difference| of neighbouring voxels along x within the CT window
   [−500, 500] HU, for cascade-free low-res samples of the held-out demographics and for the held-out
   volumes themselves, polyphase-subsampled to the same in-plane grid;
3. the lungs and their rim, per sex: lung voxels (below −400 HU inside the body, the evaluation's lung
   threshold), rim voxels (−400 to −200 HU inside the body: the grey edge between lung and tissue that the
   threshold does not count) and mean body SUV, of the samples and of the held-out volumes on the same grid.
   The phantoms' lungs have binary edges (few rim voxels); a generator whose lung edges come out grey loses
   lung volume to the −400 HU threshold even when the lungs' extent is right;
4. with ``--weight-sweep N``: does the generated body grow with the requested weight?  N subjects of
   1.75 m, age 50, alternating sex, weights evenly spaced over 50–100 kg; girth = mean area per axial
   slice (cm²) of voxels with CT > −200 HU; Pearson r and slope vs weight, for the samples and for phantoms
   of the same demographics put through the same training grid (the issue's GPU check, runnable anywhere).

    .venv/bin/python bench/lowres_quality.py --lowres demo_out/runs/lowres --cohort demo_out/heldout
    .venv/bin/python bench/lowres_quality.py --lowres RUN --cohort data/test --subjects 16 --device cuda \
        --weight-sweep 24

Used for the README's "The noise is undertraining" paragraph (200- vs 600-step demo models).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.cohort import Cohort  # noqa: E402
from libs.data import normalized_volume, polyphase  # noqa: E402
from libs.demographics import Demographics, encode_many  # noqa: E402
from libs.evaluation.body import body_mask  # noqa: E402
from libs.generate import load_lowres_model, pick_device, restore_background, sample_lowres, subject_seed  # noqa: E402
from libs.intensity import unit_to_ct, unit_to_suv  # noqa: E402
from libs.lowres import demographic_input, expand_cond  # noqa: E402
from libs.phantom.writer import write_phantom_cohort  # noqa: E402

SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def roughness_hu(ct_hu: np.ndarray) -> float:
    """Mean |difference| of x-neighbours of a CT clipped to the paper's [−500, 500] HU window."""
    ct = np.clip(ct_hu.astype(np.float64), -500.0, 500.0)
    return float(np.abs(np.diff(ct, axis=0)).mean())


LUNG_HU, RIM_HU = -400.0, -200.0      # the evaluation's lung threshold; the rim band above it


def lung_rim(ct_unit: np.ndarray, pet_unit: np.ndarray) -> dict[str, float]:
    """Lung voxels (< −400 HU inside the body), rim voxels (−400 to −200 HU inside the body) and mean body
    SUV of one volume in [0, 1] units, after the generator's own background restoration."""
    ct = restore_background(unit_to_ct(ct_unit))
    body = body_mask(ct)
    return {"lung_voxels": float(((ct < LUNG_HU) & body).sum()),
            "rim_voxels": float(((ct >= LUNG_HU) & (ct < RIM_HU) & body).sum()),
            "body_suv": float(unit_to_suv(pet_unit)[body].mean())}


def lungs_by_sex(records: list[Demographics], reference: torch.Tensor, samples: torch.Tensor) -> dict:
    """Per sex: mean lung / rim voxels and body SUV of held-out and generated volumes, and Δ % of the means."""
    out = {}
    for sex in sorted({d.sex for d in records}):
        idx = [i for i, d in enumerate(records) if d.sex == sex]
        row = {"n": len(idx)}
        for name, vols in (("heldout", reference), ("generated", samples)):
            m = [lung_rim(vols[i][0].cpu().numpy(), vols[i][1].cpu().numpy()) for i in idx]
            row[name] = {k: float(np.mean([r[k] for r in m])) for k in m[0]}
        row["delta_pct"] = {k: 100.0 * (row["generated"][k] / row["heldout"][k] - 1.0) if row["heldout"][k] else None
                            for k in row["heldout"]}
        out[sex] = row
    return out


def girth_cm2(ct_unit: np.ndarray, voxel_mm: float) -> float:
    """Mean area per axial slice (cm²) of voxels above −200 HU of a CT in [0, 1] units (x, y, z)."""
    return float((unit_to_ct(ct_unit) > -200.0).sum(axis=(0, 1)).mean() * voxel_mm**2 / 100.0)


def weight_sweep(model, n: int, seed: int, dev: torch.device, sample) -> dict:
    cfg = model.config
    records = [Demographics(f"sweep_{k:03d}", 1.75, float(w), "MF"[k % 2], 50.0)
               for k, w in enumerate(np.linspace(50.0, 100.0, n))]
    weights = np.array([d.weight_kg for d in records])
    voxel = cfg.in_plane_mm * cfg.data.factor
    samples = sample_lowres(model, records, [subject_seed(seed, d.subject_id) for d in records], sample, dev)
    generated = np.array([girth_cm2(s[0].cpu().numpy(), voxel) for s in samples])
    grid = tuple(cfg.data.grid)
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_cohort(tmp, records, seed=seed, spacing_mm=cfg.in_plane_mm, progress=False)
        cohort = Cohort(tmp)
        phantom = np.array([girth_cm2(polyphase(normalized_volume(cohort, d, grid), cfg.data.factor,
                                                (0, 0, 0))[0].float().numpy(), voxel) for d in records])
    out = {}
    for name, g in (("generated", generated), ("phantom", phantom)):
        out[name] = {"pearson_r": float(np.corrcoef(weights, g)[0, 1]),
                     "slope_cm2_per_kg": float(np.polyfit(weights, g, 1)[0]),
                     "girth_cm2_at_50kg_100kg": [float(g[0]), float(g[-1])]}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} %"


@click.command()
@click.option("--lowres", required=True, type=click.Path(exists=True), help="Low-res checkpoint or run folder.")
@click.option("--cohort", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out cohort directory (not the training cohort).")
@click.option("--subjects", default=8, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--steps", default=None, type=click.IntRange(1, 1000), help="Sampler steps [the checkpoint's].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--guidance", default=None, type=click.FloatRange(0.0),
              help="Classifier-free guidance weight of the samples [the checkpoint's sample.guidance].")
@click.option("--guidance-sigma", default=None, type=click.FloatRange(0.0), nargs=2, metavar="LO HI",
              help="Guide only while LO ≤ σ ≤ HI [the checkpoint's].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-ema", is_flag=True, help="Raw weights instead of the EMA.")
@click.option("--weight-sweep", "sweep", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="Also the girth-vs-weight check on this many subjects (0: skip).")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the numbers as JSON.")
def main(lowres, cohort, subjects, steps, seed, guidance, guidance_sigma, device, no_ema, sweep, json_out):
    dev = pick_device(device)
    model = load_lowres_model(lowres, dev, ema=not no_ema)
    cfg = model.config
    co = Cohort(cohort)
    records = co.demographics()[:subjects]
    grid = tuple(cfg.data.grid)
    u = torch.stack([polyphase(normalized_volume(co, d, grid), cfg.data.factor, (0, 0, 0)) for d in records])
    x0 = model.standardize.to_net(u).to(dev)
    # the conditioning the network was trained on (z-scored demographics, "given" channel: libs.lowres)
    cond = expand_cond(demographic_input(torch.from_numpy(encode_many(records)), model.normalization),
                       x0.shape[2:]).to(dev)
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

    changes = {"steps": steps, "guidance": guidance, "guidance_sigma": list(guidance_sigma) if guidance_sigma else None}
    sample = dataclasses.replace(cfg.sample, **{k: v for k, v in changes.items() if v is not None})
    seeds = [subject_seed(seed, d.subject_id) for d in records]
    samples = sample_lowres(model, records, seeds, sample, dev)
    rough_gen = [roughness_hu(unit_to_ct(s[0].cpu().numpy())) for s in samples]
    rough_ref = [roughness_hu(unit_to_ct(v[0].numpy())) for v in u]
    result.update(sample_steps=sample.steps, guidance=sample.guidance, guidance_sigma=sample.guidance_sigma,
                  roughness_generated_hu=float(np.mean(rough_gen)),
                  roughness_reference_hu=float(np.mean(rough_ref)))
    click.echo(f"  CT roughness (HU, {sample.steps}-step samples): generated {np.mean(rough_gen):.1f}, "
               f"held-out {np.mean(rough_ref):.1f}")
    result["lungs_by_sex"] = lungs_by_sex(records, u, samples)
    for sex, r in result["lungs_by_sex"].items():
        h, g, d = r["heldout"], r["generated"], r["delta_pct"]
        click.echo(f"  sex {sex} (n {r['n']}): lung voxels {h['lung_voxels']:.0f} held-out, {g['lung_voxels']:.0f} "
                   f"generated ({_pct(d['lung_voxels'])}); rim voxels (-400 to -200 HU) {h['rim_voxels']:.0f}, "
                   f"{g['rim_voxels']:.0f}; body SUV {h['body_suv']:.3f}, {g['body_suv']:.3f} ({_pct(d['body_suv'])})")
    if sweep:
        result["weight_sweep"] = weight_sweep(model, sweep, seed, dev, sample)
        for name, r in result["weight_sweep"].items():
            click.echo(f"  girth vs weight ({sweep} subjects, 50–100 kg), {name}: r = {r['pearson_r']:.3f}, "
                       f"slope {r['slope_cm2_per_kg']:.2f} cm²/kg, {r['girth_cm2_at_50kg_100kg'][0]:.0f} → "
                       f"{r['girth_cm2_at_50kg_100kg'][1]:.0f} cm²")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
