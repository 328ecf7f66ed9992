#!/usr/bin/env python
"""Training-data loader throughput (issue 16, item 5), against the research code's loader design.

TotalGen's training loader (libs.data.CohortVolumes) decodes every subject of the cohort once per launch —
NIfTI → [0, 1] float16 on the training grid, or straight from an ``.npy`` cache (``data.cache_dir``) —
keeps all of them in host memory and cuts each batch from there: the low-res stage's polyphase samples
(PolyphaseSamples) and the SR stage's residual patches (ResidualPatches, which since the fidelity issue
cut the patch and its LR region first and standardize only those voxels). The research code's design,
as the issue describes it: each launch reloads a random subset of at most 20 subjects and trains on that.

This script measures, on one phantom cohort on the presets' training grid (the paper's 224 × 224 × 384 by
default, or any pair of presets):

* **launch cost**: seconds to make all N subjects ready — from NIfTI, from NIfTI writing the ``.npy``
  cache, and from that cache — and seconds to reload a random subset of ``--subset`` subjects from NIfTI
  (the research design's per-launch cost), each with the presets' ``data.load_workers`` threads;
* **per-batch loader cost** in one process (``--threads`` torch threads), medians over ``--draws`` batches
  of each preset's ``optim.batch``: low-res polyphase samples; SR residual patches with the preset's
  augmentation, without it, and without it while standardizing the whole subject volume before cutting
  (the loader before the fidelity issue's fix; the same tensors, checked on two batches before timing);
* loader images/s per process, and how many loader processes keep up with a consumer rate
  (``--consumer-rate``: training images/s of the two stages, by default the H200's measured bf16 rates);
* with ``--train-steps K``, the stages' own training loops for 2K steps from scratch (the presets pointed at
  this cohort, run folders under OUT): images/s of the second K steps, loader included, as the
  training log reports them — on a CPU this is what the bench presets train at;
* a whole training of each preset's ``loop.steps`` on a cohort of ``--cohort-subjects`` at the consumer rate:
  hours with our one load of the cohort (from NIfTI, scaled from the measured seconds per subject) against the
  research design's reload at each of its launches of ``--launch-steps`` steps (the device waiting for each
  load), and the host memory each design holds.

NIfTI files read here sit in the OS page cache (the cohort was just written or read), so "from NIfTI" is
decoding and resampling, not disk; a cold disk only adds to the reload's cost.

    .venv/bin/python bench/loader_bench.py --out bench_out/loader --subjects 24          # paper grid, ~4 min
    .venv/bin/python bench/loader_bench.py --out bench_out/loader_bench \\
        --lowres-config 1_Trainings/configs/lowres_bench.yaml \\
        --superres-config 1_Trainings/configs/superres_bench.yaml --subjects 40 --train-steps 20
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.config import load_config, to_dict  # noqa: E402
from libs.data import (  # noqa: E402
    CohortVolumes,
    PolyphaseSamples,
    batch_indices,
    normalized_volume,
    offset_of,
    polyphase,
)
from libs.lowres import (  # noqa: E402
    LowresConfig,
    Standardize,
    channel_stats,
    demographic_scaling,
    expand_cond,
    train_lowres,
)
from libs.phantom.writer import sampled_demographics, write_phantom_cohort  # noqa: E402
from libs.superres import (  # noqa: E402
    Pairing,
    ResidualPatches,
    SRConfig,
    load_pairing,
    train_superres,
)
from libs.windows import position_channels, upsample_crop  # noqa: E402

DEFAULT_LOWRES = ROOT / "1_Trainings/configs/lowres_paper.yaml"
DEFAULT_SUPERRES = ROOT / "1_Trainings/configs/superres_paper.yaml"


def make_cohort(path: Path, n: int, spacing_mm: float, seed: int, workers: int) -> Path:
    """A phantom training cohort of ``n`` subjects (resumable: complete subjects are kept)."""
    report = write_phantom_cohort(path, sampled_demographics(n, seed, prefix="loader"), seed=seed,
                                  spacing_mm=spacing_mm, workers=workers, progress=True)
    if report.failed:
        raise click.ClickException(f"phantom cohort: {len(report.failed)} subjects failed: "
                                   f"{next(iter(report.failed.values()))}")
    return path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reload_subset(volumes: CohortVolumes, subset: int, seed: int, workers: int) -> tuple[list[str], float]:
    """The research design's launch: a random subset of at most ``subset`` subjects decoded from NIfTI with
    ``workers`` threads (as CohortVolumes decodes); returns their ids and the seconds it took."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(volumes.records), size=min(subset, len(volumes.records)), replace=False))
    demos = [volumes.records[k] for k in picked]

    def load(d):
        return normalized_volume(volumes.cohort, d, volumes.grid, volumes.in_plane_mm)

    def run():
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(load, demos))

    loaded, seconds = timed(run)
    assert len(loaded) == len(demos)
    return [d.subject_id for d in demos], seconds


def whole_volume_draw(patches: ResidualPatches, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One un-augmented residual patch as the loader made it before the fidelity issue's fix: the subject's
    whole volume converted and standardized, then the patch and its LR cut from it. Consumes ``rng`` exactly
    as :meth:`ResidualPatches.draw` does and returns the same tensors (no anchors, no blur, level 0)."""
    if patches.anchors:
        raise click.ClickException("the whole-volume emulation covers the presets without data.lr_anchors")
    f, grid = patches.pairing.factor, patches.pairing.grid
    i = int(rng.integers(len(patches.volumes)))
    offset = offset_of(int(rng.integers(f**3)), f)
    start = [int(rng.integers(g - p + 1)) for g, p in zip(grid, patches.patch)]
    whole = patches.std.to_net(patches.volumes.region(i, (slice(None),) * 3)[None])      # (1, C, X, Y, Z)
    up = upsample_crop(polyphase(whole, f, offset), f, start, patches.patch)[0]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patches.patch))
    residual = whole[0][(slice(None), *sl)] - up
    demo = expand_cond(patches.cond[i:i + 1], patches.patch)[0]
    level = torch.zeros((1, *patches.patch))
    return residual, torch.cat([up, demo, position_channels(start, patches.patch, grid), level])


def median_seconds(fn, draws: int) -> float:
    """Median wall time of ``fn(k)`` for k = 1..draws (call 0 is a warm-up)."""
    fn(0)
    times = []
    for k in range(1, draws + 1):
        t0 = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loader_costs(volumes: CohortVolumes, low: LowresConfig, sr: SRConfig, draws: int, seed: int) -> dict:
    """Per-batch seconds of each loader (module doc), each at its preset's ``optim.batch``."""
    samples = PolyphaseSamples(volumes, low.data.factor)
    b_lr, b_sr = low.optim.batch, sr.optim.batch

    def lowres(k):
        return samples.batch(batch_indices(k, b_lr, 0, 1, len(samples), seed))

    pairing = load_pairing(sr)
    mean, std = channel_stats(volumes)
    scaling = demographic_scaling(volumes.cond) if sr.model.standardize_demographics else {}
    patches = ResidualPatches(volumes, pairing, sr.data.patch, Standardize(mean, std, pairing.net_sigma), scaling,
                              sr.data.lr_anchors)

    def sr_augmented(k):
        return patches.batch(np.random.default_rng([seed, k, 0, 7]), b_sr, sr.augment,
                             np.random.default_rng([seed, k, 0, 8]))

    def sr_plain(k):
        return patches.batch(np.random.default_rng([seed, k, 0, 7]), b_sr)

    def sr_whole(k):
        rng = np.random.default_rng([seed, k, 0, 7])
        pairs = [whole_volume_draw(patches, rng) for _ in range(b_sr)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    # the emulation must be the loader it claims to be: the same tensors as the fixed loader's
    for k in range(2):
        for a, b in zip(sr_plain(k), sr_whole(k)):
            if not torch.equal(a, b):
                raise AssertionError("the whole-volume emulation differs from ResidualPatches.draw")
    out = {"lowres_batch": b_lr, "superres_batch": b_sr,
           "lowres_sample_shape": list(samples.shape), "superres_patch": list(sr.data.patch)}
    for name, fn, batch in (("lowres", lowres, b_lr), ("superres_augmented", sr_augmented, b_sr),
                            ("superres_plain", sr_plain, b_sr), ("superres_whole_volume", sr_whole, b_sr)):
        sec = median_seconds(fn, draws)
        out[name] = {"s_per_batch": sec, "images_per_s": batch / sec}
    return out


def whole_training(total_steps: int, batch: int, consumer_rate: float, ours_launch_s: float, reload_s: float,
                   launch_steps: int) -> dict:
    """Wall clock of a whole training of ``total_steps`` steps of ``batch`` at ``consumer_rate`` images/s (the
    loader keeping up, as its workers do): ours loads the cohort once (``ours_launch_s``), the research design
    reloads its subset (``reload_s``) at each of its launches of ``launch_steps`` steps; the device waits for
    each load."""
    train_s = total_steps * batch / consumer_rate
    launches = math.ceil(total_steps / launch_steps)
    ours, research = train_s + ours_launch_s, train_s + launches * reload_s
    return {"launch_steps": launch_steps, "research_launches": launches, "train_hours": train_s / 3600,
            "ours_hours": ours / 3600, "research_hours": research / 3600, "research_over_ours": research / ours}


def train_rate(cfg_yaml: Path, kind, runs: Path, cohort: Path, steps: int, lowres_yaml: Path | None) -> float:
    """The stage's own training loop, 2·steps steps from scratch on ``cohort``; images/s of the last report
    (the second ``steps``: loading, forward, backward and the optimizer, as the training log counts them)."""
    cfg = to_dict(load_config(cfg_yaml, kind))
    stage = "lowres" if kind is LowresConfig else "superres"
    run_dir = runs / stage
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg["run_dir"], cfg["data"]["cohort"] = str(run_dir), str(cohort)
    cfg["loop"].update(steps=2 * steps, report_every=steps, checkpoint_every=2 * steps, max_minutes=None)
    if lowres_yaml is not None:
        cfg["lowres_config"] = str(lowres_yaml)
    loaded = load_config(cfg, kind, origin=str(cfg_yaml))
    (train_lowres if kind is LowresConfig else train_superres)(loaded, device="cpu", progress=False)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return float(records[-1]["img_per_s"])


def markdown(info: dict) -> str:
    c, lc = info["cohort"], info["launch"]
    n = c["subjects"]
    lines = [f"# Training-data loader, {c['grid'][0]} × {c['grid'][1]} × {c['grid'][2]} grid "
             f"({c['spacing_mm']:g} mm phantoms, {n} subjects)", "",
             f"Launch ({info['load_workers']} loader threads): all {n} subjects from NIfTI {lc['ours_nifti_s']:.1f} s, "
             f"writing the .npy cache {lc['ours_cache_write_s']:.1f} s, from the cache {lc['ours_cache_read_s']:.1f} s "
             f"({lc['ours_cache_read_s'] / n:.3f} s per subject); the research design's reload of "
             f"{lc['research_subjects']} subjects from NIfTI {lc['research_reload_s']:.1f} s "
             f"({lc['research_reload_s'] / lc['research_subjects']:.3f} s per subject); "
             f"{info['host_memory_gib']:.2f} GiB of volumes in memory.", "",
             f"Per-batch loader cost, one process, {info['threads']} torch thread(s), "
             f"medians of {info['draws']} batches:",
             "", "| loader | batch | s per batch | images/s per process | processes for the consumer rate |",
             "|---|---|---|---|---|"]
    rates = info["consumer_rate"]
    for key, label, rate in (("lowres", "low-res polyphase samples", rates["lowres"]),
                             ("superres_augmented", "SR patches, preset augmentation", rates["superres"]),
                             ("superres_plain", "SR patches, no augmentation", rates["superres"]),
                             ("superres_whole_volume", "SR patches, whole volume standardized first (before "
                                                       "the fix)", rates["superres"])):
        row = info["loader"][key]
        batch = info["loader"]["lowres_batch" if key == "lowres" else "superres_batch"]
        lines.append(f"| {label} | {batch} | {row['s_per_batch']:.4f} | {row['images_per_s']:.1f} | "
                     f"{rate / row['images_per_s']:.2f} at {rate:g} images/s |")
    if info.get("train"):
        t = info["train"]
        lines += ["", f"Training loops on this CPU ({info['threads']} thread(s), the presets' own settings, loading "
                      f"included): low-res {t['lowres_images_per_s']:.2f} images/s, super-resolution "
                      f"{t['superres_images_per_s']:.2f} images/s ({t['steps']} steps timed after {t['steps']})."]
    w = info["whole_training"]
    per_subject_gib = info["host_memory_gib"] / n
    lines += ["", f"A whole training on a cohort of {w['cohort_subjects']} subjects at the consumer rate above: ours "
                  f"decodes every subject from NIfTI once ({w['ours_launch_s']:.0f} s at this machine's "
                  f"{lc['ours_nifti_s'] / n:.3f} s per subject) and holds {w['cohort_subjects'] * per_subject_gib:.1f} "
                  f"GiB in host memory; the research design reloads {lc['research_subjects']} subjects "
                  f"({lc['research_reload_s']:.1f} s, {lc['research_subjects'] * per_subject_gib:.1f} GiB) at "
                  f"every launch and trains each launch on those alone:", "",
              "| stage | steps (batch) | steps per research launch | research launches | training alone h | ours h | "
              "research design h | research / ours |", "|---|---|---|---|---|---|---|---|"]
    for stage, rows in w["rows"].items():
        for r in rows:
            lines.append(f"| {stage} | {w['total_steps'][stage]} ({info['loader'][stage + '_batch']}) | "
                         f"{r['launch_steps']} | {r['research_launches']} | {r['train_hours']:.2f} | "
                         f"{r['ours_hours']:.2f} | {r['research_hours']:.2f} | {r['research_over_ours']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_rates(text: str) -> dict:
    try:
        lr, sr = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected LOWRES,SUPERRES images/s, e.g. 24.3,29.5") from None
    if lr <= 0 or sr <= 0:
        raise click.BadParameter("rates must be positive")
    return {"lowres": lr, "superres": sr}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the cohort, cache and report.")
@click.option("--lowres-config", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_LOWRES),
              show_default=True)
@click.option("--superres-config", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_SUPERRES),
              show_default=True)
@click.option("--cohort", type=click.Path(exists=True, file_okay=False), default=None,
              help="A cohort on the presets' grid; default: phantoms written to OUT/cohort.")
@click.option("--subjects", default=24, show_default=True, type=click.IntRange(1),
              help="Phantom subjects to write (without --cohort).")
@click.option("--subset", default=20, show_default=True, type=click.IntRange(1),
              help="Subjects the research design reloads per launch.")
@click.option("--draws", default=10, show_default=True, type=click.IntRange(1), help="Timed batches per loader.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch threads per process.")
@click.option("--consumer-rate", default=None, metavar="LR,SR",
              help="Training images/s the loader must feed [default: with --train-steps the rates measured "
                   "there, else 24.3,29.5 — the H200's bf16 low-res / SR rates at the paper size].")
@click.option("--launch-steps", default="250,1000,5000", show_default=True, metavar="N,N,...",
              help="Optimizer steps per research-design launch for the whole-training comparison.")
@click.option("--cohort-subjects", default=565, show_default=True, type=click.IntRange(1),
              help="Training cohort size for the whole-training comparison (the paper presets' AutoPET budget).")
@click.option("--train-steps", default=0, show_default=True, type=click.IntRange(0),
              help="Also time each stage's own training loop (2 × this many steps; CPU).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
def main(out, lowres_config, superres_config, cohort, subjects, subset, draws, threads, consumer_rate, launch_steps,
         cohort_subjects, train_steps, seed):
    """Measure the training loader (module doc) and write OUT/loader.json and OUT/loader.md."""
    torch.set_num_threads(threads)
    rates = parse_rates(consumer_rate) if consumer_rate else None
    try:
        steps_list = [int(v) for v in launch_steps.split(",")]
    except ValueError:
        raise click.BadParameter(f"{launch_steps!r}: expected integers, e.g. 250,1000") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    low = load_config(lowres_config, LowresConfig)
    sr = to_dict(load_config(superres_config, SRConfig))
    sr["lowres_config"] = str(lowres_config)
    sr = load_config(sr, SRConfig, origin=str(superres_config))
    if Pairing.of(low).grid != load_pairing(sr).grid:
        raise click.ClickException("the two presets do not share a grid")
    grid, workers = tuple(low.data.grid), low.data.load_workers
    spacing = low.in_plane_mm
    if cohort is None:
        cohort = make_cohort(out / "cohort", subjects, spacing, seed, workers=os.cpu_count() or 1)
    cohort = Path(cohort)

    # launch costs: ours (all subjects; NIfTI, writing the cache, from the cache), the research reload
    volumes, nifti_s = timed(lambda: CohortVolumes(cohort, grid, None, workers, False, spacing))
    n = len(volumes)
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    _, write_s = timed(lambda: CohortVolumes(cohort, grid, cache, workers, False, spacing))
    volumes, read_s = timed(lambda: CohortVolumes(cohort, grid, cache, workers, False, spacing))
    picked, reload_s = reload_subset(volumes, subset, seed, workers)
    memory = sum(v.numel() * v.element_size() for v in volumes.volumes) / 2**30
    print(f"launch: {n} subjects from NIfTI {nifti_s:.1f} s, cache write {write_s:.1f} s, cache read {read_s:.1f} s; "
          f"research reload of {len(picked)} {reload_s:.1f} s", flush=True)

    loader = loader_costs(volumes, low, sr, draws, seed)
    info = {"cohort": {"path": str(cohort), "subjects": n, "grid": list(grid), "spacing_mm": spacing},
            "lowres_config": str(lowres_config), "superres_config": str(superres_config),
            "load_workers": workers, "threads": threads, "draws": draws,
            "host_memory_gib": memory, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "launch": {"ours_nifti_s": nifti_s, "ours_cache_write_s": write_s, "ours_cache_read_s": read_s,
                       "research_subjects": len(picked), "research_reload_s": reload_s},
            "loader": loader}
    if train_steps:
        del volumes
        runs = out / "runs"
        info["train"] = {"steps": train_steps,
                         "lowres_images_per_s": train_rate(Path(lowres_config), LowresConfig, runs, cohort,
                                                           train_steps, None),
                         "superres_images_per_s": train_rate(Path(superres_config), SRConfig, runs, cohort,
                                                             train_steps, Path(lowres_config))}
        rates = rates or {"lowres": info["train"]["lowres_images_per_s"],
                          "superres": info["train"]["superres_images_per_s"]}
    info["consumer_rate"] = rates = rates or parse_rates("24.3,29.5")
    ours_launch = nifti_s / n * cohort_subjects
    total = {"lowres": low.loop.steps, "superres": sr.loop.steps}
    info["whole_training"] = {
        "cohort_subjects": cohort_subjects, "ours_launch_s": ours_launch, "total_steps": total,
        "rows": {stage: [whole_training(total[stage], loader[f"{stage}_batch"], rates[stage], ours_launch, reload_s,
                                        s) for s in steps_list] for stage in ("lowres", "superres")}}
    (out / "loader.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    text = markdown(info)
    (out / "loader.md").write_text(text, encoding="utf-8")
    print(text)
    lr, srw, srp = (loader[k]["images_per_s"] for k in ("lowres", "superres_augmented", "superres_whole_volume"))
    print(f"loader: low-res {lr:.1f} / SR {srw:.1f} images/s per process (SR before the fix {srp:.1f}); "
          f"research reload {reload_s:.1f} s per launch vs ours {read_s:.1f} s for all {n}")


if __name__ == "__main__":
    main()
