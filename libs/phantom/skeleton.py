"""Phantom skeleton: vertebrae (C5…L5) with discs and spinal canal, ribs 1–12 with costal cartilage,
sternum, clavicles, scapulae, hip bones, sacrum and proximal femora — each labelled with its
TotalSegmentator 'total' id.  Bones have a cortical shell around trabecular marrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..labels import label_id
from .anatomy import TISSUE
from .body import Torso
from .shapes import Canvas, Irregularity, capsule_field, ellipsoid_field, rotation

_CORTEX, _MARROW = TISSUE["cortical_bone"], TISSUE["marrow"]
_LUMBAR = ["L5", "L4", "L3", "L2", "L1"]
_THORACIC = [f"T{k}" for k in range(12, 0, -1)]
_CERVICAL = ["C7", "C6", "C5", "C4", "C3"]


@dataclass(frozen=True)
class Level:
    """One vertebra: name (e.g. 'T12') and its bottom/top height above the volume's inferior edge (mm)."""

    name: str
    bottom: float
    top: float

    @property
    def mid(self) -> float:
        return 0.5 * (self.bottom + self.top)


def spine_levels(length_mm: float, jitter: float) -> list[Level]:
    """Vertebral levels from the sacrum (at 27.5 % of the crop) up past the clavicles (92.5 %).

    L5…T1 share the span sacrum → just above the clavicles, lumbar units 1.45× the thoracic ones
    (vertebra + disc ≈ 37 vs 25 mm in an adult); cervical levels continue above at 0.75×.
    """
    bottom = (0.275 + 0.005 * jitter) * length_mm
    t1_top = (0.937 + 0.003 * jitter) * length_mm
    unit = (t1_top - bottom) / (1.45 * len(_LUMBAR) + len(_THORACIC))
    levels, z = [], bottom
    for name in _LUMBAR + _THORACIC + _CERVICAL:
        h = unit * (1.45 if name[0] == "L" else 1.0 if name[0] == "T" else 0.75)
        levels.append(Level(name, z, z + h))
        z += h
        if z > length_mm:
            break
    return levels


def level(levels: list[Level], name: str) -> Level:
    return next(lv for lv in levels if lv.name == name)


def _bone(canvas: Canvas, box, f, label: int, shell: float = 0.55, within=None) -> None:
    """Paint a bone: marrow where f < shell, cortex up to f = 1; optional extra mask ``within``."""
    inside = f < 1.0 if within is None else (f < 1.0) & within
    canvas.paint(box, inside, _CORTEX, label)
    canvas.paint(box, inside & (f < shell), _MARROW)


def spine_y(torso: Torso, z_index: np.ndarray, ry: float) -> np.ndarray:
    """Antero-posterior centre (mm) of the vertebral bodies: at the back of the cavity."""
    return torso.cav_y[z_index] - torso.cav_b[z_index] + 0.85 * ry


def paint_spine(canvas: Canvas, torso: Torso, levels: list[Level], scale: float) -> None:
    """Vertebral bodies, posterior arches, discs, spinal canal and cord."""
    s = canvas.spacing
    for lv in levels:
        kind = lv.name[0]
        rx = scale * {"L": 24.0, "T": 17.0, "C": 12.0}[kind]
        ry = 0.8 * rx
        zc = lv.mid
        k = min(int(zc / s), canvas.shape[2] - 1)
        yc = float(spine_y(torso, np.array([k]), ry)[0])
        gap = min(0.22 * (lv.top - lv.bottom), 8.0)           # intervertebral disc
        lab = label_id(f"vertebrae_{lv.name}")
        box, f = ellipsoid_field(canvas, (0.0, yc, zc), (rx, ry, 0.5 * (lv.top - lv.bottom) - 0.5 * gap))
        if box is not None:
            _bone(canvas, box, f, lab, shell=0.6)
        box, f = ellipsoid_field(canvas, (0.0, yc, lv.top), (0.9 * rx, 0.9 * ry, 0.5 * gap + 0.5 * s))
        if box is not None:
            canvas.paint(box, (f < 1.0) & (canvas.labels[box] == 0), TISSUE["disc"])
        back = yc - ry
        arch = [((0.0, back - 10.0, zc), (0.0, back - 34.0 * scale, zc - 8.0), 5.5),   # spinous process
                ((11.0, back + 2.0, zc), (9.0, back - 16.0, zc), 5.0),                  # pedicle/lamina R
                ((-11.0, back + 2.0, zc), (-9.0, back - 16.0, zc), 5.0),                # pedicle/lamina L
                ((9.0, back - 8.0, zc), (rx + 14.0, back - 10.0, zc), 4.5),             # transverse R
                ((-9.0, back - 8.0, zc), (-(rx + 14.0), back - 10.0, zc), 4.5)]         # transverse L
        for p0, p1, r in arch:
            box, f = capsule_field(canvas, p0, p1, r * scale)
            if box is not None:
                _bone(canvas, box, f, lab, shell=0.3)
    _paint_canal(canvas, torso, levels, scale)


def _paint_canal(canvas: Canvas, torso: Torso, levels: list[Level], scale: float) -> None:
    s = canvas.spacing
    z0, z1 = levels[0].bottom - 10.0, canvas.length
    for zc in np.arange(z0, z1, 4.0 * s):
        k = min(int(zc / s), canvas.shape[2] - 1)
        lv = min(levels, key=lambda v: abs(v.mid - zc))
        rx = scale * {"L": 24.0, "T": 17.0, "C": 12.0}[lv.name[0]]
        yc = float(spine_y(torso, np.array([k]), 0.8 * rx)[0]) - 0.8 * rx - 8.0 * scale
        p0, p1 = (0.0, yc, zc), (0.0, yc, zc + 4.0 * s)
        box, f = capsule_field(canvas, p0, p1, 8.0 * scale)
        if box is not None:
            canvas.paint(box, f < 1.0, TISSUE["spinal_canal"])
            if lv.name[0] != "L" or lv.name in ("L1",):   # the cord ends at L1; cauda equina below
                canvas.paint(box, f < 0.35, TISSUE["spinal_canal"], label_id("spinal_cord"))


def paint_ribs(canvas: Canvas, torso: Torso, levels: list[Level]) -> None:
    """Ribs 1–12 on the cavity wall, sloping down anteriorly; 1–7 reach the sternum via cartilage."""
    length, s = canvas.length, canvas.spacing
    for k in range(1, 13):
        z_post = level(levels, f"T{k}").mid
        drop = length * (0.035 if k <= 2 else 0.06)
        reach = 0.97 if k <= 7 else 0.80 if k <= 10 else 0.45
        half = 5.0
        box = canvas.box((0.0, 0.0, z_post - drop / 2), (1e4, 1e4, drop / 2 + half + s))
        if box is None:
            continue
        u, v = torso.uv(canvas, box)
        r = np.sqrt(torso.cavity_q[box])
        sweep = 0.5 * (1.0 + v / np.maximum(r, 1e-6))         # 0 at the back, 1 at the front
        ring = (r > 0.93) & (r < 1.07)
        zc = z_post - drop * sweep**1.2
        _, _, zeta = canvas.coords(box)
        band = ring & (np.abs(zeta - zc) < half) & (np.abs(u) > 0.06)
        cartilage = band & (sweep > 0.82) & (sweep < reach)
        bone = band & (sweep <= min(reach, 0.82))
        for side, sign in (("left", -1.0), ("right", 1.0)):
            on_side = (u * sign) > 0
            canvas.paint(box, bone & on_side, _CORTEX, label_id(f"rib_{side}_{k}"))
            canvas.paint(box, bone & on_side & (np.abs(zeta - zc) < 0.45 * half), _MARROW)
        canvas.paint(box, cartilage, TISSUE["soft"], label_id("costal_cartilages"))


def paint_shoulder_girdle(canvas: Canvas, torso: Torso, levels: list[Level], rng: np.random.Generator) -> None:
    """Sternum, clavicles and scapulae."""
    s = canvas.spacing
    t2, t8 = level(levels, "T2"), level(levels, "T8")
    k = min(int(t2.mid / s), canvas.shape[2] - 1)
    front = float(torso.cav_y[k] + torso.cav_b[k])
    zc = 0.5 * (t2.top + t8.bottom)
    kz = min(int(zc / s), canvas.shape[2] - 1)
    front_mid = float(torso.cav_y[kz] + torso.cav_b[kz])
    box, f = ellipsoid_field(canvas, (0.0, front_mid + 4.0, zc), (15.0, 6.5, 0.5 * (t2.top - t8.bottom)))
    if box is not None:
        _bone(canvas, box, f, label_id("sternum"), shell=0.45)
    z_clav = level(levels, "T1").top + 0.004 * canvas.length
    kc = min(int(z_clav / s), canvas.shape[2] - 1)
    shoulder = 0.88 * float(torso.half_width[kc])
    back = float(torso.cav_y[kc] - torso.cav_b[kc])
    for side, sign in (("left", -1.0), ("right", 1.0)):
        box, f = capsule_field(canvas, (sign * 22.0, front + 2.0, z_clav - 6.0),
                               (sign * shoulder, back + 25.0, z_clav + 14.0), 8.0)
        if box is not None:
            _bone(canvas, box, f, label_id(f"clavicula_{side}"), shell=0.35, within=torso.body[box])
        ks = min(int((z_clav - 0.09 * canvas.length) / s), canvas.shape[2] - 1)
        centre = (sign * 0.62 * float(torso.cav_a[ks]), float(torso.cav_y[ks] - torso.cav_b[ks]) - 14.0,
                  z_clav - 0.085 * canvas.length)
        box, f = ellipsoid_field(canvas, centre, (52.0, 7.0, 72.0), rotation(yaw_deg=sign * 22.0),
                                 Irregularity.draw(rng, 0.12))
        if box is not None:
            _bone(canvas, box, f, label_id(f"scapula_{side}"), shell=0.3, within=torso.body[box])


def paint_pelvis(canvas: Canvas, torso: Torso, levels: list[Level], rng: np.random.Generator,
                 scale: float) -> None:
    """Hip bones (iliac wing, acetabulum, pubic ramus), sacrum and proximal femora."""
    s, length = canvas.spacing, canvas.length
    k_il, k_ac = min(int(0.21 * length / s), canvas.shape[2] - 1), min(int(0.085 * length / s),
                                                                           canvas.shape[2] - 1)
    a_il, y_il, b_il = float(torso.cav_a[k_il]), float(torso.cav_y[k_il]), float(torso.cav_b[k_il])
    a_ac, y_ac, b_ac = float(torso.cav_a[k_ac]), float(torso.cav_y[k_ac]), float(torso.cav_b[k_ac])
    l5 = level(levels, "L5")
    box, f = ellipsoid_field(canvas, (0.0, y_il - 0.72 * b_il, l5.bottom - 0.075 * length),
                             (44.0 * scale, 20.0 * scale, 0.08 * length), rotation(roll_deg=-25.0),
                             Irregularity.draw(rng, 0.08))
    if box is not None:
        _bone(canvas, box, f, label_id("sacrum"), shell=0.6)
    for side, sign in (("left", -1.0), ("right", 1.0)):
        lab = label_id(f"hip_{side}")
        parts = [ellipsoid_field(canvas, (sign * 0.62 * a_il, y_il - 0.3 * b_il, 0.21 * length),
                                 (11.0, 58.0 * scale, 0.075 * length), rotation(yaw_deg=sign * 35.0),
                                 Irregularity.draw(rng, 0.1)),
                 ellipsoid_field(canvas, (sign * 0.58 * a_ac, y_ac - 0.05 * b_ac, 0.085 * length),
                                 (22.0 * scale, 30.0 * scale, 0.055 * length), None, Irregularity.draw(rng, 0.1)),
                 capsule_field(canvas, (sign * 0.5 * a_ac, y_ac + 0.2 * b_ac, 0.08 * length),
                               (sign * 10.0, y_ac + 0.6 * b_ac, 0.075 * length), 9.0 * scale)]
        for box, f in parts:
            if box is not None:
                _bone(canvas, box, f, lab, shell=0.5, within=torso.body[box])
        head = (sign * (0.58 * a_ac + 24.0 * scale), y_ac - 0.05 * b_ac, 0.075 * length)
        lab = label_id(f"femur_{side}")
        for box, f in (ellipsoid_field(canvas, head, (23.0 * scale,) * 3),
                       capsule_field(canvas, head, (head[0] + sign * 35.0, head[1], head[2] - 30.0), 15.0 * scale),
                       capsule_field(canvas, (head[0] + sign * 35.0, head[1], head[2] - 30.0),
                                     (head[0] + sign * 30.0, head[1], -50.0), 14.0 * scale)):
            if box is not None:
                _bone(canvas, box, f, lab, shell=0.45, within=torso.body[box])
