"""Organ labels for the work directory: TotalSegmentator (fast, offline wrapper of libs.evaluation.segment)
or existing segmentations (``--labels-from``), always written on the CT grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..evaluation.segment import choose_device, prepare, segment_ct, totalsegmentator_version
from ..manifest import claim, file_hash, fingerprint
from ..volumes import read_volume, same_grid, write_volume
from .crop import resample
from .errors import PreprocessError
from .jobs import JobReport, pending, run_jobs
from .work import WorkDir

LABELS_JOB = "labels"          # the manifest job of 2_segment_organs.py (work/labels/manifest.json)


def _subjects(work: WorkDir) -> list[str]:
    if not work.demographics_path.is_file():
        raise PreprocessError(f"{work.demographics_path}: not found; run 1_dicom_to_nifti.py first")
    return [d.subject_id for d in work.demographics()]


def has_labels(work: WorkDir, subject_id: str) -> bool:
    """True when the label file reads to its end and has the CT's shape (resume check)."""
    try:
        return read_volume(work.path("labels", subject_id)).shape == read_volume(work.path("ct", subject_id)).shape
    except Exception:  # noqa: BLE001 - any failure means "label this subject"
        return False


def _label_file_or_none(labels_dir: Path, subject_id: str) -> Path | None:
    try:
        return find_label_file(labels_dir, subject_id)
    except FileNotFoundError:
        return None


def find_label_file(labels_dir: Path, subject_id: str) -> Path:
    """``DIR/<id>.nii.gz`` or ``DIR/labels/<id>.nii.gz`` (a cohort directory)."""
    for path in (labels_dir / f"{subject_id}.nii.gz", labels_dir / "labels" / f"{subject_id}.nii.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {subject_id}.nii.gz in {labels_dir.name} or its labels/ folder")


def copy_labels(work_root: str, labels_dir: str, subject_id: str) -> None:
    """Existing labels onto the CT grid (nearest neighbour when the grids differ)."""
    work = WorkDir(work_root)
    ct = read_volume(work.path("ct", subject_id), "ct")
    labels = read_volume(find_label_file(Path(labels_dir), subject_id), "labels")
    array = labels.array if same_grid(ct, labels) else resample(labels, ct.shape, ct.affine, 0, 0)
    write_volume(work.path("labels", subject_id), np.asarray(array), ct.affine, "labels")


def segment_work(work_root: str | os.PathLike, labels_from: str | os.PathLike | None = None, device: str = "auto",
                 workers: int = 1, overwrite: bool = False, progress: bool = True) -> JobReport:
    """Write ``labels/<id>.nii.gz`` for every work-directory CT (resumable).

    TotalSegmentator runs the 'total' task in fast mode (3 mm, as in the paper) on all classes; its weights
    are checked before the first subject and never downloaded (:mod:`libs.evaluation.segment`)."""
    work, report = WorkDir(work_root), JobReport()
    subjects = _subjects(work)
    if labels_from is None:
        choose_device(device)                         # a bad --device is refused even when nothing is to do
    manifest = claim(work.root / "labels", LABELS_JOB, folder=True, overwrite=overwrite)
    keyed = {}
    for sid in subjects:
        if labels_from is not None:
            given = _label_file_or_none(Path(labels_from), sid)
            source = {"labels_from": file_hash(given) if given else None}
        else:
            source = {"totalsegmentator": totalsegmentator_version(), "fast": True, "roi": "all"}
        keyed[sid] = fingerprint({"ct": file_hash(work.path("ct", sid)), **source})
    todo = pending(keyed, manifest, lambda sid: has_labels(work, sid), overwrite, report)
    if labels_from is not None:
        tasks = [(sid, (str(work_root), str(labels_from), sid)) for sid in todo]
        return run_jobs(tasks, copy_labels, workers, "labels", progress, report, manifest, keyed)
    if not todo:
        return report
    segmenter = prepare(fast=True, roi=(), device=device)

    def one(sid: str) -> None:
        labels = segment_ct(work.path("ct", sid), segmenter)
        write_volume(work.path("labels", sid), labels.array, labels.affine, "labels")

    return run_jobs([(sid, (sid,)) for sid in todo], one, 1, "TotalSegmentator", progress, report, manifest, keyed)
