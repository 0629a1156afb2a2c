"""The chest wall and head bones of the whole-column phantom: ribs 1-9 with their costal cartilages, the
sternum, clavicles, scapulae and the skull base (ribs 10-12 are in :mod:`.skeleton`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from SpineInpaintLib.data.phantom.body import _Layout, _Painter
from SpineInpaintLib.data.phantom.shapes import _capsule_prim, _ellipsoid_prim, _Prim, _sd_ellipse
from SpineInpaintLib.data.phantom.spine import _Vert

__all__: list[str] = []

#: Per rib 1-9: angle (deg from straight back, round the side) where the bone ends, capsule radius (mm).
_RIB_SHAPE = {1: (148.0, 4.2), 2: (150.0, 4.0), 3: (150.0, 4.2), 4: (149.0, 4.4), 5: (148.0, 4.5),
              6: (146.0, 4.5), 7: (144.0, 4.5), 8: (140.0, 4.4), 9: (140.0, 4.3)}


@dataclasses.dataclass
class _Sternum:
    """The sternum's mid-line: top (jugular notch) and bottom (xiphoid tip) z, and y as a function of z."""

    z_top: float
    z_bottom: float
    layout: _Layout
    fat: float

    def y(self, z: float) -> float:
        """Centre of the sternum (mm): inside the anterior wall, just under the subcutaneous fat."""
        _, _, ba, yc = (float(v[0]) for v in self.layout.outline(np.array([z])))
        return yc - ba + 2.0 + 1.2 * self.fat + 6.0

    def half_width(self, z: float) -> float:
        """Manubrium ~25 mm, body ~15 mm, xiphoid ~8 mm half width."""
        t = (self.z_top - z) / max(self.z_top - self.z_bottom, 1.0)
        return float(np.interp(t, [0.0, 0.2, 0.3, 0.85, 1.0], [25.0, 22.0, 14.0, 13.0, 7.0]))

    def attachment(self, number: int) -> float:
        """z where costal cartilage 1-7 meets the sternum (1 on the manubrium, 2 at the sternal angle)."""
        t = [0.08, 0.25, 0.38, 0.5, 0.62, 0.74, 0.84][number - 1]
        return self.z_top - t * (self.z_top - self.z_bottom)


def _sternum_of(lay: _Layout, upper: dict[str, _Vert], fat: float) -> _Sternum:
    z_top = 0.5 * (upper["T2"].center[2] + upper["T3"].center[2])
    z_bottom = float(upper["T9"].center[2]) - 12.0
    return _Sternum(float(z_top), z_bottom, lay, fat)


def _sternum_prims(st: _Sternum) -> list[_Prim]:
    """Manubrium, body and xiphoid: flat capsules (6 mm thick) down the mid-line."""
    zs = np.linspace(st.z_top, st.z_bottom, 9)
    prims = []
    for z0, z1 in zip(zs[:-1], zs[1:]):
        hw = st.half_width(0.5 * (z0 + z1))
        r = 5.0 if z1 > st.z_bottom + 1 else 3.0
        a, b = np.array([0.0, st.y(z0), z0]), np.array([0.0, st.y(z1), z1])
        prims.append(_capsule_prim(np.zeros(3), np.eye(3), a, b, r, scale=(r / hw, 1.0, 1.0)))
    return prims


def _rib_path(lay: _Layout, fat: float, vt: _Vert, side: float, end_deg: float, drop: float):
    """Head, tubercle and the points round the chest wall (just inside the muscle layer) of a rib."""
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    v_c = 0.80 * b + d["canal_d"] / 2 + 0.5
    head = c + fr @ np.array([side * (a + 1.5), 0.45 * b, hc - 3.0])
    tub = c + fr @ np.array([side * (d["tp_span"] / 2 - 2.0), v_c + 10.0, 0.14 * d["height"] - 5.0])
    A, Bp, Ba, yc = (float(v[0]) for v in lay.outline(np.array([tub[2]])))
    pts = [head, tub]
    phis = np.arange(38.0, end_deg + 1e-6, 3.0)
    for phi in phis:
        ex, ey = side * math.sin(math.radians(phi)), math.cos(math.radians(phi))
        B = Bp if ey > 0 else Ba
        rb = 1.0 / (abs(ex / A) ** 2.5 + abs(ey / B) ** 2.5) ** 0.4
        inset = 2.0 + fat * (0.9 - 0.3 * ey) + 7.0
        t = (phi - phis[0]) / max(end_deg - phis[0], 1.0)
        z = tub[2] - 4.0 - drop * t ** 1.2
        if ey > 0:  # behind: inside the back wall and no further back than the posterior rib arcs
            rb = min(rb, (lay.y_back - yc) / ey, (lay.rib_back(z) - yc) / ey + inset)
        r = rb - inset
        # the cage narrows toward the thoracic inlet as the cavity does (_Layout.cavity_adjust)
        pts.append(np.array([r * ex * float(lay.cage(z)), yc + r * ey, z]))
    return pts


def _upper_rib_prims(lay: _Layout, fat: float, vt: _Vert, side: float, number: int,
                     st: _Sternum) -> tuple[list[_Prim], list[_Prim]]:
    """Rib 1-9 of vertebra ``vt``: a chain of capsules from the head (at the body, by the disc above)
    and the tubercle (at the transverse process) round the chest, descending; ribs 1-7 reach the
    sternum through their costal cartilage, 8-9 the cartilage of the rib above (the costal margin)."""
    end_deg, r0 = _RIB_SHAPE[number]
    tub_z = float((vt.center + vt.frame @ np.array([0.0, 0.0, 0.14 * vt.dims["height"] - 5.0]))[2])
    if number <= 7:
        # the bony end lies a little below its sternal attachment: lower cartilages climb to the sternum
        z_end = st.attachment(number) - (0.0, 0.0, 4.0, 7.0, 11.0, 16.0, 22.0)[number - 1]
        drop = max(tub_z - 4.0 - z_end, 8.0)
    else:
        drop = 90.0 + 6.0 * (number - 8)
    pts = _rib_path(lay, fat, vt, side, end_deg, drop)
    radii = [r0 + 0.6, r0 + 0.3] + [r0 - 0.6 * i / max(len(pts) - 3, 1) for i in range(len(pts) - 2)]
    prims = [_capsule_prim(np.zeros(3), np.eye(3), pts[i], pts[i + 1], min(radii[i], radii[i + 1]))
             for i in range(len(pts) - 1)]
    last = pts[-1]
    if number <= 7:
        z_s = st.attachment(number)
        tgt = np.array([side * (st.half_width(z_s) - 2.0), st.y(z_s), z_s])
    else:
        tgt = np.array([side * 0.6 * abs(last[0]), last[1] - 25.0, last[2] + 22.0])
    mid = 0.5 * (last + tgt) + np.array([0.0, -3.0, 0.0])
    cart = [_capsule_prim(np.zeros(3), np.eye(3), last, mid, 3.8), _capsule_prim(np.zeros(3), np.eye(3), mid, tgt, 3.6)]
    return prims, cart


def _clavicle_prims(lay: _Layout, st: _Sternum, side: float) -> list[_Prim]:
    """A clavicle: an S-curved rod from the manubrium's top out and back to the shoulder."""
    A, _, Ba, yc = (float(v[0]) for v in lay.outline(np.array([st.z_top])))
    y0 = st.y(st.z_top)
    pts = [np.array([side * 20.0, y0 - 4.0, st.z_top + 6.0]),
           np.array([side * 0.3 * A, y0 - 6.0, st.z_top + 12.0]),
           np.array([side * 0.55 * A, y0 + 4.0, st.z_top + 18.0]),
           np.array([side * 0.78 * A, yc - 0.15 * Ba, st.z_top + 22.0])]
    return [_capsule_prim(np.zeros(3), np.eye(3), a, b, 6.5, scale=(1.0, 1.0, 0.9)) for a, b in zip(pts[:-1], pts[1:])]


def _scapula_prims(lay: _Layout, fat: float, upper: dict[str, _Vert], side: float) -> list[_Prim]:
    """A scapula: a flat plate on the back of the chest (T2-T7) turning forward at its lateral edge,
    with the ridge of its spine across the upper part."""
    z_hi, z_lo = float(upper["T2"].center[2]), float(upper["T7"].center[2])
    zc = 0.5 * (z_hi + z_lo)
    A, _, _, _ = (float(v[0]) for v in lay.outline(np.array([zc])))
    y_plate = min(lay.y_back - 2.0 - 0.6 * fat - 26.0, lay.rib_back(zc) + 14.0)  # on the posterior ribs
    ang = math.radians(28.0)
    u = np.array([side * math.cos(ang), -math.sin(ang), 0.0])
    v = np.array([side * math.sin(ang), math.cos(ang), 0.0])
    fr = np.stack([u, v, np.array([0.0, 0.0, 1.0])], axis=1)
    c = np.array([side * 0.52 * A, y_plate, zc])
    plate = _ellipsoid_prim(c, fr, (0.2 * A + 12.0, 4.0, 0.55 * (z_hi - z_lo) + 8.0))
    spine_a = c + fr @ np.array([-0.2 * A, 4.0, 0.35 * (z_hi - z_lo)])
    spine_b = c + fr @ np.array([0.25 * A, 2.0, 0.5 * (z_hi - z_lo)])
    return [plate, _capsule_prim(np.zeros(3), np.eye(3), spine_a, spine_b, 4.0)]


def _skull_shape(c1: _Vert) -> tuple[float, float, float, float, float]:
    """Skull centre y, z and half width, depth, height: its base (the foramen magnum) over the atlas."""
    z = float(c1.center[2]) + 10.0 + 70.0
    return float(c1.center[1]) - 13.0, z, 72.0, 90.0, 70.0


def _skull_prims(c1: _Vert) -> tuple[list[_Prim], list[_Prim], _Prim]:
    """The skull as a 7 mm shell with the foramen magnum over the canal; returns (bone, cuts, brain)."""
    y, z, a, b, h = _skull_shape(c1)
    c = np.array([float(c1.center[0]), y, z])
    outer = _ellipsoid_prim(c, np.eye(3), (a, b, h))
    brain = _ellipsoid_prim(c, np.eye(3), (a - 7.0, b - 7.0, h - 7.0))
    v_c = 0.80 * c1.dims["depth"] / 2 + c1.dims["canal_d"] / 2 + 0.5
    canal = c1.center + c1.frame @ np.array([0.0, v_c, 0.0])
    r = 0.5 * c1.dims["canal_w"] + 2.0
    hole = _Prim(np.array([canal[0], canal[1], z - h]), np.eye(3), np.array([-r - 1, -r - 5, -15.0]),
                 np.array([r + 1, r + 5, 25.0]), lambda u, v, w: _sd_ellipse(u, v, r, r + 3.0))
    return [outer], [brain, hole], brain


def _paint_chest_bones(p: _Painter, upper: list[_Vert]) -> None:
    """Scapulae, clavicles, ribs 1-9 with cartilages, sternum and the skull (vertebrae come after)."""
    cfg, lay = p.cfg, p.layout
    by = {v.name: v for v in upper}
    st = _sternum_of(lay, by, cfg.fat_mm)
    cort = max(cfg.cortical_mm, 1.0)
    for side, label in ((1.0, 71), (-1.0, 72)):  # scapula_left / _right
        p.bone(_scapula_prims(lay, cfg.fat_mm, by, side), [], label, cfg.cortical_hu * 0.9, cfg.cancellous_hu, cort)
    for side, label in ((1.0, 73), (-1.0, 74)):  # clavicula_left / _right
        p.bone(_clavicle_prims(lay, st, side), [], label, cfg.cortical_hu * 0.95, cfg.cancellous_hu, cort)
    for n in range(1, 10):
        vt = by[f"T{n}"]
        for side, base in ((1.0, 91), (-1.0, 103)):  # rib_left_n = 91 + n, rib_right_n = 103 + n
            rib, cart = _upper_rib_prims(lay, cfg.fat_mm, vt, side, n, st)
            p.soft(cart, [], 130.0, 117, clip=None, k=p.k)
            p.bone(rib, [], base + n, vt.cortical_hu * 0.9, vt.cancellous_hu, cort_mm=1.1)
    p.bone(_sternum_prims(st), [], 116, cfg.cortical_hu * 0.9, cfg.cancellous_hu * 0.9, cort)
    bone, cuts, brain = _skull_prims(by["C1"])
    p.soft([brain], [], 35.0, 90, clip=None)
    p.bone(bone, cuts, 91, cfg.cortical_hu * 1.2, cfg.cancellous_hu * 1.5, cort_mm=2.0)
