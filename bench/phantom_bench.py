#!/usr/bin/env python
"""Phantom generator benchmark: seconds per subject (one CPU core) and organ volumes vs ICRP-89.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/phantom_bench.py --n 100 --spacing-mm 4

Prints medians (speed) and, per organ and sex, the mean labelled volume of the cohort, the mean of the
BSA-scaled ICRP expectation for the same subjects, the ICRP-89 reference volume, and the male/female
ratio next to ICRP's.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import click
import numpy as np

from libs.labels import label_id
from libs.phantom import expected_volume_ml, make_phantom, reference_volume_ml
from libs.phantom.writer import _write_one, sampled_demographics

ORGANS = {"liver": ["liver"], "spleen": ["spleen"], "kidneys (both)": ["kidney_left", "kidney_right"],
          "heart": ["heart"], "pancreas": ["pancreas"]}
ICRP_KEY = {"liver": "liver", "spleen": "spleen", "kidneys (both)": "kidney", "heart": "heart", "pancreas": "pancreas"}


def _speed(spacing: float, n: int, seed: int) -> dict:
    subjects = sampled_demographics(n, seed)
    gen, full = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for d in subjects:
            t0 = time.perf_counter()
            make_phantom(d, seed, spacing)
            t1 = time.perf_counter()
            _write_one(tmp, d, seed, spacing, None)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            full.append(t2 - t1)
    return {"spacing_mm": spacing, "n": n, "median_s_generate": statistics.median(gen),
            "median_s_generate_and_write": statistics.median(full),
            "subjects_per_s_with_write": 1.0 / statistics.median(full)}


def _volumes(n: int, seed: int, spacing: float) -> list[dict]:
    rows = []
    for d in sampled_demographics(n, seed):
        ph = make_phantom(d, seed, spacing)
        voxel_ml = spacing**3 / 1000.0
        for organ, names in ORGANS.items():
            vol = sum(int((ph.labels == label_id(nm)).sum()) for nm in names) * voxel_ml
            factor = 2.0 if organ.startswith("kidneys") else 1.0
            rows.append({"organ": organ, "sex": d.sex, "labelled_ml": vol,
                         "expected_ml": factor * expected_volume_ml(ICRP_KEY[organ], d),
                         "icrp_ml": factor * reference_volume_ml(ICRP_KEY[organ], d.sex)})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| organ | sex | n | labelled mL (mean ± sd) | BSA-scaled ICRP mL | ICRP-89 ref mL "
             "| M/F labelled | M/F ICRP |", "|---|---|---|---|---|---|---|---|"]
    for organ in ORGANS:
        labelled = {}
        for sex in ("M", "F"):
            sel = [r for r in rows if r["organ"] == organ and r["sex"] == sex]
            v = np.array([r["labelled_ml"] for r in sel])
            labelled[sex] = v.mean()
            ratios = ""
            if sex == "F":
                icrp = reference_volume_ml(ICRP_KEY[organ], "M") / reference_volume_ml(ICRP_KEY[organ], "F")
                ratios = f"{labelled['M'] / labelled['F']:.2f} | {icrp:.2f}"
            lines.append(f"| {organ} | {sex} | {len(sel)} | {v.mean():.0f} ± {v.std(ddof=1):.0f} | "
                         f"{np.mean([r['expected_ml'] for r in sel]):.0f} | {sel[0]['icrp_ml']:.0f} | "
                         f"{ratios or ' | '} |")
    return "\n".join(lines)


@click.command()
@click.option("--n", default=100, show_default=True, help="Subjects for the organ-volume statistics.")
@click.option("--spacing-mm", default=4.0, show_default=True, help="Spacing for the organ-volume statistics.")
@click.option("--speed-n", default=10, show_default=True, help="Subjects timed per spacing.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
def main(n, spacing_mm, speed_n, seed, json_out):
    speed = [_speed(s, speed_n, seed) for s in (8.0, 4.0, 2.0)]
    for s in speed:
        click.echo(f"{s['spacing_mm']:.0f} mm: generate {s['median_s_generate']:.2f} s, generate+write "
                   f"{s['median_s_generate_and_write']:.2f} s (median of {s['n']}), "
                   f"{s['subjects_per_s_with_write']:.2f} subjects/s")
    rows = _volumes(n, seed, spacing_mm)
    click.echo(f"\nOrgan volumes of {n} phantom subjects at {spacing_mm:g} mm (seed {seed}):\n")
    click.echo(_table(rows))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump({"speed": speed, "volumes": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
