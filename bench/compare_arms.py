#!/usr/bin/env python
"""EDM vs flow matching side by side: two runs of bench/fidelity.py (one per arm, same seeds, so the same
held-out reference and noise floor) → one Markdown table of Δ % and Welch p per measure and sex, the count of
significant comparisons of each arm, and the network evaluations (NFE) per subject of each.

    .venv/bin/python bench/fidelity.py --out bench_out/fidelity                        # EDM arm
    .venv/bin/python bench/fidelity.py --out bench_out/fidelity_flow --objective flow  # flow arm
    .venv/bin/python bench/compare_arms.py bench_out/fidelity bench_out/fidelity_flow --out bench_out/arms.md

The last line printed is a one-line summary.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.config import load_config  # noqa: E402
from libs.generate import read_stage_file, resolve_checkpoint, stage_source  # noqa: E402
from libs.lowres import LowresConfig  # noqa: E402
from libs.samplers import network_calls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import response_cells, slope_rows  # noqa: E402

from libs.superres import SRConfig  # noqa: E402
from libs.windows import window_grid  # noqa: E402

SEX = ("sex=F", "sex=M")
NUMERIC = ("n_ref", "ref_mean", "ref_sd", "generated_mean", "generated_sd", "generated_pct", "generated_p",
           "generated_se", "floor_mean", "floor_sd", "floor_pct", "floor_p", "floor_se")


def read_rows(fidelity_csv: Path) -> dict:
    """fidelity.csv → {(region, measure, subgroup): row with numbers}."""
    if not fidelity_csv.is_file():
        raise click.ClickException(f"{fidelity_csv}: not found (run bench/fidelity.py first)")
    with open(fidelity_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        for k in NUMERIC:
            r[k] = float(r[k]) if r.get(k) not in (None, "", "nan") else math.nan
        out[(r["region"], r["measure"], r["subgroup"])] = r
    return out




def arm_cost(runs: Path) -> dict:
    """Objective, sampler and network evaluations per subject of the two trained stages in ``runs``."""
    out = {}
    for stage, cls in (("lowres", LowresConfig), ("superres", SRConfig)):
        try:
            path = resolve_checkpoint(stage_source(runs, stage))
        except FileNotFoundError as exc:
            raise click.ClickException(f"{exc} (pass the arm's runs folder or exported weights)") from None
        ckpt = read_stage_file(path, stage)
        cfg = load_config(ckpt["config"], cls, origin=str(path))
        calls = network_calls(cfg.sample.solver, cfg.sample.steps)
        windows = 1
        if stage == "superres":
            grid = ckpt["normalization"]["grid"]
            windows = len(window_grid(grid, cfg.window.size or cfg.data.patch, cfg.window.overlap)[1])
        out[stage] = {"objective": cfg.diffusion.objective, "solver": cfg.sample.solver, "steps": cfg.sample.steps,
                      "space": cfg.sample.space(cfg.diffusion.objective), "calls": calls, "windows": windows}
    return out


def _f(v: float, digits: int = 1) -> str:
    return "–" if math.isnan(v) else f"{v:+.{digits}f}" if digits == 1 else f"{v:.{digits}f}"


def summary(rows: dict, cohort: str) -> dict:
    """Significant sex comparisons and mean |Δ %| of one cohort, body and organ rows apart."""
    out = {}
    for part in ("body", "organs"):
        sel = [r for (region, _, g), r in rows.items() if g in SEX and (region == "body") == (part == "body")]
        if sel:
            out[part] = {"significant": sum(r[f"{cohort}_p"] < 0.05 for r in sel), "comparisons": len(sel),
                         "mean_abs_pct": sum(abs(r[f"{cohort}_pct"]) for r in sel) / len(sel)}
    return out


def read_slopes(run: Path) -> dict:
    """The demographic slopes (generated and noise floor vs held-out) of one fidelity run, by measure."""
    path = run / "comparison" / "response.csv"
    if not path.is_file():
        raise click.ClickException(f"{path}: not found (the run's comparison folder)")
    names = {"heldout": "heldout", "generated": "generated", "floor": "floor"}
    return {r["measure"]: r for r in slope_rows(response_cells(path), names)}


def slope_lines(edm: dict, flow: dict) -> list[str]:
    out = ["", "Demographic slopes (least squares, adjusted for the other covariates; Δ % of the generated slope "
           "from the held-out reference's):", "",
           "| measure | covariate | reference slope | EDM Δ % | p | flow Δ % | p | noise floor Δ % |",
           "|---|---|---|---|---|---|---|---|"]
    for m, e in edm.items():
        f = flow.get(m)
        if f is None:
            continue
        out.append(f"| {m} | {e['covariate']} | {e['ref_slope']:.1f} | {_f(e['generated_pct'])} | "
                   f"{_f(e['generated_p'], 3)} | {_f(f['generated_pct'])} | {_f(f['generated_p'], 3)} | "
                   f"{_f(e['floor_pct'])} |")
    return out


def markdown(edm: dict, flow: dict, cost: dict, names: tuple[str, str], slopes: tuple[dict, dict] = ({}, {})) -> str:
    keys = [k for k in edm if k[2] in SEX and k in flow]
    same_ref = all(math.isclose(edm[k]["ref_mean"], flow[k]["ref_mean"], rel_tol=1e-9) for k in keys)
    out = ["# EDM vs flow matching on the closed-loop benchmark", "",
           f"Runs: EDM `{names[0]}`, flow `{names[1]}`. "
           + ("Both were compared with the same held-out reference and noise floor."
              if same_ref else "**The two runs have different reference cohorts: run them with the same seeds.**"),
           "", "| | EDM | flow |", "|---|---|---|"]
    for stage in ("lowres", "superres"):
        e, f = cost["edm"][stage], cost["flow"][stage]
        out.append(f"| {stage}: objective, sampler | {e['objective']}, {e['solver']} {e['steps']} steps in "
                   f"{e['space']} | {f['objective']}, {f['solver']} {f['steps']} steps in {f['space']} |")
    nfe = {a: cost[a]["lowres"]["calls"] + cost[a]["superres"]["calls"] for a in ("edm", "flow")}
    out.append(f"| network evaluations per subject (low-res + SR calls; each SR call covers "
               f"{cost['edm']['superres']['windows']} windows) | {nfe['edm']} | {nfe['flow']} |")
    se, sf = summary(edm, "generated"), summary(flow, "generated")
    floor = summary(edm, "floor")
    for part in se:
        out.append(f"| {part}: sex comparisons at p < 0.05 (noise floor {floor[part]['significant']}) | "
                   f"{se[part]['significant']}/{se[part]['comparisons']} | "
                   f"{sf.get(part, {}).get('significant', '–')}/{sf.get(part, {}).get('comparisons', '–')} |")
        out.append(f"| {part}: mean \\|Δ %\\| (noise floor {floor[part]['mean_abs_pct']:.1f}) | "
                   f"{se[part]['mean_abs_pct']:.1f} | {sf.get(part, {}).get('mean_abs_pct', math.nan):.1f} |")
    out += ["", "| region | measure | subgroup | reference mean | EDM Δ % | p | flow Δ % | p | noise floor Δ % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        e, f = edm[k], flow[k]
        digits = 0 if k[1].endswith("_ml") or k[1].endswith("_mm") else 2
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {e['ref_mean']:.{digits}f} | {_f(e['generated_pct'])} | "
                   f"{_f(e['generated_p'], 3)} | {_f(f['generated_pct'])} | {_f(f['generated_p'], 3)} | "
                   f"{_f(e['floor_pct'])} |")
    if slopes[0] and slopes[1]:
        out += slope_lines(*slopes)
    return "\n".join(out) + "\n"


@click.command(context_settings={"show_default": True})
@click.argument("edm_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("flow_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--edm-runs", type=click.Path(file_okay=False),
              help="The EDM arm's trained stages (run folders or exported weights) [EDM_DIR/runs].")
@click.option("--flow-runs", type=click.Path(file_okay=False), help="The flow arm's trained stages [FLOW_DIR/runs].")
@click.option("--out", default="bench_out/arms.md", type=click.Path(dir_okay=False))
def main(edm_dir, flow_dir, edm_runs, flow_runs, out):
    """Write the side-by-side table of two fidelity runs (EDM_DIR, FLOW_DIR)."""
    edm_dir, flow_dir = Path(edm_dir), Path(flow_dir)
    edm, flow = read_rows(edm_dir / "fidelity.csv"), read_rows(flow_dir / "fidelity.csv")
    cost = {"edm": arm_cost(Path(edm_runs) if edm_runs else edm_dir / "runs"),
            "flow": arm_cost(Path(flow_runs) if flow_runs else flow_dir / "runs")}
    text = markdown(edm, flow, cost, (str(edm_dir), str(flow_dir)), (read_slopes(edm_dir), read_slopes(flow_dir)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    se, sf = summary(edm, "generated"), summary(flow, "generated")
    parts = [f"{p}: p<0.05 EDM {se[p]['significant']}/{se[p]['comparisons']}, flow "
             f"{sf.get(p, {}).get('significant', '–')}/{sf.get(p, {}).get('comparisons', '–')}, mean |Δ| EDM "
             f"{se[p]['mean_abs_pct']:.1f} %, flow {sf.get(p, {}).get('mean_abs_pct', math.nan):.1f} %" for p in se]
    print(f"{out}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
