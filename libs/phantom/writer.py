"""Write a phantom cohort directory: resumable, parallel, one failing subject never stops the others."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..cohort import Cohort
from ..demographics import Demographics, DemographicsError, read_demographics_csv
from .anatomy import sample_demographics
from .build import make_phantom, subject_rng


@dataclass
class CohortReport:
    """What a cohort job did: written, skipped (already complete) and failed subject ids with reasons."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def sampled_demographics(n: int, seed: int, prefix: str = "phantom") -> list[Demographics]:
    """Subjects ``<prefix>_00000 … <prefix>_{n-1}``; subject k is the same whatever ``n`` is."""
    return [sample_demographics(subject_rng(seed, f"{prefix}_{k:05d}", 0), f"{prefix}_{k:05d}") for k in range(n)]


def _write_one(root: str, demo: Demographics, seed: int, spacing_mm: float, previews: str | None) -> str:
    phantom = make_phantom(demo, seed, spacing_mm)
    meta = {"generator": "totalgen phantom", "version": __version__, "seed": seed, "spacing_mm": spacing_mm,
            "shape": list(phantom.ct.shape), "demographics": asdict(demo),
            "drawn": {"organ_volumes_ml": phantom.params.volumes_ml, "suv": phantom.params.suv,
                      "hu": phantom.params.hu, "body_length_mm": phantom.params.length_mm,
                      "pet_fwhm_mm": phantom.params.pet_fwhm_mm}}
    Cohort(root).write_subject(demo.subject_id, phantom.ct, phantom.suv, phantom.affine, phantom.labels, meta)
    if previews:
        from ..previews import preview_sheet
        preview_sheet(Path(previews) / f"{demo.subject_id}.png", demo, phantom.ct, phantom.suv, (spacing_mm,) * 3)
    return demo.subject_id


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _check_existing(cohort: Cohort, records: list[Demographics], overwrite: bool) -> None:
    if overwrite or not cohort.demographics_path.exists():
        return
    try:
        existing = cohort.demographics()
    except DemographicsError as exc:
        raise DemographicsError(f"{exc} (pass --overwrite to replace it)") from None
    if existing != records:
        raise DemographicsError(f"{cohort.demographics_path} already holds a different cohort; choose another "
                                "--out or pass --overwrite")


def write_phantom_cohort(out: str | os.PathLike, records: list[Demographics], seed: int, spacing_mm: float = 2.0,
                         workers: int = 1, overwrite: bool = False, previews: str | os.PathLike | None = None,
                         progress: bool = True) -> CohortReport:
    """Write ``records`` as phantoms into the cohort directory ``out``; skip subjects already complete."""
    cohort, report, start = Cohort(out), CohortReport(), time.perf_counter()
    _check_existing(cohort, records, overwrite)
    cohort.write_demographics(records)
    todo = []
    for d in records:
        has_preview = previews is None or (Path(previews) / f"{d.subject_id}.png").is_file()
        if not overwrite and has_preview and _same_settings(cohort, d.subject_id, seed, spacing_mm) \
                and cohort.is_complete(d.subject_id, labels=True):
            report.skipped.append(d.subject_id)
        else:
            todo.append(d)
    args = [(str(out), d, seed, spacing_mm, str(previews) if previews else None) for d in todo]
    bar = tqdm(total=len(todo), desc="phantoms", unit="subj", disable=not progress or not todo)
    if workers <= 1:
        for a in args:
            _collect(report, a[1].subject_id, lambda a=a: _write_one(*a))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            futures = {pool.submit(_write_one, *a): a[1].subject_id for a in args}
            for fut in as_completed(futures):
                _collect(report, futures[fut], fut.result)
                bar.update()
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _same_settings(cohort: Cohort, subject_id: str, seed: int, spacing_mm: float) -> bool:
    """True when the subject's sidecar says it was made with this seed and spacing."""
    try:
        meta = json.loads(cohort.path("meta", subject_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("seed") == seed and meta.get("spacing_mm") == spacing_mm


def _collect(report: CohortReport, subject_id: str, fn) -> None:
    try:
        fn()
        report.written.append(subject_id)
    except Exception as exc:  # noqa: BLE001 - one subject's failure is reported, the others go on
        report.failed[subject_id] = f"{type(exc).__name__}: {exc}"


def load_records(demographics_csv: str | None, n: int, seed: int, prefix: str = "phantom") -> list[Demographics]:
    """Subjects from a cohort CSV (validated) or sampled like the AutoPET adults."""
    return read_demographics_csv(demographics_csv) if demographics_csv else sampled_demographics(n, seed, prefix)
