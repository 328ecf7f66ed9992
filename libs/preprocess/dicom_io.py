"""DICOM files → studies → series → volumes with true affines.

Studies and series are told apart by their DICOM tags (StudyInstanceUID, SeriesInstanceUID, Modality),
never by folder names; files may sit at any depth.  UIDs stay in memory: a study leaves this module
only as a derived subject id (a salted SHA-256 prefix), which names its outputs.

Geometry (PS3.3 C.7.6.2): the pixel in column i, row j of a slice lies at
``ImagePositionPatient + i·Δc·RowDirection + j·Δr·ColumnDirection`` (LPS mm), with
``ImageOrientationPatient = [RowDirection, ColumnDirection]`` and ``PixelSpacing = [Δr, Δc]``.
Slices are sorted by their position along the normal RowDirection × ColumnDirection and must be
evenly spaced.  LPS → RAS negates x and y.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .errors import PreprocessError, SkipStudy

_SCAN_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType", "CorrectedImage", "NumberOfFrames"]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SeriesFiles:
    """The files of one series and what scanning learnt about it (no identifying values)."""

    modality: str
    files: list[str] = field(default_factory=list)
    attenuation_corrected: bool = False
    localizer: bool = False
    multiframe: bool = False


@dataclass
class StudyFiles:
    """One study: its derived subject id and its series keyed by (in-memory) SeriesInstanceUID."""

    subject_id: str
    series: dict[str, SeriesFiles] = field(default_factory=dict)

    def n_files(self) -> int:
        return sum(len(s.files) for s in self.series.values())


def subject_id_for(study_key: str, salt: str = "") -> str:
    """Derived, non-reversible subject id: ``sub-`` + 12 hex digits of SHA-256(salt + study key), the key
    being the StudyInstanceUID (DICOM) or the study folder relative to the release root (AutoPET NIfTI)."""
    return "sub-" + hashlib.sha256(f"{salt}{study_key}".encode()).hexdigest()[:12]


def _header(path: str):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
        return None


def scan_studies(root: str | os.PathLike, salt: str = "") -> list[StudyFiles]:
    """Every study found under ``root`` (any depth); files that are not DICOM images are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise PreprocessError(f"{root}: not a folder")
    studies: dict[str, StudyFiles] = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            ds = _header(os.path.join(dirpath, name))
            if ds is None or not all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "Modality")):
                continue
            study_uid = str(ds.StudyInstanceUID)
            study = studies.setdefault(study_uid, StudyFiles(subject_id_for(study_uid, salt)))
            series = study.series.setdefault(str(ds.SeriesInstanceUID), SeriesFiles(str(ds.Modality).upper()))
            series.files.append(os.path.join(dirpath, name))
            series.attenuation_corrected |= "ATTN" in tag_values(ds.get("CorrectedImage"))
            series.localizer |= "LOCALIZER" in tag_values(ds.get("ImageType"))
            series.multiframe |= int(ds.get("NumberOfFrames") or 1) > 1
    return sorted(studies.values(), key=lambda s: s.subject_id)


def tag_values(element) -> list[str]:
    if element is None:
        return []
    value = element.value if hasattr(element, "value") else element
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v).strip().upper() for v in value]
    return [v.strip().upper() for v in str(value).split("\\")]


def pick_series(study: StudyFiles, modality: str) -> SeriesFiles:
    """The series of ``modality`` (CT or PT) to convert: volumes only (≥ 2 slices, no localizers); for PET
    attenuation-corrected ones first; then the one with most slices.  :class:`SkipStudy` when none."""
    found = [s for s in study.series.values() if s.modality == modality and not s.localizer and len(s.files) > 1]
    if modality == "PT" and any(s.attenuation_corrected for s in found):
        found = [s for s in found if s.attenuation_corrected]
    if not found:
        raise SkipStudy(f"no {modality} volume series (Modality {modality}, more than one slice)")
    best = max(found, key=lambda s: len(s.files))
    if best.multiframe:
        raise SkipStudy(f"{modality} series is multi-frame (enhanced) DICOM, which is not supported")
    return best


@dataclass
class SliceStack:
    """A series read into a volume: values ``[i, j, k]`` (column, row, slice) in file pixel order, the
    voxel → RAS+ affine, and the sorted slice headers (for per-slice tags)."""

    values: np.ndarray
    affine: np.ndarray
    headers: list


def _vec(ds, key: str, n: int, name: str) -> np.ndarray:
    value = ds.get(key)
    if value is None or len(value) != n:
        raise SkipStudy(f"{name}: {key} missing or malformed")
    return np.asarray([float(v) for v in value])


def slice_geometry(headers: list, name: str) -> tuple[list, np.ndarray]:
    """Sort slice headers along the normal; return them and the voxel → LPS affine.

    Raises :class:`SkipStudy` naming the series ``name`` for mixed orientations or grids, duplicate
    positions, or uneven slice spacing (gaps)."""
    iop = _vec(headers[0], "ImageOrientationPatient", 6, name)
    spacing = _vec(headers[0], "PixelSpacing", 2, name)
    shape = (int(headers[0].Rows), int(headers[0].Columns))
    for ds in headers:
        if not np.allclose(_vec(ds, "ImageOrientationPatient", 6, name), iop, atol=1e-4) or \
                not np.allclose(_vec(ds, "PixelSpacing", 2, name), spacing, atol=1e-4) or \
                (int(ds.Rows), int(ds.Columns)) != shape:
            raise SkipStudy(f"{name}: slices differ in orientation, pixel spacing or matrix size")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([_vec(ds, "ImagePositionPatient", 3, name) for ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers, positions = [headers[k] for k in order], positions[order]
    steps = np.diff(positions @ normal)
    if steps.min() <= 1e-3:
        raise SkipStudy(f"{name}: two slices share a position (duplicate or mixed series)")
    if steps.max() - steps.min() > max(0.01 * np.median(steps), 1e-3):
        raise SkipStudy(f"{name}: uneven slice spacing {steps.min():.3f}–{steps.max():.3f} mm (missing slices?)")
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(headers) - 1)
    affine[:3, 3] = positions[0]
    return headers, affine


def read_stack(files: list[str], name: str) -> SliceStack:
    """Read the slices of one series (stored values, float64, before any rescale) with a RAS+ affine."""
    try:
        headers = [pydicom.dcmread(f) for f in files]
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise SkipStudy(f"{name}: unreadable file ({type(exc).__name__})") from None
    if len(headers) < 2:
        raise SkipStudy(f"{name}: fewer than two slices")
    headers, affine_lps = slice_geometry(headers, name)
    try:
        planes = [np.asarray(ds.pixel_array, dtype=np.float64).T for ds in headers]  # [row, col] → [i=col, j=row]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for unsupported transfer syntaxes
        raise SkipStudy(f"{name}: pixel data cannot be decoded ({type(exc).__name__})") from None
    return SliceStack(np.stack(planes, axis=-1), LPS_TO_RAS @ affine_lps, headers)


def rescaled(stack: SliceStack) -> np.ndarray:
    """Stored values × RescaleSlope + RescaleIntercept, each slice with its own pair (they may vary)."""
    slopes = np.array([float(ds.get("RescaleSlope", 1.0) or 1.0) for ds in stack.headers])
    intercepts = np.array([float(ds.get("RescaleIntercept", 0.0) or 0.0) for ds in stack.headers])
    return stack.values * slopes + intercepts


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip array axes to the closest RAS+ order (the libs.volumes contract); affine follows."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
