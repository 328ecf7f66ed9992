"""Preview figures: per-subject PET/CT sheets and cohort demographic distributions (PNG, matplotlib Agg).

Figures are built with matplotlib's object API (no pyplot state), so generation may write previews from its
writer thread.

Coronal views are shown in radiological convention: the subject's right on the image's left,
superior at the top, with the true aspect ratio of the voxel spacing.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .demographics import Demographics
from .files import atomic_path


def coronal(volume: np.ndarray) -> np.ndarray:
    """A coronal image ``[x, z]`` → display rows top = superior, columns left = subject's right."""
    return volume.T[::-1, ::-1]


def _title(d: Demographics) -> str:
    return (f"{d.subject_id}: {d.sex}, {d.age_years:.0f} y, {100 * d.height_m:.0f} cm, "
            f"{d.weight_kg:.0f} kg, BMI {d.bmi:.1f}")


def draw_outlines(ax, labels_slice: np.ndarray, aspect: float) -> None:
    """Outline each label id of a coronal ``[x, z]`` label slice on ``ax`` (one colour per id)."""
    image = coronal(labels_slice)
    ids = [int(v) for v in np.unique(image) if v != 0]
    cmap = matplotlib.colormaps["tab20"]
    for k, idx in enumerate(ids):
        ax.contour((image == idx).astype(np.float32), levels=[0.5], colors=[cmap(k % 20)], linewidths=0.6)
    ax.set_aspect(aspect)


def body_centre_y(ct_hu: np.ndarray) -> int:
    """Index of the coronal slice through the body's front-to-back centre: the middle of the y extent of the
    evaluation's body mask (the largest connected region above −500 HU, so a stray voxel in the air around a
    generated body does not move it); the volume's middle when there is no body."""
    from .evaluation.body import body_mask

    ys = np.flatnonzero(body_mask(ct_hu).any(axis=(0, 2)))
    return int((ys[0] + ys[-1]) // 2) if ys.size else ct_hu.shape[1] // 2


def preview_sheet(path: str | os.PathLike, demo: Demographics, ct_hu: np.ndarray, suv: np.ndarray,
                  spacing_mm: tuple[float, float, float], suv_max: float = 10.0,
                  labels: np.ndarray | None = None) -> Path:
    """Coronal CT slice (through the body's AP centre) + coronal PET MIP, demographics in the title; with
    ``labels`` (TotalSegmentator ids, CT grid) the organ outlines of that slice are drawn over the CT."""
    y_mid = body_centre_y(ct_hu)
    aspect = spacing_mm[2] / spacing_mm[0]
    fig = Figure(figsize=(6.4, 5.2), dpi=110)
    axes = fig.subplots(1, 2)
    axes[0].imshow(coronal(ct_hu[:, y_mid, :]), cmap="gray", vmin=-500, vmax=500, aspect=aspect,
                   interpolation="nearest")
    axes[0].set_title("CT coronal (HU −500…500)" + (", organ outlines" if labels is not None else ""), fontsize=8)
    if labels is not None:
        draw_outlines(axes[0], labels[:, y_mid, :], aspect)
    axes[1].imshow(coronal(suv.max(axis=1)), cmap="gray_r", vmin=0, vmax=suv_max, aspect=aspect,
                   interpolation="nearest")
    axes[1].set_title(f"PET MIP (SUV 0…{suv_max:g})", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.02, "R", color="tab:orange", transform=ax.transAxes, fontsize=8)
    fig.suptitle(_title(demo), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def distribution_figure(path: str | os.PathLike, cohorts: dict[str, list[Demographics]]) -> Path:
    """Histograms of height, weight and BMI by sex for one or more cohorts (one row per cohort)."""
    names = list(cohorts)
    fig = Figure(figsize=(9, 2.6 * len(names)), dpi=110)
    axes = fig.subplots(len(names), 3, squeeze=False)
    measures = (("height (cm)", lambda d: 100 * d.height_m, np.arange(145, 206, 5)),
                ("weight (kg)", lambda d: d.weight_kg, np.arange(45, 106, 5)),
                ("BMI (kg/m²)", lambda d: d.bmi, np.arange(12, 46, 2)))
    for row, name in enumerate(names):
        for col, (label, fn, bins) in enumerate(measures):
            ax = axes[row, col]
            for sex, colour in (("M", "tab:blue"), ("F", "tab:red")):
                vals = [fn(d) for d in cohorts[name] if d.sex == sex]
                ax.hist(vals, bins=bins, alpha=0.55, color=colour, label=f"{sex} (n={len(vals)})")
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"{name}\nsubjects", fontsize=8)
            if col == 2:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
