"""NIfTI volumes: the one image I/O module of the project.

Contract
--------
* Every array handed out or taken in is indexed ``[x, y, z]`` in RAS+ order (x → subject's Right,
  y → Anterior, z → Superior; ``z = 0`` is the most inferior slice).  Files in any other
  orientation are reoriented on read (:func:`read_volume`), so callers never see another order.
* The affine maps voxel indices to RAS+ world millimetres; both qform and sform carry it.
* Each kind of volume has one on-disk dtype: ``ct`` int16 Hounsfield units, ``suv`` float32 SUVbw,
  ``labels`` uint8 TotalSegmentator ids.  Values are stored unscaled (slope 1, intercept 0).
* Writes are atomic (temporary file + rename); a crash never leaves a truncated ``.nii.gz`` under
  its final name.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import atomic_path

KINDS = {"ct": np.int16, "suv": np.float32, "labels": np.uint8}
_KIND_RANGE = {"ct": (-32768, 32767), "labels": (0, 255)}


class VolumeError(ValueError):
    """A volume file is missing, unreadable, or holds values that do not fit its kind."""


@dataclass(frozen=True)
class Volume:
    """A 3-D array ``[x, y, z]`` (RAS+) with its voxel → world (mm) affine."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along x, y, z."""
        return spacing_of(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) of each array axis: the norms of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def centered_affine(shape: tuple[int, int, int], spacing_mm: float | tuple[float, float, float]
                    ) -> np.ndarray:
    """RAS+ diagonal affine whose volume centre sits at world (0, 0, 0) mm.

    Used for phantom and generated volumes, which have no scanner frame of their own: they open
    upright and centred in any viewer.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=float) - 1.0) / 2.0 * sp
    return affine


def voxel_to_world(affine: np.ndarray, ijk) -> np.ndarray:
    """World RAS+ mm of voxel index/indices ``ijk`` (shape (3,) or (N, 3))."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown volume kind {kind!r}; expected one of {sorted(KINDS)}")


def as_kind(array: np.ndarray, kind: str, where: str = "array") -> np.ndarray:
    """Cast ``array`` to the on-disk dtype of ``kind`` (rounding integers), refusing NaN/inf/overflow."""
    _check_kind(kind)
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"{where}: expected a 3-D volume [x, y, z], got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise VolumeError(f"{where}: {kind} volume contains NaN or infinite values")
    if kind in _KIND_RANGE:
        lo, hi = _KIND_RANGE[kind]
        if array.size and (array.min() < lo or array.max() > hi):
            raise VolumeError(f"{where}: {kind} values span [{array.min()}, {array.max()}], "
                              f"outside the {np.dtype(KINDS[kind]).name} range [{lo}, {hi}]")
        if array.dtype.kind == "f":
            array = np.rint(array)
    return array.astype(KINDS[kind], copy=False)


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, kind: str) -> Path:
    """Write ``array`` ``[x, y, z]`` (RAS+) with ``affine`` as a NIfTI file of the given kind, atomically."""
    path = Path(path)
    data = as_kind(array, kind, where=str(path))
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: affine must be a finite, invertible 4x4 matrix")
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(KINDS[kind])
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def read_volume(path: str | os.PathLike, kind: str | None = None) -> Volume:
    """Read a NIfTI file, reoriented to RAS+ ``[x, y, z]``; cast to ``kind``'s dtype when given.

    Raises :class:`VolumeError` naming the file when it is missing, unreadable, truncated, not 3-D,
    or holds NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        array = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise VolumeError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise VolumeError(f"{path}: contains NaN or infinite values")
    if kind is not None:
        array = as_kind(array, kind, where=str(path))
    return Volume(array=array, affine=img.affine.copy())


def same_grid(a: Volume, b: Volume, atol_mm: float = 1e-3) -> bool:
    """True when two volumes share shape and affine (to ``atol_mm``)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol_mm)
