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
"""

from __future__ import annotations

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


def ratios(model, cohort: Cohort, demo, seed: int, device: torch.device) -> dict[str, float]:
    """One subject: super-resolved-from-truth measure / phantom measure, for each of MEASURES."""
    truth = normalized_volume(cohort, demo, model.grid).float()
    sr_seed = subject_seed(seed, demo.subject_id, stage=1)
    lr = polyphase(truth, model.factor, anchor_offset(sr_seed, model.factor))
    out = sample_sr(model, lr, demo, sr_seed, model.config.sample, model.config.window, device)
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
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON.")
def main(superres, cohort, subjects, seed, device, json_out):
    dev = pick_device(device)
    model = load_sr_model(superres, dev)
    co = Cohort(cohort)
    result = {"superres": str(model.path), "step": model.step, "cohort": str(cohort), "seed": seed, "by_sex": {}}
    click.echo(f"{model.path} (step {model.step}): {subjects} men and {subjects} women of {cohort} "
               f"super-resolved from their true LR, ratio to the phantom")
    everyone = co.demographics()
    for sex in ("M", "F"):
        records = [d for d in everyone if d.sex == sex][:subjects]
        if not records:
            continue
        rows = [ratios(model, co, d, seed, dev) for d in records]
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in MEASURES}
        result["by_sex"][sex] = {"n": len(rows), "mean_ratio": mean,
                                 "subjects": {d.subject_id: r for d, r in zip(records, rows)}}
        click.echo(f"  sex {sex} (n {len(rows)}): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
