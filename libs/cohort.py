"""The cohort directory — one layout for real, phantom and generated data (DESIGN.md)::

    COHORT/
      demographics.csv             subject_id,height_m,weight_kg,sex,age_years
      ct/<subject_id>.nii.gz       CT, int16 HU
      suv/<subject_id>.nii.gz      PET, float32 SUVbw, same grid as ct
      labels/<subject_id>.nii.gz   optional, uint8 TotalSegmentator 'total' ids, same grid
      previews/<subject_id>.png    optional
      meta/<subject_id>.json       optional sidecar
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demographics import Demographics, read_demographics_csv, write_demographics_csv
from .files import atomic_write_text
from .volumes import Volume, VolumeError, read_volume, same_grid, write_volume

DEMOGRAPHICS_FILE = "demographics.csv"


@dataclass(frozen=True)
class Subject:
    """The volumes of one subject; ``labels`` may be None."""

    demographics: Demographics
    ct: Volume
    suv: Volume
    labels: Volume | None = None


class Cohort:
    """Paths and I/O for one cohort directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # paths -------------------------------------------------------------------------------------
    @property
    def demographics_path(self) -> Path:
        return self.root / DEMOGRAPHICS_FILE

    def path(self, kind: str, subject_id: str) -> Path:
        """Path of one subject file; ``kind`` in ct, suv, labels, previews, meta."""
        ext = {"previews": ".png", "meta": ".json"}.get(kind, ".nii.gz")
        return self.root / kind / f"{subject_id}{ext}"

    # reading -----------------------------------------------------------------------------------
    def demographics(self) -> list[Demographics]:
        return read_demographics_csv(self.demographics_path)

    def has_labels(self, subject_id: str) -> bool:
        return self.path("labels", subject_id).is_file()

    def load(self, subject: Demographics | str, labels: bool = True) -> Subject:
        """Read one subject's volumes; raises VolumeError naming the file if they disagree in grid."""
        if isinstance(subject, str):
            subject = next((d for d in self.demographics() if d.subject_id == subject), None) or \
                _raise(VolumeError(f"{self.demographics_path}: no subject {subject!r}"))
        sid = subject.subject_id
        ct = read_volume(self.path("ct", sid), "ct")
        suv = read_volume(self.path("suv", sid), "suv")
        if not same_grid(ct, suv):
            raise VolumeError(f"{self.path('suv', sid)}: grid {suv.shape} differs from the CT grid {ct.shape}")
        if suv.array.min() < 0:
            raise VolumeError(f"{self.path('suv', sid)}: negative SUV ({suv.array.min():.3g}); is it SUV?")
        lab = None
        if labels and self.has_labels(sid):
            lab = read_volume(self.path("labels", sid), "labels")
            if not same_grid(ct, lab):
                raise VolumeError(f"{self.path('labels', sid)}: grid differs from the CT grid")
        return Subject(subject, ct, suv, lab)

    def is_complete(self, subject_id: str, labels: bool = False) -> bool:
        """True when the subject's volumes exist and their headers load (used to resume jobs)."""
        kinds = ("ct", "suv", "labels") if labels else ("ct", "suv")
        try:
            import nibabel as nib
            shapes = []
            for kind in kinds:
                img = nib.load(str(self.path(kind, subject_id)))
                shapes.append(img.shape)
                np.asarray(img.dataobj[..., -1])  # touches the end of the compressed stream
        except Exception:  # noqa: BLE001 - any failure means "redo this subject"
            return False
        return len(set(shapes)) == 1

    # writing -----------------------------------------------------------------------------------
    def write_demographics(self, records: list[Demographics]) -> Path:
        return write_demographics_csv(self.demographics_path, records)

    def write_subject(self, subject_id: str, ct_hu: np.ndarray, suv: np.ndarray, affine: np.ndarray,
                      labels: np.ndarray | None = None, meta: dict | None = None) -> None:
        """Write one subject's volumes (each atomically). CT last, so a complete CT marks completion."""
        write_volume(self.path("suv", subject_id), suv, affine, "suv")
        if labels is not None:
            write_volume(self.path("labels", subject_id), labels, affine, "labels")
        if meta is not None:
            atomic_write_text(self.path("meta", subject_id), json.dumps(meta, indent=2, sort_keys=True) + "\n")
        write_volume(self.path("ct", subject_id), ct_hu, affine, "ct")


def _raise(exc: Exception):
    raise exc
