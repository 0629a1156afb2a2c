"""The column above T10 in the phantom: poses of T9 ... C1 and the shapes peculiar to the neck (atlas,
axis with its dens, uncinate processes, transverse foramina)."""

from __future__ import annotations

import math

import numpy as np

from SpineInpaintLib.core.labels import VERTEBRA_NAMES
from SpineInpaintLib.data.phantom.config import UPPER_LEVELS, PhantomConfig
from SpineInpaintLib.data.phantom.shapes import (
    _F,
    _capsule_prim,
    _ellipsoid_prim,
    _frame,
    _Prim,
    _sd_ellipse,
)
from SpineInpaintLib.data.phantom.spine import _level_dims, _Vert, _vertebra_prims

__all__: list[str] = []

#: Cancellous bone of the cervical bodies is denser than the lumbar (about +15 %).
_CERVICAL_DENSITY = 1.15


def _tilts(frame: np.ndarray) -> tuple[float, float]:
    """Sagittal (toward posterior) and coronal (toward left) tilt (deg) of a frame's superior axis."""
    w = frame[:, 2]
    return math.degrees(math.atan2(w[1], w[2])), math.degrees(math.atan2(w[0], w[2]))


def _build_upper(cfg: PhantomConfig, t10: _Vert, rng: np.random.Generator) -> list[_Vert]:
    """Poses of T9 ... C1 (caudal to cranial) stacked on T10.

    The thoracic kyphosis is shared evenly by the discs T10/T9 ... T2/T1 (the superior axis tilting
    forward level by level), the cervical lordosis by C7 ... C2 (tilting back); the coronal tilt of
    T10 fades over three levels. ``rng`` is a stream of its own, so the levels below stay as they were.
    """
    names = [VERTEBRA_NAMES[i] for i in UPPER_LEVELS]
    jit = cfg.level_jitter
    theta0, phi0 = _tilts(t10.frame)
    out: list[_Vert] = []
    prev, prev_theta, prev_phi = t10, theta0, phi0
    n_thor = sum(1 for n in names if n.startswith("T"))
    for j, name in enumerate(names):
        d = _level_dims(cfg, rng, name)
        if name.startswith("T"):
            theta = prev_theta - cfg.thoracic_kyphosis_deg / n_thor
        elif name == "C1":
            theta = prev_theta + 4.0
        else:
            theta = prev_theta + cfg.cervical_lordosis_deg / 6.0
        theta += float(rng.normal(0, 20 * jit))
        phi = phi0 * max(0.0, 1.0 - (j + 1) / 3.0) + float(rng.normal(0, 10 * jit))
        psi = float(rng.normal(0, 10 * jit))
        step = prev.dims["height"] / 2 + prev.dims["disc_above"] + d["height"] / 2
        mid = _frame((prev_theta + theta) / 2, (prev_phi + phi) / 2, 0.0)[:, 2]
        center = prev.center + step * mid
        dens = _CERVICAL_DENSITY if name.startswith("C") else 1.0
        vt = _Vert(UPPER_LEVELS[j], name, d, center, _frame(theta, phi, psi),
                   cfg.cortical_hu * float(rng.uniform(0.94, 1.06)),
                   cfg.cancellous_hu * dens * float(rng.uniform(0.94, 1.06)))
        out.append(vt)
        prev, prev_theta, prev_phi = vt, theta, phi
    return out


def _foramen(c, fr, u: float, v: float, r: float, half: float) -> _Prim:
    """A vertical hole of radius ``r`` through a transverse process (for the vertebral artery)."""
    return _Prim(c, fr, np.array([u - r - 1, v - r - 1, -half]), np.array([u + r + 1, v + r + 1, half]),
                 lambda uu, vv, ww: _sd_ellipse(uu - _F(u), vv - _F(v), r, r))


def _atlas_prims(vt: _Vert) -> tuple[list[_Prim], list[_Prim]]:
    """C1: a ring (anterior arch in front of the dens, posterior arch with its tubercle), two lateral
    masses and transverse processes with their foramina; no body. The frame's origin is the dens."""
    d, c, fr = vt.dims, vt.center, vt.frame
    cw, cd = d["canal_w"] / 2, d["canal_d"] / 2
    front, back = -7.0, 0.80 * d["depth"] / 2 + 2 * cd + 2.5  # inner faces: before the dens, behind the cord
    v_r, b_in, a_in = (front + back) / 2, (back - front) / 2, cw + 2.0
    t = 2.3  # half thickness of the arches

    def ring(u, v, w):
        dd = np.abs(_sd_ellipse(u, v - _F(v_r), a_in + t, b_in + t)) - _F(t)
        return np.maximum(dd, np.abs(w) - _F(4.5))

    ext = np.array([a_in + 2 * t + 1, b_in + 2 * t + 1, 5.5])
    prims = [_Prim(c, fr, np.array([-ext[0], v_r - ext[1], -ext[2]]), np.array([ext[0], v_r + ext[1], ext[2]]),
                   ring)]
    cuts = []
    v_lm = v_r - 0.35 * b_in
    for s in (-1.0, 1.0):
        prims.append(_ellipsoid_prim(c + fr @ np.array([s * (a_in + 0.5), v_lm, 0.0]), fr, (7.0, 9.5, 8.0)))
        prims.append(_capsule_prim(c, fr, (s * (a_in + 5.0), v_lm, 0.0), (s * d["tp_span"] / 2, v_lm + 2.0, 0.0),
                                   4.5, scale=(1.0, 1.0, 0.9)))
        cuts.append(_foramen(c, fr, s * (a_in + 9.0), v_lm + 0.7, 2.7, 8.0))
    prims.append(_capsule_prim(c, fr, (0.0, v_r + b_in + t, 0.0), (0.0, v_r + b_in + t + 6.0, -1.0), 3.5))
    return prims, cuts


def _cervical_prims(vt: _Vert, upper: _Vert | None) -> tuple[list[_Prim], list[_Prim]]:
    """C2 ... C7 (and the thoracic levels, unchanged): the generic vertebra, plus the dens on C2,
    uncinate processes on the upper lateral rims of C3-C7 and transverse foramina in C2-C6."""
    if vt.name == "C1":
        return _atlas_prims(vt)
    prims, cuts = _vertebra_prims(vt, upper)
    if not vt.name.startswith("C"):
        return prims, cuts
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    if vt.name == "C2":
        # the dens rises from the body into the ring of the atlas
        prims.append(_capsule_prim(c, fr, (0.0, -0.5, hc - 2.0), (0.0, 1.5, hc + d["disc_above"] + 9.0), 5.0))
    else:
        for s in (-1.0, 1.0):
            prims.append(_capsule_prim(c, fr, (s * (a - 1.5), 0.1 * b, hc - 1.0), (s * (a - 0.8), 0.15 * b, hc + 3.0),
                                       1.8))
    if vt.name != "C7":
        v_c = 0.80 * b + d["canal_d"] / 2 + 0.5
        u_f = (d["canal_w"] / 2 + d["ped_w"] / 2 + d["tp_span"] / 2) / 2 + 1.0
        for s in (-1.0, 1.0):
            cuts.append(_foramen(c, fr, s * u_f, v_c - 3.0, 2.6, hc + 2.0))
    return prims, cuts
