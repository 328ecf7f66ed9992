"""Torso envelope of the phantom: skin, subcutaneous fat, muscle wall and the body cavity.

The cross-section at each height is an ellipse whose half-width and half-depth follow a sex-specific
profile (hips, waist, chest, shoulders) scaled so that the torso volume matches ≈ 47 % of body mass;
subcutaneous fat thickens with BMI (and at the abdomen and, in women, the hips); the cavity holding the
organs sits inside a muscle wall that is thickest at the back, where the spine and paraspinal muscles are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..demographics import Demographics
from .anatomy import PhantomParams
from .shapes import Canvas

_PROFILE_T = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
_WIDTH = {"M": [1.02, 1.04, 1.03, 0.97, 0.93, 0.95, 1.00, 1.04, 1.08, 1.14, 1.06],
          "F": [1.10, 1.12, 1.08, 0.98, 0.90, 0.92, 0.98, 1.00, 1.02, 1.06, 1.00]}
_DEPTH = {"M": [0.95, 1.00, 1.02, 1.02, 1.00, 1.00, 1.02, 1.04, 1.02, 0.92, 0.80],
          "F": [0.98, 1.02, 1.02, 1.00, 0.98, 0.98, 1.02, 1.04, 1.00, 0.90, 0.78]}


@dataclass
class Torso:
    """Per-slice ellipses (mm, arrays over z) and the cavity's normalized radius² volume."""

    half_width: np.ndarray      # body ellipse, x
    half_depth: np.ndarray      # body ellipse, y
    fat: np.ndarray             # subcutaneous fat thickness
    cav_a: np.ndarray           # cavity half-width
    cav_b: np.ndarray           # cavity half-depth
    cav_y: np.ndarray           # cavity centre, y
    cavity_q: np.ndarray        # (x/cav_a)² + ((y - cav_y)/cav_b)², full volume float32
    body: np.ndarray            # bool body mask, full volume

    def uv(self, canvas: Canvas, box):
        """Cavity-normalized coordinates (u = x / a, v = (y − y_c) / b) of a box, broadcast to 3-D."""
        x, y, _ = canvas.coords(box)
        sz = box[2]
        u = x / self.cav_a[None, None, sz]
        v = (y - self.cav_y[None, None, sz]) / self.cav_b[None, None, sz]
        return u, v


def _profiles(demo: Demographics, params: PhantomParams, t: np.ndarray):
    fa = np.interp(t, _PROFILE_T, _WIDTH[demo.sex])
    fb = np.interp(t, _PROFILE_T, _DEPTH[demo.sex])
    belly = float(np.clip(1.0 + 0.015 * (demo.bmi - 25.0), 0.9, 1.3))   # abdominal depth with BMI
    fb = fb * np.where((t > 0.22) & (t < 0.55), belly, 1.0)
    norm = np.sqrt(np.mean(fa * fb))
    return params.half_width_mm * fa / norm, params.half_depth_mm * fb / norm


def _fat_profile(demo: Demographics, params: PhantomParams, t: np.ndarray) -> np.ndarray:
    factor = np.interp(t, [0.0, 0.2, 0.3, 0.5, 0.6, 1.0], [1.2, 1.25, 1.35, 1.35, 1.0, 0.9])
    if demo.sex == "F":
        factor = factor * np.interp(t, [0.0, 0.25, 0.35, 1.0], [1.5, 1.4, 1.0, 1.0])
    return params.fat_mm * factor


def build_torso(canvas: Canvas, demo: Demographics, params: PhantomParams, fat_class: int,
                muscle_class: int, soft_class: int) -> Torso:
    """Paint fat, muscle wall and cavity filler (soft tissue) into ``canvas``; return the torso geometry."""
    t = canvas.zeta / canvas.length
    a, b = _profiles(demo, params, t)
    fat = np.minimum(_fat_profile(demo, params, t), 0.45 * np.minimum(a, b))
    inner_a, inner_b = a - fat, b - fat
    cav_a = np.maximum(inner_a - 18.0, 0.5 * inner_a)
    cav_b = np.maximum(inner_b - 22.0, 0.6 * inner_b)
    cav_y = inner_b - cav_b - 10.0                    # walls: 10 mm in front, the rest (≈ 34 mm) at the back
    x, y, _ = canvas.coords((slice(None),) * 3)

    def q(ha, hb, yc=0.0):
        return (x / ha[None, None, :]) ** 2 + ((y - yc) / hb[None, None, :]) ** 2

    body = q(a, b) <= 1.0
    canvas.tissue[body] = fat_class
    canvas.tissue[q(inner_a, inner_b) <= 1.0] = muscle_class
    cavity_q = q(cav_a, cav_b, cav_y[None, None, :]).astype(np.float32)
    canvas.tissue[cavity_q <= 1.0] = soft_class
    return Torso(a, b, fat, cav_a, cav_b, cav_y, cavity_q, body)
