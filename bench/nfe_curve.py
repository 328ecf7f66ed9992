#!/usr/bin/env python
"""Fidelity against network evaluations: runs of bench/fidelity.py that generate with the same trained stages, the
same held-out cohort and noise floor but other sampler settings (``--runs-from W --sampler-lowres ...
--sampler-sr ...``), compared with a many-step reference run of the same models.

"Equal fidelity" (issue 16) = every body measure of a run within its run-to-run noise of the reference. That
noise is measured with two runs of one recipe that differ only in the sampling seed (``--noise A B``, e.g. the
same command with ``--gen-seed 1``): the between-seed spread of a cohort mean, pooled over the body measures in
units of each measure's standard error (so one pair of runs gives an estimate with 12 degrees of freedom, not
one per measure). A run holds fidelity on a measure when it differs from the reference by at most two standard
deviations of the difference of two sampling runs, 2·√2·σ_seed.

    W=Resource/demo_weights
    .venv/bin/python bench/fidelity.py --out bench_out/nfe/ref --runs-from $W \\
        --sampler-lowres heun:64 --sampler-sr euler:32
    .venv/bin/python bench/fidelity.py --out bench_out/nfe/preset --runs-from $W
    .venv/bin/python bench/fidelity.py --out bench_out/nfe/preset_g1 --runs-from $W --gen-seed 1
    .venv/bin/python bench/fidelity.py --out bench_out/nfe/sr5 --runs-from $W --sampler-sr euler:5
    .venv/bin/python bench/nfe_curve.py bench_out/nfe/ref bench_out/nfe/preset bench_out/nfe/sr5 \\
        --noise bench_out/nfe/preset bench_out/nfe/preset_g1 --out bench_out/nfe/nfe.md

Writes the Markdown table and a figure (OUT with .png) and prints a one-line summary last.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from libs.samplers import network_calls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_arms import SEX, read_rows  # noqa: E402
from fidelity import MEASURES  # noqa: E402

KEYS = [("body", m, g) for m in MEASURES for g in SEX]
SET_BY_DEMOGRAPHICS = ("length_mm",)        # the generated length follows the height law: no sampling noise


def read_recipe(run: Path) -> dict:
    """Sampler settings, network calls and checkpoint hashes of a fidelity run's generated cohort (its sidecars,
    which must agree with each other), plus the per-subject seeds."""
    metas = sorted((run / "generated" / "meta").glob("*.json"))
    if not metas:
        raise click.ClickException(f"{run}/generated/meta: no sidecars (a bench/fidelity.py output folder?)")
    recipes, seeds = set(), {}
    for path in metas:
        meta = json.loads(path.read_text(encoding="utf-8"))
        low, sr = meta["sampler"], meta["sampler_superres"]
        recipe = (low["solver"], int(low["steps"]), float(low.get("churn", 0.0)), sr["solver"], int(sr["steps"]),
                  float(sr.get("churn", 0.0)), float(sr["sigma_max"]), float(sr.get("cond_noise", 0.0)),
                  meta["checkpoints"]["lowres"]["sha256"], meta["checkpoints"]["superres"]["sha256"])
        recipes.add(recipe)
        seeds[meta["subject_id"]] = (meta["seed"], meta["seed_superres"])
    if len(recipes) != 1:
        raise click.ClickException(f"{run}: the generated subjects were sampled with different settings")
    (ls, ln, lc, ss, sn, sc, smax, cn, lhash, shash), = recipes
    calls = (network_calls(ls, ln), network_calls(ss, sn))
    return {"label": f"low-res {ls} {ln} (churn {lc:g}) + SR {ss} {sn} (churn {sc:g}, σ_max {smax:g})",
            "sampler": (ls, ln, lc, ss, sn, sc, smax, cn), "calls": calls, "nfe": sum(calls),
            "models": (lhash, shash), "seeds": seeds}


def seed_noise(a: dict, b: dict) -> tuple[float, dict]:
    """Between-seed SD of each body measure's cohort mean from two sampling runs of one recipe.

    z_k = (mean_a − mean_b) / (√2·SE_k), with SE_k = √((sd_a² + sd_b²) / 2n) the standard error of one cohort
    mean; c = √(mean z_k²) pooled over the measures; σ_seed,k = c·SE_k. c = 1 when the runs scatter like two
    independent samples of the generated population; less when the shared demographics make them agree more.
    Body length is set by the height law, not drawn, so it does not enter the pool (it would pull c towards 0)."""
    z2, se = [], {}
    for k in KEYS:
        ra, rb = a[k], b[k]
        se[k] = math.sqrt((ra["generated_sd"] ** 2 + rb["generated_sd"] ** 2) / (2.0 * ra["n_ref"]))
        if se[k] > 0 and k[1] not in SET_BY_DEMOGRAPHICS:
            z2.append(((ra["generated_mean"] - rb["generated_mean"]) / (math.sqrt(2.0) * se[k])) ** 2)
    if not z2:
        raise click.ClickException("the noise runs have no spread to measure")
    c = math.sqrt(sum(z2) / len(z2))
    return c, {k: c * se[k] for k in KEYS}


def compare(ref: dict, run: dict, sigma: dict) -> dict:
    """Per body measure × sex: the run's Δ % from the held-out phantoms, its difference from the reference run
    (% of the reference run's mean) and whether that lies within 2·√2·σ_seed."""
    out = {}
    for k in KEYS:
        diff = run[k]["generated_mean"] - ref[k]["generated_mean"]
        tol = 2.0 * math.sqrt(2.0) * sigma[k]
        out[k] = {"pct": run[k]["generated_pct"], "vs_ref_pct": 100.0 * diff / ref[k]["generated_mean"],
                  "tol_pct": 100.0 * tol / abs(ref[k]["generated_mean"]), "holds": abs(diff) <= tol}
    return out


def load_runs(ref_dir: Path, run_dirs: list[Path], noise: tuple[Path, Path]) -> tuple[dict, dict]:
    """Rows and recipes of every folder; refuses runs of other models or another held-out cohort."""
    rows, recipes = {}, {}
    for d in [ref_dir, *run_dirs, *noise]:
        if d in rows:
            continue
        rows[d], recipes[d] = read_rows(d / "fidelity.csv"), read_recipe(d)
        missing = [k for k in KEYS if k not in rows[d]]
        if missing:
            raise click.ClickException(f"{d}/fidelity.csv lacks {missing[0]}")
        if recipes[d]["models"] != recipes[ref_dir]["models"]:
            raise click.ClickException(f"{d}: generated with other trained stages than {ref_dir}")
        if any(not math.isclose(rows[d][k]["ref_mean"], rows[ref_dir][k]["ref_mean"], rel_tol=1e-9) for k in KEYS):
            raise click.ClickException(f"{d}: another held-out cohort than {ref_dir} (use the same --heldout-seed)")
    a, b = noise
    if recipes[a]["sampler"] != recipes[b]["sampler"]:
        raise click.ClickException("--noise needs two runs of one sampler recipe (only the seed may differ)")
    if recipes[a]["seeds"] == recipes[b]["seeds"]:
        raise click.ClickException("--noise: the two runs used the same sampling seeds (pass --gen-seed to one)")
    return rows, recipes


def markdown(ref_dir: Path, run_dirs: list[Path], rows: dict, recipes: dict, noise: tuple[Path, Path],
             c: float, sigma: dict, results: dict) -> str:
    ref = recipes[ref_dir]
    out = ["# Fidelity against network evaluations", "",
           f"Reference `{ref_dir}`: {ref['label']}, {ref['nfe']} network calls per subject "
           f"({ref['calls'][0]} + {ref['calls'][1]}). Run-to-run noise from `{noise[0]}` and `{noise[1]}` "
           f"(same recipe, other sampling seed): the between-seed SD of a cohort mean is {c:.2f} standard errors "
           "(pooled over the body measure × sex rows except the length, which the height law sets); a run holds a "
           "measure when it is within 2·√2·σ_seed of the reference.", "",
           "| run | sampler | NFE (low-res + SR) | holds | body measures within target (±5 % or 2 SE) |",
           "|---|---|---|---|---|"]
    for d in [ref_dir, *run_dirs]:
        r = recipes[d]
        within = sum(abs(rows[d][k]["generated_pct"]) <= 5.0 or abs(rows[d][k]["generated_se"]) <= 2.0
                     for k in KEYS if k[1] != "ct_roughness_hu")
        holds = "reference" if d == ref_dir else f"{sum(v['holds'] for v in results[d].values())}/{len(KEYS)}"
        out.append(f"| `{d}` | {r['label']} | {r['nfe']} ({r['calls'][0]} + {r['calls'][1]}) | {holds} | "
                   f"{within}/10 |")
    out += ["", "Δ % of the generated cohort from the held-out phantoms; in brackets the difference from the "
            "reference run, % of its mean, and the tolerance 2·√2·σ_seed (✗: outside).", "",
            "| measure | sex | " + " | ".join(f"`{d.name}` ({recipes[d]['nfe']})" for d in [ref_dir, *run_dirs])
            + " | tolerance % |", "|---|---|" + "---|" * (len(run_dirs) + 2)]
    for k in KEYS:
        cells = [f"{rows[ref_dir][k]['generated_pct']:+.1f}"]
        for d in run_dirs:
            v = results[d][k]
            cells.append(f"{v['pct']:+.1f} ({v['vs_ref_pct']:+.1f}{'' if v['holds'] else ' ✗'})")
        tol = 100.0 * 2.0 * math.sqrt(2.0) * sigma[k] / abs(rows[ref_dir][k]["generated_mean"])
        out.append(f"| {k[1]} | {k[2][4:]} | " + " | ".join(cells) + f" | ±{tol:.1f} |")
    return "\n".join(out) + "\n"


def figure(path: Path, ref_dir: Path, run_dirs: list[Path], rows: dict, recipes: dict, sigma: dict) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), dpi=110)
    order = sorted(run_dirs, key=lambda d: recipes[d]["nfe"])
    for ax, m in zip(axes.ravel(), MEASURES):
        for g, colour in zip(SEX, ("tab:red", "tab:blue")):
            k = ("body", m, g)
            ref = rows[ref_dir][k]
            tol = 100.0 * 2.0 * math.sqrt(2.0) * sigma[k] / ref["ref_mean"]
            ax.axhspan(ref["generated_pct"] - tol, ref["generated_pct"] + tol, color=colour, alpha=0.08)
            ax.plot([recipes[d]["nfe"] for d in order], [rows[d][k]["generated_pct"] for d in order], "o-",
                    color=colour, label=f"{g[4:]}")
            ax.plot([recipes[ref_dir]["nfe"]], [ref["generated_pct"]], "s", color=colour, mfc="white")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("network calls per subject", fontsize=7)
        ax.set_ylabel("Δ % vs held-out", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Fidelity vs NFE (squares: reference run; bands: its ±2·√2·σ_seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.argument("ref_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--noise", nargs=2, required=True, type=click.Path(file_okay=False, exists=True), metavar="A B",
              help="Two runs of one recipe with different sampling seeds: the run-to-run noise.")
@click.option("--out", default="bench_out/nfe.md", type=click.Path(dir_okay=False))
def main(ref_dir, run_dirs, noise, out):
    """Compare fidelity runs (RUN_DIRS) of other samplers with a many-step reference run (REF_DIR)."""
    ref_dir, run_dirs, noise = Path(ref_dir), [Path(d) for d in run_dirs], (Path(noise[0]), Path(noise[1]))
    rows, recipes = load_runs(ref_dir, run_dirs, noise)
    c, sigma = seed_noise(rows[noise[0]], rows[noise[1]])
    results = {d: compare(rows[ref_dir], rows[d], sigma) for d in run_dirs}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(ref_dir, run_dirs, rows, recipes, noise, c, sigma, results), encoding="utf-8")
    figure(out.with_suffix(".png"), ref_dir, run_dirs, rows, recipes, sigma)
    held = ", ".join(f"{recipes[d]['nfe']} calls {sum(v['holds'] for v in results[d].values())}/{len(KEYS)}"
                     for d in sorted(run_dirs, key=lambda d: recipes[d]["nfe"]))
    print(f"{out}: reference {recipes[ref_dir]['nfe']} calls; seed noise {c:.2f} SE; measures holding: {held}")


if __name__ == "__main__":
    main()
