"""Seeds, the compute device, and the wall-clock / peak-memory timers that every report records."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError

__all__ = ["seed_everything", "resolve_device", "Timer", "StageTimer"]


# --- reproducibility and devices ----------------------------------------------------------------------
def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch (CPU and CUDA); returns the seed for recording."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


def resolve_device(device: str = "auto") -> torch.device:
    """``'auto'`` -> CUDA when available else CPU; ``'cpu'``; ``'cuda'``/``'gpu'`` (error if absent)."""
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise SpineInpaintError("--device cuda was asked for but no CUDA GPU is available (use cpu or auto)")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise SpineInpaintError(f"unknown device '{device}' (use auto, cpu or cuda)")


# --- timings -------------------------------------------------------------------------------------
def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 ** (2 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


class Timer:
    """Wall-clock seconds of a block: ``with Timer() as t: ...`` then ``t.seconds``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float | None = None

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


class StageTimer:
    """Seconds and peak memory of each stage of a run, in the order the stages ran.

    Examples
    --------
    >>> timer = StageTimer()
    >>> with timer.stage("segmentation"):
    ...     pass
    >>> [s["name"] for s in timer.stages]
    ['segmentation']

    A stage that raises is recorded with ``status`` 'failed' and the error goes on.
    """

    def __init__(self) -> None:
        self.stages: list[dict] = []
        self._created = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (recorded even when the block raises)."""
        start = time.perf_counter()
        status = "failed"
        try:
            yield
            status = "ok"
        finally:
            self._record(name, time.perf_counter() - start, status)

    def _record(self, name: str, seconds: float, status: str) -> None:
        self.stages.append({"name": str(name), "seconds": float(seconds), "status": status,
                            "peak_rss_mb": _peak_rss_mb()})

    @property
    def total_seconds(self) -> float:
        """Sum of the stages' seconds."""
        return float(sum(s["seconds"] for s in self.stages))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage name (a name timed more than once is summed)."""
        out: dict[str, float] = {}
        for s in self.stages:
            out[s["name"]] = out.get(s["name"], 0.0) + s["seconds"]
        return out

    def to_dict(self) -> dict:
        """JSON-ready: the stages in order, their total, and the process's peak memory."""
        return {
            "stages": [dict(s) for s in self.stages],
            "total_seconds": self.total_seconds,
            "wall_seconds": time.perf_counter() - self._created,
            "peak_rss_mb": _peak_rss_mb(),
        }
