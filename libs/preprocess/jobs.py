"""Batch machinery shared by the preprocessing steps: parallel, resumable, one failure never stops the rest."""

from __future__ import annotations

import csv
import io
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..files import atomic_write_text
from ..manifest import Manifest
from ..manifest import pending as split_pending
from .errors import SkipStudy

# a token with a path separator followed by more characters ("/data/Doe^John/ct", "a\\b"); a bare
# folder word like "labels/" in a message of ours stays readable
_PATHLIKE = re.compile(r"\S*[/\\][^\s/\\]\S*")


@dataclass
class JobReport:
    """Per-subject outcome of a batch: written, already complete, skipped (with reason), failed (with reason)."""

    written: list[str] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, where: str) -> str:
        return (f"{where}: {len(self.written)} written, {len(self.complete)} already complete, "
                f"{len(self.skipped)} skipped, {len(self.failed)} failed in {self.seconds:.1f} s")

    def problems(self) -> list[str]:
        return [f"  skipped {k}: {v}" for k, v in sorted(self.skipped.items())] + \
               [f"  failed {k}: {v}" for k, v in sorted(self.failed.items())]


def scrub(message: str) -> str:
    """One line of an exception message with path-like tokens removed (folder names may hold names)."""
    return _PATHLIKE.sub("<path>", message.splitlines()[0] if message else "")[:300]


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pending(keyed: dict[str, str], manifest: Manifest, done, overwrite: bool, report: JobReport) -> list[str]:
    """The keys to (re)make (:func:`libs.manifest.pending`); the complete ones go to ``report.complete``."""
    complete, todo = split_pending(keyed, manifest, done, overwrite)
    report.complete.extend(complete)
    return todo


def _record(report: JobReport, key: str, call, manifest: Manifest | None = None, fp: str | None = None) -> None:
    try:
        call()
        report.written.append(key)
        if manifest is not None:
            manifest.record(key, fp)
    except SkipStudy as exc:
        report.skipped[key] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one subject's failure is reported, the others go on
        report.failed[key] = f"{type(exc).__name__}: {scrub(str(exc))}"


def run_jobs(tasks: list[tuple[str, tuple]], fn, workers: int = 1, desc: str = "subjects",
             progress: bool = True, report: JobReport | None = None, manifest: Manifest | None = None,
             fingerprints: dict[str, str] | None = None) -> JobReport:
    """Call ``fn(*args)`` for every ``(key, args)``; :class:`SkipStudy` → skipped, other exceptions → failed.

    With a ``manifest``, each key's entry is dropped before its task runs and set to ``fingerprints[key]``
    once the task has written it.  ``fn`` must be a module-level function when ``workers > 1`` (it runs in
    worker processes)."""
    report = report or JobReport()
    start = time.perf_counter()
    fps = fingerprints or {}
    if manifest is not None and any(key in manifest.entries for key, _ in tasks):
        for key, _ in tasks:          # until rewritten, an old output is not current
            manifest.entries.pop(key, None)
        manifest.save()
    bar = tqdm(total=len(tasks), desc=desc, unit="subj", disable=not progress or not tasks)
    if workers <= 1 or len(tasks) <= 1:
        for key, args in tasks:
            _record(report, key, lambda args=args: fn(*args), manifest, fps.get(key))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            futures = {pool.submit(fn, *args): key for key, args in tasks}
            for fut in as_completed(futures):
                _record(report, futures[fut], fut.result, manifest, fps.get(futures[fut]))
                bar.update()
    bar.close()
    report.seconds += time.perf_counter() - start
    return report


def write_skipped_csv(path: str | os.PathLike, report: JobReport) -> Path | None:
    """``subject_id,status,reason`` for every skipped or failed subject (atomically); removed when none."""
    path = Path(path)
    rows = [(k, "skipped", v) for k, v in sorted(report.skipped.items())] + \
           [(k, "failed", v) for k, v in sorted(report.failed.items())]
    if not rows:
        if path.exists():
            path.unlink()
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("subject_id", "status", "reason"))
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return path
