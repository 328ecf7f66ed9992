"""Assemble one phantom subject: geometry → tissue classes + labels → CT (HU) and PET (SUV)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..demographics import Demographics
from ..volumes import centered_affine
from .anatomy import TISSUE, TISSUES, PhantomParams, draw_params
from .body import build_torso
from .organs import make_layout, paint_abdomen, paint_bowel, paint_heart_and_aorta, paint_lungs, paint_muscles
from .shapes import Canvas
from .skeleton import paint_pelvis, paint_ribs, paint_shoulder_girdle, paint_spine, spine_levels

FOV_MM = 448.0            # 224 voxels × 2 mm in-plane, as the preprocessed real data
CT_RANGE_HU = (-1024, 3071)


@dataclass
class Phantom:
    """One phantom subject. Arrays are ``[x, y, z]`` RAS+: CT int16 HU, SUV float32, labels uint8."""

    demographics: Demographics
    ct: np.ndarray
    suv: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    params: PhantomParams


def subject_rng(seed: int, subject_id: str, stream: int) -> np.random.Generator:
    """Random stream of one subject: depends on (seed, subject id, stream) only, never on cohort size."""
    return np.random.default_rng([int(seed), zlib.crc32(subject_id.encode()), stream])


def grid_shape(length_mm: float, spacing_mm: float, fov_mm: float = FOV_MM) -> tuple[int, int, int]:
    n = int(round(fov_mm / spacing_mm))
    return n, n, max(16, int(round(length_mm / spacing_mm)))


def _upsample_linear(a: np.ndarray, shape) -> np.ndarray:
    """Separable linear interpolation of a small array onto ``shape`` (cell-centred grids)."""
    for axis, n_out in enumerate(shape):
        n_in = a.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
        i0 = np.minimum(pos.astype(np.int64), n_in - 2)
        w = (pos - i0).astype(np.float32).reshape([-1 if k == axis else 1 for k in range(a.ndim)])
        a = np.take(a, i0, axis=axis) * (1.0 - w) + np.take(a, i0 + 1, axis=axis) * w
    return a


def smooth_field(shape, rng: np.random.Generator, cell_vox: float) -> np.ndarray:
    """Zero-mean, ≈ unit-SD random field smooth over ~``cell_vox`` voxels (coarse noise, linear upsampling)."""
    coarse = [max(2, int(np.ceil(n / max(cell_vox, 1.0))) + 1) for n in shape]
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    return _upsample_linear(noise, shape)


def _gaussian_noise_gain(sigma: float, truncate: float) -> float:
    """SD of white unit noise after a 3-D separable Gaussian filter of ``sigma`` voxels (scipy's kernel)."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sum(k**2) ** 1.5)


def build_geometry(demo: Demographics, params: PhantomParams, spacing_mm: float,
                   rng: np.random.Generator) -> tuple[Canvas, object]:
    """Voxelize the anatomy: tissue classes and TotalSegmentator labels on a fresh canvas."""
    canvas = Canvas(grid_shape(params.length_mm, spacing_mm), spacing_mm)
    torso = build_torso(canvas, demo, params, TISSUE["fat"], TISSUE["muscle"], TISSUE["soft"])
    scale = float(np.clip(demo.height_m / 1.75, 0.85, 1.15))
    levels = spine_levels(canvas.length, params.jitter["spine"])
    layout = make_layout(canvas, params, levels)
    paint_lungs(canvas, torso, layout)
    paint_bowel(canvas, torso, layout, params, smooth_field(canvas.shape, rng, 12.0 / spacing_mm))
    paint_muscles(canvas, torso, layout, scale)
    paint_heart_and_aorta(canvas, torso, layout, params, rng)
    paint_abdomen(canvas, torso, layout, params, rng)
    paint_spine(canvas, torso, levels, scale)
    paint_ribs(canvas, torso, levels)
    paint_shoulder_girdle(canvas, torso, levels, rng)
    paint_pelvis(canvas, torso, levels, rng, scale)
    return canvas, torso


def render_ct(canvas: Canvas, torso, params: PhantomParams, texture: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """CT in HU: tissue means + smooth texture + lung gravity gradient + scanner noise; air is −1000."""
    table = np.array([params.hu[name] for name in TISSUES], np.float32)
    hu = table[canvas.tissue]
    lung = canvas.tissue == TISSUE["lung"]
    hu += np.where(lung, 60.0, 8.0).astype(np.float32) * texture
    yy = np.broadcast_to(canvas.y[None, :, None], canvas.shape)
    hu[lung] -= 30.0 * yy[lung] / 150.0                  # denser towards the back (supine)
    noise_sd = params.ct_noise_hu * min(1.0, (2.0 / canvas.spacing) ** 1.5)
    hu += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise_sd)
    if canvas.spacing <= 3.0:
        hu = ndimage.gaussian_filter(hu, 0.8 / canvas.spacing, truncate=2.0)
    hu[~torso.body] = -1000.0
    return np.clip(np.rint(hu), *CT_RANGE_HU).astype(np.int16)


def render_pet(canvas: Canvas, torso, params: PhantomParams, texture: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """PET in SUV: tissue uptake × heterogeneity, blurred to the scanner FWHM, plus count noise (∝ √SUV).

    The heterogeneity shares the CT's smooth tissue texture (the same tissue seen by both modalities)."""
    table = np.array([params.suv[name] for name in TISSUES], np.float32)
    table[TISSUE["air"]] = 0.0
    suv = table[canvas.tissue]
    suv *= 1.0 + 0.06 * texture
    sigma = params.pet_fwhm_mm / 2.3548 / canvas.spacing
    suv = ndimage.gaussian_filter(suv, sigma, truncate=3.0)
    noise = rng.standard_normal(canvas.shape, dtype=np.float32)
    if canvas.spacing < 4.0:                        # PET noise is correlated over ~4 mm
        noise = ndimage.gaussian_filter(noise, 2.0 / canvas.spacing, truncate=2.0)
        noise /= np.float32(_gaussian_noise_gain(2.0 / canvas.spacing, 2.0))
    scale = params.pet_noise * min(1.0, (4.0 / canvas.spacing) ** 1.5)
    suv += np.float32(scale) * np.sqrt(np.maximum(suv, 0.0)) * noise
    return np.maximum(suv, 0.0).astype(np.float32)


def make_phantom(demo: Demographics, seed: int, spacing_mm: float = 2.0) -> Phantom:
    """The phantom of one subject, fully determined by ``(seed, demo)`` (independent of cohort size).

    At 2 mm the grid is 224 × 224 × Z with Z from the paper's height law, like preprocessed real data.
    """
    if not 0.5 <= spacing_mm <= 16.0:
        raise ValueError(f"spacing_mm must be within 0.5–16 mm, got {spacing_mm}")
    params = draw_params(demo, subject_rng(seed, demo.subject_id, 1))
    canvas, torso = build_geometry(demo, params, spacing_mm, subject_rng(seed, demo.subject_id, 2))
    noise_rng = subject_rng(seed, demo.subject_id, 3)
    texture = smooth_field(canvas.shape, noise_rng, 6.0 / spacing_mm)
    ct = render_ct(canvas, torso, params, texture, noise_rng)
    suv = render_pet(canvas, torso, params, texture, noise_rng)
    return Phantom(demo, ct, suv, canvas.labels, centered_affine(canvas.shape, spacing_mm), params)
