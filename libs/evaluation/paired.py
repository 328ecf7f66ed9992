"""Paired metrics between two cohorts with the same subject ids (a = reference, b = test).

Overlap per organ label: Dice and the 95 % Hausdorff distance (mm).  Intensity agreement inside the
body: MAE, PSNR and SSIM of CT (HU) and PET (SUV).  Choices, stated once:

* **grids** — when b's grid differs from a's, b is resampled onto a's grid through the two affines
  (world mm → voxel), nearest neighbour for labels, trilinear for images; outside b's field of view
  labels are 0, CT −1000 HU, SUV 0.  Output rows carry ``resampled``.
* **HD95** — surfaces are the mask voxels with a 6-neighbour outside the mask; distances are Euclidean
  in mm (``distance_transform_edt`` with the voxel spacing); HD95 = max of the two directed 95th
  percentiles (symmetric).  Dice is NaN and HD95 NaN when both masks are empty; HD95 NaN when one is.
* **window** — CT is clipped to [−1000, 1000] HU (data range 2000 HU), SUV to [0, 25] (data range 25)
  before MAE, PSNR and SSIM.
* **region** — MAE and PSNR use the voxels inside either body mask (union of a's and b's); SSIM
  (``skimage.metrics.structural_similarity``, 7-voxel uniform window, shrunk for tiny volumes) runs on
  the union's bounding box.  PSNR = 10·log10(range² / MSE); identical volumes give PSNR ∞, SSIM 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from ..volumes import Volume, same_grid
from .body import body_mask

CT_WINDOW_HU = (-1000.0, 1000.0)
SUV_WINDOW = (0.0, 25.0)
BACKGROUND = {"ct": -1000.0, "suv": 0.0, "labels": 0}
METRICS = ("dice", "hausdorff", "psnr", "ssim", "mae")
_SIX = ndimage.generate_binary_structure(3, 1)


def resample_to(vol: Volume, shape: tuple[int, int, int], affine: np.ndarray, kind: str) -> np.ndarray:
    """``vol`` sampled on the grid (``shape``, ``affine``): nearest for ``labels``, trilinear otherwise."""
    if vol.shape == tuple(shape) and np.allclose(vol.affine, affine, atol=1e-3):
        return vol.array
    to_b = np.linalg.inv(vol.affine) @ np.asarray(affine, dtype=float)   # a voxel → world → b voxel
    order = 0 if kind == "labels" else 1
    data = vol.array if kind == "labels" else vol.array.astype(np.float32)
    out = ndimage.affine_transform(data, to_b[:3, :3], offset=to_b[:3, 3], output_shape=tuple(shape), order=order,
                                   mode="constant", cval=BACKGROUND[kind])
    return out.astype(vol.array.dtype) if kind == "labels" else out


def on_grid_of(a: Volume, b: Volume, kind: str) -> tuple[np.ndarray, bool]:
    """b's array on a's grid, and whether it had to be resampled."""
    if same_grid(a, b):
        return b.array, False
    return resample_to(b, a.shape, a.affine, kind), True


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice 2|A∩B| / (|A| + |B|) of two boolean masks; NaN when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else math.nan


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one 6-neighbour outside the mask (the array border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_SIX, border_value=0)


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing_mm) -> float:
    """Symmetric 95 % Hausdorff distance (mm) between the surfaces of two boolean masks.

    max(P95 of distances from a's surface to b's, P95 of distances from b's surface to a's).
    """
    if not a.any() or not b.any():
        return math.nan
    union = a | b
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in np.nonzero(union))
    sa, sb = surface(a[box]), surface(b[box])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing_mm)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing_mm)[sb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference inside ``mask`` (units of the images)."""
    return float(np.abs(a[mask].astype(np.float64) - b[mask].astype(np.float64)).mean()) if mask.any() else math.nan


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio (dB) inside ``mask``: 10·log10(range² / MSE); ∞ for identical images."""
    if not mask.any():
        return math.nan
    mse = float(((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_in_box(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """SSIM of the two images on the bounding box of ``mask`` (7-voxel window, or the largest odd size
    that fits); NaN when the box is thinner than 3 voxels."""
    if not mask.any():
        return math.nan
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(mask))
    ca, cb = a[box].astype(np.float64), b[box].astype(np.float64)
    win = min(7, min(ca.shape))
    win -= 1 - win % 2
    if win < 3:
        return math.nan
    return float(structural_similarity(ca, cb, data_range=data_range, win_size=win))


def image_metrics(a: np.ndarray, b: np.ndarray, body: np.ndarray, window: tuple[float, float],
                  metrics: tuple[str, ...]) -> dict[str, float]:
    """MAE / PSNR / SSIM (as requested in ``metrics``) of two images clipped to ``window``."""
    ca, cb = np.clip(a, *window), np.clip(b, *window)
    data_range = window[1] - window[0]
    out = {}
    if "mae" in metrics:
        out["mae"] = mae(ca, cb, body)
    if "psnr" in metrics:
        out["psnr"] = psnr(ca, cb, body, data_range)
    if "ssim" in metrics:
        out["ssim"] = ssim_in_box(ca, cb, body, data_range)
    return out


def union_body(ct_a: np.ndarray, ct_b: np.ndarray) -> np.ndarray:
    """Voxels inside the body mask of either CT (both on the same grid)."""
    return body_mask(ct_a) | body_mask(ct_b)
