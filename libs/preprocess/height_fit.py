"""Height law for the cascade: body length (slices) = a · height_m + b, fitted robustly (RANSAC)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from ..cohort import Cohort
from ..files import atomic_path, atomic_write_text
from ..volumes import spacing_of
from .errors import PreprocessError

MIN_SUBJECTS = 10


@dataclass(frozen=True)
class HeightFit:
    """slices = a · height_m + b (slices of ``slice_mm``); R² on the inliers; inlier mask per point."""

    a: float
    b: float
    slice_mm: float
    r2_inliers: float
    inliers: np.ndarray


def cohort_lengths(cohort_dir: str | os.PathLike, slice_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Heights (m) and body lengths (z extent of each CT in slices of ``slice_mm``) of a cohort."""
    cohort = Cohort(cohort_dir)
    heights, lengths, ids = [], [], []
    for demo in cohort.demographics():
        img = nib.load(str(cohort.path("ct", demo.subject_id)))
        zooms = spacing_of(img.affine)
        axis = int(np.argmax(np.abs(img.affine[2, :3])))       # the array axis that runs along S
        heights.append(demo.height_m)
        lengths.append(img.shape[axis] * zooms[axis] / slice_mm)
        ids.append(demo.subject_id)
    return np.asarray(heights), np.asarray(lengths), ids


def fit_height_law(heights: np.ndarray, lengths: np.ndarray, slice_mm: float = 2.0,
                   residual_threshold: float | None = None, seed: int = 0) -> HeightFit:
    """RANSAC line through (height, length); the threshold defaults to sklearn's (the MAD of the lengths)."""
    from sklearn.linear_model import LinearRegression, RANSACRegressor

    if len(heights) < MIN_SUBJECTS:
        raise PreprocessError(f"{len(heights)} subjects: at least {MIN_SUBJECTS} are needed for a height fit")
    x = np.asarray(heights, float).reshape(-1, 1)
    y = np.asarray(lengths, float)
    model = RANSACRegressor(LinearRegression(), residual_threshold=residual_threshold, random_state=seed)
    model.fit(x, y)
    inliers = model.inlier_mask_
    a, b = float(model.estimator_.coef_[0]), float(model.estimator_.intercept_)
    pred = a * x[inliers, 0] + b
    ss_res = float(((y[inliers] - pred) ** 2).sum())
    ss_tot = float(((y[inliers] - y[inliers].mean()) ** 2).sum())
    return HeightFit(a, b, slice_mm, 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), inliers)


def write_height_yaml(path: str | os.PathLike, fit: HeightFit) -> Path:
    """The low-resolution config section ``height_law: {a, b, slice_mm}`` (libs.lowres.HeightLaw)."""
    text = yaml.safe_dump({"height_law": {"a": round(fit.a, 4), "b": round(fit.b, 4), "slice_mm": fit.slice_mm}},
                          sort_keys=False)
    atomic_write_text(path, text)
    return Path(path)


def scatter_plot(path: str | os.PathLike, heights: np.ndarray, lengths: np.ndarray, fit: HeightFit) -> Path:
    """Heights vs lengths, inliers and outliers marked, with the fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(heights[fit.inliers], lengths[fit.inliers], s=12, label="inliers")
    ax.scatter(heights[~fit.inliers], lengths[~fit.inliers], s=12, marker="x", color="tab:red", label="outliers")
    h = np.linspace(heights.min(), heights.max(), 50)
    ax.plot(h, fit.a * h + fit.b, color="k",
            label=f"{fit.a:.2f}·h + {fit.b:.2f}  (R² {fit.r2_inliers:.3f})")
    ax.set_xlabel("height (m)")
    ax.set_ylabel(f"body length (slices of {fit.slice_mm:g} mm)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
