"""Make a phantom: place the grid, paint the anatomy, simulate the scanner."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.io import Volume
from SpineInpaintLib.data.phantom.body import (
    _HU,
    _Layout,
    _make_layout,
    _paint_canal,
    _paint_muscles,
    _paint_vessels,
    _paint_viscera,
    _Painter,
    _scanner,
    _vertebra_extent,
    _z_of,
)
from SpineInpaintLib.data.phantom.cervical import _build_upper, _cervical_prims
from SpineInpaintLib.data.phantom.config import _L, SUPPORTED_LEVELS, Phantom, PhantomConfig, SpineLevel
from SpineInpaintLib.data.phantom.ribcage import _paint_chest_bones, _skull_shape
from SpineInpaintLib.data.phantom.shapes import _dilated, _Grid, _paint, _rasterise
from SpineInpaintLib.data.phantom.skeleton import (
    _SI_JOINT_GAP,
    _hip_joint_prims,
    _ilium_prim,
    _rib_prims,
    _sacroiliac_prims,
)
from SpineInpaintLib.data.phantom.spine import _build_spine, _disc_prims, _sacrum_prims
from SpineInpaintLib.data.phantom.thorax import _paint_heart, _paint_mediastinum, _upper_shape

__all__ = ["make_phantom"]

# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------
_Z_MARGIN = 10.0  # mm of context above and below the requested levels


def _place_grid(cfg: PhantomConfig, lay: _Layout, ext: dict[int, tuple[np.ndarray, np.ndarray]],
                z_model: tuple[float, float], table_bottom: float) -> _Grid:
    levels = cfg.level_ids()
    lo = min(ext[i][0][2] for i in levels) - _Z_MARGIN
    hi = max(ext[i][1][2] for i in levels) + _Z_MARGIN
    dz, dxy = float(cfg.slice_thickness), float(cfg.spacing_xy)
    nx, ny = (int(n) for n in cfg.shape_xy)
    nz = int(cfg.n_slices) if cfg.n_slices is not None else int(math.ceil((hi - lo) / dz)) + 1
    if cfg.origin is not None:
        origin = tuple(float(o) for o in cfg.origin)
    else:
        zc = (lo + hi) / 2
        z_mid = np.linspace(lo, hi, 9)
        _, _, Ba, yc = lay.outline(z_mid)
        front = float((yc - Ba).min())
        span = table_bottom - front
        if ny * dxy >= span + 10.0:
            ycen = (front + table_bottom) / 2
        else:
            ycen = float(np.mean(lay.canal_at(z_mid)[1]))
        origin = (-(nx - 1) / 2 * dxy, ycen - (ny - 1) / 2 * dxy, zc - (nz - 1) / 2 * dz)
    z_first, z_last = origin[2] - dz / 2, origin[2] + (nz - 0.5) * dz
    if z_first < z_model[0] - 30.0 or z_last > z_model[1] + 30.0:
        top = "the skull base" if cfg.whole_column else "T10 (ask for a level above T10 for the whole column)"
        raise SpineInpaintError(
            f"the grid spans z = {z_first:.0f} to {z_last:.0f} mm but the phantom models only "
            f"{z_model[0]:.0f} to {z_model[1]:.0f} mm (hip joints to {top}): use fewer or thinner slices"
        )
    if not any(ext[i][1][2] >= z_first and ext[i][0][2] <= z_last for i in levels):
        raise SpineInpaintError("the grid holds none of the requested levels (check origin and n_slices)")
    return _Grid((nz, ny, nx), (dxy, dxy, dz), origin)


def make_phantom(config: PhantomConfig | None = None, **overrides) -> Phantom:
    """Make a phantom CT of the spine (thoracolumbar, or the whole column C1-sacrum) with its label map.

    Parameters
    ----------
    config
        The configuration (default :class:`PhantomConfig()`); ``overrides`` replace fields of it,
        e.g. ``make_phantom(seed=3, n_slices=40)``.

    Returns
    -------
    Phantom
        ``ct`` (int16 HU) and ``labels`` (uint8) on the same identity-direction grid, the pose of
        every vertebra and the config.

    Raises
    ------
    SpineInpaintError
        For an invalid config: empty or oversize grid, spacing out of range, unknown level,
        scoliosis beyond 20 degrees, a z extent the anatomy does not cover, ...
    """
    cfg = config if config is not None else PhantomConfig()
    if not isinstance(cfg, PhantomConfig):
        raise SpineInpaintError(f"config must be a PhantomConfig, got {type(cfg).__name__}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(PhantomConfig)}
        if unknown:
            raise SpineInpaintError(f"unknown phantom option(s): {', '.join(sorted(unknown))}")
        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    seeds = np.random.SeedSequence([int(cfg.seed), 20240611]).spawn(3)
    rng_geo, rng_tex, rng_noise = (np.random.default_rng(s) for s in seeds)

    verts, sacral = _build_spine(cfg, rng_geo)
    whole = cfg.whole_column
    # the column above T10 draws from streams of its own: the thoracolumbar phantom keeps every voxel
    upper = _build_upper(cfg, verts[-1], np.random.default_rng([int(cfg.seed), 20261208])) if whole else []
    chain = verts + upper
    vprims = [_cervical_prims(v, chain[i + 1] if i + 1 < len(chain) else None) for i, v in enumerate(chain)]
    sprims = _sacrum_prims(sacral, verts[0], plate=cfg.sacrum_plate)
    ext = {v.label: _vertebra_extent(pr[0]) for v, pr in zip(chain, vprims)}
    sac_lo, sac_hi = _vertebra_extent(sprims[0])
    # The "sacrum" level's field of view reaches 20 mm below the sacrum: the hip joints beside it.
    ext[25] = (sac_lo - np.array([0.0, 0.0, 20.0]), sac_hi)
    tips_y = max(max(e[1][1] for k, e in ext.items() if k <= max(SUPPORTED_LEVELS)), float(sac_hi[1]))
    if whole:  # the thoracic spinous processes lie on the table too
        tips_y = max(tips_y, max(e[1][1] for e in ext.values()) - 10.0)
    layout = _make_layout(cfg, verts, sacral, tips_y, rng_geo, upper)
    gap = float(rng_geo.uniform(4.0, 12.0))
    by = {v.name: v for v in chain}
    if whole:
        layout.upper = _upper_shape(cfg, by, _z_of(verts, "T12"))
        skull = _skull_shape(by["C1"])
        z_model = (float(sac_lo[2]) - 20.0, skull[1])
    else:
        z_model = (float(sac_lo[2]) - 20.0, float(ext[verts[-1].label][1][2]))
    grid = _place_grid(cfg, layout, ext, z_model, layout.y_back + gap + 42.0)

    p = _Painter(cfg, grid, layout, rng_tex)
    p.table(gap)
    p.body()
    _paint_viscera(p, verts)
    shared_rng, own_rng = p.rng, np.random.default_rng([int(cfg.seed), 20261209])
    if whole:
        p.rng = own_rng
        _paint_heart(p, by)
        p.rng = shared_rng
        _paint_vessels(p, verts, by["T4"].center[2], by["T9"].center[2] - 5.0)
        _paint_muscles(p, verts)
        _paint_canal(p, verts, skull[1] - skull[4] + 6.0)
        p.rng = own_rng
        _paint_mediastinum(p, by)
        p.rng = shared_rng
    else:
        _paint_vessels(p, verts)
        _paint_muscles(p, verts)
        _paint_canal(p, verts)
    p.drop_cache()
    pairs = [(lo, up) for lo, up in zip(chain[:-1], chain[1:]) if up.name != "C1"]  # no disc under the atlas
    if cfg.lumbarised_s1:
        pairs.append((sacral[0], verts[0]))
    for lo, up in pairs:
        # annulus fibrosus, then the nucleus pulposus (a smaller, posterior footprint) inside it
        dhu = cfg.disc_hu - 0.5 * (_HU["annulus"] + _HU["nucleus"])
        for nucleus in (False, True):
            res = _rasterise(grid, _disc_prims(lo, up, nucleus), [], (0.0,), p.k, p.h)
            if res is not None:
                box, (f_disc,) = res
                _paint(p.ct, p.lab, box, f_disc, _HU["nucleus" if nucleus else "annulus"] + dhu,
                       None if nucleus else _L["intervertebral_disc"])
    # bones, the vertebrae last so that their labels win at the joints (sacro-iliac, costovertebral)
    z_crest = (_z_of(verts, "L4") + _z_of(verts, "L5")) / 2  # the intercristal line
    si_cuts = [_dilated(q, _SI_JOINT_GAP) for q in sprims[0] + vprims[0][0]] if cfg.sacroiliac_joint else []
    for side, label in ((1.0, _L["hip_left"]), (-1.0, _L["hip_right"])):
        il = [_ilium_prim(p, verts[0], side, z_crest, float(sac_lo[2]) - 20.0)]
        if cfg.sacroiliac_joint:
            il += _sacroiliac_prims(verts[0], sacral, side, cfg.sacrum_plate, cfg.vertebra_scale)
        p.bone(il, si_cuts, label, cfg.cortical_hu * 0.95, cfg.cancellous_hu * 0.9,
               cort_mm=max(cfg.cortical_mm, 1.2))
    # Hip joints below the sacrum, textured from their own random stream and kept below the lowest
    # slice (of at most 6 mm) a field of view ending at S1 can have: those phantoms, drawn before the
    # joints existed, keep every voxel.
    z_hip_top = float(ext[verts[0].label][0][2]) - _Z_MARGIN - 8.0
    shared_rng, p.rng = p.rng, np.random.default_rng([int(cfg.seed), 20261202])
    for side, femur, hip in ((1.0, _L["femur_left"], _L["hip_left"]), (-1.0, _L["femur_right"], _L["hip_right"])):
        head, cup = _hip_joint_prims(verts[0], float(sac_lo[2]), z_hip_top, side, cfg.vertebra_scale)
        p.bone([cup], [], hip, cfg.cortical_hu * 0.95, cfg.cancellous_hu * 0.9, cort_mm=max(cfg.cortical_mm, 1.2))
        p.bone(head, [], femur, cfg.cortical_hu * 0.9, cfg.cancellous_hu * 0.9, cort_mm=max(cfg.cortical_mm, 1.2))
    p.rng = shared_rng
    for v in verts:
        if v.name in ("T10", "T11", "T12") and not (v.name == "T12" and cfg.rib_pairs == 11):
            number = int(v.name[1:])
            for side, base in ((1.0, 91), (-1.0, 103)):  # rib_left_n = 91 + n, rib_right_n = 103 + n
                rib, cart = _rib_prims(p, v, side, number)
                p.bone(rib, [], base + number, v.cortical_hu * 0.9, v.cancellous_hu, cort_mm=1.1)
                if cart:
                    p.soft(cart, [], _HU["cartilage"], _L["costal_cartilages"], clip=None, k=p.k)
    p.rng = own_rng
    if cfg.rib_pairs == 13:  # a short lumbar rib on L1, which TotalSegmentator has no id for
        l1 = by["L1"]
        for side in (1.0, -1.0):
            rib, _ = _rib_prims(p, l1, side, 12)
            p.bone(rib, [], _L["supernumerary_rib"], l1.cortical_hu * 0.9, l1.cancellous_hu, cort_mm=1.1)
    if whole:
        _paint_chest_bones(p, upper)
    p.rng = shared_rng
    p.bone(sprims[0], sprims[1], _L["sacrum"], sacral[0].cortical_hu, sacral[0].cancellous_hu)
    for v, (prims, cuts) in zip(chain, vprims):
        if v.label > max(SUPPORTED_LEVELS):
            p.rng = own_rng
        p.bone(prims, cuts, v.label, v.cortical_hu, v.cancellous_hu)
    p.rng = shared_rng

    labels = p.lab
    ct = _scanner(p.ct, cfg, grid, rng_noise)
    del p
    geom = dict(spacing=grid.spacing, origin=grid.origin, direction=np.eye(3))
    centerline = tuple(
        SpineLevel(v.label, v.name, v.center.copy(), v.frame.copy(), v.dims["width"], v.dims["depth"],
                   v.dims["height"], v.dims["disc_above"] if i + 1 < len(chain) else 0.0)
        for i, v in enumerate(chain)
    )
    s2 = sacral[0]
    sacrum = SpineLevel(25, "sacrum", s2.center.copy(), s2.frame.copy(), s2.dims["width"], s2.dims["depth"],
                        s2.dims["height"], 0.0)
    centerline = (sacrum,) + centerline
    return Phantom(Volume(ct, **geom), Volume(labels, **geom), centerline, cfg)
