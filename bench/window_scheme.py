#!/usr/bin/env python
"""Super-resolution window schemes compared on trained weights (issue 16, item 3: less window redundancy).

The SR sampler evaluates its denoiser on overlapping windows and blends them (libs.windows.WindowPlan). At the
paper size the training patch (56 × 56 × 96) tiles the 224 × 224 × 384 grid as 5 × 5 × 5 = 125 windows, 1.95
times the volume's voxels; larger windows cover it with fewer, less redundant ones — exactly the same
function for a convolution-only network away from the margins where a window sees its own zero padding, and
those are what the blend weights discard. This script measures, on a trained model and one seed per subject,
what a scheme changes in the output against a reference scheme (default: the training patch, overlap 0.25):

* the largest and the mean |difference| of the generated volume (CT in HU, PET in SUV);
* two seam checks on the CT: the mean |neighbour difference| across the scheme's window borders (every
  plane where a window starts or ends inside the volume) in the scheme's output, divided by the same quantity
  on the same planes of the reference output ("seam ratio"), and divided by the same quantity two planes to
  either side in the scheme's own output ("border / beside") — a seam shows as a ratio above 1;
* with ``--denoiser-ratios``, one denoiser evaluation alone: a one-step Euler "sample" from σ = r·σ_data
  without churn returns exactly the blended denoiser output D(x; σ) on the noise x (plus up(LR)), so the
  schemes' largest |difference| there is the blending's own error, free of the sampler's chaos (a stochastic
  sampler turns a small difference into whole voxels crossing an edge);
* windows per call, voxel redundancy and seconds per subject.

Each subject's low-res volume is drawn once with the low-res stage's own sampler and seeds (as the cascade
does) and super-resolved by every scheme with the same SR seed, so the schemes differ in nothing else.

    .venv/bin/python bench/window_scheme.py --lowres Resource/demo_weights/lowres.safetensors \\
        --superres Resource/demo_weights/superres.safetensors \\
        --demographics bench_out/fidelity/heldout/demographics.csv --subjects 3 \\
        --scheme 56x56x96@0.25 --scheme 32x32x52@0.15 --scheme 28x28x48@0.25 --denoiser-ratios 0.1,1,10 \\
        --json-out /tmp/windows.json                # the README's table (reference: the whole volume)

Scheme ``XxYxZ@OVERLAP``: window size in voxels (clipped to the volume) and the minimum overlap fraction
(libs.windows.window_starts). The first ``--scheme`` is the reference unless ``--reference`` names another.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.cascade import load_sr_model, sample_sr  # noqa: E402
from libs.demographics import read_demographics_csv  # noqa: E402
from libs.generate import load_lowres_model, pick_device, sample_lowres, subject_seed  # noqa: E402
from libs.intensity import unit_to_ct, unit_to_suv  # noqa: E402
from libs.superres import WindowConfig  # noqa: E402
from libs.windows import window_grid  # noqa: E402


def parse_scheme(text: str) -> tuple[tuple[int, int, int], float]:
    """``"56x56x96@0.25"`` → ((56, 56, 96), 0.25)."""
    try:
        size, overlap = text.split("@")
        dims = tuple(int(v) for v in size.lower().split("x"))
        value = float(overlap)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected XxYxZ@OVERLAP, e.g. 56x56x96@0.25") from None
    if len(dims) != 3 or min(dims) < 1 or not 0.0 <= value <= 0.9:
        raise click.BadParameter(f"{text!r}: three positive sizes and an overlap in [0, 0.9]")
    return dims, value


def border_planes(full, window, overlap) -> list[list[int]]:
    """Per axis, the plane indices p (0 < p < full) where a window of the scheme starts or ends: the
    neighbour pair (p − 1, p) straddles that window's border."""
    win, starts, _ = window_grid(full, window, overlap)
    planes = []
    for axis in range(3):
        edges = set()
        for s in {st[axis] for st in starts}:
            edges.update(p for p in (s, s + win[axis]) if 0 < p < full[axis])
        planes.append(sorted(edges))
    return planes


def scheme_stats(full, window, overlap) -> dict:
    win, starts, overlap_vox = window_grid(full, window, overlap)
    return {"window": list(win), "overlap": overlap, "overlap_voxels": list(overlap_vox), "windows": len(starts),
            "redundancy": len(starts) * math.prod(win) / math.prod(full)}


def border_gradient(ct: np.ndarray, planes: list[list[int]]) -> float:
    """Mean |ct[p] − ct[p − 1]| over the border planes of all axes (NaN without any)."""
    values = []
    for axis, ps in enumerate(planes):
        for p in ps:
            a = np.take(ct, p, axis=axis)
            b = np.take(ct, p - 1, axis=axis)
            values.append(np.abs(a - b).mean())
    return float(np.mean(values)) if values else math.nan


def self_seam(ct: np.ndarray, planes: list[list[int]]) -> float:
    """Mean |ΔHU| across the window borders / mean |ΔHU| across the planes two voxels to either side of them,
    in one volume (NaN for a single window): anatomy changes little over two voxels, a seam jumps."""
    border, beside = [], []
    for axis, ps in enumerate(planes):
        grad = np.abs(np.diff(ct, axis=axis)).mean(axis=tuple(a for a in range(3) if a != axis))  # pair (p-1, p)
        for p in ps:
            side = [grad[q - 1] for q in (p - 2, p + 2) if 1 <= q < ct.shape[axis]]
            if side:
                border.append(grad[p - 1])
                beside.append(np.mean(side))
    return float(np.sum(border) / np.sum(beside)) if border and np.sum(beside) > 0 else math.nan


def compare(out: dict[str, np.ndarray], ref: dict[str, np.ndarray], planes) -> dict:
    d_ct, d_suv = np.abs(out["ct"] - ref["ct"]), np.abs(out["suv"] - ref["suv"])
    g_ref = border_gradient(ref["ct"], planes)
    return {"max_abs_ct_hu": float(d_ct.max()), "mean_abs_ct_hu": float(d_ct.mean()),
            "max_abs_suv": float(d_suv.max()), "mean_abs_suv": float(d_suv.mean()),
            "seam_ratio": border_gradient(out["ct"], planes) / g_ref if g_ref > 0 else math.nan,
            "self_seam": self_seam(out["ct"], planes)}


def _nanmax(values) -> str:
    """The largest finite value, 3 decimals ('–' when there is none: a single window has no border)."""
    finite = [v for v in values if math.isfinite(v)]
    return f"{max(finite):.3f}" if finite else "–"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lowres", required=True, type=click.Path(exists=True), help="Low-res weights or run folder.")
@click.option("--superres", required=True, type=click.Path(exists=True), help="SR weights or run folder.")
@click.option("--demographics", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Demographics CSV; the first --subjects rows are generated.")
@click.option("--subjects", default=4, show_default=True, type=click.IntRange(1))
@click.option("--scheme", "schemes", multiple=True, required=True, metavar="XxYxZ@OVERLAP",
              help="A window scheme (repeatable); the first is the reference unless --reference is given.")
@click.option("--reference", default=None, metavar="XxYxZ@OVERLAP", help="The scheme the others are compared to.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Windows per network call.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--device", default="auto", show_default=True)
@click.option("--denoiser-ratios", default="", show_default=True, metavar="R,R,...",
              help="Also compare single denoiser evaluations at σ = R·σ_data (one-step Euler, no churn).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write the rows as JSON.")
def main(lowres, superres, demographics, subjects, schemes, reference, batch, seed, device, denoiser_ratios,
         json_out):
    dev = pick_device(device)
    torch.set_grad_enabled(False)
    parsed = [parse_scheme(s) for s in schemes]
    ref_text = reference or schemes[0]
    ref_scheme = parse_scheme(ref_text)
    if ref_text not in schemes:
        parsed.insert(0, ref_scheme)
        schemes = (ref_text, *schemes)
    lr_model, sr_model = load_lowres_model(lowres, dev), load_sr_model(superres, dev)
    full = sr_model.grid
    records = read_demographics_csv(demographics)[:subjects]
    ratios = [float(r) for r in denoiser_ratios.split(",") if r.strip()]
    rows = {text: scheme_stats(full, *p) | {"seconds": [], "per_subject": [], "denoiser": {r: [] for r in ratios}}
            for text, p in zip(schemes, parsed)}
    for d in records:
        lr_seed = subject_seed(seed, d.subject_id)
        lr_u = sample_lowres(lr_model, [d], [lr_seed], lr_model.config.sample, dev)[0]
        results = {}
        for text, (size, overlap) in zip(schemes, parsed):
            t0 = time.perf_counter()
            hr = sample_sr(sr_model, lr_u, d, subject_seed(seed, d.subject_id, stage=1), sr_model.config.sample,
                           WindowConfig(size=list(size), overlap=overlap, batch=batch), dev)
            rows[text]["seconds"].append(time.perf_counter() - t0)
            hr = hr.float().cpu()
            results[text] = {"ct": unit_to_ct(hr[0]).numpy(), "suv": unit_to_suv(hr[1]).numpy()}
        for r in ratios:          # one blended denoiser evaluation per scheme, same noise
            one_call = dataclasses.replace(sr_model.config.sample, solver="euler", steps=1, churn=0.0,
                                           sigma_max_ratio=r)
            calls = {text: sample_sr(sr_model, lr_u, d, subject_seed(seed, d.subject_id, stage=1), one_call,
                                     WindowConfig(size=list(size), overlap=overlap, batch=batch), dev).float().cpu()
                     for text, (size, overlap) in zip(schemes, parsed)}
            ref_ct = unit_to_ct(calls[ref_text][0])
            for text, hr in calls.items():
                rows[text]["denoiser"][r].append(float((unit_to_ct(hr[0]) - ref_ct).abs().max()))
        for text, (size, overlap) in zip(schemes, parsed):
            planes = border_planes(full, size, overlap)
            rows[text]["per_subject"].append({"subject": d.subject_id} | compare(results[text], results[ref_text],
                                                                                  planes))
    print(f"grid {'x'.join(map(str, full))}, {len(records)} subjects, reference {ref_text}; "
          f"seam ratio = mean |ΔHU| across the scheme's window borders, scheme / reference output")
    print("| scheme | windows | redundancy | s per subject | max |ΔCT| HU | mean |ΔCT| HU | max |ΔSUV| | "
          "seam ratio | border / beside |")
    print("|---|---|---|---|---|---|---|---|---|")
    for text, r in rows.items():
        ps = r["per_subject"]
        print(f"| {text} | {r['windows']} | {r['redundancy']:.2f} | {np.mean(r['seconds']):.1f} | "
              f"{max(p['max_abs_ct_hu'] for p in ps):.1f} | {np.mean([p['mean_abs_ct_hu'] for p in ps]):.2f} | "
              f"{max(p['max_abs_suv'] for p in ps):.3f} | {_nanmax(p['seam_ratio'] for p in ps)} | "
              f"{_nanmax(p['self_seam'] for p in ps)} |")
    if ratios:
        print("\nOne denoiser evaluation (one-step Euler from σ = r·σ_data, no churn): largest |ΔCT| (HU) against "
              "the reference, over the subjects")
        print("| scheme | " + " | ".join(f"r = {r:g}" for r in ratios) + " |")
        print("|---|" + "---|" * len(ratios))
        for text, r in rows.items():
            print(f"| {text} | " + " | ".join(f"{max(r['denoiser'][q]):.2f}" for q in ratios) + " |")
    if json_out:
        info = {"lowres": str(lowres), "superres": str(superres), "grid": list(full), "reference": ref_text,
                "subjects": [d.subject_id for d in records], "device": str(dev), "rows": rows}
        Path(json_out).write_text(json.dumps(info, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
