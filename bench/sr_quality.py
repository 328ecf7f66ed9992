#!/usr/bin/env python
"""What a trained super-resolution stage does on its own: held-out phantoms super-resolved from their TRUE
low-res volume, measured against the phantoms themselves with the evaluation stage's body measures.

    .venv/bin/python bench/sr_quality.py --superres Resource/demo_weights/superres.safetensors \\
        --cohort bench_out/fidelity/heldout --subjects 8 --json-out bench_out/sr_quality.json

For the first ``--subjects`` men and the first ``--subjects`` women of the cohort: the phantom on the stage's
training grid (libs.data.normalized_volume), its polyphase LR sample at the offset the cascade would anchor
for that subject's super-resolution seed (libs.cascade.anchor_offset), super-resolved with the stage's own
sampler and window (libs.cascade.sample_sr), and both the result and the phantom brought back to HU / SUV at
their true length (libs.cascade.to_physical_hr). Per sex it prints the mean ratio, super-resolved over
phantom, of body volume, fat volume, lung volume (below −400 HU), mean body SUV and CT roughness.

The low-res stage is out of the loop, so a lung or SUV deficit here is the super-resolution stage's own; the
cascade's (bench/fidelity.py) adds the low-res stage's (bench/lowres_quality.py).

``--sampler SOLVER:N``, ``--sigma-max-ratio R`` and ``--churn S`` replace the stage's recorded sampler settings, so
two samplers can be compared on the same subjects and seeds, e.g. the paper presets' earlier SR sampler:

    .venv/bin/python bench/sr_quality.py --superres Resource/demo_weights/superres.safetensors \
        --cohort bench_out/fidelity/heldout --subjects 8 --sampler heun:32 --sigma-max-ratio 160 --churn 0
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

from libs.cascade import anchor_offset, load_sr_model, sample_sr, to_physical_hr  # noqa: E402
from libs.cohort import Cohort  # noqa: E402
from libs.data import normalized_volume, polyphase  # noqa: E402
from libs.evaluation.body import body_measures  # noqa: E402
from libs.generate import pick_device, subject_seed  # noqa: E402

MEASURES = ("volume_ml", "fat_volume_ml", "lung_volume_ml", "suv_mean", "ct_roughness_hu")


def sampler_settings(recorded, spec: str | None, sigma_max_ratio: float | None, churn: float | None):
    """The stage's recorded SR sampler with the command line's replacements (``SOLVER:N``, σ_max / σ_data,
    churn); refused with the option's name when the result is not a valid sampler."""
    changes = {}
    if spec:
        solver, _, steps = spec.partition(":")
        try:
            changes.update(solver=solver, steps=int(steps))
        except ValueError:
            raise click.BadParameter(f"{spec!r}: expected SOLVER:N, e.g. euler:10", param_hint="--sampler") from None
    if sigma_max_ratio is not None:
        changes["sigma_max_ratio"] = sigma_max_ratio
    if churn is not None:
        changes["churn"] = churn
    try:
        return dataclasses.replace(recorded, **changes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--sampler") from None


def ratios(model, cohort: Cohort, demo, seed: int, device: torch.device, sample=None) -> dict[str, float]:
    """One subject: super-resolved-from-truth measure / phantom measure, for each of MEASURES."""
    truth = normalized_volume(cohort, demo, model.grid).float()
    sr_seed = subject_seed(seed, demo.subject_id, stage=1)
    lr = polyphase(truth, model.factor, anchor_offset(sr_seed, model.factor))
    out = sample_sr(model, lr, demo, sr_seed, sample or model.config.sample, model.config.window, device)
    got = body_measures(*to_physical_hr(out, demo, model)[:3])
    ref = body_measures(*to_physical_hr(truth, demo, model)[:3])
    return {k: got[k] / ref[k] if ref[k] else float("nan") for k in MEASURES}


@click.command()
@click.option("--superres", required=True, type=click.Path(exists=True), help="SR weights or run folder.")
@click.option("--cohort", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out phantoms on the stage's grid (e.g. bench_out/fidelity/heldout).")
@click.option("--subjects", default=8, show_default=True, type=click.IntRange(1), help="Per sex.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Job seed (as infer.py's).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--sampler", "spec", default=None, metavar="SOLVER:N", help="Solver and steps instead of the recorded.")
@click.option("--sigma-max-ratio", default=None, type=click.FloatRange(0.0, min_open=True), metavar="R",
              help="Starting noise level σ_max / σ_data instead of the recorded.")
@click.option("--churn", default=None, type=click.FloatRange(0.0), metavar="S", help="Churn instead of the recorded.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON.")
def main(superres, cohort, subjects, seed, device, spec, sigma_max_ratio, churn, json_out):
    dev = pick_device(device)
    model = load_sr_model(superres, dev)
    sample = sampler_settings(model.config.sample, spec, sigma_max_ratio, churn)
    co = Cohort(cohort)
    result = {"superres": str(model.path), "step": model.step, "cohort": str(cohort), "seed": seed,
              "sampler": dataclasses.asdict(sample), "by_sex": {}}
    click.echo(f"{model.path} (step {model.step}): {subjects} men and {subjects} women of {cohort} "
               f"super-resolved from their true LR with {sample.solver} {sample.steps} steps from σ "
               f"{sample.sigma_max_ratio:g}·σ_data, churn {sample.churn:g}; ratio to the phantom")
    everyone = co.demographics()
    for sex in ("M", "F"):
        records = [d for d in everyone if d.sex == sex][:subjects]
        if not records:
            continue
        rows = [ratios(model, co, d, seed, dev, sample) for d in records]
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in MEASURES}
        result["by_sex"][sex] = {"n": len(rows), "mean_ratio": mean,
                                 "subjects": {d.subject_id: r for d, r in zip(records, rows)}}
        click.echo(f"  sex {sex} (n {len(rows)}): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
