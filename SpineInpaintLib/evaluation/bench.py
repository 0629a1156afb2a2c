"""Benchmarks (``python -m SpineInpaintLib bench``): speed and memory targets live here, not in tests.

Each benchmark is a function returning a list of rows ``{"name", "seconds", ...}``; they run on
this machine in one process, so rows of one run are comparable with each other (and only with
each other: the machine is noisy). Peak memory is the process's resident high-water mark after
the benchmark (``ru_maxrss``), so run one benchmark per process when memory matters.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError, pipeline
from SpineInpaintLib.core import io
from SpineInpaintLib.core.labels import spine_mask
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data import lesions, lesions_focal
from SpineInpaintLib.data.phantom import config as phantom
from SpineInpaintLib.data.phantom.generate import make_phantom
from SpineInpaintLib.detection import inference as detection
from SpineInpaintLib.evaluation.demo import demo_case
from SpineInpaintLib.evaluation.restore import truth_metrics
from SpineInpaintLib.inpainting import methods as inpainting
from SpineInpaintLib.inpainting.restore import restore_ct, restore_mask
from SpineInpaintLib.segmentation import networks as segmentation
from SpineInpaintLib.segmentation.inference import segment_volume
from SpineInpaintLib.training import gan

__all__ = [
    "BENCHMARKS", "run_benchmarks", "format_table", "bench_phantom", "bench_whole_spine", "bench_detection", "bench_segmentation",
    "bench_pipeline", "bench_inpainting", "write_result",
]


def _timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_phantom(seed: int = 0) -> list[dict]:
    """A 512x512x100 phantom (0.8 mm, 2.5 mm slices) and a destructive lytic lesion in L3.

    Target (issue 3): phantom with lesion in under 20 s on the 2-core CPU.
    """

    config = phantom.PhantomConfig(seed=seed, shape_xy=(512, 512), n_slices=100, spacing_xy=0.8,
                                   slice_thickness=2.5, levels=("L2", "L3", "L4"))
    ph, t_phantom = _timed(make_phantom, config)
    _, t_lesion = _timed(lesions.simulate_lesion, ph.ct, ph.labels, "L3", "lytic", True, seed=seed)
    shape = "x".join(map(str, ph.ct.size_xyz))
    return [
        {"name": "phantom", "case": shape, "seconds": t_phantom},
        {"name": "lesion (destructive lytic, L3)", "case": shape, "seconds": t_lesion},
        {"name": "phantom + lesion", "case": shape, "seconds": t_phantom + t_lesion, "target_s": 20.0},
    ]


def bench_whole_spine(seed: int = 0) -> list[dict]:
    """A 512x512x300 whole-spine phantom, C1 to the sacrum (0.8 mm, 2.4 mm slices), with two lesions.

    The lesions: a classic destructive lytic one in L2 and two focal ones (a soft-tissue mass in T7's
    body, lytic remnants in C5's pedicle) in one call of the focal simulator. Target (issue 26):
    phantom and two lesions in under 60 s on the 2-core CPU.
    """
    config = phantom.PhantomConfig(seed=seed, shape_xy=(512, 512), n_slices=300, spacing_xy=0.8,
                                   slice_thickness=2.4, levels="C1-sacrum")
    ph, t_phantom = _timed(make_phantom, config)
    _, t_classic = _timed(lesions.simulate_lesion, ph.ct, ph.labels, "L2", "lytic", True, seed=seed)
    _, t_focal = _timed(lesions_focal.simulate_focal_lesions, ph.ct, ph.labels, seed, levels=["T7", "C5"],
                        count=2, kinds=["soft_tissue_mass", "lytic_remnant"], locations=["body", "pedicle"])
    shape = "x".join(map(str, ph.ct.size_xyz))
    return [
        {"name": "whole-spine phantom", "case": shape, "seconds": t_phantom},
        {"name": "classic lesion (L2)", "case": shape, "seconds": t_classic},
        {"name": "two focal lesions (T7, C5)", "case": shape, "seconds": t_focal},
        {"name": "phantom + two focal lesions", "case": shape, "seconds": t_phantom + t_focal, "target_s": 60.0},
        {"name": "phantom + all three lesions", "case": shape, "seconds": t_phantom + t_classic + t_focal},
    ]


def bench_detection(seed: int = 0) -> list[dict]:
    """The default lesion detector (shipped RetinaNet) on the axial slices of a 512x512 phantom.

    Target (issue 5): >= 5 slices per second at 512x512 on the 2-core CPU, everything included
    (2.5D stacking, resampling to the 1 mm crop around the spine, the network, NMS, mapping back).
    Also times the whole volume-level call (detection, spine filter, 3D linking).
    """

    config = phantom.PhantomConfig(seed=seed, shape_xy=(512, 512), n_slices=40, spacing_xy=0.8,
                                   slice_thickness=2.5, levels=("L3",))
    ph = make_phantom(config)
    lesion = lesions.simulate_lesion(ph.ct, ph.labels, "L3", "lytic", True, seed=seed)
    detector = detection.load_detector()
    ct, spine = io.reorient(lesion.ct, "LPS"), io.reorient(ph.labels, "LPS")
    spine = spine.with_array(spine_mask(spine.array))
    n = int(spine.array.any(axis=(1, 2)).sum())
    first = int(np.argmax(spine.array.any(axis=(1, 2))))
    detection.detect_slices(ct, spine, detector, slices=[first])  # warm-up (first call allocates)
    _, t_slices = _timed(detection.detect_slices, ct, spine, detector)
    found, t_volume = _timed(detection.detect_volume, lesion.ct, ph.labels, detector)
    shape = "x".join(map(str, ph.ct.size_xyz))
    return [
        {"name": f"RetinaNet, {n} slices", "case": shape, "seconds": t_slices, "slices_per_s": n / t_slices,
         "target_slices_per_s": 5.0},
        {"name": f"detect_volume ({len(found)} lesion)", "case": shape, "seconds": t_volume},
    ]


def bench_segmentation(seed: int = 0, nets: tuple[str, ...] = ("unet", "vnet")) -> list[dict]:
    """Whole-volume spine segmentation of a 512x512x100 CT (phantom, 0.8 mm, 2.5 mm slices).

    Target (issue 4): under 30 s on the 2-core CPU with the default network
    (:data:`SpineInpaintLib.segmentation.DEFAULT_NETWORK`, the V-Net), everything included:
    resampling to the network grid and back, finding the spine with the U-Net, the 100 slices in
    batches, stray-component clean-up and the per-vertebra split. The other network's row is timed
    beside it without a target, and so is the V-Net on whole slices (no locator), the way it ran
    before :func:`~SpineInpaintLib.segmentation.locate_spine`.
    """

    config = phantom.PhantomConfig(seed=seed, shape_xy=(512, 512), n_slices=100, spacing_xy=0.8,
                                   slice_thickness=2.5, levels=("L2", "L3", "L4"))
    ct = make_phantom(config).ct
    shape = "x".join(map(str, ct.size_xyz))
    runs = [(net, "auto", "") for net in nets]
    if "vnet" in nets:
        runs.append(("vnet", None, ", whole slices"))
    rows = []
    for net, locator, what in runs:
        model, _ = segmentation.load_model(net)
        result, seconds = _timed(segment_volume, ct, net, model=model, locator=locator)
        row = {"name": f"segment_volume {net}{what} ({len(result.levels())} levels)", "case": shape,
               "seconds": seconds, "steps_s": {k: round(v, 2) for k, v in result.timings.items()}}
        if net == segmentation.DEFAULT_NETWORK and locator == "auto":
            row["target_s"] = 30.0
        rows.append(row)
    return rows


def bench_pipeline(seed: int = 0, methods: tuple[str, ...] = ("context", "biharmonic")) -> list[dict]:
    """The whole ``restore`` on the demo case (512x512x100 phantom, destructive lytic L3), per stage.

    The lesion mask is given (detection is timed by its own benchmark), and each method runs on the
    same input in this one process, the biharmonic baseline included. Target (issue 7): the whole
    pipeline under 60 s with peak memory under 6 GB.
    """

    sim, _ = demo_case()
    shape = "x".join(map(str, sim.ct.size_xyz))
    truth = {"labels": sim.healthy_labels, "ct": sim.healthy_ct, "level": sim.level}
    rows = []
    for method in methods:
        result, seconds = _timed(pipeline.restore, sim.ct, sim.mask, method=method, seed=seed)
        for stage in result.report["timings"]["stages"]:
            rows.append({"name": f"{method}: {stage['name']}", "case": shape, "seconds": stage["seconds"]})
        m = truth_metrics(result, truth)
        rows.append({"name": f"{method}: whole pipeline", "case": shape, "seconds": seconds, "target_s": 60.0,
                     "dice": m.get("dice"), "hd95_mm": m.get("hd95_mm")})
    return rows


def bench_inpainting(seed: int = 0, slices: int = 20, methods: tuple[str, ...] = ("context", "wgan-gp", "biharmonic"),
                     steps: int = 100, restarts: int = 2) -> list[dict]:
    """Inpainting a destructive lesion that spans ``slices`` axial slices (phantom, 1 mm slices).

    Target (issue 6): under 20 s for 20 slices on the 2-core CPU with the default method (the
    context generator); the paper's z-optimisation (WGAN-GP, ``steps`` Adam steps, ``restarts`` z
    per slice, all slices in one batch) and the biharmonic baseline are timed on the same hole. The
    binary task (vertebra mask) and the grey task (HU) are timed separately; models are loaded first.
    """

    overrides = {**gan.phantom_overrides(seed), "slice_thickness": 1.0, "levels": (30, 29, 28)}
    case = datasets.phantom_case(seed, lesion_types=None, **overrides)
    lesion = lesions.simulate_lesion(case.healthy_ct, case.labels, 29, "lytic", True, size=0.8, seed=seed)
    hole = lesion.mask.array.copy()
    zs = np.nonzero(hole.reshape(hole.shape[0], -1).any(axis=1))[0]
    hole[zs[slices:]] = 0  # exactly `slices` slices
    n = int(min(slices, len(zs)))
    cache = inpainting.ModelCache()
    rows = []
    shape = "x".join(map(str, case.ct.size_xyz))
    for method in methods:
        for task in ("binary", "grey"):
            try:
                if method in ("context",) + inpainting.GAN_METHODS:  # load the weights outside the timing
                    cache.context(task) if method == "context" else cache.gan(method, task)
                if task == "binary":
                    result, seconds = _timed(restore_mask, case.labels, hole, method=method, models=cache,
                                             steps=steps, restarts=restarts, seed=seed)
                else:
                    result, seconds = _timed(restore_ct, lesion.ct, case.labels, hole, method=method,
                                             models=cache, steps=steps, restarts=restarts, seed=seed)
            except Exception as err:  # noqa: BLE001 - a missing model is reported, not fatal
                rows.append({"name": f"{method} ({task}): {err}", "case": shape, "seconds": float("nan")})
                continue
            row = {"name": f"{method} ({task}), {n} slices", "case": shape, "seconds": seconds,
                   "seconds_per_slice": seconds / max(1, result.slices)}
            if method == "context" or method in inpainting.GAN_METHODS:
                row["target_s"] = 20.0
            rows.append(row)
    return rows


#: name -> benchmark function
BENCHMARKS: dict[str, Callable[[], list[dict]]] = {
    "phantom": bench_phantom,
    "whole_spine": bench_whole_spine,
    "detection": bench_detection,
    "segmentation": bench_segmentation,
    "pipeline": bench_pipeline,
    "inpainting": bench_inpainting,
}


def run_benchmarks(names: list[str] | None = None) -> dict:
    """Run the named benchmarks (all by default); returns a JSON-ready result with machine facts."""

    names = names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SpineInpaintError(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    rows = []
    for name in names:
        for row in BENCHMARKS[name]():
            row["benchmark"] = name
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            rows.append(row)

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "numpy": np.__version__},
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """A plain-text table of a :func:`run_benchmarks` result."""
    lines = [f"{'benchmark':<10} {'step':<34} {'case':<12} {'seconds':>8} {'target':>7} {'peak MB':>8}"]
    for row in result["rows"]:
        target = f"{row['target_s']:.0f}" if "target_s" in row else ""
        lines.append(f"{row['benchmark']:<10} {row['name']:<34} {row.get('case', ''):<12} "
                     f"{row['seconds']:8.2f} {target:>7} {row['peak_rss_mb']:8.0f}")
    return "\n".join(lines)


def write_result(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
