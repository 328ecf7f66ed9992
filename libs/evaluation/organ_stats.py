"""Organ and whole-body statistics of a cohort directory as one tidy CSV.

One row per subject × region.  Organ regions (``liver``, ``spleen``, ``kidney_left``, ``kidney_right``,
``kidneys`` = both, ``heart``) need ``labels/<id>.nii.gz`` and fill the columns of
:data:`libs.evaluation.measures.MEASURES`; the ``body`` region needs CT only and fills
:data:`libs.evaluation.body.BODY_MEASURES`.  Cells that do not apply to a region are empty.
Demographics ride along on every row, so the file alone is enough for the cohort comparison.

The CSV is rewritten after each subject; rerunning reuses a subject's rows only when the table's manifest
(:mod:`libs.manifest`, ``<table>.manifest.json``) records the same fingerprint: the content hashes of its
CT, SUV and label files, its demographics and the code version of the measures.  ``overwrite``
recomputes everything; a CSV this job did not write is refused unless ``overwrite``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..cohort import Cohort
from ..demographics import Demographics
from ..manifest import claim, code_version, file_hash, fingerprint
from . import body, measures
from .body import BODY_MEASURES, body_measures
from .errors import EvaluationError
from .measures import MEASURES, ORGAN_REGIONS, organ_measures, region_mask
from .tables import SubjectTable, read_csv

ID_COLUMNS = ["subject_id", "sex", "age_years", "height_m", "weight_kg", "bmi", "region", "n_voxels"]
VALUE_COLUMNS = list(dict.fromkeys([*MEASURES, *BODY_MEASURES]))
COLUMNS = ID_COLUMNS + VALUE_COLUMNS
TEXT_COLUMNS = ("subject_id", "sex", "region")
BODY_REGION = "body"
KINDS = ("ct", "suv", "labels", "meta", "previews")
MEASURES_CODE = code_version(body, measures)      # editing a measure invalidates its stored rows


@dataclass
class StatsReport:
    """What a statistics job did; ``rows`` is the whole table in cohort order."""

    rows: list[dict] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _demographic_cells(demo: Demographics) -> dict:
    return {"subject_id": demo.subject_id, "sex": demo.sex, "age_years": demo.age_years,
            "height_m": demo.height_m, "weight_kg": demo.weight_kg, "bmi": demo.bmi}


def subject_rows(cohort: Cohort, demo: Demographics) -> list[dict]:
    """The rows of one subject: ``body`` always, the organ regions when the subject has labels."""
    subject = cohort.load(demo, labels=True)
    ct, suv, affine = subject.ct.array, subject.suv.array, subject.ct.affine
    base = _demographic_cells(demo)
    rows = [base | {"region": BODY_REGION} | body_measures(ct, suv, affine)]
    if subject.labels is not None:
        for region in ORGAN_REGIONS:
            mask = region_mask(subject.labels.array, region)
            rows.append(base | {"region": region} | organ_measures(mask, ct, suv, affine))
    return rows


LABEL_SOURCES = ("generated", "segmenter", "provided")


def label_source(cohort: Cohort, subject_id: str) -> str | None:
    """Where a subject's labels come from: 'generated' (the cascade's sidecar says so), 'segmenter'
    (``3_Evaluations/1_segment.py`` recorded them in labels/manifest.json), 'provided' (shipped with the
    cohort: phantom ground truth, preprocessing) — None without labels."""
    import json

    from ..manifest import manifest_path, read_manifest
    if not cohort.has_labels(subject_id):
        return None
    try:
        meta = json.loads(cohort.path("meta", subject_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and isinstance(meta.get("labels"), dict) and meta["labels"].get("source") == "generated":
        return "generated"
    from .segment import SEGMENT_JOB
    made = read_manifest(manifest_path(cohort.root / "labels", folder=True), SEGMENT_JOB)
    return "segmenter" if made is not None and subject_id in made.entries else "provided"


def label_sources(cohort: Cohort) -> dict[str, int]:
    """Subjects per label source (see :func:`label_source`), including 'none' for subjects without labels."""
    counts: dict[str, int] = {}
    for d in cohort.demographics():
        src = label_source(cohort, d.subject_id) or "none"
        counts[src] = counts.get(src, 0) + 1
    return counts


def subject_fingerprint(cohort: Cohort, demo: Demographics) -> str:
    """What a subject's rows depend on: its files' content, its demographics, the measures' code."""
    files = {kind: file_hash(cohort.path(kind, demo.subject_id)) for kind in ("ct", "suv", "labels")}
    return fingerprint({"files": files, "demographics": _demographic_cells(demo), "code": MEASURES_CODE})


def check_not_cohort_file(cohort: Cohort, out: str | os.PathLike) -> None:
    """Refuse an output path that is one of the cohort's own files (its demographics.csv, a volume)."""
    out = Path(out).resolve()
    root = cohort.root.resolve()
    if out == cohort.demographics_path.resolve() or (out.parent.parent == root and out.parent.name in KINDS):
        raise EvaluationError(f"{out}: is a file of the cohort {cohort.root} itself; write the table elsewhere")


def cohort_stats(cohort_dir: str | os.PathLike, out_csv: str | os.PathLike, overwrite: bool = False,
                 progress: bool = True, desc: str = "organ stats") -> StatsReport:
    """Compute (or resume) the statistics table of a cohort into ``out_csv``; the cohort is only read.

    A subject that fails (missing or corrupt file) is reported in ``failed`` and the others go on.
    """
    cohort, report, start = Cohort(cohort_dir), StatsReport(), time.perf_counter()
    if not cohort.demographics_path.is_file():
        raise EvaluationError(f"{cohort.demographics_path}: not found; is {cohort_dir} a cohort directory?")
    check_not_cohort_file(cohort, out_csv)
    records = cohort.demographics()
    order = [d.subject_id for d in records]
    made = claim(out_csv, "organ-stats", folder=False, overwrite=overwrite)
    table = SubjectTable(out_csv, COLUMNS, TEXT_COLUMNS, fresh=overwrite)
    table.write(order)
    for demo in tqdm(records, desc=desc, unit="subj", disable=not progress):
        sid, labelled = demo.subject_id, cohort.has_labels(demo.subject_id)
        if not labelled:
            report.unlabeled.append(sid)
        fp = subject_fingerprint(cohort, demo)
        if table.rows_of(sid) and made.current(sid, fp):
            report.reused.append(sid)
            continue
        try:
            made.forget(sid)
            table.put(sid, subject_rows(cohort, demo), order)
            made.record(sid, fp)
            report.computed.append(sid)
        except Exception as exc:  # noqa: BLE001 - one subject's failure is reported, the others go on
            report.failed[sid] = f"{type(exc).__name__}: {exc}"
    table.write([s for s in order if s not in report.failed])
    report.rows = [r for sid in order if sid not in report.failed for r in (table.rows_of(sid) or [])]
    report.seconds = time.perf_counter() - start
    return report


def read_stats_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a statistics CSV written by :func:`cohort_stats` (numbers parsed, NaN for empty cells)."""
    header, rows = read_csv(path, TEXT_COLUMNS)
    missing = [c for c in ("subject_id", "sex", "region") if c not in header]
    if missing:
        raise EvaluationError(f"{path}: not an organ statistics CSV (missing column {missing[0]!r})")
    return rows


def describe_report(report: StatsReport, out_csv: str | os.PathLike, n_subjects: int) -> list[str]:
    """Human-readable summary lines of a statistics job (for the scripts)."""
    lines = [f"{Path(out_csv)}: {len(report.computed)} computed, {len(report.reused)} reused, "
             f"{len(report.failed)} failed of {n_subjects} subjects in {report.seconds:.1f} s"]
    if report.unlabeled:
        lines.append(f"  {len(report.unlabeled)} subject(s) have no labels/<id>.nii.gz: whole-body (label-free) "
                     "rows only — run 3_Evaluations/1_segment.py for organ rows")
    lines += [f"  failed {sid}: {reason}" for sid, reason in report.failed.items()]
    return lines
