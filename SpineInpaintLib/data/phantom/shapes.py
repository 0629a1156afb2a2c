"""Signed-distance primitives and their rasterisation onto the phantom grid, with smooth noise fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------
# Grid and rasterisation
# --------------------------------------------------------------------------------------------
_F = np.float32


@dataclasses.dataclass
class _Grid:
    """An identity-direction grid: voxel (k, j, i) sits at origin + (i dx, j dy, k dz)."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z)
    origin: tuple[float, float, float]  # (x, y, z)

    def axis(self, dim: int, i0: int, i1: int) -> np.ndarray:
        """Physical coordinates of voxel centres i0..i1-1 along x (0), y (1) or z (2)."""
        return (self.origin[dim] + self.spacing[dim] * np.arange(i0, i1)).astype(_F)

    def zsub(self, k0: int, k1: int, k: int) -> np.ndarray:
        """z of ``k`` equally spaced sub-slices in each slice k0..k1-1 (centred in the slice)."""
        idx = np.arange(k0 * k, k1 * k, dtype=np.float64)
        return (self.origin[2] + self.spacing[2] * ((idx + 0.5) / k - 0.5)).astype(_F)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
        """Index box (z0, z1, y0, y1, x0, x1) of the voxels whose centres may lie in [lo, hi] (LPS)."""
        nz, ny, nx = self.shape
        out = []
        for dim, n in ((2, nz), (1, ny), (0, nx)):
            a = math.floor((lo[dim] - self.origin[dim]) / self.spacing[dim])
            b = math.ceil((hi[dim] - self.origin[dim]) / self.spacing[dim]) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            out += [a, b]
        return tuple(out)  # type: ignore[return-value]


@dataclasses.dataclass
class _Prim:
    """A shape in a local frame: ``sdf(u, v, w)`` < 0 inside, with a local bounding box."""

    center: np.ndarray
    frame: np.ndarray  # columns u, v, w in LPS
    lo: np.ndarray
    hi: np.ndarray
    sdf: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def world_box(self) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[x, y, z] for x in (self.lo[0], self.hi[0]) for y in (self.lo[1], self.hi[1])
                            for z in (self.lo[2], self.hi[2])])
        pts = corners @ self.frame.T + self.center
        return pts.min(0), pts.max(0)

    def local(self, z: np.ndarray, y: np.ndarray, x: np.ndarray):
        """Local (u, v, w) of the grid points z[:, None, None], y[None, :, None], x[None, None, :]."""
        dx = (x - _F(self.center[0]))[None, None, :]
        dy = (y - _F(self.center[1]))[None, :, None]
        dz = (z - _F(self.center[2]))[:, None, None]
        f = self.frame.astype(_F)
        return tuple(dx * f[0, c] + dy * f[1, c] + dz * f[2, c] for c in range(3))


def _ramp(d: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy of a voxel of width ``h`` at signed distance ``d`` (box filter)."""
    out = _F(0.5) - d * _F(1.0 / h)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _rasterise(grid: _Grid, prims: Sequence[_Prim], cuts: Sequence[_Prim], offsets: Sequence[float],
               k: int, h: float):
    """Occupancy of the union of ``prims`` minus ``cuts`` on ``grid``, eroded by each offset (mm).

    The signed distance is evaluated on ``k`` sub-slices per slice and the occupancies averaged,
    which models the slice sensitivity profile; ``h`` is the in-plane ramp width. Each primitive is
    evaluated only inside its own box. Returns ``(box, [occupancy per offset])`` or ``None``.
    """
    boxes = []
    for p in prims:
        b = grid.box(*p.world_box())
        if b is not None:
            boxes.append((p, b))
    if not boxes:
        return None
    z0 = min(b[0] for _, b in boxes); z1 = max(b[1] for _, b in boxes)  # noqa: E702
    y0 = min(b[2] for _, b in boxes); y1 = max(b[3] for _, b in boxes)  # noqa: E702
    x0 = min(b[4] for _, b in boxes); x1 = max(b[5] for _, b in boxes)  # noqa: E702
    zc, yc, xc = grid.zsub(z0, z1, k), grid.axis(1, y0, y1), grid.axis(0, x0, x1)
    dist = np.full(((z1 - z0) * k, y1 - y0, x1 - x0), 1e4, dtype=_F)

    def apply(p: _Prim, b, combine) -> None:
        zs = slice((b[0] - z0) * k, (b[1] - z0) * k)
        ys, xs = slice(b[2] - y0, b[3] - y0), slice(b[4] - x0, b[5] - x0)
        u, v, w = p.local(zc[zs], yc[ys], xc[xs])
        view = dist[zs, ys, xs]
        combine(view, p.sdf(u, v, w), out=view)

    for p, b in boxes:
        apply(p, b, np.minimum)
    for c in cuts:
        b = grid.box(*c.world_box())
        if b is None:
            continue
        b = (max(b[0], z0), min(b[1], z1), max(b[2], y0), min(b[3], y1), max(b[4], x0), min(b[5], x1))
        if b[0] >= b[1] or b[2] >= b[3] or b[4] >= b[5]:
            continue
        apply(_Prim(c.center, c.frame, c.lo, c.hi, lambda u, v, w, f=c.sdf: -f(u, v, w)), b, np.maximum)
    shape = (z1 - z0, k, y1 - y0, x1 - x0)
    fracs = [_ramp(dist + _F(o), h).reshape(shape).mean(axis=1) for o in offsets]
    return (z0, z1, y0, y1, x0, x1), fracs


def _paint(ct: np.ndarray, lab: np.ndarray, box, frac: np.ndarray, hu, label: int | None,
           label_mask: np.ndarray | None = None) -> None:
    """Composite ``hu`` with occupancy ``frac`` over the image in ``box``; label where frac >= 0.5."""
    z0, z1, y0, y1, x0, x1 = box
    sub = ct[z0:z1, y0:y1, x0:x1]
    sub += frac * (hu - sub)
    if label is not None:
        mask = frac >= 0.5 if label_mask is None else label_mask
        lab[z0:z1, y0:y1, x0:x1][mask] = label


# --------------------------------------------------------------------------------------------
# Signed-distance-like primitives (float32, first order accurate near the surface)
# --------------------------------------------------------------------------------------------
def _sd_ellipse(x: np.ndarray, y: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance to the ellipse x^2/a^2 + y^2/b^2 = 1 (a, b scalars or arrays)."""
    # d = (rho - 1) / |grad rho|; the tiny shift keeps the centre (0/0) finite at about -a.
    xa, yb = x / a + _F(1e-4), y / b
    rho2 = xa * xa + yb * yb
    grad2 = (xa / a) ** 2 + (yb / b) ** 2
    return (np.sqrt(rho2) - _F(1.0)) * np.sqrt(rho2 / grad2)


def _sd_segment2(x, y, ax, ay, bx, by) -> np.ndarray:
    """Distance in a plane to the segment (ax, ay)-(bx, by)."""
    ex, ey = bx - ax, by - ay
    px, py = x - ax, y - ay
    t = np.clip((px * ex + py * ey) / max(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
    qx, qy = px - t * ex, py - t * ey
    return np.sqrt(qx * qx + qy * qy)


def _capsule_prim(center, frame, a, b, r, scale=(1.0, 1.0, 1.0)) -> _Prim:
    """A capsule of radius r from a to b (local coordinates), optionally squashed per axis."""
    a, b, s = np.asarray(a, float), np.asarray(b, float), np.asarray(scale, float)
    e = b - a
    ee = max(float(e @ e), 1e-9)

    def sdf(u, v, w):
        pu, pv, pw = u - _F(a[0]), v - _F(a[1]), w - _F(a[2])
        t = np.clip((pu * _F(e[0]) + pv * _F(e[1]) + pw * _F(e[2])) * _F(1.0 / ee), 0.0, 1.0)
        qu = (pu - t * _F(e[0])) * _F(s[0])
        qv = (pv - t * _F(e[1])) * _F(s[1])
        qw = (pw - t * _F(e[2])) * _F(s[2])
        return np.sqrt(qu * qu + qv * qv + qw * qw) - _F(r)

    pad = r / s.min() + 0.5
    return _Prim(np.asarray(center, float), np.asarray(frame, float), np.minimum(a, b) - pad,
                 np.maximum(a, b) + pad, sdf)


def _ellipsoid_prim(center, frame, semi) -> _Prim:
    a, b, c = (float(s) for s in semi)

    def sdf(u, v, w):
        ua, vb, wc = u / _F(a) + _F(1e-4), v / _F(b), w / _F(c)
        rho2 = ua * ua + vb * vb + wc * wc
        grad2 = (ua / _F(a)) ** 2 + (vb / _F(b)) ** 2 + (wc / _F(c)) ** 2
        return (np.sqrt(rho2) - _F(1.0)) * np.sqrt(rho2 / grad2)

    semi = np.array([a, b, c]) + 1.0
    return _Prim(np.asarray(center, float), np.asarray(frame, float), -semi, semi, sdf)


# --------------------------------------------------------------------------------------------
# The spine: poses of the vertebrae
# --------------------------------------------------------------------------------------------
def _frame(theta: float, phi: float, psi: float) -> np.ndarray:
    """Frame (columns u left, v posterior, w superior) of a vertebra tilted by theta (toward
    posterior) and phi (toward left) and rotated axially by psi (body toward the left), degrees."""
    t = np.array([math.tan(math.radians(phi)), math.tan(math.radians(theta)), 1.0])
    t /= np.linalg.norm(t)
    p = np.array([0.0, 1.0, 0.0])
    v0 = p - (p @ t) * t
    v0 /= np.linalg.norm(v0)
    u0 = np.cross(v0, t)
    c, s = math.cos(math.radians(psi)), math.sin(math.radians(psi))
    u = c * u0 + s * v0
    v = -s * u0 + c * v0
    return np.stack([u, v, t], axis=1)


def _frame_mean(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """An orthonormal frame halfway between two frames."""
    m = f1 + f2
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    return r if np.linalg.det(r) > 0 else f1


# --------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------
def _lerp_axis(a: np.ndarray, axis: int, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``t``."""
    i0 = np.clip(np.floor(t).astype(np.intp), 0, a.shape[axis] - 2)
    w = (t - i0).astype(_F)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    lo, hi = np.take(a, i0, axis=axis), np.take(a, i0 + 1, axis=axis)
    return lo + w * (hi - lo)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing_zyx: Sequence[float],
                  sigma_mm: Sequence[float]) -> np.ndarray:
    """Gaussian random field with correlation lengths ``sigma_mm`` (z, y, x), unit variance, float32.

    White noise on a grid of step ~sigma, smoothed by one step and interpolated linearly: cheap
    for any box size because the work is on the coarse grid and one interpolation per axis.
    """
    steps = [max(sp, s) for sp, s in zip(spacing_zyx, sigma_mm)]
    coarse = [int(math.ceil(n * sp / st)) + 3 for n, sp, st in zip(shape, spacing_zyx, steps)]
    field = rng.standard_normal(coarse, dtype=_F)
    sig = [1.0 if s >= sp else s / sp for s, sp in zip(sigma_mm, spacing_zyx)]
    field = ndimage.gaussian_filter(field, sig, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    for axis, (n, sp, st) in enumerate(zip(shape, spacing_zyx, steps)):
        t = np.arange(n) * (sp / st) + 1.0
        field = _lerp_axis(field, axis, t)
    return field


def _trabecular(rng: np.random.Generator, shape, spacing_zyx) -> np.ndarray:
    """Band-passed noise (0.45-1.5 mm), unit variance: the grain of cancellous bone at CT resolution."""
    white = rng.standard_normal(shape, dtype=_F)
    fine = ndimage.gaussian_filter(white, [0.45 / s for s in spacing_zyx], truncate=3.0)
    coarse = ndimage.gaussian_filter(fine, [1.5 / s for s in spacing_zyx], truncate=2.5)
    band = fine - 0.7 * coarse
    band /= max(float(band.std()), 1e-6)
    return band


def _gauss(x, mu, sigma):
    return np.exp(-(((x - mu) / sigma) ** 2))


def _const(value: float):
    """A function of z returning ``value`` in every slice."""
    return lambda z: np.full(np.shape(z), value, dtype=float)


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _dilated(prim: _Prim, mm: float) -> _Prim:
    """``prim`` grown by ``mm`` (its distance lowered, its box widened)."""
    return _Prim(prim.center, prim.frame, prim.lo - mm, prim.hi + mm,
                 lambda u, v, w, f=prim.sdf: f(u, v, w) - _F(mm))
