"""The phantom's sacrum and pelvis beside the real scan's, with and without the pelvic options.

Draws one varied phantom (``datasets.varied_overrides``; field of view from below the sacrum to L5)
three times: with none of the three pelvic options of ``PhantomConfig`` (``sacrum_plate``,
``sacroiliac_joint``, ``sacrum_upright``), with the plate only (the varied phantoms as drawn for
training) and with all three, and shows each
beside ``totalsegmentator/example_ct``: a mid-sagittal slice and an axial slice through S2, on one
millimetre scale centred on the sacrum (green: sacrum label, blue: hip bones). It also prints the
sacrum label's height and front-to-back depth (mm) in each.

Usage (about 30 s)::

    .venv/bin/python experiments/phantom_pelvis.py docs/phantom_pelvis.png [--seed 2009]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from SpineInpaintLib.core import io
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.phantom.config import PhantomConfig
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.data.real import load_real_case

VARIANTS = (
    ("none of the options", dict(sacrum_plate=False, sacroiliac_joint=False, sacrum_upright=False)),
    ("sacrum_plate only (as trained)", dict(sacrum_plate=True, sacroiliac_joint=False, sacrum_upright=False)),
    ("all three options", dict(sacrum_plate=True, sacroiliac_joint=True, sacrum_upright=True)),
)


def sacrum_extent(labels: io.Volume) -> tuple[float, float]:
    """Height (S-I) and depth (A-P) in mm of the sacrum label (TotalSegmentator id 25)."""
    pts = labels.index_to_physical(np.argwhere(labels.array == 25))
    return float(np.ptp(pts[:, 2])), float(np.ptp(pts[:, 1]))


def panels(ax_sag, ax_ax, ct: io.Volume, labels: io.Volume, title: str) -> None:
    ct, labels = io.reorient(ct, "LPS"), io.reorient(labels, "LPS")
    img, lab = ct.array, labels.array
    sx, sy, sz = ct.spacing
    k, j, i = np.argwhere(lab == 25).mean(axis=0)
    x = int(round(np.median(np.argwhere(lab == 25)[:, 2])))
    sag_ext = [-j * sy, (img.shape[1] - j) * sy, -k * sz, (img.shape[0] - k) * sz]
    ax_sag.imshow(np.clip(img[:, :, x], -200, 1000), cmap="gray", extent=sag_ext, origin="lower")
    ys, zs = (np.arange(img.shape[1]) - j) * sy, (np.arange(img.shape[0]) - k) * sz
    ax_sag.contour(ys, zs, lab[:, :, x] == 25, [0.5], colors="lime", linewidths=0.8)
    ax_sag.set_xlim(-90, 90)
    ax_sag.set_ylim(-90, 90)
    ax_sag.set_title(f"{title}\nsagittal (anterior left)", fontsize=9)
    # the axial slice a quarter of the way down the sacrum (about S2)
    ks = np.nonzero((lab == 25).any(axis=(1, 2)))[0]
    z = int(ks.max() - 0.25 * (ks.max() - ks.min()))
    ax_ext = [-i * sx, (img.shape[2] - i) * sx, (img.shape[1] - j) * sy, -j * sy]
    ax_ax.imshow(np.clip(img[z], -200, 1000), cmap="gray", extent=ax_ext)
    xs = (np.arange(img.shape[2]) - i) * sx
    for ids, colour in (([25, 26], "lime"), ([77, 78], "deepskyblue")):
        ax_ax.contour(xs, ys, np.isin(lab[z], ids), [0.5], colors=colour, linewidths=0.8)
    ax_ax.set_xlim(-140, 140)
    ax_ax.set_ylim(90, -90)
    ax_ax.set_title("axial, about S2 (anterior up)", fontsize=9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("figure", help="PNG to write")
    parser.add_argument("--seed", type=int, default=2009, help="varied phantom seed (default 2009)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 8.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct, labels = load_real_case("totalsegmentator")
    height, depth = sacrum_extent(labels)
    print(f"real scan: sacrum height {height:.0f} mm, depth {depth:.0f} mm")
    panels(axes[0, 0], axes[1, 0], ct, labels, "example_ct (real, 3 mm)")
    for col, (name, flags) in enumerate(VARIANTS, start=1):
        overrides = dict(datasets.varied_overrides(args.seed), levels=("sacrum", "S1", "L5"), **flags)
        ph = make_phantom(PhantomConfig.random(args.seed, **overrides))
        print(f"phantom {args.seed}, {name}: sacrum height %.0f mm, depth %.0f mm" % sacrum_extent(ph.labels))
        panels(axes[0, col], axes[1, col], ph.ct, ph.labels, f"varied phantom {args.seed}: {name}")
    fig.suptitle("The sacrum and pelvis: real scan and phantom (green: sacrum / S1, blue: hip bones; mm)")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=70)
    print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
