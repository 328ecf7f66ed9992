#!/usr/bin/env python
"""The closed-loop fidelity benchmark: does the cascade learn the phantom population?

1. phantom cohorts: a training cohort (sampled like the AutoPET adults), a disjoint held-out cohort, and the
   *noise floor* — phantoms of exactly the held-out demographics drawn with another seed (what a perfect
   generator would score against the held-out cohort with this many subjects);
2. both stages trained from scratch on the training cohort (the bench presets, or any pair of presets);
3. the cascade generates the held-out demographics (same demographics CSV);
4. the evaluation stage's own comparison (libs.evaluation.report.run_comparison) of the generated cohort and
   the noise floor against the held-out reference; this script summarises the body measures per sex and
   age group (mean ± SD, Δ %, Welch p, Δ in standard errors), the demographic slopes (body and fat volume
   per 10 kg, length and lung volume per 10 cm, adjusted for the other covariates), and the targets of
   issue 12 (the lung slope is reported, not a target: it shows whether the lungs grow with height).

    .venv/bin/python bench/fidelity.py --out bench_out/fidelity                   # 2 CPU cores, ≤ 90 min
    .venv/bin/python bench/fidelity.py --out bench_out/fidelity_gpu --device cuda --subjects 200 \\
        --train-subjects 565 --lowres-config 1_Trainings/configs/lowres_paper.yaml \\
        --superres-config 1_Trainings/configs/superres_paper.yaml --steps 20000
    .venv/bin/python bench/fidelity.py --out bench_out/fidelity_flow --objective flow   # the flow-matching arm
    # the same trained stages on another held-out cohort, floor and sampling seed (no training):
    .venv/bin/python bench/fidelity.py --out bench_out/fidelity_h11 --runs-from bench_out/fidelity/runs \
        --heldout-seed 11
    # the same stages and cohorts, another sampling seed (the generated cohort's run-to-run noise):
    .venv/bin/python bench/fidelity.py --out bench_out/fidelity_g1 --runs-from bench_out/fidelity/runs --gen-seed 1

Every step resumes (phantoms and generated subjects are skipped when complete, training resumes from its
run folder). Writes OUT/fidelity.md, fidelity.csv, fidelity.png, previews.png and OUT/comparison/; the last
line printed is the one-line summary.
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from pathlib import Path

import click
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.cascade import generate_cascade_cohort  # noqa: E402
from libs.cohort import Cohort  # noqa: E402
from libs.config import load_config, to_dict  # noqa: E402
from libs.evaluation.measures import region_mask  # noqa: E402
from libs.evaluation.report import run_comparison  # noqa: E402
from libs.evaluation.tables import read_csv  # noqa: E402
from libs.generate import stage_source  # noqa: E402
from libs.labelstage import LabelConfig, train_labels  # noqa: E402
from libs.lowres import LowresConfig, train_lowres  # noqa: E402
from libs.phantom.writer import sampled_demographics, write_phantom_cohort  # noqa: E402
from libs.samplers import network_calls  # noqa: E402
from libs.superres import SRConfig, train_superres  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "1_Trainings" / "configs"
MEASURES = ("volume_ml", "length_mm", "fat_volume_ml", "lung_volume_ml", "suv_mean", "ct_roughness_hu")
SUBGROUPS = ("sex=F", "sex=M", "age<=65", "age>65")
SLOPES = (("volume_ml", "weight_kg"), ("fat_volume_ml", "weight_kg"), ("length_mm", "height_m"),
          ("lung_volume_ml", "height_m"))
ORGANS = ("liver", "heart", "kidneys", "spleen")                    # the paper's organ table
ORGAN_MEASURES = ("volume_ml", "suv_mean", "suv_max")
CONSISTENCY_ORGANS = ("liver", "spleen", "kidneys", "heart")
ORGAN_TARGET_PCT = 10.0                     # issue 14: organ volume and SUVmean within ±10 % (or 2 SE) per sex
COHORTS = ("generated", "floor")          # compared against the held-out reference
TARGET_PCT, ROUGHNESS_RATIO, SLOPE_PCT = 5.0, 1.3, 25.0


def make_cohorts(out: Path, n_train: int, n_test: int, seed: int, heldout_seed: int, spacing_mm: float,
                 workers: int, train: bool = True) -> dict:
    """Training (seed), held-out (heldout_seed) and noise-floor (heldout_seed + 1) phantom cohorts under
    ``out`` (resumable); the floor has exactly the held-out demographics.  ``train=False`` skips the first."""
    held = sampled_demographics(n_test, heldout_seed, prefix="heldout")
    plan = [("heldout", held, heldout_seed), ("floor", held, heldout_seed + 1)]
    if train:
        plan.insert(0, ("train", sampled_demographics(n_train, seed, prefix="train"), seed))
    paths = {name: out / name for name in ("train", "heldout", "floor")}
    for name, records, s in plan:
        report = write_phantom_cohort(paths[name], records, seed=s, spacing_mm=spacing_mm, workers=workers,
                                      progress=False)
        if report.failed:
            raise RuntimeError(f"phantom cohort {name}: {len(report.failed)} subjects failed: "
                               f"{next(iter(report.failed.values()))}")
    return paths


def stage_configs(lowres_yaml: Path, superres_yaml: Path, runs: Path, cohort: Path,
                  steps: int | None, minutes: float | None = None) -> tuple[LowresConfig, SRConfig]:
    """The two presets pointed at this benchmark's cohort and run folders ``runs/{lowres,superres}``
    (``steps`` overrides both stages; ``minutes`` is each stage's wall-clock budget, loop.max_minutes)."""
    low = to_dict(load_config(lowres_yaml, LowresConfig))
    sr = to_dict(load_config(superres_yaml, SRConfig))
    low["run_dir"], low["data"]["cohort"] = str(runs / "lowres"), str(cohort)
    sr["run_dir"], sr["data"]["cohort"], sr["lowres_config"] = str(runs / "superres"), str(cohort), \
        str(lowres_yaml)
    for cfg in (low, sr):
        if steps:
            cfg["loop"]["steps"] = steps
        if minutes:
            cfg["loop"]["max_minutes"] = minutes
    return load_config(low, LowresConfig, origin=str(lowres_yaml)), load_config(sr, SRConfig, origin=str(superres_yaml))


def label_config(yaml_path: Path, runs: Path, cohort: Path, low: LowresConfig) -> LabelConfig:
    """The label-stage preset pointed at this benchmark's cohort and ``runs/labels``; its grid must be the
    cascade's."""
    cfg = to_dict(load_config(yaml_path, LabelConfig))
    cfg["run_dir"], cfg["data"]["cohort"] = str(runs / "labels"), str(cohort)
    out = load_config(cfg, LabelConfig, origin=str(yaml_path))
    if list(out.data.grid) != list(low.data.grid) or out.in_plane_mm != low.in_plane_mm:
        raise click.UsageError(f"{yaml_path}: grid {out.data.grid} at {out.in_plane_mm} mm differs from the cascade's "
                               f"{low.data.grid} at {low.in_plane_mm} mm")
    return out


def _optional_source(runs: Path, stage: str):
    """``stage_source`` of a stage that a runs folder may lack (None then)."""
    try:
        return stage_source(runs, stage)
    except FileNotFoundError:
        return None


def trained_steps(source, stage: str, planned: int) -> str:
    """The training steps a stage's checkpoint (or exported weights) records, with the planned count when short
    of it (a run stopped by its time budget)."""
    from libs.generate import read_stage_file, resolve_checkpoint
    step = read_stage_file(resolve_checkpoint(source), stage).get("step")
    return str(planned) if step in (None, planned) else f"{step} (of {planned})"


def samplers(lowres, superres, lowres_spec: str | None, sr_spec: str | None, sr_sigma_max_ratio: float | None = None,
             lr_guidance: float | None = None, lr_guidance_sigma: tuple[float, float] | None = None):
    """The two stages' recorded sampler settings, with ``SOLVER:N`` overrides (churn 0 for the deterministic
    multistep solver), the SR stage's starting noise level σ_max / σ_data and the low-res stage's
    classifier-free guidance (weight, σ interval)."""
    import dataclasses

    from libs.generate import read_stage_file, resolve_checkpoint
    out = []
    recorded = [load_config(read_stage_file(resolve_checkpoint(path), stage)["config"], cls).sample
                for path, stage, cls in ((lowres, "lowres", LowresConfig), (superres, "superres", SRConfig))]
    for sample, spec, name in zip(recorded, (lowres_spec, sr_spec), ("--sampler-lowres", "--sampler-sr")):
        if spec:
            solver, _, steps = spec.partition(":")
            try:
                sample = dataclasses.replace(sample, solver=solver, steps=int(steps),
                                             churn=0.0 if solver == "dpmpp_2m" else sample.churn)
            except ValueError as exc:
                raise click.BadParameter(f"{spec!r}: {exc}", param_hint=name) from None
        out.append(sample)
    if sr_sigma_max_ratio is not None:
        out[1] = dataclasses.replace(out[1], sigma_max_ratio=sr_sigma_max_ratio)
    guide = {k: v for k, v in (("guidance", lr_guidance), ("guidance_sigma", lr_guidance_sigma)) if v}
    if guide:
        try:
            out[0] = dataclasses.replace(out[0], **{k: list(v) if k == "guidance_sigma" else v
                                                    for k, v in guide.items()})
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--lr-guidance-sigma") from None
    return tuple(out)


def describe_samplers(s_lr, s_sr) -> str:
    calls = network_calls(s_lr.solver, s_lr.steps) + network_calls(s_sr.solver, s_sr.steps)
    lo, hi = s_lr.guidance_sigma
    guide = f", guidance {s_lr.guidance:g} for σ in [{lo:g}, {hi:g}]" if s_lr.guided else ""
    return (f"low-res {s_lr.solver} {s_lr.steps} steps (churn {s_lr.churn:g}{guide}), "
            f"SR {s_sr.solver} {s_sr.steps} steps (churn {s_sr.churn:g}) from σ {s_sr.sigma_max_ratio:g}·σ_data; "
            f"{calls} network calls per subject" + (" (low-res ones in the guided σ range on a doubled batch)"
                                                    if s_lr.guided else ""))


def comparison_cells(path: Path, region: str = "body") -> dict:
    """comparison.csv → {(measure, subgroup, cohort): row} for one region."""
    _, rows = read_csv(path, text_columns=("region", "measure", "subgroup", "cohort", "role"))
    return {(r["measure"], r["subgroup"], r["cohort"]): r for r in rows if r["region"] == region}


def response_cells(path: Path) -> dict:
    _, rows = read_csv(path, text_columns=("region", "measure", "cohort", "role", "covariate", "per",
                                           "adjusted_for"))
    return {(r["measure"], r["covariate"], r["cohort"]): r for r in rows if r["region"] == "body"}


def diff_se(row: dict, ref: dict) -> float:
    """(mean − reference mean) in standard errors of the difference (Welch)."""
    se = math.sqrt(row["sd"] ** 2 / row["n"] + ref["sd"] ** 2 / ref["n"]) if row["n"] > 1 and ref["n"] > 1 else 0
    return (row["mean"] - ref["mean"]) / se if se > 0 else math.nan


def summary_rows(cells: dict, names: dict, measures=MEASURES, region: str = "body") -> list[dict]:
    """One row per measure × subgroup: reference, then Δ %, Welch p and Δ/SE of each compared cohort."""
    rows = []
    for m in measures:
        for g in SUBGROUPS:
            ref = cells.get((m, g, names["heldout"]))
            if ref is None or any((m, g, names[c]) not in cells for c in COHORTS):
                continue
            row = {"region": region, "measure": m, "subgroup": g, "n_ref": ref["n"], "ref_mean": ref["mean"],
                   "ref_sd": ref["sd"]}
            for c in COHORTS:
                r = cells[(m, g, names[c])]
                row |= {f"{c}_mean": r["mean"], f"{c}_sd": r["sd"], f"{c}_pct": r["pct_diff"],
                        f"{c}_p": r["welch_p"], f"{c}_se": diff_se(r, ref)}
            rows.append(row)
    return rows


def slope_rows(resp: dict, names: dict) -> list[dict]:
    rows = []
    for m, cov in SLOPES:
        ref = resp[(m, cov, names["heldout"])]
        row = {"measure": m, "covariate": f"{cov} ({ref['per']})", "ref_slope": ref["slope"], "ref_se": ref["se"]}
        for c in COHORTS:
            r = resp[(m, cov, names[c])]
            row |= {f"{c}_slope": r["slope"], f"{c}_se": r["se"],
                    f"{c}_pct": 100.0 * (r["slope"] - ref["slope"]) / abs(ref["slope"]),
                    f"{c}_p": r["diff_vs_reference_p"]}
        rows.append(row)
    return rows


def targets(rows: list[dict], slopes: list[dict], cohort: str) -> dict:
    """Issue 12's targets for one compared cohort: body measures (sex subgroups) within ±5 % or 2 SE,
    CT roughness within 1.3× of the reference, body-volume-vs-weight slope within 25 %."""
    body = [r for r in rows if r["subgroup"].startswith("sex") and r["measure"] != "ct_roughness_hu"]
    ok = [abs(r[f"{cohort}_pct"]) <= TARGET_PCT or abs(r[f"{cohort}_se"]) <= 2.0 for r in body]
    rough = [r for r in rows if r["measure"] == "ct_roughness_hu" and r["subgroup"].startswith("sex")]
    ratios = [r[f"{cohort}_mean"] / r["ref_mean"] for r in rough]
    vol_slope = next(s for s in slopes if s["measure"] == "volume_ml")
    return {"body_within": sum(ok), "body_total": len(ok),
            "worst_body_pct": max(abs(r[f"{cohort}_pct"]) for r in body),
            "roughness_ratio": ratios, "roughness_ok": all(1 / ROUGHNESS_RATIO <= q <= ROUGHNESS_RATIO for q in ratios),
            "volume_slope_pct": vol_slope[f"{cohort}_pct"], "slope_ok": abs(vol_slope[f"{cohort}_pct"]) <= SLOPE_PCT,
            "significant": sum(r[f"{cohort}_p"] < 0.05 for r in rows), "comparisons": len(rows)}


def organ_rows(comparison_csv: Path, names: dict) -> list[dict]:
    """The organ table (issue 14): volume, SUVmean, SUVmax of the paper's organs per sex and age group; empty
    when the generated cohort has no labels."""
    rows = []
    for organ in ORGANS:
        rows += summary_rows(comparison_cells(comparison_csv, organ), names, ORGAN_MEASURES, organ)
    if all(not math.isfinite(r.get("generated_mean", math.nan)) for r in rows):
        return []                 # a CT + PET model: the comparison lists the organs with no generated value
    return rows


def organ_targets(rows: list[dict], cohort: str) -> dict:
    """Issue 14's targets for one cohort: organ volume and SUVmean per sex within ±10 % or 2 SE; the count of
    Welch-significant comparisons among the sex rows (the paper's layout)."""
    sex = [r for r in rows if r["subgroup"].startswith("sex")]
    main = [r for r in sex if r["measure"] in ("volume_ml", "suv_mean")]
    ok = [abs(r[f"{cohort}_pct"]) <= ORGAN_TARGET_PCT or abs(r[f"{cohort}_se"]) <= 2.0 for r in main]
    return {"within": sum(ok), "total": len(ok), "significant": sum(r[f"{cohort}_p"] < 0.05 for r in sex),
            "comparisons": len(sex)}


def hu_consistency(reference: Path, cohorts: dict[str, Path]) -> list[dict]:
    """Image–label consistency: per organ, the reference cohort's central 95 % HU range inside its labels, and
    the fraction of each cohort's label voxels whose HU lies in that range (mean over subjects)."""

    def volumes(root: Path):
        cohort = Cohort(root)
        for d in cohort.demographics():
            subject = cohort.load(d, labels=True)
            if subject.labels is not None:
                yield subject.ct.array, subject.labels.array

    ref_hu = {o: [] for o in CONSISTENCY_ORGANS}
    for ct, lab in volumes(reference):
        for o in CONSISTENCY_ORGANS:
            ref_hu[o].append(ct[region_mask(lab, o)])
    ranges = {o: tuple(np.percentile(np.concatenate(v), [2.5, 97.5])) for o, v in ref_hu.items()
              if sum(a.size for a in v)}
    out = []
    for name, root in {"reference": reference, **cohorts}.items():
        frac = {o: [] for o in ranges}
        for ct, lab in volumes(root):
            for o, (lo, hi) in ranges.items():
                hu = ct[region_mask(lab, o)]
                if hu.size:
                    frac[o].append(float(((hu >= lo) & (hu <= hi)).mean()))
        for o, (lo, hi) in ranges.items():
            out.append({"cohort": name, "organ": o, "hu_low": float(lo), "hu_high": float(hi),
                        "subjects": len(frac[o]), "in_range": float(np.mean(frac[o])) if frac[o] else math.nan})
    return out


def _f(v: float, digits: int = 1) -> str:
    return "–" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.{digits}f}"


def comparison_cells_md(r: dict, digits: int) -> list[str]:
    """Markdown cells of one summary row: reference mean ± SD (n), then mean ± SD, Δ %, p, Δ/SE per cohort."""
    cells = [f"{_f(r['ref_mean'], digits)} ± {_f(r['ref_sd'], digits)} ({r['n_ref']})"]
    for c in COHORTS:
        cells += [f"{_f(r[f'{c}_mean'], digits)} ± {_f(r[f'{c}_sd'], digits)}", _f(r[f"{c}_pct"]),
                  _f(r[f"{c}_p"], 3), _f(r[f"{c}_se"])]
    return cells


def organ_markdown(rows: list[dict], checks: dict, consistency: list[dict]) -> list[str]:
    """The organ section of the report (issue 14)."""
    out = ["## Organs: generated labels vs the held-out phantoms' ground truth", "",
           "| organ | measure | subgroup | reference (n) | generated | Δ % | p | Δ/SE | noise floor | Δ % | p | Δ/SE |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 0 if r["measure"] == "volume_ml" else 2
        cells = comparison_cells_md(r, digits)
        out.append(f"| {r['region']} | {r['measure']} | {r['subgroup']} | " + " | ".join(cells) + " |")
    g, f = checks["generated"], checks["floor"]
    out += ["", "Targets (issue 14): organ volume and SUVmean per sex within ±10 % or 2 SE; at most 3 "
            "Welch-significant sex comparisons.", "", "| | generated | noise floor |", "|---|---|---|",
            f"| organ volume / SUVmean within target | {g['within']}/{g['total']} | {f['within']}/{f['total']} |",
            f"| sex comparisons at p < 0.05 | {g['significant']}/{g['comparisons']} | {f['significant']}/"
            f"{f['comparisons']} |", ""]
    if consistency:
        out += ["Image–label consistency: the fraction of each organ's label voxels whose HU lies in the reference "
                "cohort's central 95 % HU range for that organ (mean over subjects); the mean HU and SUV inside "
                "the labels are the hu_mean / suv_mean rows of comparison/comparison.md.", "",
                "| organ | reference HU range | reference | generated | noise floor |", "|---|---|---|---|---|"]
        for organ in dict.fromkeys(c["organ"] for c in consistency):
            by = {c["cohort"]: c for c in consistency if c["organ"] == organ}
            ref = by["reference"]
            out.append(f"| {organ} | {ref['hu_low']:.0f} … {ref['hu_high']:.0f} HU | " + " | ".join(
                _f(by[n]["in_range"], 3) if n in by else "–" for n in ("reference", "generated", "floor")) + " |")
        out.append("")
    return out


def markdown(rows, slopes, checks, info: dict, organs: list[str] | None = None) -> str:
    out = ["# Closed-loop fidelity benchmark", "",
           f"Training cohort {info['n_train']} phantoms; held-out reference {info['n_test']} phantoms; "
           f"generated = the cascade on the held-out demographics; noise floor = phantoms of the same "
           f"demographics, another seed. {info['spacing_mm']:g} mm grid. Presets {info['presets']}, "
           f"{info['steps']} training steps; samplers: {info.get('samplers', 'the presets’')}; seeds: "
           f"{info['seeds']}; device {info['device']}; "
           f"times {info['times']}.", "",
           "Δ % = 100·(cohort − reference)/reference; p = Welch; Δ/SE = difference in standard errors.", "",
           "| measure | subgroup | reference (n) | generated | Δ % | p | Δ/SE | noise floor | Δ % | p | Δ/SE |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 3 if r["measure"] == "suv_mean" else 1
        cells = comparison_cells_md(r, digits)
        out.append(f"| {r['measure']} | {r['subgroup']} | " + " | ".join(cells) + " |")
    out += ["", "Demographic slopes (least squares, adjusted for weight, height, age and sex):", "",
            "| measure | covariate | reference | generated | Δ % | p(≠ ref) | noise floor | Δ % | p(≠ ref) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in slopes:
        cells = [f"{_f(s['ref_slope'])} ± {_f(s['ref_se'])}"]
        for c in COHORTS:
            cells += [f"{_f(s[f'{c}_slope'])} ± {_f(s[f'{c}_se'])}", _f(s[f"{c}_pct"]), _f(s[f"{c}_p"], 3)]
        out.append(f"| {s['measure']} | {s['covariate']} | " + " | ".join(cells) + " |")
    out += ["", "Targets (issue 12): body measures per sex within ±5 % or 2 SE; CT roughness within 1.3×; "
            "body-volume-vs-weight slope within 25 %.", "", "| | generated | noise floor |", "|---|---|---|"]
    g, f = checks["generated"], checks["floor"]
    out += [f"| body measures within target | {g['body_within']}/{g['body_total']} | {f['body_within']}/"
            f"{f['body_total']} |",
            f"| worst body |Δ %| (by sex) | {_f(g['worst_body_pct'])} | {_f(f['worst_body_pct'])} |",
            f"| CT roughness ratio F, M | {', '.join(_f(q, 2) for q in g['roughness_ratio'])} | "
            f"{', '.join(_f(q, 2) for q in f['roughness_ratio'])} |",
            f"| body volume vs weight slope Δ % | {_f(g['volume_slope_pct'])} | {_f(f['volume_slope_pct'])} |",
            f"| comparisons at p < 0.05 | {g['significant']}/{g['comparisons']} | {f['significant']}/"
            f"{f['comparisons']} |", ""]
    return "\n".join(out + (organs or []))


def figure(path: Path, rows: list[dict]) -> Path:
    """Δ % ± 2 SE of the generated cohort and the noise floor, per measure and subgroup."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=110)
    for ax, m in zip(axes.ravel(), MEASURES):
        sub = [r for r in rows if r["measure"] == m]
        x = np.arange(len(sub))
        for k, (c, colour) in enumerate((("generated", "tab:red"), ("floor", "tab:grey"))):
            pct = np.array([r[f"{c}_pct"] for r in sub])
            se_pct = np.array([abs(r[f"{c}_pct"] / r[f"{c}_se"]) if r[f"{c}_se"] else 0.0 for r in sub])
            ax.errorbar(x + (k - 0.5) * 0.25, pct, yerr=2 * np.nan_to_num(se_pct), fmt="o", color=colour,
                        capsize=3, label="generated" if c == "generated" else "noise floor")
        ax.axhspan(-TARGET_PCT, TARGET_PCT, color="tab:green", alpha=0.12)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, [r["subgroup"] for r in sub], fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("Δ % vs held-out (± 2 SE)", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Closed-loop fidelity: generated and noise floor vs held-out phantoms (green: ±5 %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(out: Path, comp: Path, info: dict, paths: dict | None = None) -> tuple[dict, list[dict]]:
    """fidelity.md / .csv / .png and previews.png; with labels in the generated cohort, the organ section
    (and ``organs`` in the returned checks)."""
    names = {"heldout": "heldout", "generated": "generated", "floor": "floor"}
    rows = summary_rows(comparison_cells(comp / "comparison.csv"), names)
    slopes = slope_rows(response_cells(comp / "response.csv"), names)
    checks = {c: targets(rows, slopes, c) for c in COHORTS}
    organs = organ_rows(comp / "comparison.csv", names)
    section = None
    if organs:
        checks["organs"] = {c: organ_targets(organs, c) for c in COHORTS}
        consistency = hu_consistency(paths["heldout"], {c: paths[c] for c in COHORTS}) if paths else []
        section = organ_markdown(organs, checks["organs"], consistency)
    (out / "fidelity.md").write_text(markdown(rows, slopes, checks, info, section), encoding="utf-8")
    with open(out / "fidelity.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + organs)
    figure(out / "fidelity.png", rows)
    shutil.copyfile(comp / "figures" / "previews.png", out / "previews.png")
    return checks, rows


def _timed(times: dict, name: str, fn):
    t0 = time.perf_counter()
    result = fn()
    times[name] = f"{(time.perf_counter() - t0) / 60:.1f} min"
    return result


@click.command(context_settings={"show_default": True})
@click.option("--out", default="bench_out/fidelity", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--train-subjects", default=240, type=click.IntRange(8), metavar="N")
@click.option("--subjects", default=64, type=click.IntRange(8), metavar="N", help="Held-out (and floor) subjects.")
@click.option("--objective", default="edm", type=click.Choice(["edm", "flow"]),
              help="The arm: the default presets are *_bench.yaml (edm) or *_bench_flow.yaml (flow).")
@click.option("--lowres-config", default=None, type=click.Path(dir_okay=False),
              help="Low-res preset [1_Trainings/configs/lowres_bench(_flow).yaml].")
@click.option("--superres-config", default=None, type=click.Path(dir_okay=False),
              help="Super-res preset [1_Trainings/configs/superres_bench(_flow).yaml].")
@click.option("--steps", default=None, type=click.IntRange(1), metavar="N",
              help="Training steps of each stage [the presets'].")
@click.option("--train-minutes", default=None, type=click.FloatRange(0.0, min_open=True), metavar="M",
              help="Wall-clock budget of each stage's training (loop.max_minutes): it stops with a checkpoint at "
                   "the first report past M minutes, and the benchmark generates with what it reached (the "
                   "report gives the steps); rerun to continue towards --steps.")
@click.option("--seed", default=0, type=click.IntRange(0), metavar="S",
              help="Seed of the training cohort and the training runs.")
@click.option("--heldout-seed", default=None, type=click.IntRange(0), metavar="H",
              help="Seed of the held-out cohort (floor: H+1) and of generation  [S+1; generation S].")
@click.option("--gen-seed", default=None, type=click.IntRange(0), metavar="G",
              help="Seed of the cascade's sampling [S, or H with --heldout-seed]: the same models, cohorts and "
                   "floor drawn again, for the run-to-run noise of the generated cohort.")
@click.option("--runs-from", default=None, type=click.Path(file_okay=False, exists=True), metavar="DIR",
              help="Evaluate the trained stages in DIR/{lowres,superres} (an earlier benchmark's runs/) or "
                   "DIR/{lowres,superres}.safetensors (exported weights, e.g. Resource/demo_weights) instead of "
                   "training: the same models on another held-out cohort.")
@click.option("--sampler-lowres", default=None, metavar="SOLVER:N",
              help="Generate with this low-res solver and step count (heun, euler, dpmpp_2m) [the trained stage's].")
@click.option("--sampler-sr", default=None, metavar="SOLVER:N", help="The same for the super-resolution stage.")
@click.option("--sr-sigma-max-ratio", default=None, type=click.FloatRange(0.0, min_open=True), metavar="R",
              help="Start the super-resolution sampler at σ_max = R · σ_data [the trained stage's].")
@click.option("--lr-guidance", default=None, type=click.FloatRange(0.0), metavar="W",
              help="Low-res classifier-free guidance weight (1 = none; needs diffusion.cond_dropout) [the trained "
                   "stage's].")
@click.option("--lr-guidance-sigma", default=None, type=click.FloatRange(0.0), nargs=2, metavar="LO HI",
              help="Guide only while LO ≤ σ ≤ HI [the trained stage's].")
@click.option("--labels-config", default=None, type=click.Path(dir_okay=False),
              help="Label-stage preset [1_Trainings/configs/labels_bench.yaml with the default image presets; "
                   "none with others]: trained on the same phantoms (with --runs-from: DIR/labels or "
                   "DIR/labels.safetensors, if there), it labels every generated subject, and the report gains the "
                   "organ table.")
@click.option("--no-labels", is_flag=True, help="No label stage: CT + PET only (no organ table unless the cascade "
                                                 "generates labels itself).")
@click.option("--device", default="auto", metavar="DEV")
@click.option("--batch", default=8, type=click.IntRange(1), metavar="N", help="Subjects per low-res sampling batch.")
@click.option("--quiet", is_flag=True)
def main(out, train_subjects, subjects, objective, lowres_config, superres_config, steps, train_minutes, seed,
         heldout_seed, gen_seed, runs_from, sampler_lowres, sampler_sr, sr_sigma_max_ratio, lr_guidance,
         lr_guidance_sigma, labels_config, no_labels, device, batch, quiet):
    """Train the cascade on phantoms, generate a held-out cohort's demographics, compare with the noise floor."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    suffix = "_flow" if objective == "flow" else ""
    default_presets = lowres_config is None
    lowres_config = lowres_config or str(CONFIGS / f"lowres_bench{suffix}.yaml")
    superres_config = superres_config or str(CONFIGS / f"superres_bench{suffix}.yaml")
    out, times = Path(out), {}
    if gen_seed is None:
        gen_seed = seed if heldout_seed is None else heldout_seed
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    runs = Path(runs_from) if runs_from else out / "runs"
    low_cfg, sr_cfg = stage_configs(Path(lowres_config), Path(superres_config), runs, out / "train", steps,
                                    train_minutes)
    spacing = low_cfg.in_plane_mm
    paths = _timed(times, "phantoms", lambda: make_cohorts(out, train_subjects, subjects, seed, heldout_seed,
                                                           spacing, 2, train=not runs_from))
    if labels_config and (no_labels or low_cfg.data.channel_set.has_labels):
        raise click.UsageError("--labels-config: not with --no-labels, nor for a cascade that generates label "
                               "channels itself (data.labels in its low-res preset)")
    # the label stage: the given preset; by default labels_bench.yaml, for the default (bench) image presets only
    # (another preset may have another grid) and not where the cascade generates label channels itself
    lab_yaml = labels_config or (CONFIGS / "labels_bench.yaml" if default_presets and not no_labels
                                 and not low_cfg.data.channel_set.has_labels else None)
    lab_cfg = label_config(Path(lab_yaml), runs, out / "train", low_cfg) if lab_yaml else None
    if not runs_from:
        _timed(times, "train lowres", lambda: train_lowres(low_cfg, device=device, progress=not quiet))
        _timed(times, "train superres", lambda: train_superres(sr_cfg, device=device, progress=not quiet))
        if lab_cfg is not None:
            _timed(times, "train labels", lambda: train_labels(lab_cfg, device=device, progress=not quiet))
    stages = ((stage_source(runs, "lowres"), stage_source(runs, "superres")) if runs_from else
              (low_cfg.run_dir, sr_cfg.run_dir))
    label_stage = None
    if lab_cfg is not None:
        label_stage = lab_cfg.run_dir if not runs_from else _optional_source(runs, "labels")
    s_lr, s_sr = samplers(*stages, sampler_lowres, sampler_sr, sr_sigma_max_ratio, lr_guidance, lr_guidance_sigma)
    report = _timed(times, "generate", lambda: generate_cascade_cohort(
        *stages, paths["heldout"] / "demographics.csv", out / "generated", seed=gen_seed, sample_lowres_cfg=s_lr,
        sample_sr_cfg=s_sr, batch=batch, device=device, previews=False, progress=not quiet, labels=label_stage))
    if report.failed:
        raise SystemExit(f"generation failed for {len(report.failed)} subjects: {next(iter(report.failed.values()))}")
    comp = out / "comparison"
    _timed(times, "compare", lambda: run_comparison(paths["heldout"], [out / "generated", paths["floor"]], comp,
                                                    min_volume_ml=50.0, preview_subjects=4, overwrite=True,
                                                    progress=False))
    info = {"n_train": train_subjects, "n_test": subjects, "spacing_mm": spacing, "device": device,
            "seeds": f"training {seed}, held-out {heldout_seed}, floor {heldout_seed + 1}, generation {gen_seed}"
                     + (f"; trained stages from {runs}" if runs_from else ""),
            "presets": f"{Path(lowres_config).name} + {Path(superres_config).name} (objectives "
                       f"{low_cfg.diffusion.objective} + {sr_cfg.diffusion.objective})",
            "steps": " + ".join(trained_steps(src, name, cfg.loop.steps) for src, name, cfg in
                                ((stages[0], "lowres", low_cfg), (stages[1], "superres", sr_cfg)))
                     + (f"; label stage {trained_steps(label_stage, 'labels', lab_cfg.loop.steps)}"
                        if label_stage is not None else ""),
            "samplers": describe_samplers(s_lr, s_sr),
            "times": ", ".join(f"{k} {v}" for k, v in times.items())}
    checks, _ = write_outputs(out, comp, info, paths | {"generated": out / "generated"})
    g, f = checks["generated"], checks["floor"]
    print(f"{out}/fidelity.md: body measures within target {g['body_within']}/{g['body_total']} (floor "
          f"{f['body_within']}/{f['body_total']}), worst |Δ| {g['worst_body_pct']:.1f} % (floor "
          f"{f['worst_body_pct']:.1f} %), roughness ratio {'/'.join(f'{q:.2f}' for q in g['roughness_ratio'])}, "
          f"volume-weight slope Δ {g['volume_slope_pct']:+.0f} % (floor {f['volume_slope_pct']:+.0f} %), "
          f"p<0.05 {g['significant']}/{g['comparisons']} (floor {f['significant']}/{f['comparisons']}); "
          + (f"organs within target {o['within']}/{o['total']} (floor {of['within']}/{of['total']}), organ p<0.05 "
             f"{o['significant']}/{o['comparisons']} (floor {of['significant']}/{of['comparisons']}); "
             if (o := checks.get("organs", {}).get("generated")) and (of := checks["organs"]["floor"]) else "")
          + f"{', '.join(f'{k} {v}' for k, v in times.items())}")


if __name__ == "__main__":
    main()
