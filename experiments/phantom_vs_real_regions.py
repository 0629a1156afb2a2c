"""Phantoms of each body region beside the real scans of that region: a figure and a measured table.

For every real scan of the registry, phantoms (``PhantomConfig.random``, eight seeds by default) are made
over the scan's own vertebrae on a grid like the scan's (1.5 mm pixels and slices, the same in-plane field of
view). Measured with one definition on both (``SpineInpaintLib.data.phantom.tissues``): per vertebra its
label volume (mL) and mean HU; per scan the mean HU of bone (vertebra labels), disc (between adjacent
vertebra labels), muscle (autochthon, iliopsoas) and fat (-190 to -30 HU inside the body). Real labels
are TotalSegmentator predictions. The unlabelled chest scans enter the figure only.

Usage (about 20 s on 2 cores)::

    .venv/bin/python experiments/phantom_vs_real_regions.py --figure docs/phantom_regions.png \
        --table docs/experiments/2026-12-08-phantom-regions.md [--seeds 0,1,2,3,4,5,6,7]
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import VERTEBRA_NAMES, vertebra_mask
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.data import real
from SpineInpaintLib.data.phantom import PhantomConfig, make_phantom, tissue_hu_statistics

#: Real scan shown per region in the figure, and the levels its phantom covers when the scan has no labels.
FIGURE_SCANS = (("neck", "s0003", None), ("chest", "lidc_0314", ("T2", "T9")),
                ("thoracolumbar", "s0009", None), ("abdomen", "totalsegmentator", None),
                ("lumbar", "verse_tptbox", None))

TISSUES = ("bone", "disc", "muscle", "fat")

HEADER = """# 2026-12-08: phantoms of each region against the real scans

Written by (about 45 s for eight seeds on the 2-core CPU; seeds {seeds}):

```sh
.venv/bin/python experiments/phantom_vs_real_regions.py --figure docs/phantom_regions.png \\
    --table docs/experiments/2026-12-08-phantom-regions.md --seeds {seeds_arg}
```

Phantoms: `PhantomConfig.random(seed, levels=<the scan's levels>, spacing_xy=1.5, slice_thickness=1.5)`
with the scan's in-plane field of view, mean ± sd over the seeds. Real labels are TotalSegmentator
predictions. Tissues: bone = every vertebra label, disc = between adjacent vertebra labels, muscle =
autochthon and iliopsoas labels, fat = -190 to -30 HU inside the body (`data.phantom.tissues`);
`verse_tptbox` has no muscle labels.

"""


def phantom_like(ct: io.Volume, levels: tuple[int, ...], seed: int):
    """A varied phantom over ``levels`` on a 1.5 mm grid with about the in-plane field of view of ``ct``."""
    fov = [n * s for n, s in zip(ct.size_xyz[:2], ct.spacing[:2])]
    shape = tuple(int(min(512, max(64, round(f / 1.5)))) for f in fov)
    config = PhantomConfig.random(seed, levels=tuple(levels), spacing_xy=1.5, slice_thickness=1.5, shape_xy=shape)
    return make_phantom(config)


def per_level(ct: io.Volume, labels: io.Volume, levels) -> dict[str, dict[str, float]]:
    """Volume (mL) and mean HU of each vertebra label."""
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    out = {}
    for level in levels:
        mask = labels.array == level
        if mask.any():
            out[VERTEBRA_NAMES[level]] = {"ml": float(mask.sum() * voxel_ml), "hu": float(ct.array[mask].mean())}
    return out


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    for scan in real.real_scans(labelled=True):
        if not scan.levels:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ct, labels = real.load_real_case(scan.name)
        row = {"scan": scan.name, "region": scan.region, "levels": per_level(ct, labels, scan.levels),
               "tissues": {k: v["mean"] for k, v in tissue_hu_statistics(ct, labels).items()}, "phantoms": []}
        for seed in seeds:
            ph = phantom_like(ct, scan.levels, seed)
            row["phantoms"].append({"seed": seed, "levels": per_level(ph.ct, ph.labels, scan.levels),
                                    "tissues": {k: v["mean"] for k, v in
                                                tissue_hu_statistics(ph.ct, ph.labels).items()}})
        rows.append(row)
        print(f"measured {scan.name}", flush=True)
    return rows


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}" if len(values) > 1 else f"{values[0]:.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| scan (region) | vertebra | real mL | phantom mL | real HU | phantom HU |", "|---|---|---|---|---|---|"]
    for row in rows:
        for name, value in row["levels"].items():
            ph = [p["levels"].get(name) for p in row["phantoms"] if name in p["levels"]]
            lines.append(f"| {row['scan']} ({row['region']}) | {name} | {value['ml']:.1f} | "
                         f"{_mean_sd([p['ml'] for p in ph])} | {value['hu']:.0f} | {_mean_sd([p['hu'] for p in ph])} |")
    lines += ["", "| scan (region) | " + " | ".join(f"{t} real / phantom HU" for t in TISSUES) + " |",
              "|---|" + "---|" * len(TISSUES)]
    for row in rows:
        cells = [f"{row['tissues'][t]:.0f} / {_mean_sd([p['tissues'][t] for p in row['phantoms']])}"
                 if np.isfinite(row["tissues"][t]) else "- / " + _mean_sd([p["tissues"][t] for p in row["phantoms"]])
                 for t in TISSUES]
        lines.append(f"| {row['scan']} ({row['region']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sagittal(ax, ct: io.Volume, labels: io.Volume | None, title: str) -> None:
    ct = io.reorient(ct, "LPS")
    img = ct.array
    if labels is not None and vertebra_mask(labels.array).any():
        x = int(np.median(np.argwhere(vertebra_mask(io.reorient(labels, "LPS").array))[:, 2]))
    else:
        x = img.shape[2] // 2
    sx, sy, sz = ct.spacing
    ax.imshow(np.clip(img[:, :, x], -300, 1200), cmap="gray", origin="lower",
              extent=[0, img.shape[1] * sy, 0, img.shape[0] * sz])
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def figure(path: str, seed: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(FIGURE_SCANS), figsize=(3.2 * len(FIGURE_SCANS), 7.0))
    for col, (region, name, fallback) in enumerate(FIGURE_SCANS):
        scan = real.real_scan(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if scan.labelled:
                ct, labels = real.load_real_case(name)
            else:
                ct, labels = real.load_real_ct(name), None
        levels = scan.levels or tuple(range(min(map(_id, fallback)), max(map(_id, fallback)) + 1))
        ph = phantom_like(ct, levels, seed)
        _sagittal(axes[0, col], ct, labels, f"real: {name} ({region})")
        _sagittal(axes[1, col], ph.ct, ph.labels, f"phantom seed {seed}: {VERTEBRA_NAMES[max(levels)]}-"
                  f"{VERTEBRA_NAMES[min(levels)]}")
    fig.suptitle("mid-sagittal slices, anterior left, window -300..1200 HU (real labels: TotalSegmentator)", fontsize=9)
    save_figure(fig, path)


def _id(name: str) -> int:
    from SpineInpaintLib.core.labels import vertebra_id

    return vertebra_id(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", help="write the figure here")
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.figure:
        figure(args.figure, seeds[0])
    if args.table or args.json:
        rows = measure(seeds)
        if args.table:
            with open(args.table, "w") as f:
                f.write(HEADER.format(seeds=", ".join(map(str, seeds)), seeds_arg=",".join(map(str, seeds))) + table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        print(table(rows))


if __name__ == "__main__":
    main()
