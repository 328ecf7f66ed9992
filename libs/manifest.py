"""What produced each output: one manifest per job output, so that a job reuses only outputs that are
provably current and never writes over files it did not create.

A job keeps a manifest beside what it writes — ``<folder>/manifest.json`` for a cohort folder,
``<table>.manifest.json`` for a CSV table::

    {"job": "generate", "format": 1, "entries": {"<subject_id>": "<fingerprint>"}}

An entry's fingerprint is the SHA-256 of everything its output depends on (:func:`fingerprint`): the
content hashes of the input files (:func:`file_hash`), the settings and seeds, the checkpoint hashes and
the code version of the measure (:func:`code_version`).  A rerun reuses an output only when its entry
equals the job's fingerprint; an output whose entry differs was made from other inputs or settings.

:func:`claim` is the single gate of a job onto its output: it refuses (one line) an output that exists
but was not written by this kind of job — a user's input, another cohort, a stale file of unknown
origin — unless ``overwrite`` says to replace it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .checkpoint import sha256_file
from .files import atomic_write_text

FORMAT = 1


class ManifestError(ValueError):
    """The output is not this job's to write or reuse (the message names the path and the way out)."""


def file_hash(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's content, or None when there is no such file."""
    return sha256_file(path) if Path(path).is_file() else None


def file_stamp(path: str | os.PathLike) -> list[int] | None:
    """[size, modification time in ns] of a file, or None when there is none: the cheap proof of change
    for large source files (a DICOM tree, a data release) that would be slow to hash on every rerun."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def fingerprint(what: dict) -> str:
    """SHA-256 of a JSON-able description of what produced an output (key order does not matter)."""
    text = json.dumps(what, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_version(*modules) -> str:
    """A version of the code that computes a measure: the SHA-256 of the modules' source files, so editing
    the measure invalidates every result it produced."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def manifest_path(output: str | os.PathLike, folder: bool) -> Path:
    """``<folder>/manifest.json`` for a folder output, ``<stem>.manifest.json`` beside a file output."""
    output = Path(output)
    if folder:
        return output / "manifest.json"
    return output.with_name(output.name.removesuffix(output.suffix) + ".manifest.json")


class Manifest:
    """The entries of one job output; :meth:`record` writes the manifest atomically after each change."""

    def __init__(self, path: Path, job: str, entries: dict[str, str] | None = None):
        self.path, self.job, self.entries = path, job, dict(entries or {})

    def current(self, key: str, fp: str) -> bool:
        return self.entries.get(key) == fp

    def record(self, key: str, fp: str) -> None:
        self.entries[key] = fp
        self.save()

    def forget(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.save()

    def save(self) -> None:
        text = json.dumps({"job": self.job, "format": FORMAT, "entries": self.entries}, indent=1, sort_keys=True)
        atomic_write_text(self.path, text + "\n")


def read_manifest(path: Path, job: str) -> Manifest | None:
    """The manifest at ``path`` if it is a readable manifest of ``job``; None when there is none."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("job") != job or not isinstance(raw.get("entries"), dict):
            return None
        return Manifest(path, job, {str(k): str(v) for k, v in raw["entries"].items()})
    except (OSError, UnicodeError, ValueError, AttributeError):
        return None


def pending(keyed: dict[str, str], manifest: Manifest, done, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Split the keys of ``keyed`` (key → fingerprint of its inputs and settings) into (complete, to do).

    A key is complete only when its output is whole (``done(key)``) and the manifest says it was made from
    exactly these inputs and settings; ``overwrite`` redoes every key."""
    complete, todo = [], []
    for key, fp in keyed.items():
        (complete if not overwrite and manifest.current(key, fp) and done(key) else todo).append(key)
    return complete, todo


def claim(output: str | os.PathLike, job: str, folder: bool, overwrite: bool = False) -> Manifest:
    """The manifest of ``job`` for ``output`` (a cohort folder or a table file), written before the job
    writes anything, after checking that the job may write there.

    An output that does not exist (or an empty folder) is claimed with an empty manifest.  An existing
    output without a manifest of this job is refused with :class:`ManifestError` — unless ``overwrite``,
    which claims it afresh.  ``overwrite`` also drops the entries of this job's own manifest, so nothing
    is reused.
    """
    output = Path(output)
    path = manifest_path(output, folder)
    manifest = read_manifest(path, job)
    if manifest is None:
        if output.is_file() and folder:
            raise ManifestError(f"{output}: is a file, not a folder")
        # another job's manifest counts as occupying; hidden names are temporary files of atomic writes
        occupied = output.is_file() or (output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()))
        if occupied and not overwrite:
            what = "folder holds files" if folder else "file exists and was"
            raise ManifestError(f"{output}: this {what} not written by a TotalGen {job} job (no {path.name}); "
                                "choose another output or pass --overwrite to replace it")
        manifest = Manifest(path, job)
    elif overwrite:
        manifest.entries.clear()
    manifest.save()
    return manifest
