"""Work directory → cohort directory: 2 mm isotropic PET grid, body mask, clavicles→hips window, 224² in-plane.

Per subject (arrays are RAS+ ``[x, y, z]``):

1. target grid: the PET field of view resampled to ``spacing_mm`` isotropic (same centre and axes);
2. CT (linear, outside its field of view −1024 HU), SUV (linear, outside 0) and labels (nearest neighbour)
   onto it; SUV below 0 (reconstruction noise) is clipped to 0;
3. body mask: largest 26-connected component of (CT > ``ct_threshold`` and SUV > ``pet_threshold``), holes
   filled in 3-D and then in every axial slice; outside it CT is −1000 HU and SUV 0;
4. z window: from ``margin`` slices below the lowest hip/sacrum voxel to ``margin`` slices above the highest
   clavicle/scapula voxel (TotalSegmentator ids from :mod:`libs.labels`), clipped to the volume;
5. in-plane: the body mask's bounding-box centre put at the centre of a ``size`` × ``size`` grid, padding
   with CT −1000 / SUV 0 / label 0, cropping symmetrically about the body when it is wider.

The output affine follows every step, so world coordinates stay those of the scanner.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..cohort import Cohort
from ..demographics import read_demographics_csv, write_demographics_csv
from ..labels import label_id
from ..manifest import claim, code_version, file_hash, fingerprint
from ..volumes import Volume, read_volume
from .errors import PreprocessError, SkipStudy
from .jobs import JobReport, pending, run_jobs, write_skipped_csv
from .work import WorkDir

TOP_LANDMARKS = ("clavicula_left", "clavicula_right", "scapula_left", "scapula_right")
BOTTOM_LANDMARKS = ("hip_left", "hip_right", "sacrum")
CROP_JOB = "crop"              # the manifest job of 3_crop_and_resample.py (<cohort>/manifest.json)
CT_OUTSIDE_FOV_HU = -1024.0
CT_BACKGROUND_HU = -1000


@dataclass(frozen=True)
class CropSettings:
    spacing_mm: float = 2.0
    size: int = 224
    margin: int = 20
    ct_threshold: float = -1000.0
    pet_threshold: float = 0.1


def target_grid(pet: Volume, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the PET field of view at ``spacing_mm`` isotropic, centred like the PET grid."""
    old_sp = np.asarray(pet.spacing)
    axes = pet.affine[:3, :3] / old_sp
    shape = tuple(max(1, int(round(n * s / spacing_mm))) for n, s in zip(pet.shape, old_sp))
    centre = pet.affine[:3, :3] @ ((np.asarray(pet.shape) - 1) / 2.0) + pet.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = axes * spacing_mm
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return shape, affine


def resample(vol: Volume, shape, affine: np.ndarray, order: int, fill: float) -> np.ndarray:
    """``vol`` sampled on the grid (shape, affine): order 1 linear, 0 nearest; ``fill`` outside."""
    to_source = np.linalg.inv(vol.affine) @ affine
    data = vol.array if order == 0 else vol.array.astype(np.float32)
    return ndimage.affine_transform(data, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=fill, prefilter=False)


def body_mask(ct: np.ndarray, suv: np.ndarray, s: CropSettings) -> np.ndarray:
    """Largest connected component of (CT > ct_threshold and SUV > pet_threshold), holes filled."""
    candidate = (ct > s.ct_threshold) & (suv > s.pet_threshold)
    components, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        raise SkipStudy(f"no body found (CT > {s.ct_threshold:g} HU and SUV > {s.pet_threshold:g})")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(components == np.argmax(sizes))
    for z in range(mask.shape[2]):
        mask[..., z] = ndimage.binary_fill_holes(mask[..., z])
    return mask


def z_window(labels: np.ndarray, margin: int) -> tuple[int, int]:
    """[z0, z1) from ``margin`` slices below the hips/sacrum to ``margin`` above the clavicles/scapulae."""
    def z_of(names):
        hit = np.isin(labels, [label_id(n) for n in names]).any(axis=(0, 1))
        return np.flatnonzero(hit)

    top, bottom = z_of(TOP_LANDMARKS), z_of(BOTTOM_LANDMARKS)
    if top.size == 0:
        raise SkipStudy("no clavicle or scapula label: upper crop landmark missing")
    if bottom.size == 0:
        raise SkipStudy("no hip or sacrum label: lower crop landmark missing")
    if top.max() <= bottom.min():
        raise SkipStudy("clavicles/scapulae are not above the hips/sacrum (is the CT upside down?)")
    return max(0, int(bottom.min()) - margin), min(labels.shape[2], int(top.max()) + margin + 1)


def inplane_starts(mask: np.ndarray, size: int) -> tuple[int, int]:
    """First source index along x and y of the ``size``-wide window centred on the mask's bounding box."""
    starts = []
    for axis in (0, 1):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        centre = (hit[0] + hit[-1]) / 2.0 if hit.size else (mask.shape[axis] - 1) / 2.0
        starts.append(int(np.floor(centre - (size - 1) / 2.0 + 0.5)))
    return starts[0], starts[1]


def take(array: np.ndarray, starts, shape, fill) -> np.ndarray:
    """The window ``[starts, starts + shape)`` of ``array``; what lies outside is ``fill``."""
    out = np.full(shape, fill, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(starts, shape, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, starts))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = array[src]
    return out


def crop_subject(work_root: str, cohort_root: str, subject_id: str, s: CropSettings) -> dict:
    """Crop one work-directory subject into the cohort; returns the window (for the meta sidecar)."""
    work = WorkDir(work_root)
    if not work.path("labels", subject_id).is_file():
        raise SkipStudy("no labels: run 2_segment_organs.py first")
    ct, suv = read_volume(work.path("ct", subject_id), "ct"), read_volume(work.path("suv", subject_id), "suv")
    labels = read_volume(work.path("labels", subject_id), "labels")
    shape, affine = target_grid(suv, s.spacing_mm)
    ct_t = resample(ct, shape, affine, 1, CT_OUTSIDE_FOV_HU)
    suv_t = np.maximum(resample(suv, shape, affine, 1, 0.0), 0.0)
    lab_t = resample(labels, shape, affine, 0, 0)
    mask = body_mask(ct_t, suv_t, s)
    ct_t[~mask], suv_t[~mask] = CT_BACKGROUND_HU, 0.0
    z0, z1 = z_window(lab_t, s.margin)
    x0, y0 = inplane_starts(mask[..., z0:z1], s.size)
    starts, out_shape = (x0, y0, z0), (s.size, s.size, z1 - z0)
    out_affine = affine.copy()
    out_affine[:3, 3] = affine[:3, :3] @ np.asarray(starts, float) + affine[:3, 3]
    meta = {"source_subject": subject_id, "crop": asdict(s), "window_start_voxel": list(starts),
            "shape": list(out_shape)}
    Cohort(cohort_root).write_subject(subject_id, take(np.rint(ct_t), starts, out_shape, CT_BACKGROUND_HU),
                                      take(suv_t, starts, out_shape, 0.0), out_affine,
                                      take(lab_t, starts, out_shape, 0), meta)
    return meta


def crop_cohort(work_root: str | os.PathLike, cohort_root: str | os.PathLike, settings: CropSettings = CropSettings(),
                workers: int = 1, overwrite: bool = False, progress: bool = True) -> JobReport:
    """Every subject of the work directory's demographics.csv into the cohort (resumable)."""
    work, cohort, report = WorkDir(work_root), Cohort(cohort_root), JobReport()
    if not work.demographics_path.is_file():
        raise PreprocessError(f"{work.demographics_path}: not found; run 1_dicom_to_nifti.py first")
    records = read_demographics_csv(work.demographics_path)
    manifest = claim(cohort.root, CROP_JOB, folder=True, overwrite=overwrite)
    code = code_version(sys.modules[__name__])
    keyed = {r.subject_id: fingerprint({"demographics": asdict(r), "settings": asdict(settings), "code": code,
                                        **{k: file_hash(work.path(k, r.subject_id)) for k in ("ct", "suv", "labels")}})
             for r in records}
    todo = pending(keyed, manifest, lambda sid: cohort.is_complete(sid, labels=True), overwrite, report)
    tasks = [(sid, (str(work_root), str(cohort_root), sid, settings)) for sid in todo]
    run_jobs(tasks, crop_subject, workers, "crop + resample", progress, report, manifest, keyed)
    done = [r for r in records if manifest.current(r.subject_id, keyed[r.subject_id])
            and cohort.is_complete(r.subject_id, labels=True)]
    if done:
        write_demographics_csv(cohort.demographics_path, done)
    write_skipped_csv(cohort.root / "skipped.csv", report)
    return report
