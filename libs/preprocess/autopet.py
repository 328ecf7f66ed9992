"""AutoPET / TCIA FDG-PET-CT-Lesions NIfTI release → work directory (same layout as the DICOM import).

A study is any folder under the input holding ``CT.nii.gz`` and ``SUV.nii.gz`` (the release also has
CTres, PET and SEG, which are not needed: SUV is already SUVbw, SEG holds lesions, not organs).  Its key is
its path relative to the input, e.g. ``PETCT_0af7ffe12a/08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445``;
the subject folder is the first part.

* age and sex: the metadata CSV (columns matched case-insensitively: ``Subject ID``, ``age``, ``sex``;
  optional ``Study Date``/``study``, used when a subject has several studies: its value must occur in the
  study folder name);
* height and weight: a user CSV with columns ``study`` (the key above, or the subject folder when it has one
  study), ``height_m``, ``weight_kg``; or the DICOM headers (PatientSize, PatientWeight) of the matching
  study folder of the DICOM release (``--dicom-root``, same folder names);
* rows lacking any of them are skipped with the reason in ``skipped.csv``.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ..demographics import Demographics, DemographicsError
from ..manifest import claim, code_version, file_stamp, fingerprint
from ..volumes import read_volume
from .convert import finish
from .dicom_io import subject_id_for
from .errors import PreprocessError, SkipStudy
from .jobs import JobReport, pending, run_jobs
from .patient import age_years
from .work import WORK_JOB, WorkDir

_SUBJECT_COLS = ("subject id", "subject_id", "subject", "patient id", "patient")
_STUDY_COLS = ("study date", "study_date", "study")


@dataclass(frozen=True)
class AutopetStudy:
    key: str           # path relative to the input (posix)
    folder: str        # absolute path
    subject_id: str


def _read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise PreprocessError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def _column(rows: list[dict], names, path, required=True) -> str | None:
    for name in names:
        if rows and name in rows[0]:
            return name
    if required:
        raise PreprocessError(f"{path}: no column {names[0]!r} (looked for {', '.join(names)})")
    return None


def find_studies(root: str | os.PathLike, salt: str = "") -> list[AutopetStudy]:
    root = Path(root)
    found = []
    for suv in sorted(root.rglob("SUV.nii.gz")):
        if (suv.parent / "CT.nii.gz").is_file():
            key = suv.parent.relative_to(root).as_posix()
            found.append(AutopetStudy(key, str(suv.parent), subject_id_for(key, salt)))
    if not found:
        raise PreprocessError(f"{root}: no study folder with CT.nii.gz and SUV.nii.gz")
    return found


def _metadata_row(study: AutopetStudy, rows: list[dict], subj_col: str, study_col: str | None) -> dict:
    subject = study.key.split("/")[0]
    mine = [r for r in rows if r[subj_col] == subject]
    if len(mine) > 1 and study_col:
        mine = [r for r in mine if r[study_col] and r[study_col] in study.key.split("/")[-1]] or mine
    if len(mine) != 1:
        raise SkipStudy(f"metadata CSV: {len(mine)} rows match this study's subject folder, expected one")
    return mine[0]


def _body(study: AutopetStudy, body_rows: dict[str, dict] | None, dicom_root: str | None) -> tuple[float, float]:
    """(height_m, weight_kg) from the user CSV or the DICOM headers."""
    if body_rows is not None:
        row = body_rows.get(study.key) or body_rows.get(study.key.split("/")[0])
        if row is None:
            raise SkipStudy("no height/weight row in the demographics CSV")
        try:
            return float(row["height_m"]), float(row["weight_kg"])
        except (KeyError, ValueError):
            raise SkipStudy("demographics CSV: height_m or weight_kg missing or not a number") from None
    folder = Path(dicom_root or "") / study.key
    for path in sorted(folder.rglob("*")) if dicom_root and folder.is_dir() else []:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSize", "PatientWeight"])
        except Exception:  # noqa: BLE001 - not a DICOM file: keep looking
            continue
        if ds.get("PatientSize") and ds.get("PatientWeight"):
            return float(ds.PatientSize), float(ds.PatientWeight)
    raise SkipStudy("height/weight unknown: not in the DICOM headers of the matching study folder")


def import_study(study: AutopetStudy, out: str, meta_row: dict, height_weight: tuple[float, float]) -> str:
    """Copy one study's CT and SUV into the work directory with its demographics row."""
    sex = meta_row.get("sex", "").upper()[:1]
    age_text = meta_row.get("age", "")
    try:
        age = float(age_text) if age_text.replace(".", "", 1).isdigit() else age_years({"PatientAge": age_text})
        demo = Demographics(study.subject_id, height_weight[0], height_weight[1], sex, age)
    except (DemographicsError, SkipStudy) as exc:
        raise SkipStudy(f"demographics refused: {exc}") from None
    ct = read_volume(Path(study.folder) / "CT.nii.gz", "ct")
    suv = read_volume(Path(study.folder) / "SUV.nii.gz", "suv")
    meta = {"source": "autopet-nifti", "suv_rule": "SUV.nii.gz of the release", "ct_shape": list(ct.shape),
            "pet_shape": list(suv.shape)}
    WorkDir(out).write_study(demo, (ct.array, ct.affine), (np.asarray(suv.array, np.float32), suv.affine), meta)
    return study.subject_id


def import_autopet(root, out, metadata_csv, demographics_csv=None, dicom_root=None, workers=1, salt="",
                   overwrite=False, progress=True) -> JobReport:
    """Every study of the NIfTI release into the work directory ``out`` (resumable)."""
    if demographics_csv is None and dicom_root is None:
        raise PreprocessError("height and weight need --demographics CSV or --dicom-root DIR")
    rows = _read_csv(metadata_csv)
    subj_col = _column(rows, _SUBJECT_COLS, metadata_csv)
    _column(rows, ("age",), metadata_csv)
    _column(rows, ("sex",), metadata_csv)
    study_col = _column(rows, _STUDY_COLS, metadata_csv, required=False)
    body_rows = None
    if demographics_csv is not None:
        body = _read_csv(demographics_csv)
        key = _column(body, ("study", "subject id", "subject_id"), demographics_csv)
        body_rows = {r[key]: r for r in body}
    work, report, args, keyed = WorkDir(out), JobReport(), {}, {}
    studies = find_studies(root, salt)
    manifest = claim(work.root, WORK_JOB, folder=True, overwrite=overwrite)
    code = code_version(sys.modules[__name__])
    for study in studies:
        try:
            row, height_weight = _metadata_row(study, rows, subj_col, study_col), _body(study, body_rows, dicom_root)
        except SkipStudy as exc:
            report.skipped[study.subject_id] = str(exc)
            manifest.forget(study.subject_id)
            continue
        folder = Path(study.folder)
        args[study.subject_id] = (study, str(out), row, height_weight)
        keyed[study.subject_id] = fingerprint({"ct": file_stamp(folder / "CT.nii.gz"), "row": row,
                                               "suv": file_stamp(folder / "SUV.nii.gz"),
                                               "height_weight": height_weight, "code": code})
    todo = pending(keyed, manifest, work.is_done, overwrite, report)
    run_jobs([(sid, args[sid]) for sid in todo], import_study, workers, "AutoPET NIfTI", progress, report,
             manifest, keyed)
    return finish(work, report, manifest)
