#!/usr/bin/env python
"""Generate a synthetic PET/CT cohort from a demographics CSV: the cascade, or the low-res stage alone.

    python 2_Tests/infer.py --lowres runs/lowres_paper --superres runs/superres_paper \
        --demographics cohort.csv --out results/synthetic
    python 2_Tests/infer.py --model_dir Resource/demo_weights ...   # exported weights (*.safetensors) work too
    torchrun --nproc_per_node 4 2_Tests/infer.py ...          # rows split across GPUs

Writes the cohort directory layout (demographics.csv, ct/, suv/, previews/, meta/). Rerunning resumes:
finished subjects are skipped; a bad CSV row or a failing subject is reported and the rest go on.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from libs.cli import run_guarded


def _replace(cfg, **values):
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if v is not None})


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--lowres", type=click.Path(), metavar="CKPT",
              help="Low-resolution checkpoint (ckpt-*.pt), its run folder (newest checkpoint), or exported "
                   "weights (*.safetensors).")
@click.option("--superres", type=click.Path(), metavar="CKPT",
              help="Super-resolution checkpoint, run folder or exported weights; without it only the low-res stage "
                   "runs.")
@click.option("--model_dir", "--model-dir", "model_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Find the newest low-res and super-res checkpoints (or exported weights) under DIR (instead "
                   "of --lowres/--superres).")
@click.option("--demographics", "--demo_csv", "demographics", required=True, type=click.Path(dir_okay=False),
              metavar="CSV", help="subject_id,height_m,weight_kg,sex,age_years (heights in metres)")
@click.option("--out", "--output_dir", "out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Output cohort directory.")
@click.option("--steps-lowres", "--steps", "steps_lowres", type=click.IntRange(1, 1000), metavar="N",
              help="Low-res sampler steps [default: the checkpoint's].")
@click.option("--steps-sr", type=click.IntRange(1, 1000), metavar="N",
              help="SR sampler steps [default: the checkpoint's].")
@click.option("--solver", type=click.Choice(["heun", "euler", "dpmpp_2m"]),
              help="Sampler of both stages [default: the checkpoints'].")
@click.option("--churn", type=click.FloatRange(0.0), metavar="S",
              help="EDM stochastic churn S of both stages, γ = min(S / steps, √2 − 1) per step "
                   "[default: the checkpoints'].")
@click.option("--ode-space", type=click.Choice(["auto", "sigma", "flow"]),
              help="Variables the ODE steps are taken in, both stages: sigma (EDM), flow (flow time) or auto (each "
                   "checkpoint's objective's) [default: the checkpoints'].")
@click.option("--schedule", type=click.Choice(["karras", "uniform_time"]),
              help="Noise-level grid of both stages: EDM's Karras grid or equal steps in flow time "
                   "[default: the checkpoints'].")
@click.option("--sr-cond-noise", type=click.FloatRange(0.0, 2.0), metavar="S",
              help="Conditioning-augmentation level added to the generated LR before super-resolution "
                   "[default: the SR checkpoint's sample.cond_noise].")
@click.option("--sr-sigma-max-ratio", type=click.FloatRange(0.0, min_open=True), metavar="R",
              help="Start the SR sampler at noise level σ_max = R · σ_data [default: the SR checkpoint's "
                   "sample.sigma_max_ratio].")
@click.option("--lr-guidance", type=click.FloatRange(0.0), metavar="W",
              help="Classifier-free guidance weight of the low-res stage, 1 = none (needs a model trained with "
                   "diffusion.cond_dropout) [default: the checkpoint's sample.guidance].")
@click.option("--lr-guidance-sigma", type=click.FloatRange(0.0), nargs=2, metavar="LO HI",
              help="Apply that guidance only while LO ≤ σ ≤ HI [default: the checkpoint's sample.guidance_sigma].")
@click.option("--window", type=click.IntRange(8, 4096), nargs=3, metavar="X Y Z",
              help="SR window size [default: the SR checkpoint's, i.e. its training patch].")
@click.option("--overlap", type=click.FloatRange(0.0, 0.9), metavar="F", help="SR window overlap [default: 0.25].")
@click.option("--window-batch", type=click.IntRange(1, 4096), metavar="N", help="SR windows per forward pass.")
@click.option("--labels", "labels", type=click.Path(), metavar="CKPT",
              help="Label stage (1_Trainings/train_labels.py: run folder, checkpoint or labels.safetensors) that "
                   "writes labels/<id>.nii.gz for every generated subject; with --model_dir, one found there is "
                   "used unless --no-labels.")
@click.option("--no-labels", is_flag=True, help="With --model_dir: do not use a label stage found there.")
@click.option("--seed", default=0, type=click.IntRange(0, 2**31 - 1), metavar="S",
              help="Job seed; each subject's seeds derive from it and the subject id.")
@click.option("--batch", default=4, type=click.IntRange(1, 1024), metavar="N", help="Subjects per low-res batch.")
@click.option("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("--no-previews", is_flag=True, help="Do not write previews/<id>.png.")
@click.option("--overwrite", is_flag=True,
              help="Regenerate every subject; also write into a folder this job did not create.")
@click.option("--compile", "compile_", is_flag=True,
              help="Run the networks under torch.compile (worth it on a GPU for many subjects; the first calls "
                   "compile).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(lowres, superres, model_dir, demographics, out, steps_lowres, steps_sr, solver, churn, ode_space, schedule,
         sr_cond_noise, sr_sigma_max_ratio, lr_guidance, lr_guidance_sigma, window, overlap, window_batch, labels,
         no_labels, seed, batch, device, no_ema, no_previews, overwrite, compile_, quiet):
    """Sample synthetic subjects (CT in HU, PET in SUV, true NIfTI geometry) from demographics."""

    def job():
        nonlocal lowres, superres, labels
        if model_dir:
            if lowres or superres:
                raise click.UsageError("give either --model_dir or --lowres/--superres, not both")
            from libs.generate import find_label_stage, find_stage_checkpoints
            lowres, superres, messages = find_stage_checkpoints(model_dir)
            if superres and not labels and not no_labels and (found := find_label_stage(model_dir)) is not None:
                labels = found
                messages.append(f"label stage: {found} (--no-labels to generate CT + PET only)")
            for line in messages:
                click.echo(line, err=True)
        elif not lowres:
            raise click.UsageError("give --lowres CKPT (and --superres CKPT) or --model_dir DIR")
        both = {"solver": solver, "churn": churn, "ode_space": ode_space, "schedule": schedule}
        report = run_inference(lowres, superres, demographics, out, steps_lowres, steps_sr, both,
                               sr_cond_noise, window, overlap, window_batch, seed, batch, device, not no_ema,
                               not no_previews, overwrite, not quiet, compile_, sr_sigma_max_ratio,
                               {"guidance": lr_guidance, "guidance_sigma": list(lr_guidance_sigma or []) or None},
                               labels)
        click.echo(f"{out}: {len(report.written)} written, {len(report.skipped)} already complete, "
                   f"{len(report.failed)} failed in {report.seconds:.1f} s")
        for key, reason in report.failed.items():
            click.echo(f"  failed {key}: {reason}", err=True)
        if report.failed:
            sys.exit(1)

    run_guarded(job)


def run_inference(lowres, superres, demographics, out, steps_lowres, steps_sr, both: dict, cond_noise, window,
                  overlap, window_batch, seed, batch, device, ema, previews, overwrite, progress, compile_=False,
                  sr_sigma_max_ratio=None, lowres_only: dict | None = None, labels=None):
    """Resolve sampler settings (checkpoint defaults + options; ``both``: settings given for both stages,
    ``lowres_only``: for the low-res stage alone, None = the checkpoint's) and run the job."""
    import torch

    from libs.cascade import generate_cascade_cohort, load_sr_model
    from libs.generate import generate_lowres_cohort, load_lowres_model
    cpu = torch.device("cpu")
    s_lr = _replace(load_lowres_model(lowres, cpu, ema=False).config.sample, steps=steps_lowres, **both,
                    **(lowres_only or {}))
    if not superres:
        if labels:
            raise click.UsageError("--labels needs the whole cascade (--superres): the label stage labels the "
                                   "full-resolution CT + PET")
        return generate_lowres_cohort(lowres, demographics, out, seed, s_lr, batch, device, ema, previews, overwrite,
                                      progress, compile_)
    sr_cfg = load_sr_model(superres, cpu, ema=False).config
    s_sr = _replace(sr_cfg.sample, steps=steps_sr, cond_noise=cond_noise, sigma_max_ratio=sr_sigma_max_ratio, **both)
    win = _replace(sr_cfg.window, size=list(window) if window else None, overlap=overlap, batch=window_batch)
    return generate_cascade_cohort(lowres, superres, demographics, out, seed, s_lr, s_sr, win, batch, device, ema,
                                   previews, overwrite, progress, compile_, labels)


if __name__ == "__main__":
    main()
