"""Phantom soft-tissue organs: lungs (five lobes), heart, aorta, liver, gallbladder, spleen, stomach,
pancreas, kidneys, urinary bladder, psoas and paraspinal muscles, and the bowel/visceral-fat filler.

Organs are irregular ellipsoids (:mod:`.shapes`) sized to their drawn volume and placed relative to
the body cavity and the vertebral levels, so anatomy follows the body it sits in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..labels import label_id
from .anatomy import TISSUE, PhantomParams
from .body import Torso
from .shapes import Canvas, Irregularity, capsule_field, ellipsoid_field, radii_for_volume, rotation
from .skeleton import Level, level, spine_y


@dataclass
class Layout:
    """Landmark heights (mm above the inferior edge) of one subject."""

    dome_right: float
    dome_left: float
    apex: float
    levels: list[Level]


def make_layout(canvas: Canvas, params: PhantomParams, levels: list[Level]) -> Layout:
    t9 = level(levels, "T9")
    dome_r = t9.mid + 0.01 * canvas.length * params.jitter["diaphragm"]
    apex = level(levels, "T1").top + 0.03 * canvas.length
    return Layout(dome_right=dome_r, dome_left=dome_r - 0.02 * canvas.length, apex=apex, levels=levels)


def diaphragm(canvas: Canvas, torso: Torso, layout: Layout, box) -> np.ndarray:
    """Height (mm) of the diaphragm surface under each (x, y) of a box: two domes, deeper at the back."""
    u, v = torso.uv(canvas, box)
    dome = np.where(u > 0, layout.dome_right, layout.dome_left)
    return dome - canvas.length * 0.07 * ((np.abs(u) - 0.45) ** 2 / 0.35 + (v + 0.15) ** 2 / 1.4)


def _cavity_box(canvas: Canvas, z0: float, z1: float):
    return canvas.box((0.0, 0.0, 0.5 * (z0 + z1)), (1e4, 1e4, 0.5 * (z1 - z0)))


def paint_lungs(canvas: Canvas, torso: Torso, layout: Layout) -> None:
    """Both lungs between diaphragm and apex, outside the mediastinum, split into TotalSegmentator lobes."""
    box = _cavity_box(canvas, layout.dome_left - 0.12 * canvas.length, layout.apex)
    u, v = torso.uv(canvas, box)
    _, _, zeta = canvas.coords(box)
    q = torso.cavity_q[box]
    taper_start = layout.apex - 0.09 * canvas.length
    taper = np.clip(1.0 - (zeta - taper_start) / (layout.apex - taper_start), 0.0, 1.0)
    reach = 0.93 * np.sqrt(taper)
    lung = (q < reach**2) & (zeta > diaphragm(canvas, torso, layout, box)) & (np.abs(u) > 0.16 + 0.1 * (v > 0.3))
    fissure = layout.dome_right + 0.11 * canvas.length - 0.07 * canvas.length * (v + 1.0)   # oblique
    horizontal = layout.dome_right + 0.13 * canvas.length
    lower = zeta < fissure
    for name, sel in (("lung_lower_lobe_left", lower & (u < 0)), ("lung_upper_lobe_left", ~lower & (u < 0)),
                      ("lung_lower_lobe_right", lower & (u > 0)),
                      ("lung_middle_lobe_right", ~lower & (u > 0) & (zeta < horizontal)),
                      ("lung_upper_lobe_right", ~lower & (u > 0) & (zeta >= horizontal))):
        canvas.paint(box, lung & sel, TISSUE["lung"], label_id(name))


def paint_heart_and_aorta(canvas: Canvas, torso: Torso, layout: Layout, params: PhantomParams,
                          rng: np.random.Generator) -> None:
    irr = Irregularity.draw(rng, 0.12)
    radii = radii_for_volume(params.volumes_ml["heart"], (1.0, 0.85, 1.05), irr)
    z = layout.dome_left + 0.75 * radii[2] + 0.004 * canvas.length * params.jitter["heart"]
    k = min(int(z / canvas.spacing), canvas.shape[2] - 1)
    centre = (-0.15 * float(torso.cav_a[k]), float(torso.cav_y[k] + 0.22 * torso.cav_b[k]), z)
    box, f = ellipsoid_field(canvas, centre, radii, rotation(yaw_deg=-40.0, pitch_deg=25.0), irr)
    if box is not None:
        heart = f < 1.0
        canvas.paint(box, heart, TISSUE["myocardium"], label_id("heart"))
        canvas.paint(box, heart & (f < 0.45), TISSUE["blood"])
    _paint_aorta(canvas, torso, layout, centre, radii)


def _paint_aorta(canvas: Canvas, torso: Torso, layout: Layout, heart_centre, heart_radii) -> None:
    s, nz = canvas.spacing, canvas.shape[2]
    z_arch = layout.apex - 0.07 * canvas.length
    z_bif = level(layout.levels, "L4").mid
    ka, kb = min(int(z_arch / s), nz - 1), min(int(z_bif / s), nz - 1)
    y_desc_top = float(spine_y(torso, np.array([ka]), 14.0)[0]) + 32.0
    y_desc_bot = float(spine_y(torso, np.array([kb]), 19.0)[0]) + 34.0
    root = (heart_centre[0] + 10.0, heart_centre[1], heart_centre[2] + 0.5 * heart_radii[2])
    path = [(root, (8.0, root[1] - 5.0, z_arch - 10.0), 14.0),
            ((8.0, root[1] - 5.0, z_arch - 10.0), (-12.0, 0.5 * (root[1] + y_desc_top), z_arch), 12.5),
            ((-12.0, 0.5 * (root[1] + y_desc_top), z_arch), (-20.0, y_desc_top, z_arch - 20.0), 12.0),
            ((-20.0, y_desc_top, z_arch - 20.0), (-12.0, y_desc_bot, z_bif), 11.0)]
    for p0, p1, r in path:
        box, f = capsule_field(canvas, p0, p1, r)
        if box is not None:
            canvas.paint(box, (f < 1.0) & torso.body[box], TISSUE["blood"], label_id("aorta"))


def paint_bowel(canvas: Canvas, torso: Torso, layout: Layout, params: PhantomParams, field: np.ndarray) -> None:
    """Abdominal/pelvic cavity filler: bowel loops, visceral fat and gas pockets from a smooth random field."""
    box = _cavity_box(canvas, 0.0, layout.dome_right)
    region = (canvas.tissue[box] == TISSUE["soft"]) & (canvas.coords(box)[2] < diaphragm(canvas, torso, layout,
                                                                                        box))
    f = field[box]
    fat_cut = np.quantile(f[region], 1.0 - params.visceral_fat) if region.any() else np.inf
    canvas.paint(box, region, TISSUE["bowel"])
    canvas.paint(box, region & (f > fat_cut), TISSUE["visceral_fat"])
    gas_cut = np.quantile(f[region], 0.025) if region.any() else -np.inf
    canvas.paint(box, region & (f < gas_cut) & (canvas.coords(box)[2] > 0.18 * canvas.length), TISSUE["gas"])


@dataclass
class Placed:
    """An organ placed in a box: its normalized field ``f`` and the voxels it may occupy."""

    name: str
    volume_ml: float
    radii: tuple
    centre: tuple
    rot: np.ndarray | None
    irregular: Irregularity
    box: tuple | None = None
    f: np.ndarray | None = None
    inside: np.ndarray | None = None

    def rasterize(self, canvas: Canvas, torso: Torso, layout: Layout, free: np.ndarray) -> int:
        """Compute ``f`` and the allowed voxels (body, below the diaphragm, ``free``); return their count."""
        self.box, self.f = ellipsoid_field(canvas, self.centre, self.radii, self.rot, self.irregular)
        if self.box is None:
            return 0
        self.inside = (self.f < 1.0) & torso.body[self.box] & free[self.box]
        self.inside &= canvas.coords(self.box)[2] < diaphragm(canvas, torso, layout, self.box)
        return int(self.inside.sum())

    def grow(self, factor: float) -> None:
        self.radii = tuple(r * factor for r in self.radii)


def _place(canvas, torso, layout, name, volume, aspect, where, rot, rng, irr=0.22, hang=False) -> Placed:
    """Place one irregular ellipsoid organ; ``where`` = (u, v, zeta) in cavity coordinates, zeta being the
    centre's height, or the organ's top when ``hang`` (organs under the diaphragm)."""
    irregular = Irregularity.draw(rng, irr)
    radii = radii_for_volume(volume, aspect, irregular)
    z = where[2] - 0.8 * radii[2] if hang else where[2]
    k = min(max(int(z / canvas.spacing), 0), canvas.shape[2] - 1)
    centre = (where[0] * float(torso.cav_a[k]), float(torso.cav_y[k] + where[1] * torso.cav_b[k]), z)
    return Placed(name, volume, radii, centre, rot, irregular)


def _compete(canvas: Canvas, torso: Torso, layout: Layout, organs: list[Placed], tissue: dict[str, int],
             rounds: int = 3) -> None:
    """Paint organs so that each contested voxel goes to the organ whose normalized field is smallest.

    Between rounds each organ grows (≤ ×1.2 in radius) by the cube root of its volume shortfall, so
    the painted volumes approach the drawn ones even where organs press against each other.
    """
    free = canvas.labels == 0                     # lungs, heart, muscles painted before stay theirs
    for rnd in range(rounds):
        winner = np.full(canvas.shape, np.inf, np.float32)
        owner = np.full(canvas.shape, -1, np.int16)
        for i, organ in enumerate(organs):
            if organ.rasterize(canvas, torso, layout, free) == 0:
                continue
            w, o = winner[organ.box], owner[organ.box]
            win = organ.inside & (organ.f < w)
            w[win], o[win] = organ.f[win], i
        counts = np.bincount(owner[owner >= 0].ravel(), minlength=len(organs))
        short = [o.volume_ml * 1000.0 / canvas.spacing**3 / max(int(c), 1) for o, c in zip(organs, counts)]
        if rnd == rounds - 1 or max(short) < 1.03:
            break
        for organ, ratio in zip(organs, short):
            if ratio > 1.03:
                organ.grow(min(ratio ** (1.0 / 3.0), 1.2))
    for i, organ in enumerate(organs):
        if organ.box is not None:
            canvas.paint(organ.box, owner[organ.box] == i, TISSUE[tissue[organ.name]], label_id(organ.name))


def paint_abdomen(canvas: Canvas, torso: Torso, layout: Layout, params: PhantomParams,
                  rng: np.random.Generator) -> None:
    """Liver, gallbladder, spleen, stomach, pancreas, kidneys and bladder, sharing space by proximity."""
    V, J, L = params.volumes_ml, params.jitter, canvas.length
    lv = lambda name: level(layout.levels, name)  # noqa: E731
    liver = _place(canvas, torso, layout, "liver", V["liver"], (1.15, 1.0, 0.85),
                   (0.42, -0.05, layout.dome_right + 0.004 * L * J["liver"]),
                   rotation(yaw_deg=10.0, roll_deg=8.0), rng, 0.2, hang=True)
    liver_bottom = liver.centre[2] - 0.7 * liver.radii[2]
    l1, l2 = lv("L1"), lv("L2")
    organs = [liver,
              _place(canvas, torso, layout, "gallbladder", V["gallbladder"], (0.6, 0.6, 1.3),
                     (0.3, 0.5, liver_bottom), rotation(pitch_deg=20.0), rng, 0.1),
              _place(canvas, torso, layout, "spleen", V["spleen"], (0.55, 1.0, 1.1),
                     (-0.68, -0.42, layout.dome_left - 0.02 * L + 0.004 * L * J["spleen"]),
                     rotation(yaw_deg=30.0), rng, hang=True),
              _place(canvas, torso, layout, "stomach", V["stomach"], (0.95, 0.7, 1.2),
                     (-0.35, 0.3, layout.dome_left - 0.01 * L + 0.004 * L * J["stomach"]),
                     rotation(yaw_deg=-20.0, roll_deg=10.0), rng, 0.18, hang=True),
              _place(canvas, torso, layout, "pancreas", V["pancreas"], (2.4, 0.55, 0.5),
                     (-0.12, -0.12, l1.mid), rotation(yaw_deg=12.0, pitch_deg=-8.0), rng, 0.15),
              _place(canvas, torso, layout, "kidney_right", V["kidney_right"], (0.55, 0.45, 1.0),
                     (0.42, -0.62, l2.top - 0.2 * (l2.top - l2.bottom) + 0.004 * L * J["kidneys"]),
                     rotation(pitch_deg=12.0, yaw_deg=25.0), rng, 0.12),
              _place(canvas, torso, layout, "kidney_left", V["kidney_left"], (0.55, 0.45, 1.0),
                     (-0.42, -0.62, l2.top + 0.3 * (l1.top - l1.bottom) + 0.004 * L * J["kidneys"]),
                     rotation(pitch_deg=-12.0, yaw_deg=-25.0), rng, 0.12),
              _place(canvas, torso, layout, "urinary_bladder", V["urinary_bladder"], (1.15, 0.9, 0.8),
                     (0.0, 0.35, (0.135 + 0.006 * J["bladder"]) * L), None, rng, 0.1)]
    _compete(canvas, torso, layout, organs, {"liver": "liver", "gallbladder": "gallbladder", "spleen": "spleen",
                              "stomach": "stomach_wall", "pancreas": "pancreas", "kidney_right": "kidney_cortex",
                              "kidney_left": "kidney_cortex", "urinary_bladder": "urine"})
    for organ in organs:
        if organ.box is None:
            continue
        own = canvas.labels[organ.box] == label_id(organ.name)
        if organ.name == "stomach":
            zeta = canvas.coords(organ.box)[2]
            canvas.paint(organ.box, own & (organ.f < 0.7), TISSUE["stomach_content"])
            canvas.paint(organ.box, own & (organ.f < 0.7) & (zeta > organ.centre[2] + 0.45 * organ.radii[2]),
                         TISSUE["gas"])
        elif organ.name.startswith("kidney"):
            sign = 1.0 if organ.name.endswith("right") else -1.0
            x = canvas.coords(organ.box)[0]
            canvas.paint(organ.box, own & (organ.f < 0.45), TISSUE["kidney_medulla"])
            canvas.paint(organ.box, own & (organ.f < 0.3) & ((x - organ.centre[0]) * sign < -0.1 * organ.radii[0]),
                         TISSUE["renal_pelvis"])


def paint_muscles(canvas: Canvas, torso: Torso, layout: Layout, scale: float) -> None:
    """Psoas (iliopsoas) along the lumbar spine into the pelvis; paraspinal (autochthon) muscles."""
    s, nz = canvas.spacing, canvas.shape[2]
    t12, l5 = level(layout.levels, "T12"), level(layout.levels, "L5")
    for side, sign in (("left", -1.0), ("right", 1.0)):
        k0, k1 = min(int(t12.mid / s), nz - 1), min(int(0.1 * canvas.length / s), nz - 1)
        y0 = float(spine_y(torso, np.array([k0]), 19.0)[0])
        p0 = (sign * 30.0 * scale, y0, t12.mid)
        p1 = (sign * 45.0 * scale, y0 + 5.0, l5.mid)
        p2 = (sign * 0.5 * float(torso.cav_a[k1]), float(torso.cav_y[k1]), 0.1 * canvas.length)
        for a, b, r in ((p0, p1, 13.0 * scale), (p1, p2, 20.0 * scale)):
            box, f = capsule_field(canvas, a, b, r)
            if box is not None:
                canvas.paint(box, (f < 1.0) & (canvas.labels[box] == 0) & torso.body[box], TISSUE["muscle"],
                             label_id(f"iliopsoas_{side}"))
        zs = np.arange(0.2 * canvas.length, layout.apex, 6.0 * s)
        for za, zb in zip(zs[:-1], zs[1:]):
            k = min(int(za / s), nz - 1)
            y = float(torso.cav_y[k] - torso.cav_b[k]) - 28.0 * scale
            box, f = capsule_field(canvas, (sign * 32.0 * scale, y, za), (sign * 32.0 * scale, y, zb), 18.0 * scale)
            if box is not None:
                canvas.paint(box, (f < 1.0) & (canvas.labels[box] == 0) & torso.body[box], TISSUE["muscle"],
                             label_id(f"autochthon_{side}"))
