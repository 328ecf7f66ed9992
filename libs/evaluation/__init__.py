"""Evaluation of synthetic PET/CT cohorts (the paper's protocol and a few label-free extras).

Modules
-------
* :mod:`.errors`     — :class:`EvaluationError` and the scripts' one-line error guard.
* :mod:`.segment`    — TotalSegmentator (Python API) on a cohort's CT, offline-safe: weights are checked
  before anything runs, downloads and usage statistics are switched off.
* :mod:`.measures`   — per-organ measures (volume mL, SUVmean / SUVmax / SUVpeak, mean HU).
* :mod:`.body`       — label-free whole-body measures from CT alone (body mask, length, fat, lung air).
* :mod:`.organ_stats` — one subject → table rows; a whole cohort → a resumable CSV.
* :mod:`.statistics` — Welch t, one-way ANOVA, Kolmogorov–Smirnov, Cohen's d, least squares.
* :mod:`.compare`    — the paper's cohort comparison by sex, age and BMI, and demographic response slopes.
* :mod:`.figures`    — violin plots, demographic distributions, preview sheets (PNG).
* :mod:`.paired`     — Dice, HD95, PSNR, SSIM, MAE between two cohorts with the same subject ids.
* :mod:`.tables`     — tidy CSV / Markdown output and the resumable per-subject table.

All volumes follow :mod:`libs.volumes`: arrays ``[x, y, z]`` in RAS+, spacing from the affine (mm),
CT in HU, PET in SUVbw.  Every SUV statistic clips SUV to [0, 25] first, as the paper did.
"""

from .errors import EvaluationError, SegmenterWeightsError, guarded

__all__ = ["EvaluationError", "SegmenterWeightsError", "guarded"]
