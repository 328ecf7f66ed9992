"""The paired-metrics job over two cohorts: one tidy row per subject × target × metric, resumable.

Targets are organ names (Dice, HD95 from ``labels/``) and ``ct`` / ``suv`` (MAE, PSNR, SSIM inside the
body).  The CSV is rewritten after each subject; rerunning reuses a subject's rows only when the table's
manifest (:mod:`libs.manifest`) records the same fingerprint: both subjects' file contents, the metrics and
organs asked for, and the code version of the metrics.  A summary (n, mean, SD, median, min, max of the
finite values, and the count of infinite ones) goes next to it as ``<name>_summary.csv``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..cohort import Cohort, Subject
from ..labels import label_id, total_class_map
from ..manifest import claim, code_version, file_hash, fingerprint
from . import paired
from .errors import EvaluationError
from .organ_stats import check_not_cohort_file
from .paired import CT_WINDOW_HU, METRICS, SUV_WINDOW, dice, hausdorff95, image_metrics, on_grid_of, union_body
from .tables import SubjectTable, write_csv

DEFAULT_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "heart")
LABEL_METRICS = ("dice", "hausdorff")
IMAGE_METRICS = ("psnr", "ssim", "mae")
UNITS = {("ct", "mae"): "HU", ("suv", "mae"): "SUV", "psnr": "dB", "hausdorff": "mm", "dice": "", "ssim": ""}
COLUMNS = ["subject_id", "target", "metric", "value", "unit", "resampled", "note"]
SUMMARY_COLUMNS = ["target", "metric", "unit", "n", "n_infinite", "mean", "sd", "median", "min", "max"]
KINDS = ("ct", "suv", "labels")
METRICS_CODE = code_version(paired)          # editing a metric invalidates its stored rows


@dataclass
class PairedReport:
    """What a paired job did."""

    rows: list[dict] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def parse_metrics(values) -> tuple[str, ...]:
    """Metric names from comma/space separated strings; EvaluationError names an unknown one."""
    names = [v for text in values for v in str(text).replace(",", " ").split()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names)) or METRICS


def _row(sid: str, target: str, metric: str, value: float, resampled: bool, note: str = "") -> dict:
    unit = UNITS.get((target, metric), UNITS.get(metric, ""))
    return {"subject_id": sid, "target": target, "metric": metric, "value": value, "unit": unit,
            "resampled": resampled, "note": note}


def _label_rows(sid: str, a: Subject, b: Subject, metrics, organs, resampled: bool) -> list[dict]:
    wanted = [m for m in metrics if m in LABEL_METRICS]
    if a.labels is None or b.labels is None:
        note = "no labels in " + " and ".join(n for n, s in (("a", a), ("b", b)) if s.labels is None)
        return [_row(sid, o, m, math.nan, resampled, note) for o in organs for m in wanted]
    lab_b, _ = on_grid_of(a.labels, b.labels, "labels")
    rows = []
    for organ in organs:
        ma, mb = a.labels.array == label_id(organ), lab_b == label_id(organ)
        note = "" if ma.any() and mb.any() else "empty in " + " and ".join(
            n for n, m in (("a", ma), ("b", mb)) if not m.any())
        for metric in wanted:
            value = dice(ma, mb) if metric == "dice" else hausdorff95(ma, mb, a.labels.spacing)
            rows.append(_row(sid, organ, metric, value, resampled, note))
    return rows


def subject_rows(sid: str, a: Subject, b: Subject, metrics: tuple[str, ...], organs: tuple[str, ...]
                 ) -> tuple[list[dict], bool]:
    """Rows of one subject pair and whether b had to be resampled onto a's grid."""
    ct_b, resampled = on_grid_of(a.ct, b.ct, "ct")
    suv_b, _ = on_grid_of(a.ct, b.suv, "suv")
    rows = []
    if any(m in LABEL_METRICS for m in metrics):
        rows += _label_rows(sid, a, b, metrics, organs, resampled)
    image = tuple(m for m in metrics if m in IMAGE_METRICS)
    if image:
        body = union_body(a.ct.array, ct_b)
        for target, arr_a, arr_b, window in (("ct", a.ct.array, ct_b, CT_WINDOW_HU),
                                             ("suv", a.suv.array, suv_b, SUV_WINDOW)):
            values = image_metrics(arr_a, arr_b, body, window, image)
            rows += [_row(sid, target, m, values[m], resampled) for m in image]
    return rows, resampled


def _pairs(cohort_a: Cohort, cohort_b: Cohort, report: PairedReport):
    recs_a, recs_b = cohort_a.demographics(), {d.subject_id: d for d in cohort_b.demographics()}
    ids_a = {d.subject_id for d in recs_a}
    report.only_a = [d.subject_id for d in recs_a if d.subject_id not in recs_b]
    report.only_b = [s for s in recs_b if s not in ids_a]
    pairs = [(d, recs_b[d.subject_id]) for d in recs_a if d.subject_id in recs_b]
    if not pairs:
        raise EvaluationError(f"{cohort_a.root} and {cohort_b.root} share no subject id")
    return pairs


def run_paired(a_dir, b_dir, out_csv, metrics=METRICS, organs=DEFAULT_ORGANS, overwrite=False, progress=True
               ) -> PairedReport:
    """Paired metrics of cohort ``b_dir`` against ``a_dir`` into ``out_csv`` (and its summary)."""
    for d in (a_dir, b_dir):
        if not (Path(d) / "demographics.csv").is_file():
            raise EvaluationError(f"{Path(d) / 'demographics.csv'}: not found; is {d} a cohort directory?")
    check_organs(organs)
    cohort_a, cohort_b, report, start = Cohort(a_dir), Cohort(b_dir), PairedReport(), time.perf_counter()
    for cohort in (cohort_a, cohort_b):
        check_not_cohort_file(cohort, out_csv)
    pairs = _pairs(cohort_a, cohort_b, report)
    order = [d.subject_id for d, _ in pairs]
    made = claim(out_csv, "paired-metrics", folder=False, overwrite=overwrite)
    table = SubjectTable(out_csv, COLUMNS, ("subject_id", "target", "metric", "unit", "resampled", "note"), overwrite)
    table.write(order)
    for demo_a, demo_b in tqdm(pairs, desc="paired metrics", unit="subj", disable=not progress):
        sid, stored = demo_a.subject_id, table.rows_of(demo_a.subject_id)
        fp = fingerprint({"a": {k: file_hash(cohort_a.path(k, sid)) for k in KINDS},
                          "b": {k: file_hash(cohort_b.path(k, sid)) for k in KINDS},
                          "metrics": list(metrics), "organs": list(organs), "code": METRICS_CODE})
        if stored and made.current(sid, fp):
            report.reused.append(sid)
            report.resampled += [sid] if stored[0]["resampled"] == "True" else []
            continue
        try:
            made.forget(sid)
            rows, resampled = subject_rows(sid, cohort_a.load(demo_a), cohort_b.load(demo_b), tuple(metrics),
                                           tuple(organs))
            table.put(sid, rows, order)
            made.record(sid, fp)
            report.computed.append(sid)
            report.resampled += [sid] if resampled else []
        except Exception as exc:  # noqa: BLE001 - one subject's failure is reported, the others go on
            report.failed[sid] = f"{type(exc).__name__}: {exc}"
    table.write([s for s in order if s not in report.failed])
    report.rows = [r for s in order if s not in report.failed for r in (table.rows_of(s) or [])]
    write_csv(summary_path(out_csv), summarize(report.rows), SUMMARY_COLUMNS)
    report.seconds = time.perf_counter() - start
    return report


def check_organs(organs) -> None:
    """EvaluationError naming the first organ that is not a TotalSegmentator 'total' class."""
    known = total_class_map()
    for organ in organs:
        if organ not in known:
            raise EvaluationError(f"organ {organ!r} is not a TotalSegmentator 'total' class")


def summary_path(out_csv: str | os.PathLike) -> Path:
    """``<dir>/<stem>_summary.csv`` next to the per-subject CSV."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name.removesuffix(".csv") + "_summary.csv")


def summarize(rows: list[dict]) -> list[dict]:
    """Per (target, metric): n and statistics of the finite values, and how many were infinite."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["metric"]), []).append(r)
    out = []
    for (target, metric), rs in groups.items():
        vals = np.array([r["value"] for r in rs], dtype=float)
        fin = vals[np.isfinite(vals)]
        stats = {"mean": math.nan, "sd": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
        if fin.size:
            stats.update(mean=float(fin.mean()), median=float(np.median(fin)), min=float(fin.min()),
                         max=float(fin.max()), sd=float(fin.std(ddof=1)) if fin.size > 1 else math.nan)
        out.append({"target": target, "metric": metric, "unit": rs[0]["unit"], "n": int(fin.size),
                    "n_infinite": int(np.isinf(vals).sum()), **stats})
    return out
