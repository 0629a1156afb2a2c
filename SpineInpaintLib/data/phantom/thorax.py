"""The soft tissues of the chest and neck in the whole-column phantom: mediastinum, heart, aortic arch and
great vessels, airway, oesophagus and thyroid; and the shape of the upper body (chest, neck, head)."""

from __future__ import annotations

import numpy as np

from SpineInpaintLib.data.phantom.body import _HU, _Layout, _organ_hu, _Painter, _UpperShape
from SpineInpaintLib.data.phantom.config import _L, PhantomConfig
from SpineInpaintLib.data.phantom.ribcage import _skull_shape
from SpineInpaintLib.data.phantom.shapes import _capsule_prim, _const, _ellipsoid_prim, _rot_z
from SpineInpaintLib.data.phantom.spine import _Vert

__all__: list[str] = []


def _upper_shape(cfg: PhantomConfig, by: dict[str, _Vert], z_rec: float) -> _UpperShape:
    """The chest's narrowing to the thoracic inlet, the neck and the head of a whole-column phantom."""
    z = {n: float(v.center[2]) for n, v in by.items()}
    t1_top = z["T1"] + by["T1"].dims["height"] / 2
    sc = cfg.vertebra_scale
    cage_z = np.array([z["T7"], z["T6"], z["T5"], z["T4"], z["T3"], z["T2"], z["T1"], t1_top + 25.0])
    cage_f = np.array([1.0, 0.97, 0.93, 0.87, 0.78, 0.66, 0.5, 0.4])
    # the posterior rib arcs run ~20 mm behind the costotransverse joints (T9 ... T1); below T9 no limit
    thoracic = [by[f"T{n}"] for n in range(9, 0, -1)]
    back_y = [_tubercle(v)[1] + 14.0 for v in thoracic]
    back_z = [float(by["T10"].center[2])] + [float(v.center[2]) for v in thoracic]
    back_y = [back_y[0] + 80.0] + back_y
    return _UpperShape(
        cage_z=cage_z, cage_f=cage_f, z_cavity_top=t1_top + 25.0,
        z_neck=(t1_top, z["C6"]),
        neck_half=(60.0 * sc * cfg.body_width_mm / 330.0, 50.0 * sc, 75.0 * sc),
        head=_skull_shape(by["C1"]),
        z_fissure=(z["T4"], z_rec + 25.0, z["T6"] - 5.0),
        back_z=np.array(back_z), back_y=np.array(back_y),
    )


def _tubercle(v: _Vert) -> np.ndarray:
    """Where a rib's tubercle meets the transverse process of ``v`` (mid-line u, LPS mm)."""
    d = v.dims
    v_c = 0.80 * d["depth"] / 2 + d["canal_d"] / 2 + 0.5
    return v.center + v.frame @ np.array([0.0, v_c + 10.0, 0.14 * d["height"] - 5.0])


def _blood_hu(cfg: PhantomConfig) -> float:
    return _organ_hu(cfg, "aorta")


def _vein_hu(cfg: PhantomConfig) -> float:
    return _organ_hu(cfg, "ivc")


def _spine_at(lay: _Layout, z: float) -> tuple[float, float, float, float]:
    return tuple(float(v[0]) for v in lay.spine(np.array([z])))  # type: ignore[return-value]


def _paint_heart(p: _Painter, by: dict[str, _Vert]) -> None:
    """Mediastinal fat, then the heart in its pericardial fat, resting on the diaphragm (T8-T10)."""
    cfg, lay = p.cfg, p.layout
    sc = cfg.vertebra_scale
    z_t1, z_t8 = float(by["T1"].center[2]), float(by["T8"].center[2])
    sp = lambda z: lay.spine(np.asarray(z, float))  # noqa: E731
    p.tube(z_t8, z_t1 + 10.0, lambda z: sp(z)[0], lambda z: sp(z)[1] - sp(z)[3] - 42.0, _const(26.0 * sc),
           _const(34.0), _HU["deep_fat"], _L["deep_fat"])
    xs, ys, _, bs = _spine_at(lay, z_t8)
    c = np.array([xs + 22.0 * sc, ys - bs - 62.0 * sc, z_t8 - 8.0])
    fr = _rot_z(-35.0)
    semi = np.array([62.0, 48.0, 55.0]) * sc
    p.soft([_ellipsoid_prim(c, fr, semi + 4.0)], [], _HU["deep_fat"], _L["deep_fat"])
    blood = _blood_hu(cfg)

    def heart_hu(box):
        return 0.55 * blood + 0.45 * 50.0 + 8.0 * p.noise(box, (8.0, 8.0, 8.0))

    p.soft([_ellipsoid_prim(c, fr, semi)], [], heart_hu, _L["heart"])


def _tube_chain(pts, r: float):
    return [_capsule_prim(np.zeros(3), np.eye(3), a, b, r) for a, b in zip(pts[:-1], pts[1:])]


def _paint_mediastinum(p: _Painter, by: dict[str, _Vert]) -> None:
    """Aortic arch (from the descending aorta at T4 over to the ascending aorta and the heart), the great
    arteries, the superior vena cava, the airway, the oesophagus and the thyroid."""
    cfg, lay = p.cfg, p.layout
    sc = cfg.vertebra_scale
    z = {n: float(v.center[2]) for n, v in by.items()}
    r_ao = 12.0 * sc
    xs, ys, _, bs = _spine_at(lay, z["T4"])
    top = np.array([xs + 16.0 * sc, ys - bs - r_ao - 3.0, z["T4"]])  # where the descending aorta ends
    arch = [top, top + np.array([-4.0, -22.0, 16.0]) * sc, top + np.array([-20.0, -45.0, 20.0]) * sc,
            top + np.array([-32.0, -62.0, 8.0]) * sc, top + np.array([-30.0, -68.0, -22.0]) * sc,
            top + np.array([-22.0, -66.0, -48.0]) * sc]
    blood, vein = _blood_hu(cfg), _vein_hu(cfg)
    p.soft(_tube_chain(arch, r_ao), [], blood, _L["aorta"])
    # great arteries up the neck beside the trachea
    x7, y7, _, b7 = _spine_at(lay, z["C5"])
    apex = arch[2]
    bct = [apex + np.array([-10.0, -2.0, 0.0]), apex + np.array([-18.0 * sc, 2.0, 22.0 * sc])]
    p.soft(_tube_chain(bct, 6.0 * sc), [], blood, _L["brachiocephalic_trunk"])
    for side, carotid, subcl, start in ((-1.0, 57, 55, bct[1]), (1.0, 58, 56, apex + np.array([6.0, 4.0, 0.0]))):
        neck = [start, np.array([x7 + side * 24.0 * sc, y7 - b7 - 10.0, z["C7"]]),
                np.array([x7 + side * 24.0 * sc, y7 - b7 - 8.0, z["C2"]])]
        p.soft(_tube_chain(neck, 3.6 * sc), [], blood, carotid, clip="deep")
        arm = [start + np.array([side * 6.0, 8.0, 0.0]), start + np.array([side * 40.0, 14.0, 12.0]) * sc]
        p.soft(_tube_chain(arm, 4.5 * sc), [], blood, subcl)
    svc = [arch[3] + np.array([-24.0, 10.0, 25.0]) * sc, arch[4] + np.array([-24.0, 12.0, -20.0]) * sc]
    p.soft(_tube_chain(svc, 9.0 * sc), [], vein, _L["superior_vena_cava"])
    # oesophagus (collapsed, a little air) in front of the bodies; the airway in front of it
    sp = lambda q: lay.spine(np.asarray(q, float))  # noqa: E731
    ex = lambda q: sp(q)[0] + 4.0 * np.clip((z["T2"] - q) / 40.0, 0.0, 1.0)  # noqa: E731
    ey = lambda q: sp(q)[1] - sp(q)[3] - 9.0  # noqa: E731
    p.tube(float(by["T10"].center[2]), z["C6"], ex, ey, _const(9.0), _const(6.0), 45.0, _L["esophagus"], clip="deep")
    p.tube(float(by["T10"].center[2]), z["C6"], ex, ey, _const(2.5), _const(1.5), _HU["gas"], None, clip="deep")
    tx = lambda q: sp(q)[0]  # noqa: E731
    ty = lambda q: ey(q) - 6.0 - 11.0  # noqa: E731
    z_carina = z["T5"]
    p.tube(z_carina, z["C6"], tx, ty, _const(10.0), _const(9.0), 50.0, _L["trachea"], clip="deep")
    p.tube(z_carina, z["C6"], tx, ty, _const(8.0), _const(7.0), _HU["air"], _L["trachea"], clip="deep")
    p.tube(z["C6"], z["C1"] + 8.0, tx, lambda q: ey(q) - 10.0, _const(14.0), _const(6.5), _HU["air"], None,
           clip="deep")
    xc, yc_, _, _ = _spine_at(lay, z_carina)
    carina = np.array([xc, yc_ - _spine_at(lay, z_carina)[3] - 26.0, z_carina])
    for side in (-1.0, 1.0):
        bronchus = [carina, carina + np.array([side * 40.0, 14.0, -28.0]) * sc]
        p.soft(_tube_chain(bronchus, 5.5 * sc), [], _HU["air"], None)
    thy = 135.0 if cfg.phase in ("arterial", "portal") else 100.0  # iodine-rich gland
    for side in (-1.0, 1.0):
        c = np.array([tx(z["C7"]) + side * 19.0, float(ty(z["C7"])) + 2.0, 0.5 * (z["C6"] + z["T1"])])
        p.soft([_ellipsoid_prim(c, np.eye(3), (8.0, 10.0, 20.0))], [], thy, _L["thyroid_gland"], clip="deep")
