"""Figures of the cohort comparison (PNG, matplotlib Agg, written atomically).

* :func:`violin_figure` — the layout of the paper's results figure: one panel per region × measure,
  violins grouped by sex, one violin per cohort in each group (reference first).
* :func:`demographics_figure` — age, height, weight and BMI histograms per sex, cohorts overlaid.
* :func:`preview_grid` — a few subjects per cohort (coronal CT slice + coronal PET MIP), one row
  per cohort, subjects chosen evenly across the cohort's BMI range.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..cohort import Cohort  # noqa: E402
from ..demographics import Demographics  # noqa: E402
from ..files import atomic_path  # noqa: E402
from ..previews import body_centre_y, coronal, draw_outlines  # noqa: E402
from ..volumes import VolumeError  # noqa: E402

MEASURE_LABELS = {
    "volume_ml": "volume (mL)", "suv_mean": "SUVmean", "suv_max": "SUVmax", "suv_peak": "SUVpeak",
    "hu_mean": "mean HU", "length_mm": "length (mm)", "fat_volume_ml": "fat (mL)",
    "sat_volume_ml": "subcutaneous fat (mL)", "lung_volume_ml": "lung (mL)", "suv_sd": "SUV SD",
    "suv_p50": "SUV median", "suv_p90": "SUV p90", "suv_p99": "SUV p99",
}
COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
SEXES = (("F", "female"), ("M", "male"))


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _violin(ax, values: np.ndarray, pos: float, colour: str) -> None:
    """One violin (or the points themselves when a kernel density is undefined)."""
    if values.size >= 2 and np.ptp(values) > 0:
        parts = ax.violinplot([values], positions=[pos], widths=0.8, showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(colour)
            body.set_alpha(0.6)
        parts["cmedians"].set_color("black")
    elif values.size:
        ax.scatter(np.full(values.size, pos), values, s=10, color=colour)


def violin_panel(ax, samples: list[np.ndarray], sexes: list[np.ndarray], names: list[str], title: str) -> None:
    """Violins grouped by sex (F, M), one per cohort; ``samples[i]`` and ``sexes[i]`` belong to cohort i."""
    width = len(names) + 1
    for g, (code, _) in enumerate(SEXES):
        for i, (values, sex) in enumerate(zip(samples, sexes)):
            _violin(ax, values[sex == code], g * width + i, COLOURS[i % len(COLOURS)])
    ax.set_xticks([g * width + (len(names) - 1) / 2 for g in range(len(SEXES))], [s[1] for s in SEXES], fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def violin_figure(path: str | os.PathLike, cohorts, panels: list[tuple[str, str]], ncols: int) -> Path:
    """Panels of region × measure violins for ``cohorts`` (list of :class:`CohortRecords`, reference first)."""
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.3 * nrows + 0.5), dpi=110, squeeze=False)
    names = [c.name for c in cohorts]
    for ax, (region, measure) in zip(axes.ravel(), panels):
        recs = [c.values.get((region, measure), []) for c in cohorts]
        samples = [np.array([r["value"] for r in rs], dtype=float) for rs in recs]
        sexes = [np.array([r["sex"] for r in rs], dtype=object) for rs in recs]
        violin_panel(ax, samples, sexes, names, f"{region} — {MEASURE_LABELS.get(measure, measure)}")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[i % len(COLOURS)], alpha=0.6) for i in range(len(names))]
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.3 * nrows + 0.5)))
    return _save(fig, path)


def demographics_figure(path: str | os.PathLike, cohorts: dict[str, list[Demographics]]) -> Path:
    """Histograms (density) of age, height, weight and BMI; rows F / M; the first cohort (the reference) as
    filled bars, the others overlaid as steps — so a cohort generated from the reference's demographics
    shows as a step outline exactly on the filled bars."""
    measures = (("age (y)", lambda d: d.age_years, np.arange(15, 106, 5)),
                ("height (cm)", lambda d: 100 * d.height_m, np.arange(140, 211, 5)),
                ("weight (kg)", lambda d: d.weight_kg, np.arange(30, 161, 5)),
                ("BMI (kg/m²)", lambda d: d.bmi, np.arange(12, 52, 2)))
    fig, axes = plt.subplots(2, 4, figsize=(11, 4.8), dpi=110)
    for row, (code, label) in enumerate(SEXES):
        for col, (xlabel, fn, bins) in enumerate(measures):
            ax = axes[row, col]
            for i, (name, records) in enumerate(cohorts.items()):
                vals = [fn(d) for d in records if d.sex == code]
                if vals:
                    style = {"histtype": "stepfilled", "alpha": 0.35} if i == 0 else {"histtype": "step"}
                    ax.hist(vals, bins=bins, density=True, linewidth=1.4, color=COLOURS[i % len(COLOURS)],
                            label=f"{name} (n={len(vals)})", **style)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"{label}\ndensity", fontsize=8)
            if col == 3:
                ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def pick_subjects(records: list[Demographics], k: int) -> list[Demographics]:
    """``k`` subjects spread evenly over the BMI ranking (lowest and highest included)."""
    ranked = sorted(records, key=lambda d: (d.bmi, d.subject_id))
    if len(ranked) <= k:
        return ranked
    return [ranked[int(round(i))] for i in np.linspace(0, len(ranked) - 1, k)]


def _draw_subject(ax_ct, ax_pet, cohort: Cohort, demo: Demographics, suv_max: float) -> None:
    subject = cohort.load(demo, labels=True)
    ct, suv, sp = subject.ct.array, subject.suv.array, subject.ct.spacing
    y_mid = body_centre_y(ct)
    aspect = sp[2] / sp[0]
    ax_ct.imshow(coronal(ct[:, y_mid, :]), cmap="gray", vmin=-500, vmax=500, aspect=aspect, interpolation="nearest")
    ax_pet.imshow(coronal(suv.max(axis=1)), cmap="gray_r", vmin=0, vmax=suv_max, aspect=aspect,
                  interpolation="nearest")
    ax_ct.set_title(f"{demo.subject_id}\n{demo.sex} {demo.age_years:.0f} y BMI {demo.bmi:.1f}", fontsize=6)
    if subject.labels is not None:                    # organ outlines of the same slice
        draw_outlines(ax_ct, subject.labels.array[:, y_mid, :], aspect)


def preview_grid(path: str | os.PathLike, cohorts: dict[str, Cohort], k: int = 4, suv_max: float = 10.0) -> Path:
    """Rows = cohorts, ``k`` subjects each as (coronal CT −500…500 HU with the organ outlines of subjects that
    have labels, coronal PET MIP 0…suv_max)."""
    picks = {name: pick_subjects(c.demographics(), k) for name, c in cohorts.items()}
    ncols = 2 * max(1, max(len(p) for p in picks.values()))
    fig, axes = plt.subplots(len(cohorts), ncols, figsize=(1.3 * ncols, 3.0 * len(cohorts)), dpi=110, squeeze=False)
    for row, (name, cohort) in enumerate(cohorts.items()):
        for j, demo in enumerate(picks[name]):
            try:
                _draw_subject(axes[row, 2 * j], axes[row, 2 * j + 1], cohort, demo, suv_max)
            except VolumeError as exc:  # an unreadable subject leaves a note, not a missing figure
                axes[row, 2 * j].text(0.5, 0.5, f"{demo.subject_id}\nunreadable", ha="center", fontsize=6)
                axes[row, 2 * j].set_title(str(exc)[:40], fontsize=5)
        axes[row, 0].set_ylabel(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_frame_on(False)
    fig.tight_layout()
    return _save(fig, path)
