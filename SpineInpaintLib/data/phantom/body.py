"""The body of the phantom around the spine: layout, viscera, vessels, muscles, canal and the scanner model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from SpineInpaintLib.data.phantom.config import _L, PhantomConfig
from SpineInpaintLib.data.phantom.shapes import (
    _F,
    _const,
    _ellipsoid_prim,
    _gauss,
    _Grid,
    _paint,
    _Prim,
    _ramp,
    _rasterise,
    _rot_x,
    _rot_y,
    _rot_z,
    _sd_ellipse,
    _smooth_noise,
    _trabecular,
)
from SpineInpaintLib.data.phantom.spine import _Vert

# --------------------------------------------------------------------------------------------
# Layout: the body outline and the grid around the anatomy
# --------------------------------------------------------------------------------------------
#: Radius (mm) of the table top's cross curvature.
_CRADLE_RADIUS = 1800.0


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclasses.dataclass
class _UpperShape:
    """The chest, neck and head of a whole-column phantom, as functions of z (mm)."""

    cage_z: np.ndarray  # ascending z knots of the rib cage's narrowing toward the thoracic inlet
    cage_f: np.ndarray  # lateral scale of the thoracic cavity at those knots (1 = the abdomen's)
    z_cavity_top: float  # the lung apices (cupulae)
    z_neck: tuple[float, float]  # the trunk outline turns into the neck between these z
    neck_half: tuple[float, float, float]  # neck half width, front and back distance from the body centre
    head: tuple[float, float, float, float, float]  # skull centre y, z and its half width, depth, height
    z_fissure: tuple[float, float, float]  # oblique fissure z at the back and the front; horizontal fissure
    back_z: np.ndarray  # ascending z knots of the posterior limit of the upper thoracic cavity
    back_y: np.ndarray  # its y there: just in front of the ribs' posterior arcs, not the far back wall


@dataclasses.dataclass
class _Layout:
    """Per-slice anatomy curves (functions of z) and the body outline model."""

    z_knots: np.ndarray  # z of the vertebral centres, ascending (sacral segments, S1 ... T10)
    x_knots: np.ndarray
    y_knots: np.ndarray
    a_knots: np.ndarray  # body half width
    b_knots: np.ndarray  # body half depth
    canal: np.ndarray  # (n, 5): x, y, half width, half depth (in the axial plane), z
    z_s1: float
    z_t10: float
    y_back: float  # skin of the back (flat on the table)
    width: float
    depth: float
    fat: float
    wobble: np.ndarray  # (3,) random phase and amplitude of the outline
    upper: _UpperShape | None = None  # the chest, neck and head; None for the thoracolumbar phantom

    def spine(self, z: np.ndarray):
        """Vertebral-body centre line (x, y) and body half width and depth at each z."""
        knots = (self.x_knots, self.y_knots, self.a_knots, self.b_knots)
        return tuple(np.interp(z, self.z_knots, k) for k in knots)

    def zeta(self, z):
        return (np.asarray(z, float) - self.z_s1) / (self.z_t10 - self.z_s1)

    def outline(self, z: np.ndarray):
        """Half width A, posterior and anterior half depths Bp, Ba and centre y for each z."""
        t = self.zeta(z)
        wob = 1.0 + self.wobble[1] * np.sin(2 * np.pi * (1.3 * t + self.wobble[0]))
        A = self.width / 2 * (1.0 + 0.07 * _gauss(t, 1.05, 0.3) + 0.12 * _gauss(t, -0.15, 0.22)
                              - 0.03 * _gauss(t, 0.45, 0.25)) * wob
        D = self.depth * (1.0 + 0.05 * _gauss(t, 1.0, 0.3) + 0.04 * _gauss(t, 0.3, 0.25)) * (
            1 + self.wobble[2] * np.cos(2 * np.pi * (0.9 * t + self.wobble[0])))
        flat = 22.0
        Bp = 0.42 * D + flat
        Ba = D - 0.42 * D
        yc = self.y_back + flat - Bp
        if self.upper is not None:
            A, Bp, Ba, yc = self._upper_outline(np.asarray(z, float), A, Bp, Ba, yc)
        return A, Bp, Ba, yc

    def _upper_outline(self, z, A, Bp, Ba, yc):
        """The trunk outline blended into the neck above the shoulders and into the head above C1."""
        up = self.upper
        _, ys, _, bs = self.spine(z)
        a_n, front, back = up.neck_half
        bn = (front + back + bs) / 2
        ycn = ys + (back - front - bs) / 2
        y_h, z_h, a_h, b_h, c_h = up.head
        fac = np.sqrt(np.clip(1.0 - ((z - z_h) / (c_h + 6.0)) ** 2, 0.05, 1.0))
        w_h = _smoothstep((z - (z_h - c_h - 6.0)) / 22.0)
        a_n, bn, ycn = (a_n * (1 - w_h) + w_h * (a_h + 6.0) * fac, bn * (1 - w_h) + w_h * (b_h + 6.0) * fac,
                        ycn * (1 - w_h) + w_h * y_h)
        w = _smoothstep((z - up.z_neck[0]) / (up.z_neck[1] - up.z_neck[0]))
        return (A * (1 - w) + w * a_n, Bp * (1 - w) + w * bn, Ba * (1 - w) + w * bn, yc * (1 - w) + w * ycn)

    def cavity_adjust(self, z, y, x, d):
        """Narrow the cavity's distance ``d`` toward the thoracic inlet, keep it in front of the posterior
        rib arcs in the upper chest and end it at the lung apices."""
        up = self.upper
        if up is None:
            return d
        f = np.asarray(np.interp(np.ravel(z), up.cage_z, up.cage_f), dtype=_F).reshape(np.shape(z))
        d = d + np.abs(x) * ((_F(1.0) - f) / f)
        back = np.asarray(np.interp(np.ravel(z), up.back_z, up.back_y), dtype=_F).reshape(np.shape(z))
        d = np.maximum(d, y - back)
        return np.maximum(d, z - _F(up.z_cavity_top))

    def rib_back(self, z: float) -> float:
        """The most posterior y (mm) of the rib arcs at ``z`` (no limit below the upper chest)."""
        if self.upper is None:
            return 1e9
        return float(np.interp(z, self.upper.back_z, self.upper.back_y)) + 6.0

    def cage(self, z) -> np.ndarray:
        """Lateral scale of the thoracic cavity at ``z`` (1 below the upper chest)."""
        if self.upper is None:
            return np.ones(np.shape(z))
        return np.interp(z, self.upper.cage_z, self.upper.cage_f)

    def sdf(self, z, y, x, layer: str = "outer"):
        """Approximate signed distance (mm) to a body layer, arrays shaped (nz,1,1), (1,ny,1), (1,1,nx).

        ``outer``: the skin surface; ``deep``: the inner face of the subcutaneous fat; ``cavity``:
        the inner face of the body-wall muscles (the abdominal and thoracic cavity)."""
        A, Bp, Ba, yc = (np.asarray(v, dtype=_F).reshape(-1, 1, 1) for v in self.outline(z))
        dy = y - yc
        B = np.where(dy > 0, Bp, Ba)
        # superellipse of exponent 2.5 (a rounded box): |t|^2.5 = t^2 sqrt|t| avoids two powers
        ax_, ay_ = np.abs(x) / A, np.abs(dy) / B
        rho = (ax_ * ax_ * np.sqrt(ax_) + ay_ * ay_ * np.sqrt(ay_)) ** _F(0.4)
        r = np.sqrt(x * x + dy * dy)
        d = r * (_F(1.0) - _F(1.0) / np.maximum(rho, _F(1e-3)))
        # the back rests in the table's cradle
        np.maximum(d, y - _F(self.y_back) + x * x * _F(0.5 / _CRADLE_RADIUS), out=d)
        if layer == "outer":
            return d
        ny = dy / np.maximum(r, _F(1e-3))
        tf = _F(self.fat) * (_F(0.9) - _F(0.3) * ny)
        d = d + _F(2.0) + tf
        if layer == "deep":
            return d
        return self.cavity_adjust(z, y, x, d + _F(12.0) - _F(6.0) * np.maximum(ny, _F(0.0)))

    def canal_at(self, z: np.ndarray):
        return tuple(np.interp(z, self.canal[:, 4], self.canal[:, i]) for i in range(4))


def _vertebra_extent(prims: Sequence[_Prim]) -> tuple[np.ndarray, np.ndarray]:
    boxes = [p.world_box() for p in prims]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def _make_layout(cfg: PhantomConfig, verts: list[_Vert], sacral: list[_Vert], tips_y: float,
                 rng: np.random.Generator, upper: Sequence[_Vert] = ()) -> _Layout:
    chain = [v for v in reversed(sacral) if not v.name.startswith("Co")] + verts + list(upper)
    zk = np.array([v.center[2] for v in chain])
    canal = []
    for v in chain:
        b = v.dims["depth"] / 2
        cd = v.dims["canal_d"] / 2 if v.label != 25 else max(v.dims["canal_d"] / 2, 2.0)
        v_c = (0.80 if v.label != 25 else 0.85) * b + cd + 0.5
        p = v.center + v.frame[:, 1] * v_c
        cos_t = max(abs(v.frame[2, 2]), 0.3)
        canal.append((p[0], p[1], v.dims["canal_w"] / 2, cd / cos_t, p[2]))
    canal = np.array(sorted(canal, key=lambda r: r[4]))
    order = np.argsort(zk)
    return _Layout(
        z_knots=zk[order],
        x_knots=np.array([v.center[0] for v in chain])[order],
        y_knots=np.array([v.center[1] for v in chain])[order],
        a_knots=np.array([v.dims["width"] / 2 for v in chain])[order],
        b_knots=np.array([v.dims["depth"] / 2 for v in chain])[order],
        canal=canal,
        z_s1=float(verts[0].center[2]),
        z_t10=float(verts[-1].center[2]),
        y_back=float(tips_y + 7.0 + 0.55 * cfg.fat_mm),
        width=cfg.body_width_mm,
        depth=cfg.body_depth_mm,
        fat=cfg.fat_mm,
        wobble=np.array([rng.random(), rng.uniform(0, 0.025), rng.uniform(0, 0.025)]),
    )


# --------------------------------------------------------------------------------------------
# Nominal intensities (HU) before partial volume, blur and noise
# --------------------------------------------------------------------------------------------
_HU = {
    "air": -1000.0, "skin": 35.0, "subcutaneous_fat": -105.0, "deep_fat": -95.0, "muscle": 55.0,
    "wall_muscle": 48.0, "table_shell": 250.0, "table_core": -920.0, "csf": 8.0, "cord": 35.0,
    "annulus": 88.0, "nucleus": 72.0, "lung": -860.0, "bowel_fluid": 12.0, "gas": -980.0,
    "cartilage": 130.0,
}

#: (unenhanced, portal venous) HU of the enhancing organs.
_HU_ORGAN = {
    "liver": (58.0, 108.0), "spleen": (46.0, 118.0), "kidney": (32.0, 165.0), "aorta": (42.0, 160.0),
    "ivc": (40.0, 135.0), "bowel_wall": (42.0, 85.0),
}


#: Arterial-phase HU of the organs (the aorta's is ``cfg.arterial_hu``): cortical kidneys, little else.
_HU_ARTERIAL = {"liver": 72.0, "spleen": 95.0, "kidney": 175.0, "ivc": 60.0, "bowel_wall": 70.0}


def _organ_hu(cfg: PhantomConfig, name: str) -> float:
    phase = cfg.phase
    if phase == "arterial":
        return cfg.arterial_hu if name == "aorta" else _HU_ARTERIAL[name]
    return _HU_ORGAN[name][1 if phase == "portal" else 0]


class _Painter:
    """Holds the image, the labels and the grid while the anatomy is painted back to front."""

    def __init__(self, cfg: PhantomConfig, grid: _Grid, layout: _Layout, rng: np.random.Generator):
        self.cfg, self.grid, self.layout, self.rng = cfg, grid, layout, rng
        self.ct = np.full(grid.shape, _HU["air"], dtype=_F)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)
        self.h = float(grid.spacing[0])  # in-plane ramp width
        self.k = int(np.clip(round(grid.spacing[2] / grid.spacing[0]), 1, 4))
        self.zc = grid.axis(2, 0, grid.shape[0])

    # --- helpers ----------------------------------------------------------------------------
    def xy_box(self, xlo, xhi, ylo, yhi, zlo=-1e9, zhi=1e9):
        return self.grid.box(np.array([xlo, ylo, zlo]), np.array([xhi, yhi, zhi]))

    def coords(self, box):
        z0, z1, y0, y1, x0, x1 = box
        g = self.grid
        return (g.axis(2, z0, z1)[:, None, None], g.axis(1, y0, y1)[None, :, None],
                g.axis(0, x0, x1)[None, None, :])

    def noise(self, box, sigma_mm) -> np.ndarray:
        z0, z1, y0, y1, x0, x1 = box
        return _smooth_noise(self.rng, (z1 - z0, y1 - y0, x1 - x0), self.grid.spacing[::-1], sigma_mm)

    # --- table and body wall ----------------------------------------------------------------
    def table(self, gap: float) -> None:
        g = self.grid
        y = g.axis(1, 0, g.shape[1])[:, None]
        x = g.axis(0, 0, g.shape[2])[None, :]
        top = _F(self.layout.y_back + gap) - x * x * _F(0.5 / _CRADLE_RADIUS)  # a shallow cradle
        inside = _F(235.0) - np.abs(x)  # > 0 within the table's width
        hu = np.full((g.shape[1], g.shape[2]), _HU["air"], dtype=_F)
        lab2 = np.zeros(hu.shape, dtype=np.uint8)
        side = _ramp(-inside, self.h)
        for d0, d1, val in ((0.0, 42.0, _HU["table_core"]), (0.0, 1.8, _HU["table_shell"]),
                            (40.0, 42.0, _HU["table_shell"])):
            dist = np.maximum(top + _F(d0) - y, y - top - _F(d1))
            f = _ramp(dist, self.h) * side
            hu += f * (_F(val) - hu)
            lab2[f >= 0.5] = _L["table"]
        self.ct[:] = hu[None]
        self.lab[:] = lab2[None]

    def body(self) -> None:
        lay, cfg = self.layout, self.cfg
        A, _, Ba, yc = lay.outline(self.zc)
        box = self.xy_box(-A.max() - 3, A.max() + 3, float((yc - Ba).min()) - 3, lay.y_back + 3)
        if box is None:
            return
        z, y, x = self.coords(box)
        d = lay.sdf(z, y, x, "outer")
        dy = y - np.asarray(yc, dtype=_F)[box[0]:box[1], None, None]
        ny = dy / np.maximum(np.sqrt(x * x + dy * dy), _F(1e-3))
        tf = _F(cfg.fat_mm) * (_F(0.9) - _F(0.3) * ny)
        tm = _F(12.0) - _F(6.0) * np.maximum(ny, _F(0.0))
        # the inner faces of the fat and of the wall muscles, kept for clipping organs and muscles
        self.body_box = box
        self.body_deep = d + _F(2.0) + tf
        self.body_cavity = lay.cavity_adjust(z, y, x, self.body_deep + tm)
        sub = self.ct[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        lab = self.lab[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
        layers = (
            (d, _HU["skin"], _L["skin"]),
            (d + _F(2.0), _HU["subcutaneous_fat"], _L["subcutaneous_fat"]),
            (self.body_deep, _HU["wall_muscle"], _L["other_muscle"]),
            (self.body_cavity, _HU["deep_fat"], _L["deep_fat"]),
        )
        for dist, val, label in layers:
            f = _ramp(dist, self.h)
            sub += f * (_F(val) - sub)
            lab[f >= 0.5] = label

    def layer(self, box, which: str) -> np.ndarray:
        """Signed distance to a body layer ('deep' or 'cavity') on ``box``, from the cache when
        the box lies inside the body's box."""
        bb = getattr(self, "body_box", None)
        if bb is not None and all(box[2 * i] >= bb[2 * i] and box[2 * i + 1] <= bb[2 * i + 1]
                                  for i in range(3)):
            arr = self.body_deep if which == "deep" else self.body_cavity
            return arr[box[0] - bb[0]:box[1] - bb[0], box[2] - bb[2]:box[3] - bb[2],
                       box[4] - bb[4]:box[5] - bb[4]]
        z, y, x = self.coords(box)
        return self.layout.sdf(z, y, x, which)

    def drop_cache(self) -> None:
        self.body_box = None
        self.body_deep = self.body_cavity = None

    # --- per-slice tubes (vessels, muscles, canal) ------------------------------------------
    def tube(self, zlo, zhi, cx, cy, ax, ay, hu, label, clip: str | None = "cavity", extra=None,
             power: float = 2.0):
        """Paint an ellipse (or a superellipse of exponent ``power``) per slice for the slices with
        zlo <= z <= zhi; ``cx, cy, ax, ay`` are functions of z; ``hu`` a value or ``hu(box, d)``."""
        zsel = np.nonzero((self.zc >= zlo) & (self.zc <= zhi))[0]
        if zsel.size == 0:
            return None
        zz = self.zc[zsel]
        CX, CY, AX, AY = (np.asarray(f(zz), dtype=_F) for f in (cx, cy, ax, ay))
        box = self.xy_box(float((CX - AX).min()) - 2, float((CX + AX).max()) + 2,
                          float((CY - AY).min()) - 2, float((CY + AY).max()) + 2)
        if box is None:
            return None
        box = (int(zsel[0]), int(zsel[-1]) + 1) + box[2:]
        z, y, x = self.coords(box)
        CX, CY, AX, AY = (v[:, None, None] for v in (CX, CY, AX, AY))
        dx, dy = x - CX, y - CY
        if power == 2.0:
            d = _sd_ellipse(dx, dy, AX, AY)
        else:
            pw = _F(power)
            rho = (np.abs(dx / AX) ** pw + np.abs(dy / AY) ** pw) ** (_F(1.0) / pw)
            d = np.sqrt(dx * dx + dy * dy) * (_F(1.0) - _F(1.0) / np.maximum(rho, _F(1e-3)))
        if clip is not None:
            np.maximum(d, self.layer(box, clip), out=d)
        if extra is not None:
            np.maximum(d, extra(z, y, x), out=d)
        f = _ramp(d, self.h)
        val = hu(box, d) if callable(hu) else hu
        _paint(self.ct, self.lab, box, f, val, label)
        return box, d

    # --- bones ----------------------------------------------------------------------------
    def bone(self, prims, cuts, label, cort_hu, canc_hu, cort_mm=None) -> None:
        cort_mm = self.cfg.cortical_mm if cort_mm is None else cort_mm
        res = _rasterise(self.grid, prims, cuts, (0.0, cort_mm), self.k, self.h)
        if res is None:
            return
        box, (f_all, f_core) = res
        z0, z1, y0, y1, x0, x1 = box
        tex = _trabecular(self.rng, f_all.shape, self.grid.spacing[::-1])
        amp = min(70.0, 0.3 * canc_hu)
        canc = _F(canc_hu) + _F(amp) * np.tanh(_F(0.9) * tex)
        sub = self.ct[z0:z1, y0:y1, x0:x1]
        # sub <- (1 - f_all) sub + f_core canc + (f_all - f_core) cort
        sub *= _F(1.0) - f_all
        sub += f_core * canc + (f_all - f_core) * _F(cort_hu)
        self.lab[z0:z1, y0:y1, x0:x1][f_all >= 0.5] = label

    def soft(self, prims, cuts, hu, label, clip: str | None = "cavity", k: int = 1):
        """A soft-tissue organ from primitives, clipped to a body layer; returns (box, occupancy)."""
        res = _rasterise(self.grid, prims, cuts, (0.0,), k, self.h)
        if res is None:
            return None
        box, (f,) = res
        if clip is not None:
            f *= _ramp(self.layer(box, clip), self.h)
        val = hu(box) if callable(hu) else hu
        _paint(self.ct, self.lab, box, f, val, label)
        return box, f


# --------------------------------------------------------------------------------------------
# Anatomy painters
# --------------------------------------------------------------------------------------------
def _z_of(verts: list[_Vert], name: str) -> float:
    return float(next(v.center[2] for v in verts if v.name == name))


def _paint_viscera(p: _Painter, verts: list[_Vert]) -> None:
    """Bowel, liver, spleen, kidneys, then the lung bases and the diaphragm above them."""
    cfg, lay, rng = p.cfg, p.layout, p.rng
    z_t11, z_t12, z_l1, z_l2 = (_z_of(verts, n) for n in ("T11", "T12", "L1", "L2"))
    sc = cfg.vertebra_scale

    # bowel: loops of a random field in the anterior cavity and the flanks, below T12
    A, _, Ba, yc = lay.outline(p.zc)
    box = p.xy_box(-A.max(), A.max(), float((yc - Ba).min()), lay.y_back, -1e9, z_t12 - 10)
    if box is not None:
        z, y, x = p.coords(box)
        xs, ys, a_s, b_s = (np.asarray(v, _F).reshape(-1, 1, 1) for v in lay.spine(z.ravel()))
        # the peritoneal cavity: the body cavity less the retroperitoneum around the spine
        # (psoas, kidneys, great vessels)
        region = -_sd_ellipse(x - xs, y - ys - _F(10.0), a_s + _F(85.0), b_s + _F(30.0))
        np.maximum(region, p.layer(box, "cavity") + _F(2.0), out=region)
        np.maximum(region, z - _F(z_t12 - 10), out=region)
        f_reg = _ramp(region, p.h)
        # loops: where two independent smooth fields are both near zero, i.e. around the curves
        # where their zero surfaces cross, which wind through the volume like bowel
        n1 = p.noise(box, (12.0, 9.0, 9.0))
        n2 = p.noise(box, (12.0, 9.0, 9.0))
        d_loop = np.sqrt(n1 * n1 + n2 * n2) * _F(10.0) - _F(15.0)  # ~mm; loops ~20-30 mm wide
        del n1
        f_bowel = f_reg * _ramp(d_loop, p.h)
        f_lumen = f_reg * _ramp(d_loop + _F(2.5), p.h)
        anterior = np.clip((ys - b_s - y) / _F(120.0), 0.0, 1.0)
        # contents: fluid to chyme (10-50 HU), gas in the upper (anterior) part of some loops
        contents = _F(_HU["bowel_fluid"]) + _F(20.0) * (n2 + _F(1.0))
        n3 = p.noise(box, (10.0, 6.0, 6.0))
        f_gas = f_lumen * _ramp((_F(1.9) - n3 - _F(0.9) * anterior) * _F(8.0), p.h)
        _paint(p.ct, p.lab, box, f_bowel, _organ_hu(cfg, "bowel_wall"), _L["small_bowel"])
        _paint(p.ct, p.lab, box, f_lumen, contents, None)
        _paint(p.ct, p.lab, box, f_gas, _HU["gas"], None)
        del n2, n3, f_bowel, f_lumen, f_gas, region, d_loop, contents
    # colon: ascending (right) and descending (left) in the flanks, transverse across the front
    for s in (-1.0, 1.0):
        def cx(z, s=s):
            A_, _, _, _ = lay.outline(z)
            return s * (A_ - cfg.fat_mm * 0.9 - 2 - 12 - 30)

        def cy(z):
            _, ys_, _, _ = lay.spine(z)
            return ys_ - 25.0

        def stool(box, d, p=p):
            n = p.noise(box, (3.0, 2.5, 2.5))
            val = _F(-20.0) + _F(70.0) * n
            gas = _ramp((_F(1.3) - n) * _F(3.0), p.h)
            return val + gas * (_F(_HU["gas"]) - val)

        p.tube(z_l2 - 130, z_l1 + 10, cx, cy, _const(24.0), _const(22.0), stool, _L["colon"])
    # liver: a large ellipsoid on the right under the diaphragm
    ys0 = float(lay.spine(np.array([z_t11]))[1][0])
    liver = _ellipsoid_prim(np.array([-75.0, ys0 - 35.0, z_t11 + 20.0]), _rot_z(-10), (105.0, 95.0, 105.0))
    p.soft([liver], [], lambda b: _organ_hu(cfg, "liver") + 5.0 * p.noise(b, (6.0, 6.0, 6.0)), _L["liver"])
    spleen = _ellipsoid_prim(np.array([88.0, ys0 + 18.0, z_t11 - 5.0]), _rot_z(35), (32.0, 60.0, 55.0))
    p.soft([spleen], [], lambda b: _organ_hu(cfg, "spleen") + 5.0 * p.noise(b, (6.0, 6.0, 6.0)), _L["spleen"])
    # kidneys: long axis tilted (upper pole medial and posterior), hilum facing antero-medially
    for s, label, dz in ((1.0, _L["kidney_left"], 0.0), (-1.0, _L["kidney_right"], -18.0)):
        zk = z_l1 - 8.0 + dz
        xk, yk, ak, _ = (float(v[0]) for v in lay.spine(np.array([zk])))
        fr = _rot_z(s * 35.0) @ _rot_y(-s * 12.0) @ _rot_x(-10.0)
        ck = np.array([xk + s * (ak + 52.0) * sc, yk + 12.0, zk])
        kid = _ellipsoid_prim(ck, fr, (25.0 * sc, 20.0 * sc, 52.0 * sc))
        p.soft([kid], [], lambda b: _organ_hu(cfg, "kidney") + 6.0 * p.noise(b, (3.0, 3.0, 3.0)), label)
        # renal sinus fat and the (urine-filled) pelvis at the hilum; the label stays kidney
        hilum = ck + fr @ np.array([-s * 14.0 * sc, -6.0, 0.0])
        p.soft([_ellipsoid_prim(hilum, fr, (11.0 * sc, 9.0 * sc, 30.0 * sc))], [], _HU["deep_fat"], None)
        p.soft([_ellipsoid_prim(hilum, fr, (6.0 * sc, 5.0 * sc, 14.0 * sc))], [], 10.0, None)
    # lung bases: a rim inside the thoracic wall that deepens with height above the posterior
    # recess and is pushed back anteriorly by the diaphragm's domes; the diaphragm is the 5 mm
    # muscle sheet just inside the rim
    z_rec = z_t12 + float(rng.uniform(-12.0, 8.0))
    box = p.xy_box(-A.max(), A.max(), float((yc - Ba).min()), lay.y_back, z_rec - 5, 1e9)
    if box is not None:
        z, y, x = p.coords(box)
        xs, ys, a_s, b_s = (np.asarray(v, _F).reshape(-1, 1, 1) for v in lay.spine(z.ravel()))
        yc_z = np.asarray(lay.outline(z.ravel())[3], _F).reshape(-1, 1, 1)
        cav = p.layer(box, "cavity")
        rim = _F(1.4) * (z - _F(z_rec)) - _F(0.55) * np.maximum(yc_z + _F(20.0) - y, _F(0.0))
        para = (a_s + _F(6.0)) - np.abs(x - xs)  # the vertebral bodies and the mediastinum
        d_dia = np.maximum(np.maximum(cav, para), -cav - rim - _F(5.0))
        _paint(p.ct, p.lab, box, _ramp(d_dia, p.h), _HU["wall_muscle"], _L["other_muscle"])
        d_lung = np.maximum(np.maximum(cav + _F(1.0), para + _F(1.0)), -cav - rim)
        f_lung = _ramp(d_lung, p.h)
        vessels = p.noise(box, (2.0, 1.6, 1.6))
        lung_hu = _F(_HU["lung"]) + _F(25.0) * vessels + _F(800.0) * _ramp((_F(2.3) - vessels) * _F(2.0), p.h)
        _paint(p.ct, p.lab, box, f_lung, lung_hu, None)
        zz, yy, xx = np.nonzero(f_lung >= 0.5)
        left = x[0, 0, xx] > xs[zz, 0, 0]
        lobes = np.where(left, _L["lung_lower_lobe_left"], _L["lung_lower_lobe_right"]).astype(np.uint8)
        if lay.upper is not None:
            lobes = _lobes(lay, lobes, left, z[zz, 0, 0], y[0, yy, 0])
        p.lab[box[0]:box[1], box[2]:box[3], box[4]:box[5]][zz, yy, xx] = lobes


def _lobes(lay: _Layout, lobes: np.ndarray, left: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lung lobe labels of lung voxels at (z, y): above the oblique fissure (rising from the front of the
    diaphragm to the back at T4) the upper lobes, and on the right the middle lobe below the
    horizontal fissure."""
    z_back, z_front, z_hor = lay.upper.z_fissure
    y_front, y_back = float(lay.y_back) - lay.depth, float(lay.y_back)
    t = np.clip((y - y_front) / (y_back - y_front), 0.0, 1.0)
    above = z > z_front + (z_back - z_front) * t
    out = lobes.copy()
    out[above & left] = _L["lung_upper_lobe_left"]
    out[above & ~left] = np.where(z[above & ~left] > z_hor, _L["lung_upper_lobe_right"], _L["lung_middle_lobe_right"])
    return out


def _paint_vessels(p: _Painter, verts: list[_Vert], z_aorta_top: float = 1e9, z_cava_top: float = 1e9) -> None:
    """Aorta (bifurcating at L4) with calcified plaques, inferior vena cava and iliac vessels; the
    whole-column phantom ends the aorta at its arch and the cava at the heart."""
    cfg, lay = p.cfg, p.layout
    z_l4, z_l5 = _z_of(verts, "L4"), _z_of(verts, "L5")
    sc = cfg.vertebra_scale
    r_ao = 11.0 * sc

    def spine(z):
        return lay.spine(np.asarray(z, float))

    ao_x = lambda z: spine(z)[0] + 16.0 * sc  # noqa: E731
    ao_y = lambda z: spine(z)[1] - spine(z)[3] - r_ao - 3.0  # noqa: E731
    cav_x = lambda z: spine(z)[0] - 22.0 * sc  # noqa: E731
    cav_y = lambda z: spine(z)[1] - spine(z)[3] - 10.0  # noqa: E731
    hu_ao, hu_cv = _organ_hu(cfg, "aorta"), _organ_hu(cfg, "ivc")
    p.tube(z_l5 + 10, z_cava_top, cav_x, cav_y, _const(13.0 * sc), _const(9.0 * sc), hu_cv, _L["inferior_vena_cava"])
    for s, label in ((1.0, _L["iliac_vena_left"]), (-1.0, _L["iliac_vena_right"])):
        p.tube(-1e9, z_l5 + 12, lambda z, s=s: cav_x(z_l5 + 10) + 22 * sc + s * (10 + 0.45 * (z_l5 + 10 - z)),
               lambda z: cav_y(z) + 8.0, _const(7.5 * sc), _const(7.0 * sc), hu_cv, label)
    ao = p.tube(z_l4, z_aorta_top, ao_x, ao_y, _const(r_ao), _const(r_ao),
                hu_ao, _L["aorta"])
    tubes = [ao]
    for s, label in ((1.0, _L["iliac_artery_left"]), (-1.0, _L["iliac_artery_right"])):
        tubes.append(p.tube(-1e9, z_l4 + 2, lambda z, s=s: ao_x(z_l4) + s * (6 + 0.45 * (z_l4 - z)),
                            lambda z: ao_y(z) + 0.15 * (z_l4 - z), _const(6.5 * sc),
                            _const(6.5 * sc), hu_ao, label))
    # calcified plaques: bright patches on the vessel wall where a random field is high
    if cfg.calcification > 0:
        thr = 2.6 - 1.4 * cfg.calcification
        for t in tubes:
            if t is None:
                continue
            box, d = t
            n = p.noise(box, (3.0, 1.5, 1.5))
            f = _ramp(np.abs(d + _F(0.8)) - _F(0.9), p.h) * _ramp((_F(thr) - n) * _F(4.0), p.h)
            _paint(p.ct, p.lab, box, f, 750.0, None)


def _paint_muscles(p: _Painter, verts: list[_Vert]) -> None:
    """Iliopsoas, quadratus lumborum and the autochthon, with fatty infiltration."""
    cfg, lay = p.cfg, p.layout
    z_t12, z_l4, z_l5 = (_z_of(verts, n) for n in ("T12", "L4", "L5"))
    sc = cfg.vertebra_scale
    fat = cfg.muscle_fat_fraction

    def muscle_hu(fraction):
        # fat streaks along the fibres (long in z): the local fat fraction varies around ``fraction``
        def hu(box, d):
            n = p.noise(box, (14.0, 1.3, 1.3))
            ff = np.clip(_F(fraction) * (_F(1.0) + _F(0.55) * n), 0.0, 1.0)
            return _F(_HU["muscle"]) + ff * _F(_HU["deep_fat"] - _HU["muscle"])

        return hu

    def spine(z):
        return lay.spine(np.asarray(z, float))

    # psoas from T12/L1, growing to L5, then running antero-laterally with the iliacus
    z_top = z_t12 - 8.0
    r_max = 22.0 * sc

    def r_ps(z):
        t = np.clip((z_top - z) / max(z_top - z_l4, 1.0), 0.0, 1.0)
        return 4.0 + (r_max - 4.0) * t ** 0.7

    def below(z):
        return np.maximum(z_l5 - z, 0.0)

    for s, label in ((1.0, _L["iliopsoas_left"]), (-1.0, _L["iliopsoas_right"])):
        p.tube(-1e9, z_top, lambda z, s=s: spine(z)[0] + s * (spine(z)[2] + 0.8 * r_ps(z) + 0.8 * below(z)),
               lambda z: spine(z)[1] + 0.1 * spine(z)[3] - 0.9 * below(z),
               lambda z: 0.9 * r_ps(z) + 0.35 * below(z), lambda z: 1.05 * r_ps(z),
               muscle_hu(fat / 3.0), label)
    # quadratus lumborum lateral of the transverse processes
    for s in (1.0, -1.0):
        p.tube(z_l4 - 10, z_t12, lambda z, s=s: spine(z)[0] + s * (spine(z)[2] + 30.0 * sc),
               lambda z: spine(z)[1] + spine(z)[3] + 8.0, _const(15.0 * sc),
               _const(8.0 * sc), muscle_hu(fat / 2.0), _L["other_muscle"])
    # autochthon: fills the gutter between the spinous processes and the transverse processes
    zeta = lambda z: lay.zeta(z)  # noqa: E731

    def half_w(z):
        t = zeta(z)
        return sc * (28.0 + 8.0 * _gauss(t, 0.45, 0.4) - 10.0 * np.clip(-t * 3.0, 0.0, 1.0))

    def front(z):
        return lay.canal_at(np.asarray(z, float))[1]

    y_wall = lay.y_back - 2.0 - 0.6 * cfg.fat_mm

    def y_in(z):
        if lay.upper is None:
            return y_wall
        # in the upper chest the back wall lies far behind the spine: the erector spinae stays ~45 mm
        # behind the rib arcs, the trapezius and rhomboids (other muscle) fill the rest
        return np.minimum(y_wall, np.interp(z, lay.upper.back_z, lay.upper.back_y) + 51.0)

    for s, label in ((1.0, _L["autochthon_left"]), (-1.0, _L["autochthon_right"])):
        p.tube(-1e9, 1e9, lambda z, s=s: spine(z)[0] + s * (half_w(z) + 3.0),
               lambda z: (front(z) + y_in(z)) / 2 + 4.0, half_w,
               lambda z: (y_in(z) - front(z)) / 2 + 6.0, muscle_hu(fat), label, clip="deep", power=2.7)


def _paint_canal(p: _Painter, verts: list[_Vert], z_sac_top: float = 1e9) -> None:
    """Spinal canal: epidural fat around the dural sac (CSF, bright in a myelogram), the cord above the
    conus (L1); the whole-column phantom ends the sac at the foramen magnum."""
    lay = p.layout
    z_conus = _z_of(verts, "L1") - 5.0
    c_at = lambda i: (lambda z: lay.canal_at(np.asarray(z, float))[i])  # noqa: E731
    p.tube(-1e9, 1e9, c_at(0), c_at(1), c_at(2), c_at(3), _HU["deep_fat"], _L["deep_fat"], clip=None)
    sac = lambda i, f: (lambda z: f * lay.canal_at(np.asarray(z, float))[i])  # noqa: E731
    csf = p.cfg.myelogram_hu if p.cfg.phase == "myelogram" else _HU["csf"]
    p.tube(_z_of(verts, "S1") - 25, z_sac_top, c_at(0), lambda z: c_at(1)(z) - 0.5, sac(2, 0.82), sac(3, 0.78),
           csf, _L["spinal_cord"], clip=None)
    p.tube(z_conus, 1e9, c_at(0), lambda z: c_at(1)(z) - 0.8, _const(4.5),
           _const(3.8), _HU["cord"], _L["spinal_cord"], clip=None)


# --------------------------------------------------------------------------------------------
# The scanner: point spread function and noise
# --------------------------------------------------------------------------------------------
def _scanner(img: np.ndarray, cfg: PhantomConfig, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """In-plane Gaussian PSF applied to image + white noise, scaled so the noise std is
    ``cfg.noise_hu`` after blurring; rounded to int16 HU."""
    sigma = cfg.blur_mm / grid.spacing[0]
    if cfg.noise_hu > 0:
        gain = 1.0
        if sigma > 0.05:
            # std of blurred unit white noise = sum of the squared 1D kernel (2D separable kernel)
            delta = np.zeros(65, dtype=np.float64)
            delta[32] = 1.0
            k1 = ndimage.gaussian_filter1d(delta, sigma)
            gain = float((k1 ** 2).sum())
        scale = _F(cfg.noise_hu / gain)
        for z in range(img.shape[0]):  # per slice: keeps the temporary small
            img[z] += scale * rng.standard_normal(img.shape[1:], dtype=_F)
    if sigma > 0.05:
        ndimage.gaussian_filter1d(img, sigma, axis=2, output=img, truncate=3.0)
        ndimage.gaussian_filter1d(img, sigma, axis=1, output=img, truncate=3.0)
    if cfg.kernel == "sharp" and cfg.sharpening > 0:
        # a bone kernel: unsharp masking (image + s (image - blurred)), slice by slice to keep memory low
        s_px, amount = 1.2 / grid.spacing[0], _F(cfg.sharpening)
        for z in range(img.shape[0]):
            low = ndimage.gaussian_filter(img[z], s_px, truncate=3.0)
            img[z] += amount * (img[z] - low)
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16)
