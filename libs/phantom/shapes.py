"""Voxelized shape primitives for the phantom: irregular ellipsoids and capsules on a canvas.

Body coordinates (mm): x towards the subject's Right, y Anterior, and ``zeta`` the height above the
inferior edge of the volume (so ``zeta / length`` runs 0 → 1 from pelvis to shoulders).  Every
primitive works on its bounding box only, which keeps a 2 mm whole-body phantom fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Monomials of a unit direction n = (nx, ny, nz) up to degree 3 (without the constant): the
# low-order "spherical harmonics" that bend an ellipsoid into a smooth irregular organ.
_MONOMIALS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1),
              (0, 1, 1), (3, 0, 0), (0, 3, 0), (0, 0, 3), (2, 1, 0), (2, 0, 1), (1, 2, 0), (0, 2, 1),
              (1, 0, 2), (0, 1, 2), (1, 1, 1)]


def _fibonacci_sphere(n: int = 2048) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = math.pi * (1.0 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE = _fibonacci_sphere()


@dataclass(frozen=True)
class Irregularity:
    """Radius multiplier 1 + ε(n) with ε a smooth random function of direction, |ε| < amount."""

    coeffs: np.ndarray
    amount: float

    @staticmethod
    def draw(rng: np.random.Generator, amount: float) -> Irregularity:
        return Irregularity(rng.normal(0.0, 1.0, len(_MONOMIALS)) / math.sqrt(6.0), amount)

    @staticmethod
    def none() -> Irregularity:
        return Irregularity(np.zeros(len(_MONOMIALS)), 0.0)

    def eps(self, nx, ny, nz):
        """ε at unit directions (arrays of equal shape)."""
        if self.amount == 0.0:
            return np.zeros_like(nx)
        powers = [[None, n, n * n, None] for n in (nx, ny, nz)]
        for p in powers:
            p[3] = p[2] * p[1]
        acc = np.zeros_like(nx)
        for c, exps in zip(self.coeffs, _MONOMIALS):
            term = None
            for axis, e in enumerate(exps):
                if e:
                    term = powers[axis][e] if term is None else term * powers[axis][e]
            acc += np.float32(c) * term
        return self.amount * np.tanh(acc)

    def volume_factor(self) -> float:
        """Volume of the perturbed unit ball over that of the unit ball: mean of (1 + ε)³ over the sphere."""
        e = self.eps(_SPHERE[:, 0], _SPHERE[:, 1], _SPHERE[:, 2])
        return float(np.mean((1.0 + e) ** 3))


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns = local axes in body coordinates): about z (yaw), y (pitch), x (roll)."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


class Canvas:
    """The voxel grid of one phantom with its tissue-class and label volumes ``[x, y, z]``."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: float):
        self.shape = shape
        self.spacing = float(spacing_mm)
        nx, ny, nz = shape
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * spacing_mm).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * spacing_mm).astype(np.float32)
        self.zeta = ((np.arange(nz) + 0.5) * spacing_mm).astype(np.float32)
        self.length = nz * spacing_mm
        self.tissue = np.zeros(shape, np.uint8)
        self.labels = np.zeros(shape, np.uint8)

    def box(self, center, half_extent) -> tuple[slice, slice, slice] | None:
        """Index slices covering ``center ± half_extent`` (mm), or None when outside the grid."""
        out = []
        for axis, (c, h) in enumerate(zip(center, half_extent)):
            coords = (self.x, self.y, self.zeta)[axis]
            lo = int(np.searchsorted(coords, c - h, side="left"))
            hi = int(np.searchsorted(coords, c + h, side="right"))
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def coords(self, box):
        """Broadcastable body coordinates (mm) of a box: x (n,1,1), y (1,n,1), zeta (1,1,n)."""
        sx, sy, sz = box
        return self.x[sx, None, None], self.y[None, sy, None], self.zeta[None, None, sz]

    def paint(self, box, mask: np.ndarray, tissue: int, label: int | None = None) -> None:
        """Set the tissue class (and label id, when given) of the masked voxels of a box."""
        self.tissue[box][mask] = tissue
        if label is not None:
            self.labels[box][mask] = label


def ellipsoid_field(canvas: Canvas, center, radii, rot: np.ndarray | None = None,
                    irregular: Irregularity | None = None):
    """Normalized field f of an irregular ellipsoid in its bounding box (f < 1 inside, 0 at the centre).

    Returns ``(box, f)`` or ``(None, None)`` when the shape misses the grid.  ``f = |q|² / (1 + ε(q̂))²``
    with ``q`` the point in the ellipsoid's local, radius-normalized frame.
    """
    irregular = irregular or Irregularity.none()
    rot = np.eye(3) if rot is None else rot
    reach = max(radii) * (1.0 + irregular.amount) + canvas.spacing
    box = canvas.box(center, (reach, reach, reach))
    if box is None:
        return None, None
    x, y, z = canvas.coords(box)
    px, py, pz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
    q = [(np.float32(rot[0, i]) * px + np.float32(rot[1, i]) * py + np.float32(rot[2, i]) * pz)
         / np.float32(radii[i]) for i in range(3)]
    rho2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
    if irregular.amount:
        inv = 1.0 / np.sqrt(np.maximum(rho2, 1e-12))
        eps = irregular.eps(q[0] * inv, q[1] * inv, q[2] * inv)
        rho2 = rho2 / (1.0 + eps) ** 2
    return box, rho2.astype(np.float32, copy=False)


def capsule_field(canvas: Canvas, p0, p1, radius: float):
    """Normalized field of a capsule (segment p0→p1 swept by a ball): (distance / radius)²."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    lo, hi = np.minimum(p0, p1) - radius - canvas.spacing, np.maximum(p0, p1) + radius + canvas.spacing
    box = canvas.box((lo + hi) / 2, (hi - lo) / 2)
    if box is None:
        return None, None
    x, y, z = canvas.coords(box)
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd
    t = np.clip(t, 0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    return box, (dist2 / radius**2).astype(np.float32, copy=False)


def radii_for_volume(volume_ml: float, aspect, irregular: Irregularity) -> tuple[float, float, float]:
    """Ellipsoid radii (mm) with the given aspect ratios whose irregular volume is ``volume_ml``."""
    aspect = np.asarray(aspect, float)
    base = volume_ml * 1000.0 / (4.0 / 3.0 * math.pi * irregular.volume_factor() * float(np.prod(aspect)))
    return tuple(float(v) for v in aspect * base ** (1.0 / 3.0))
