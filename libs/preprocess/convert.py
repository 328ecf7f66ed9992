"""DICOM PET/CT studies → work directory (CT in HU, PET as SUVbw, one demographics row per study)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..manifest import Manifest, claim, code_version, file_stamp, fingerprint
from . import dicom_io, dicomtime, patient
from . import suv as suv_module
from .dicom_io import StudyFiles, pick_series, read_stack, rescaled, scan_studies, to_ras
from .errors import PreprocessError, SkipStudy
from .jobs import JobReport, pending, run_jobs, write_skipped_csv
from .patient import demographics, weight_kg
from .suv import suv_scale
from .work import WORK_JOB, WorkDir

INT16 = (-32768, 32767)


def _demographics(pet_header, ct_header, subject_id: str):
    """Demographics from the PET header; fields it lacks may come from the CT header of the same study."""
    try:
        return demographics(pet_header, subject_id)
    except SkipStudy as first:
        try:
            return demographics(ct_header, subject_id)
        except SkipStudy:
            raise first from None


def convert_study(study: StudyFiles, out: str | os.PathLike) -> str:
    """Convert one study into ``out``; :class:`SkipStudy` with the reason when its SUV cannot be trusted."""
    pt_files, ct_files = pick_series(study, "PT"), pick_series(study, "CT")
    pet = read_stack(pt_files.files, f"PT series ({len(pt_files.files)} slices)")
    ct = read_stack(ct_files.files, f"CT series ({len(ct_files.files)} slices)")
    demo = _demographics(pet.headers[0], ct.headers[0], study.subject_id)
    scale = suv_scale(pet.headers, weight_kg(pet.headers[0]))
    suv = rescaled(pet) * scale.factors
    hu = np.clip(np.rint(rescaled(ct)), *INT16)
    meta = {"source": "dicom", "suv_units": scale.units, "suv_rule": scale.rule,
            "uptake_s": scale.uptake_s, "half_life_s": scale.half_life_s,
            "manufacturer": str(pet.headers[0].get("Manufacturer") or ""),
            "pet_shape": list(suv.shape), "ct_shape": list(hu.shape)}
    WorkDir(out).write_study(demo, to_ras(hu, ct.affine), to_ras(suv.astype(np.float32), pet.affine), meta)
    return study.subject_id


def finish(work: WorkDir, report: JobReport, manifest: Manifest) -> JobReport:
    """Write skipped.csv and the work directory's demographics.csv (the studies the manifest holds as
    current) after a batch."""
    write_skipped_csv(work.skipped_path, report)
    work.rebuild_demographics(set(manifest.entries))
    return report


def convert_studies(studies: list[StudyFiles], out: str | os.PathLike, workers: int = 1, overwrite: bool = False,
                    progress: bool = True) -> JobReport:
    """Convert ``studies`` (resumable: a study is kept when its output is whole and the work directory's
    manifest says it was made from these very files — same names, sizes and times — by this code; unless
    ``overwrite``).  A folder holding files of anything else is refused."""
    work, report = WorkDir(out), JobReport()
    manifest = claim(work.root, WORK_JOB, folder=True, overwrite=overwrite)
    code = code_version(sys.modules[__name__], dicom_io, dicomtime, patient, suv_module)
    keyed = {s.subject_id: fingerprint({"files": sorted((f, file_stamp(f)) for series in s.series.values()
                                                        for f in series.files), "code": code}) for s in studies}
    by_id = {s.subject_id: s for s in studies}
    todo = pending(keyed, manifest, work.is_done, overwrite, report)
    run_jobs([(sid, (by_id[sid], str(out))) for sid in todo], convert_study, workers, "DICOM → NIfTI", progress,
             report, manifest, keyed)
    return finish(work, report, manifest)


def convert_tree(raw: str | os.PathLike, out: str | os.PathLike, workers: int = 1, salt: str = "",
                 overwrite: bool = False, progress: bool = True) -> JobReport:
    """Every study under ``raw`` (any depth) into the work directory ``out``."""
    studies = scan_studies(raw, salt)
    if not studies:
        raise PreprocessError(f"{raw}: no DICOM studies found")
    return convert_studies(studies, out, workers, overwrite, progress)


def convert_single(study_dir: str | os.PathLike, out: str | os.PathLike, salt: str = "",
                   overwrite: bool = False) -> JobReport:
    """The one study in ``study_dir`` into ``out``; a folder holding several studies is refused."""
    studies = scan_studies(study_dir, salt)
    if len(studies) != 1:
        raise PreprocessError(f"{Path(study_dir).name}: holds {len(studies)} DICOM studies, expected one "
                              "(use --input for a tree of studies)")
    return convert_studies(studies, out, 1, overwrite, progress=False)
