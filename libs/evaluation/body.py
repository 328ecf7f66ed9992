"""Label-free whole-body measures from CT (HU) and SUV: no segmenter needed, so they test demographic
fidelity directly (does a heavier synthetic subject have more fat, a taller one a longer body?).

Definitions (spacing always from the affine, so anisotropic generated grids are measured correctly):

* **body mask** — CT > −500 HU, its largest 6-connected component, holes filled slice by slice
  (axial), so the lungs and bowel gas count as inside the body;
* **body length** — number of axial slices holding body × slice thickness (mm);
* **fat** — body voxels within −190…−30 HU (total adipose tissue);
* **subcutaneous fat** — fat voxels 4-connected within their axial slice to fat in the outer shell of
  the body (within max(6 mm, 2 voxels) of the skin line): an approximation without a muscle-wall
  segmentation; the rest of the fat is visceral / intermuscular;
* **lung volume** — body voxels below −400 HU (lungs plus the little bowel gas a phantom or patient has;
  −400 HU is a common lung-mask threshold).  Generated CT is clipped to the paper's [−500, 500] HU window,
  so synthetic lungs sit at its −500 HU floor plus the sampler's residual noise: a threshold at the floor
  would count only the voxels whose noise happens to be negative;
* **CT roughness** — mean |difference| of in-plane (x and y) neighbouring voxels that both lie in the
  body, with CT clipped to the paper's [−500, 500] HU window: the texture / noise level a generator must
  match (in-plane only, because generated volumes are resampled along z to their body length);
* **SUV** — mean, SD and the 50th / 90th / 99th percentiles of SUV (clipped to [0, 25]) in the body.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .measures import SUV_CLIP, voxel_volume_ml

BODY_THRESHOLD_HU = -500.0
FAT_RANGE_HU = (-190.0, -30.0)
LUNG_THRESHOLD_HU = -400.0
SAT_SHELL_MM = 6.0
BODY_MEASURES = ("volume_ml", "length_mm", "fat_volume_ml", "sat_volume_ml", "lung_volume_ml", "hu_mean",
                 "ct_roughness_hu", "suv_mean", "suv_sd", "suv_p50", "suv_p90", "suv_p99", "suv_max")
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def body_mask(ct_hu: np.ndarray) -> np.ndarray:
    """Bool ``[x, y, z]``: largest connected component of CT > −500 HU, axial holes filled."""
    above = ct_hu > BODY_THRESHOLD_HU
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(ct_hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def body_length_mm(body: np.ndarray, affine: np.ndarray) -> float:
    """Superior–inferior extent (mm) of the body: slices holding body × the z spacing of the affine."""
    slices = np.flatnonzero(body.any(axis=(0, 1)))
    if slices.size == 0:
        return 0.0
    dz = float(np.linalg.norm(np.asarray(affine)[:3, 2]))
    return float(slices[-1] - slices[0] + 1) * dz


def subcutaneous_fat(fat: np.ndarray, body: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Fat connected, within each axial slice, to fat in the outer shell of the body (bool ``[x, y, z]``).

    The shell holds body voxels within max(6 mm, 2 in-plane voxels) of the nearest non-body voxel of
    the same slice (in-plane Euclidean distance in mm).
    """
    sx, sy = (float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :2], axis=0))
    shell_mm = max(SAT_SHELL_MM, 2.0 * max(sx, sy))
    # A huge z sampling confines the distance transform to each slice.
    depth = ndimage.distance_transform_edt(body, sampling=(sx, sy, 1e9))
    seeds = fat & (depth <= shell_mm)
    return ndimage.binary_propagation(seeds, structure=_INPLANE, mask=fat)


def ct_roughness_hu(ct_hu: np.ndarray, body: np.ndarray) -> float:
    """Mean |ΔHU| of x- and y-neighbours inside ``body`` (CT clipped to [−500, 500] HU); NaN without pairs."""
    ct = np.clip(ct_hu.astype(np.float32), -500.0, 500.0)
    total, count = 0.0, 0
    for axis in (0, 1):
        both = np.logical_and(np.delete(body, 0, axis), np.delete(body, -1, axis))
        total += float(np.abs(np.diff(ct, axis=axis))[both].astype(np.float64).sum())
        count += int(both.sum())
    return total / count if count else math.nan


def body_measures(ct_hu: np.ndarray, suv: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """The whole-body measures of the module docstring (volumes mL, length mm, HU, SUV)."""
    body = body_mask(ct_hu)
    vml = voxel_volume_ml(affine)
    fat = body & (ct_hu >= FAT_RANGE_HU[0]) & (ct_hu <= FAT_RANGE_HU[1])
    out = {"n_voxels": float(body.sum()), "volume_ml": float(body.sum()) * vml,
           "length_mm": body_length_mm(body, affine), "fat_volume_ml": float(fat.sum()) * vml,
           "sat_volume_ml": float(subcutaneous_fat(fat, body, affine).sum()) * vml,
           "lung_volume_ml": float((body & (ct_hu < LUNG_THRESHOLD_HU)).sum()) * vml}
    if not body.any():
        return out | {k: math.nan for k in BODY_MEASURES if k not in out}
    values = np.clip(suv[body], *SUV_CLIP).astype(np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    out.update(hu_mean=float(ct_hu[body].astype(np.float64).mean()), ct_roughness_hu=ct_roughness_hu(ct_hu, body),
               suv_mean=float(values.mean()),
               suv_sd=float(values.std(ddof=1)) if values.size > 1 else math.nan,
               suv_p50=float(p50), suv_p90=float(p90), suv_p99=float(p99), suv_max=float(values.max()))
    return out
