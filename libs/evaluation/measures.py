"""Per-organ measures: volume (mL), SUVmean, SUVmax, SUVpeak (SUV clipped to [0, 25]) and mean HU.

Regions are named by TotalSegmentator 'total' classes; their ids come from :mod:`libs.labels`
(the installed package's class map), never from numbers written here.  ``kidneys`` is the union of
both kidneys, as in the paper.

SUVpeak follows PERCIST: the highest mean SUV over a 1 mL sphere (radius 6.2 mm).  The sphere is a
voxel kernel built from the true (possibly anisotropic) spacing — the voxels whose centres lie within
the radius of the central voxel's centre — and its mean is computed everywhere at once with
:func:`scipy.ndimage.correlate`.  Only sphere *centres* must lie inside the organ; the sphere itself
averages whatever SUV surrounds them, which is how PERCIST places the peak region in a lesion.  Where
the voxels are coarser than the sphere (e.g. 8 mm grids) the kernel is the single central voxel and
SUVpeak equals SUVmax.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..labels import label_id

SUV_CLIP = (0.0, 25.0)          # SUV range of the paper's statistics
PEAK_SPHERE_ML = 1.0            # PERCIST SUVpeak sphere volume
MEASURES = ("volume_ml", "suv_mean", "suv_max", "suv_peak", "hu_mean")
ORGAN_REGIONS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney_left": ("kidney_left",),
    "kidney_right": ("kidney_right",),
    "kidneys": ("kidney_left", "kidney_right"),
    "heart": ("heart",),
}


def region_label_ids(region: str) -> tuple[int, ...]:
    """TotalSegmentator 'total' ids that make up ``region`` (a key of ORGAN_REGIONS or any class name)."""
    names = ORGAN_REGIONS.get(region, (region,))
    return tuple(label_id(n) for n in names)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: |det| of the affine's 3×3 part (mm³) / 1000."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def sphere_radius_mm(volume_ml: float = PEAK_SPHERE_ML) -> float:
    """Radius (mm) of a sphere of ``volume_ml`` mL: (3 V / 4π)^(1/3) with V in mm³ (1 mL → 6.204 mm)."""
    return (3.0 * 1000.0 * volume_ml / (4.0 * math.pi)) ** (1.0 / 3.0)


def sphere_kernel(spacing_mm, volume_ml: float = PEAK_SPHERE_ML) -> np.ndarray:
    """Boolean kernel ``[x, y, z]`` (odd sizes) of the voxels whose centres lie within the sphere radius.

    ``spacing_mm`` is the voxel size along x, y, z in mm; the kernel always holds its central voxel.
    """
    radius = sphere_radius_mm(volume_ml)
    half = [int(math.floor(radius / s)) for s in spacing_mm]
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing_mm)]
    dx, dy, dz = np.meshgrid(*axes, indexing="ij")
    return dx**2 + dy**2 + dz**2 <= radius**2 + 1e-9


def _bbox(mask: np.ndarray, pad: tuple[int, int, int]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``pad`` voxels per axis, clamped to the array."""
    box = []
    for axis, p in enumerate(pad):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - p, 0), min(int(hits[-1]) + p + 1, mask.shape[axis])))
    return tuple(box)


def suv_peak(suv: np.ndarray, mask: np.ndarray, spacing_mm, volume_ml: float = PEAK_SPHERE_ML) -> float:
    """PERCIST SUVpeak: max over centres in ``mask`` of the mean SUV in a ``volume_ml`` sphere (SUV units).

    Spheres cut by the array border average only their in-array voxels.  NaN for an empty mask.
    """
    if not mask.any():
        return float("nan")
    kernel = sphere_kernel(spacing_mm, volume_ml).astype(np.float64)
    box = _bbox(mask, tuple(k // 2 for k in kernel.shape))
    values = suv[box].astype(np.float64)
    total = ndimage.correlate(values, kernel, mode="constant", cval=0.0)
    count = ndimage.correlate(np.ones_like(values), kernel, mode="constant", cval=0.0)
    return float((total / count)[mask[box]].max())


def organ_measures(mask: np.ndarray, ct_hu: np.ndarray, suv: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Measures of one region ``mask`` (bool ``[x, y, z]``) on CT (HU) and SUV volumes of the same grid.

    Returns n_voxels, volume_ml (mL), suv_mean / suv_max / suv_peak (SUV clipped to [0, 25]) and hu_mean
    (HU); intensities are NaN when the mask is empty.
    """
    if mask.shape != ct_hu.shape or mask.shape != suv.shape:
        raise ValueError(f"mask {mask.shape}, CT {ct_hu.shape} and SUV {suv.shape} must share one grid")
    n = int(mask.sum())
    out = {"n_voxels": float(n), "volume_ml": n * voxel_volume_ml(affine)}
    if n == 0:
        out.update(suv_mean=math.nan, suv_max=math.nan, suv_peak=math.nan, hu_mean=math.nan)
        return out
    clipped = np.clip(suv, *SUV_CLIP)
    inside = clipped[mask].astype(np.float64)
    spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    out.update(suv_mean=float(inside.mean()), suv_max=float(inside.max()),
               suv_peak=suv_peak(clipped, mask, spacing), hu_mean=float(ct_hu[mask].astype(np.float64).mean()))
    return out


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of ``region`` in a TotalSegmentator 'total' label volume."""
    return np.isin(labels, region_label_ids(region))
