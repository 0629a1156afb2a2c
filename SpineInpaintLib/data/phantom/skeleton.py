"""The skeleton around the spine in the phantom: ribs, ilium, sacro-iliac joints and hips."""

from __future__ import annotations

import math

import numpy as np

from SpineInpaintLib.data.phantom.body import _Painter
from SpineInpaintLib.data.phantom.shapes import (
    _F,
    _capsule_prim,
    _ellipsoid_prim,
    _Prim,
    _sd_ellipse,
)
from SpineInpaintLib.data.phantom.spine import (
    _lateral_mass_span,
    _sacral_plate_shape,
    _Vert,
)


def _rib_prims(p: _Painter, vt: _Vert, side: float, number: int) -> tuple[list[_Prim], list[_Prim]]:
    """A rib as a chain of capsules: head at the body, tubercle at the transverse process, then
    around the body wall just inside the muscle layer, descending; rib 10 ends in cartilage."""
    lay, cfg = p.layout, p.cfg
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    v_c = 0.80 * b + d["canal_d"] / 2 + 0.5
    head = c + fr @ np.array([side * (a + 1.5), 0.45 * b, hc - 3.0])
    tub = c + fr @ np.array([side * (d["tp_span"] / 2 - 2.0), v_c + 10.0, 0.14 * d["height"] - 5.0])
    end_deg, drop, r0 = {10: (150.0, 95.0, 4.3), 11: (118.0, 55.0, 4.0), 12: (85.0, 28.0, 3.6)}[number]
    end_deg += float(p.rng.uniform(-8, 8))
    A, Bp, Ba, yc = (float(v[0]) for v in lay.outline(np.array([tub[2]])))
    pts, radii = [head, tub], [r0 + 0.6, r0 + 0.3]
    phis = np.arange(38.0, end_deg + 1e-6, 3.0)
    for phi in phis:
        ex, ey = side * math.sin(math.radians(phi)), math.cos(math.radians(phi))
        B = Bp if ey > 0 else Ba
        rho = (abs(ex / A) ** 2.5 + abs(ey / B) ** 2.5) ** 0.4
        rb = 1.0 / rho
        if ey > 0:
            rb = min(rb, (lay.y_back - yc) / ey)
        r = rb - (2.0 + cfg.fat_mm * (0.9 - 0.3 * ey) + 7.0)
        t = (phi - phis[0]) / max(end_deg - phis[0], 1.0)
        pts.append(np.array([r * ex, yc + r * ey, tub[2] - 4.0 - drop * t ** 1.2]))
        radii.append(r0 - 0.8 * t)
    prims = []
    for i in range(len(pts) - 1):
        prims.append(_capsule_prim(np.zeros(3), np.eye(3), pts[i], pts[i + 1], min(radii[i], radii[i + 1])))
    cart = []
    if number == 10:
        # costal cartilage: on toward the front and up, to the costal margin
        last = pts[-1]
        tgt = np.array([side * 0.55 * abs(last[0]), last[1] - 35.0, last[2] + 25.0])
        cart.append(_capsule_prim(np.zeros(3), np.eye(3), last, tgt, 4.0))
    return prims, cart


def _ilium_prim(p: _Painter, s1: _Vert, side: float, z_crest: float, z_bottom: float) -> _Prim:
    """An iliac wing: a curved plate from the sacro-iliac joint round to the anterior spine,
    thick at the back, topped by the crest."""
    d, c, fr = s1.dims, s1.center, s1.frame
    half_span = d["tp_span"] / 2
    joint = c + fr @ np.array([side * (half_span + 9.0), 0.25 * d["depth"] / 2, 0.0])
    sc = p.cfg.vertebra_scale
    rx, ry = 42.0 * sc, 60.0 * sc
    a_post, a_ant = math.radians(150.0), math.radians(-70.0)
    cx = abs(joint[0]) - rx * math.cos(a_post)
    cy = joint[1] - ry * math.sin(a_post)
    r_mean = (rx + ry) / 2
    z_j = float(joint[2])

    def sdf(u, v, w):
        x, y, z = u, v, w  # world offsets from the prim centre (0, 0, 0): plain LPS
        lx = x * _F(side) - _F(cx)
        ly = y - _F(cy)
        rxz = np.maximum(_F(rx) + _F(0.25) * (z - _F(z_j)), _F(28.0))
        d_rad = _sd_ellipse(lx, ly, rxz, _F(ry))
        alpha = np.arctan2(ly / _F(ry), lx / rxz)
        crest = _F(z_crest) - _F(38.0) * ((alpha - _F(math.radians(45.0))) / _F(math.radians(115.0))) ** 2
        # thick at the back (sacro-iliac joint), thin in the iliac fossa, a rim at the crest
        back = np.clip((alpha - _F(math.radians(100.0))) / _F(math.radians(50.0)), 0, 1)
        rim = np.clip(_F(1.0) - (crest - z) / _F(15.0), 0, 1)
        thick = (_F(5.0) + _F(16.0) * back * back + _F(4.0) * rim) * _F(sc)
        dist = np.abs(d_rad) - thick / 2
        cap = np.maximum(alpha - _F(a_post), _F(a_ant) - alpha) * _F(r_mean)
        np.maximum(dist, cap, out=dist)
        np.maximum(dist, z - crest, out=dist)
        np.maximum(dist, _F(z_bottom) - z, out=dist)
        return dist

    lo = np.array([min(side * (cx - rx - 40), side * (cx + rx + 40)), cy - ry - 20, z_bottom - 2])
    hi = np.array([max(side * (cx - rx - 40), side * (cx + rx + 40)), cy + ry + 20, z_crest + 2])
    return _Prim(np.zeros(3), np.eye(3), lo, hi, sdf)


#: Width (mm) of the sacro-iliac joint space between the ilium and the sacrum.
_SI_JOINT_GAP = 2.5


def _sacroiliac_prims(s1: _Vert, sacral: list[_Vert], side: float, plate: bool, sc: float) -> list[_Prim]:
    """The posterior ilium beside S1-S3: two capsules of radius 12 mm across and 20 mm front to back
    (times the vertebra scale) through points just outside the lateral edges of the S1 ala, of S2 and
    of upper S3, so that once the dilated sacrum is cut from them they hug it across the joint space."""
    b1 = s1.dims["depth"] / 2
    ala_tip = s1.dims["tp_span"] / 2 + 6.0  # lateral end of the ala ellipsoid in _vertebra_prims
    pts = [s1.center + s1.frame @ np.array([side * (ala_tip + 6.0 * sc), 0.25 * b1 + 4.0, 0.0])]
    for i, sv in enumerate(sacral[:2]):
        if plate:
            edge, _, v_mid, bow = _sacral_plate_shape(i, sv)
            v_edge = v_mid - bow + 4.0
        else:  # the lateral end of the lateral masses drawn by _sacrum_prims
            edge, v_edge = _lateral_mass_span(s1, i) + 5.0, 0.35 * sv.dims["depth"] / 2
        w = 0.0 if i == 0 else 0.3 * sv.dims["height"] / 2
        pts.append(sv.center + sv.frame @ np.array([side * (edge + 6.0 * sc), v_edge, w]))
    r = 12.0 * sc
    return [_capsule_prim(np.zeros(3), np.eye(3), a, b, r, scale=(1.0, 0.6, 1.0))
            for a, b in zip(pts[:-1], pts[1:])]


def _hip_joint_prims(s1: _Vert, z_sacrum_low: float, z_top: float, side: float,
                     scale: float) -> tuple[list[_Prim], _Prim]:
    """A femoral head with the start of its neck, and the acetabular cup of the hip bone over it.

    Placed as in an adult pelvis (about 88 mm from the mid-line, a little anterior to the S1 body,
    the head's centre just below the sacrum's lowest point, the cup's roof no higher than
    ``z_top``), so only a field of view that reaches into the pelvis shows them. Returns
    ``(femur primitives, acetabulum primitive)``.
    """
    r = 23.0 * scale
    z = min(z_sacrum_low - 5.0, z_top - (r + 7.0))
    c = np.array([side * 88.0 * scale, float(s1.center[1]) - 10.0 * scale, z])
    head = _ellipsoid_prim(c, np.eye(3), (r, r, r))
    neck = _capsule_prim(c, np.eye(3), (0.0, 0.0, 0.0), (side * 32.0 * scale, 4.0, -22.0 * scale), 14.0 * scale)
    normal = np.array([side * 0.8, 0.0, 0.6])  # the cup opens down and toward the mid-line

    def cup(u, v, w):
        dist = np.sqrt(u * u + v * v + w * w)
        shell = np.maximum(dist - _F(r + 7.0), _F(r + 1.5) - dist)
        return np.maximum(shell, -(u * _F(normal[0]) + w * _F(normal[2])) - _F(0.2 * r))

    reach = r + 8.0
    return [head, neck], _Prim(c, np.eye(3), np.full(3, -reach), np.full(3, reach), cup)
