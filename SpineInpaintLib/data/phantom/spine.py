"""The spine of the phantom: vertebrae, discs, sacrum, ribs, ilium and joints as primitives."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from SpineInpaintLib.core.labels import VERTEBRA_NAMES, vertebra_id
from SpineInpaintLib.data.phantom.config import (
    _DIMS,
    _DIMS_KEYS,
    _LORDOSIS_SHARE,
    SUPPORTED_LEVELS,
    PhantomConfig,
)
from SpineInpaintLib.data.phantom.shapes import (
    _F,
    _capsule_prim,
    _ellipsoid_prim,
    _frame,
    _frame_mean,
    _Prim,
    _sd_ellipse,
    _sd_segment2,
)


@dataclasses.dataclass
class _Vert:
    label: int
    name: str
    dims: dict
    center: np.ndarray
    frame: np.ndarray
    cortical_hu: float
    cancellous_hu: float


def _level_dims(cfg: PhantomConfig, rng: np.random.Generator, name: str) -> dict[str, float]:
    """The morphometry of one level, scaled by the config's size and the level's random jitter."""
    jit = cfg.level_jitter
    d = dict(zip(_DIMS_KEYS, (float(x) for x in _DIMS[name])))
    f = cfg.vertebra_scale * (1.0 + jit * float(rng.normal()))
    for key in ("width", "depth", "height", "canal_w", "canal_d", "ped_w", "ped_h", "tp_span", "sp_len", "sp_half"):
        d[key] *= f
    d["disc_above"] *= cfg.disc_height_scale * (1.0 + jit * float(rng.normal()))
    return d


def _build_spine(cfg: PhantomConfig, rng: np.random.Generator) -> tuple[list[_Vert], list[_Vert]]:
    """Poses of S1 ... T10 and of the sacral segments S2 ... S5 (S1 body centre at the origin)."""
    names = [VERTEBRA_NAMES[i] for i in SUPPORTED_LEVELS]
    n = len(names)
    jit = cfg.level_jitter
    dims = [_level_dims(cfg, rng, name) for name in names]
    if cfg.lumbarised_s1:
        dims[0]["mobile"] = 1.0  # S1 drawn as a lumbar vertebra above an S1/S2 disc
    # sagittal tilt: the lordosis is shared by the lumbar discs, the kyphosis by T10-L1
    theta = np.zeros(n)
    theta[0] = -(0.6 * cfg.lordosis_deg + 8.0)
    for j in range(1, n):
        step = cfg.lordosis_deg * _LORDOSIS_SHARE[j - 1] if j <= 5 else -cfg.kyphosis_deg / 3.0
        theta[j] = theta[j - 1] + step
    # coronal tilt: a C-curve with end vertebrae n_s levels from the apex, tapering outside
    apex = SUPPORTED_LEVELS.index(vertebra_id(cfg.scoliosis_apex))
    n_s = max(1, min(3, apex, n - 1 - apex))
    half = cfg.scoliosis_deg / 2.0
    phi = np.zeros(n)
    psi = np.zeros(n)
    for j in range(n):
        if abs(j - apex) <= n_s:
            phi[j] = half * math.cos(math.pi * (j - apex + n_s) / (2 * n_s))
            psi[j] = cfg.axial_rotation_deg * math.cos(math.pi * (j - apex) / (2 * n_s))
        elif j < apex:
            phi[j] = half * max(0.0, 1.0 - (apex - n_s - j) / 3.0)
        else:
            phi[j] = -half * max(0.0, 1.0 - (j - apex - n_s) / 3.0)
    theta += rng.normal(0, 20 * jit, n)
    phi += rng.normal(0, 10 * jit, n)
    psi += rng.normal(0, 10 * jit, n)

    verts: list[_Vert] = []
    center = np.zeros(3)
    for j, name in enumerate(names):
        if j > 0:
            prev = dims[j - 1]
            step = prev["height"] / 2 + prev["disc_above"] + dims[j]["height"] / 2
            mid = _frame((theta[j - 1] + theta[j]) / 2, (phi[j - 1] + phi[j]) / 2, 0.0)[:, 2]
            center = center + step * mid
        verts.append(_Vert(SUPPORTED_LEVELS[j], name, dims[j], center.copy(),
                           _frame(theta[j], phi[j], psi[j]),
                           cfg.cortical_hu * float(rng.uniform(0.94, 1.06)),
                           cfg.cancellous_hu * float(rng.uniform(0.94, 1.06))))
    # the sacrum below S1: S2 ... S5, fused; with sacrum_upright curving forward (the sacral
    # kyphosis) and ending in a coccyx (Co1, Co2-4 fused), else bending back toward the horizontal
    sacral = []
    s1 = verts[0]
    center, prev_h, prev_theta = s1.center.copy(), s1.dims["height"], theta[0]
    segments = [(44, 27, 23, 10), (36, 22, 19, 12), (28, 17, 15, 13), (20, 13, 11, 13)]
    s1_disc = _S1_DISC_MM * cfg.disc_height_scale if cfg.lumbarised_s1 else 0.0
    if cfg.sacrum_upright:  # taller segments and a stronger curve (a real sacrum: ~110 mm, 50-60 deg)
        segments = [(44, 27, 25, 10), (36, 22, 22, 14), (28, 17, 18, 16), (20, 13, 14, 16),
                    (14, 10, 12, 14), (9, 7, 16, 12)]
    for i, (w, dep, hgt, dtheta) in enumerate(segments):
        sc = cfg.vertebra_scale
        th = prev_theta + dtheta if cfg.sacrum_upright else prev_theta - dtheta
        step = prev_h / 2 + hgt * sc / 2 - 0.5 + (s1_disc if i == 0 else 0.0)
        mid = _frame((prev_theta + th) / 2, phi[0], 0.0)[:, 2]
        center = center - step * mid
        d = dict(s1.dims, width=w * sc, depth=dep * sc, height=hgt * sc, disc_above=s1_disc if i == 0 else 0.0,
                 scale=sc,
                 canal_w=(22 - 3 * i) * sc, canal_d=(9 - 1.5 * i) * sc)
        name = f"S{i + 2}" if i < 4 else f"Co{i - 3}"
        sacral.append(_Vert(25, name, d, center.copy(), _frame(th, phi[0], 0.0), s1.cortical_hu,
                            s1.cancellous_hu * 0.85))
        prev_h, prev_theta = hgt * sc, th
    return verts, sacral


#: Height (mm, before ``disc_height_scale``) of the S1/S2 disc under a lumbarised S1.
_S1_DISC_MM = 8.0

#: Pedicle convergence (deg, toward the midline anteriorly) by level; cervical pedicles converge most.
_PEDICLE_ANGLE = {"T10": 4, "T11": 5, "T12": 7, "L1": 9, "L2": 11, "L3": 14, "L4": 17, "L5": 24, "S1": 30,
                  "T1": 25, "T2": 15, "T3": 9, "C7": 35, "C6": 40, "C5": 42, "C4": 42, "C3": 42, "C2": 35}


# --------------------------------------------------------------------------------------------
# Vertebra shapes (local frame: u left, v posterior, w superior; body centre at 0)
# --------------------------------------------------------------------------------------------
_ENDPLATE_CUP = 1.2  # mm: depth of the endplates' central concavity

_ENDPLATE_THIN = 1.5  # the endplate cortex is 1/1.5 of the wall's thickness


def _body_top(u, v, a: float, b: float, hc: float):
    """Height of the (concave) superior endplate above the body centre at (u, v)."""
    r2 = np.minimum((u / _F(a)) ** 2 + (v / _F(b)) ** 2, 1.0)
    return _F(hc) - _F(_ENDPLATE_CUP) * (_F(1.0) - r2)


def _body_sdf(a: float, b: float, hc: float, post: float = 0.80):
    """Vertebral body: an elliptic cylinder with a waist, a flat slightly concave posterior wall
    (at ``post * b``) and concave endplates."""

    def sdf(u, v, w):
        t = np.minimum((w * _F(1.0 / hc)) ** 2, 1.0)
        waist = _F(1.0) - _F(0.06) * (_F(1.0) - t)
        d = _sd_ellipse(u, v, a * waist, b * (_F(1.0) - _F(0.025) * (_F(1.0) - t)))
        np.maximum(d, v - _F(post * b) - _F(0.12 * b) * (u / _F(a)) ** 2, out=d)
        # endplates: the distance is stretched so that their cortex is thinner than the walls'
        np.maximum(d, (np.abs(w) - _body_top(u, v, a, b, hc)) * _F(_ENDPLATE_THIN), out=d)
        return d

    return sdf


def _slab_capsule2(axis_pair: str, p0, p1, r: float, half: float, mid: float = 0.0):
    """A capsule in one coordinate plane ('uv' or 'vw') extruded +-half along the third axis."""

    def sdf(u, v, w):
        if axis_pair == "uv":
            d = _sd_segment2(u, v, p0[0], p0[1], p1[0], p1[1]) - _F(r)
            return np.maximum(d, np.abs(w - _F(mid)) - _F(half))
        d = _sd_segment2(v, w, p0[0], p0[1], p1[0], p1[1]) - _F(r)
        return np.maximum(d, np.abs(u - _F(mid)) - _F(half))

    return sdf


def _vertebra_prims(vt: _Vert, upper: _Vert | None) -> tuple[list[_Prim], list[_Prim]]:
    """Primitives of one vertebra (T10 ... S1) and the canal that is cut out of it."""
    d, c, fr = vt.dims, vt.center, vt.frame
    a, b, h = d["width"] / 2, d["depth"] / 2, d["height"]
    hc = h / 2
    cw, cd = d["canal_w"] / 2, d["canal_d"] / 2
    thoracic = vt.name[0] in "TC"  # cervical posterior elements are as slender as thoracic ones
    cervical = vt.name.startswith("C")
    sacral = vt.name == "S1" and "mobile" not in d
    disc = d["disc_above"] if upper is not None else 6.0
    v_c = 0.80 * b + cd + 0.5  # canal centre
    prims = [_Prim(c, fr, np.array([-a - 1, -b - 1, -hc - 1]), np.array([a + 1, 0.85 * b + 1, hc + 1]),
                   _body_sdf(a, b, hc))]
    pw, ph = d["ped_w"] / 2, d["ped_h"] / 2
    angle = _PEDICLE_ANGLE.get(vt.name, 5)
    tan_a = math.tan(math.radians(angle))
    u_p = cw + pw - 0.5
    w_p = 0.14 * h
    v0, v1 = 0.45 * b, v_c + 0.2 * cd
    for s in (-1.0, 1.0):
        def ped(u, v, w, s=s):
            up = _F(u_p) + (v - _F(v_c)) * _F(tan_a)
            dd = _sd_ellipse(u * _F(s) - up, w - _F(w_p), pw, ph)
            return np.maximum(dd, np.maximum(_F(v0) - v, v - _F(v1)))
        ext = u_p + pw + abs(tan_a) * (v1 - v0) + 1
        prims.append(_Prim(c, fr, np.array([min(0, s * ext), v0 - 1, w_p - ph - 1]),
                           np.array([max(0, s * ext), v1 + 1, w_p + ph + 1]), ped))
    # laminae: plates from the pedicles to the midline behind the canal
    lt = 3.2 if thoracic else 4.0
    v_lm = v_c + cd + lt
    w_lo, w_hi = -hc - 0.35 * disc, 0.55 * hc
    mid = (w_lo + w_hi) / 2
    for s in (-1.0, 1.0):
        p0, p1 = (s * (u_p + 0.3 * pw), v1 - 1.0), (0.0, v_lm)
        prims.append(_Prim(c, fr, np.array([min(p0[0], 0) - lt - 1, p0[1] - lt - 1, w_lo - 1]),
                           np.array([max(p0[0], 0) + lt + 1, v_lm + lt + 1, w_hi + 1]),
                           _slab_capsule2("uv", p0, p1, lt, (w_hi - w_lo) / 2, mid)))
    # spinous process in the mid-sagittal plane, pointing back and down
    incl = math.radians(d["sp_incl"])
    base = (v_lm - 1.0, mid)
    tip = (base[0] + d["sp_len"] * math.cos(incl), base[1] - d["sp_len"] * math.sin(incl))
    sp_t = 3.0 if thoracic else 3.8
    r_sp = d["sp_half"]
    prims.append(_Prim(c, fr, np.array([-sp_t - 1, base[0] - r_sp - 1, min(base[1], tip[1]) - r_sp - 1]),
                       np.array([sp_t + 1, tip[0] + r_sp + 1, max(base[1], tip[1]) + r_sp + 1]),
                       _slab_capsule2("vw", base, tip, r_sp, sp_t)))
    # transverse processes (lumbar: lateral; thoracic: postero-lateral, holding the ribs)
    if sacral:
        # the alae: wide lateral masses reaching the sacro-iliac joints
        half_span = d["tp_span"] / 2
        for s in (-1.0, 1.0):
            ala_c = c + fr @ np.array([s * (a + 0.5 * (half_span - a)), 0.25 * b, -0.05 * h])
            prims.append(_ellipsoid_prim(ala_c, fr, (0.5 * (half_span - a) + 6, 0.75 * b + 4, 0.42 * h + 2)))
    else:
        tp_back = {"T10": 16, "T11": 12, "T12": 8}.get(vt.name, -6.0 if cervical else 18.0 if thoracic else 2.0)
        tp_r = 5.0 if cervical else 4.5 if thoracic else 4.3
        for s in (-1.0, 1.0):
            a3 = np.array([s * (cw + pw), v_c - 1.0, w_p])
            tp_half = d["tp_span"] / 2 * (0.8 if vt.name == "S1" else 1.0)  # a mobile S1: no alae
            b3 = np.array([s * tp_half, v_c + tp_back, w_p + (1.0 if thoracic else 0.0)])
            prims.append(_capsule_prim(c, fr, a3, b3, tp_r, scale=(1.0, 1.0, 0.75)))
    # articular processes: the superior ones rise to the disc above, the inferior ones hang below
    r_f = 3.6 if thoracic else 4.5
    squash = (1.0, 1.0, 1.0) if thoracic else (1.2, 1.0, 1.0)  # lumbar facets: flat, sagittal plates
    u_s = cw + pw + 1.0
    for s in (-1.0, 1.0):
        a3 = np.array([s * u_s, v_c + 0.2 * cd, 0.3 * hc])
        b3 = np.array([s * (u_s + 1.5), v_c + 0.6 * cd + (2 if thoracic else 4), hc + 0.8 * disc])
        prims.append(_capsule_prim(c, fr, a3, b3, r_f, scale=squash))
        if not sacral:
            u_i = u_s - (0.5 if thoracic else 2 * r_f + 1.5)
            v_i = v_c + cd + (6 if thoracic else 3)
            a3 = np.array([s * u_i, v_i - 2, -0.1 * hc])
            b3 = np.array([s * u_i, v_i + (1 if thoracic else 3), -hc - 0.75 * disc])
            prims.append(_capsule_prim(c, fr, a3, b3, r_f - 0.5, scale=squash))
    canal = _Prim(c, fr, np.array([-cw - 1, v_c - cd - 1, -hc - disc - 12]),
                  np.array([cw + 1, v_c + cd + 1, hc + disc + 12]),
                  lambda u, v, w: _sd_ellipse(u, v - _F(v_c), cw, cd))
    return prims, [canal]


#: Half-widths (mm, before ``vertebra_scale``) of the sacral plate at S2 ... S5: a real adult sacrum is
#: about 120 mm wide at S1-S2, 100 mm lower down and 45 mm near its tip.
_SACRAL_PLATE_HALF_WIDTH = (56.0, 48.0, 36.0, 23.0)


def _sacral_plate_sdf(half_width: float, t_mid: float, v_mid: float, bow: float, hc: float):
    """A transverse plate bowed forward at its sides: its mid-surface at ``v = v_mid - bow (u / W)^2``,
    ``t_mid`` thick at the mid-line and 65 % of that at its lateral ends, ``2 hc`` tall."""

    def sdf(u, v, w):
        r2 = np.minimum((u * _F(1.0 / half_width)) ** 2, _F(1.0))
        half_t = _F(t_mid / 2) * (_F(1.0) - _F(0.35) * r2)
        d = np.abs(v - (_F(v_mid) - _F(bow) * r2)) - half_t
        np.maximum(d, np.abs(u) - _F(half_width), out=d)
        np.maximum(d, np.abs(w) - _F(hc), out=d)
        return d

    return sdf


def _sacral_plate_shape(i: int, sv: _Vert) -> tuple[float, float, float, float]:
    """``(half_width, t_mid, v_mid, bow)`` of the sacral plate of segment ``i`` (S2 = 0), for
    :func:`_sacral_plate_sdf`."""
    b, scale = sv.dims["depth"] / 2, sv.dims["scale"]  # the phantom's vertebra_scale
    return _SACRAL_PLATE_HALF_WIDTH[i] * scale, b + 3.0, 0.2 * b, 15.0 * scale


def _lateral_mass_span(s1: _Vert, i: int) -> float:
    """Lateral offset (mm) that sets the size of the lateral masses of S2 (``i`` 0) and S3 (1)."""
    return s1.dims["tp_span"] / 2 - 6.0 - 12.0 * i


def _sacrum_prims(segments: list[_Vert], s1: _Vert, plate: bool = False) -> tuple[list[_Prim], list[_Prim]]:
    """S2-S5: fused bodies, a posterior plate and crest, and either lateral masses (S2-S3, under the
    alae) or, with ``plate``, one wide bowed plate per segment that joins body and lateral masses
    (the thin curved sacrum of real scans, 100 mm wide below the sacro-iliac joints)."""
    prims, cuts = [], []
    for i, sv in enumerate(segments):
        d, c, fr = sv.dims, sv.center, sv.frame
        a, b, hc = d["width"] / 2, d["depth"] / 2, d["height"] / 2 + 0.8
        # in the plate the bodies are flatter (a real S3 body is ~12 mm deep, not 22)
        b_body = 0.75 * b if plate else b
        prims.append(_Prim(c, fr, np.array([-a - 1, -b - 1, -hc - 1]), np.array([a + 1, b + 1, hc + 1]),
                           _body_sdf(a, b_body, hc, post=0.85)))
        if sv.name.startswith("Co"):  # the coccyx: small bodies, no canal or arches
            continue
        if plate:
            w_half, t_mid, v_mid, bow = _sacral_plate_shape(i, sv)
            prims.append(_Prim(c, fr, np.array([-w_half - 1, v_mid - bow - t_mid / 2 - 1, -hc - 1]),
                               np.array([w_half + 1, v_mid + t_mid / 2 + 1, hc + 1]),
                               _sacral_plate_sdf(w_half, t_mid, v_mid, bow, hc)))
        cw, cd = d["canal_w"] / 2, max(d["canal_d"] / 2, 2.0)
        v_c = 0.85 * b + cd + 0.5
        # posterior plate (fused laminae) over the sacral canal, with the median crest
        lt = 3.0
        def laminae(u, v, w, cw=cw, cd=cd, v_c=v_c, hc=hc, lt=lt):
            d = _sd_ellipse(u, v - _F(v_c - 0.3 * cd), cw + lt + 2, cd + lt + 0.3 * cd)
            return np.maximum(d, np.abs(w) - _F(hc))

        prims.append(_Prim(c, fr, np.array([-cw - 6, v_c - 2, -hc - 1]),
                           np.array([cw + 6, v_c + cd + lt + 6, hc + 1]), laminae))
        prims.append(_capsule_prim(c, fr, (0, v_c + cd + 2, hc * 0.6), (0, v_c + cd + 7, -hc * 0.6),
                                   2.8 - 0.3 * i))
        if i < 2 and not plate:
            span = _lateral_mass_span(s1, i)
            for s in (-1.0, 1.0):
                mass_c = c + fr @ np.array([s * (a + 0.5 * (span - a)), 0.35 * b, 0.0])
                prims.append(_ellipsoid_prim(mass_c, fr, (0.5 * (span - a) + 5, 0.8 * b + 3, hc + 2)))
        cuts.append(_Prim(c, fr, np.array([-cw - 1, v_c - cd - 1, -hc - 3]),
                          np.array([cw + 1, v_c + cd + 1, hc + 3]),
                          lambda u, v, w, cw=cw, cd=cd, v_c=v_c: _sd_ellipse(u, v - _F(v_c), cw, cd)))
    return prims, cuts


def _disc_prims(lo: _Vert, up: _Vert, nucleus: bool = False) -> list[_Prim]:
    """The disc between ``lo`` and the vertebra above it: the space between the two endplates,
    inside a footprint interpolated between the two bodies, bulging 1 mm; or its nucleus (60 %
    of the footprint, shifted back)."""
    a = (lo.dims["width"] + up.dims["width"]) / 4 + 1.0
    b = (lo.dims["depth"] + up.dims["depth"]) / 4 + 0.8
    c = (lo.center + up.center) / 2
    shift = 0.0
    if nucleus:
        shift = 0.15 * b
        a, b = 0.6 * a, 0.55 * b
    fr = _frame_mean(lo.frame, up.frame)
    lo_c, lo_f, up_c, up_f = (x.astype(_F) for x in (lo.center, lo.frame, up.center, up.frame))
    a_lo, b_lo, hc_lo = lo.dims["width"] / 2, lo.dims["depth"] / 2, lo.dims["height"] / 2
    a_up, b_up, hc_up = up.dims["width"] / 2, up.dims["depth"] / 2, up.dims["height"] / 2

    def sdf(u, v, w):
        d = _sd_ellipse(u, v - _F(shift), a, b)
        np.maximum(d, v - _F(0.80 * b) - _F(0.12 * b) * (u / _F(a)) ** 2, out=d)
        # back to LPS offsets from the disc centre, then into each vertebra's frame
        f = fr.astype(_F)
        px, py, pz = (u * f[i, 0] + v * f[i, 1] + w * f[i, 2] for i in range(3))
        for vc, vf, aa, bb, hh, sign in ((lo_c, lo_f, a_lo, b_lo, hc_lo, 1.0),
                                         (up_c, up_f, a_up, b_up, hc_up, -1.0)):
            off = (_F(c[0]) - vc[0], _F(c[1]) - vc[1], _F(c[2]) - vc[2])
            lu = (px + off[0]) * vf[0, 0] + (py + off[1]) * vf[1, 0] + (pz + off[2]) * vf[2, 0]
            lv = (px + off[0]) * vf[0, 1] + (py + off[1]) * vf[1, 1] + (pz + off[2]) * vf[2, 1]
            lw = (px + off[0]) * vf[0, 2] + (py + off[1]) * vf[1, 2] + (pz + off[2]) * vf[2, 2]
            # inside the disc: above the lower body's top (sign +1), below the upper body's bottom
            np.maximum(d, _body_top(lu, lv, aa, bb, hh) - _F(sign) * lw, out=d)
        return d

    hz = (lo.dims["height"] + up.dims["height"]) / 4 + lo.dims["disc_above"] / 2 + 6
    return [_Prim(c, fr, np.array([-a - 1, -b - 1, -hz]), np.array([a + 1, b + 1, hz]), sdf)]










