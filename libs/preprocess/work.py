"""The work directory of the import steps (layout in :mod:`libs.preprocess`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np

from ..cohort import Cohort
from ..demographics import Demographics, write_demographics_csv
from ..files import atomic_write_text
from ..volumes import write_volume

SKIPPED_FILE = "skipped.csv"
WORK_JOB = "preprocess"        # the manifest job of 1_dicom_to_nifti.py and 1b_import_autopet_nifti.py


class WorkDir(Cohort):
    """A work directory: cohort-style paths, but CT and SUV each on their own series' grid."""

    @property
    def skipped_path(self) -> Path:
        return self.root / SKIPPED_FILE

    def is_done(self, subject_id: str) -> bool:
        """True when CT, SUV and meta exist and the volumes read to their end (resume check)."""
        try:
            json.loads(self.path("meta", subject_id).read_text(encoding="utf-8"))
            for kind in ("suv", "ct"):
                img = nib.load(str(self.path(kind, subject_id)))
                np.asarray(img.dataobj[..., -1])  # touches the end of the compressed stream
        except Exception:  # noqa: BLE001 - any failure means "redo this study"
            return False
        return True

    def write_study(self, demo: Demographics, ct: tuple[np.ndarray, np.ndarray],
                    suv: tuple[np.ndarray, np.ndarray], meta: dict) -> None:
        """Write SUV, meta and CT (last, so a complete CT marks a complete study), each atomically."""
        sid = demo.subject_id
        write_volume(self.path("suv", sid), suv[0], suv[1], "suv")
        meta = {"demographics": asdict(demo), **meta}
        atomic_write_text(self.path("meta", sid), json.dumps(meta, indent=2, sort_keys=True) + "\n")
        write_volume(self.path("ct", sid), ct[0], ct[1], "ct")

    def collected_demographics(self, keep: set[str] | None = None) -> list[Demographics]:
        """Demographics of every complete study (of those in ``keep`` when given), from the meta sidecars
        (sorted by id)."""
        records = []
        meta_dir = self.root / "meta"
        for path in sorted(meta_dir.glob("*.json")) if meta_dir.is_dir() else []:
            sid = path.name[:-len(".json")]
            if (keep is None or sid in keep) and self.is_done(sid):
                records.append(Demographics(**json.loads(path.read_text(encoding="utf-8"))["demographics"]))
        return records

    def rebuild_demographics(self, keep: set[str] | None = None) -> int:
        """Rewrite ``demographics.csv`` from the complete studies (those in ``keep`` when given); returns
        their number."""
        records = self.collected_demographics(keep)
        if records or self.demographics_path.is_file():      # a table of withdrawn studies is emptied
            write_demographics_csv(self.demographics_path, records)
        return len(records)


def work_dir(root: str | os.PathLike) -> WorkDir:
    return WorkDir(root)
