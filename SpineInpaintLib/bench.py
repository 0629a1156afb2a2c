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
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["BENCHMARKS", "run_benchmarks", "format_table"]


def _timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_phantom(seed: int = 0) -> list[dict]:
    """A 512x512x100 phantom (0.8 mm, 2.5 mm slices) and a destructive lytic lesion in L3.

    Target (issue 3): phantom with lesion in under 20 s on the 2-core CPU.
    """
    from SpineInpaintLib import lesions, phantom

    config = phantom.PhantomConfig(seed=seed, shape_xy=(512, 512), n_slices=100, spacing_xy=0.8,
                                   slice_thickness=2.5, levels=("L2", "L3", "L4"))
    ph, t_phantom = _timed(phantom.make_phantom, config)
    _, t_lesion = _timed(lesions.simulate_lesion, ph.ct, ph.labels, "L3", "lytic", True, seed=seed)
    shape = "x".join(map(str, ph.ct.size_xyz))
    return [
        {"name": "phantom", "case": shape, "seconds": t_phantom},
        {"name": "lesion (destructive lytic, L3)", "case": shape, "seconds": t_lesion},
        {"name": "phantom + lesion", "case": shape, "seconds": t_phantom + t_lesion, "target_s": 20.0},
    ]


#: name -> benchmark function
BENCHMARKS: dict[str, Callable[[], list[dict]]] = {
    "phantom": bench_phantom,
}


def run_benchmarks(names: list[str] | None = None) -> dict:
    """Run the named benchmarks (all by default); returns a JSON-ready result with machine facts."""
    from SpineInpaintLib import SpineInpaintError

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
    import torch

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
