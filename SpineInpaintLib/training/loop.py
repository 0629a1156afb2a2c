"""Pieces every trainer shares: distributed context, checkpoints, the metrics CSV and its curves."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from SpineInpaintLib.core.files import atomic_write
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.core.runtime import resolve_device
from SpineInpaintLib.core.weights import unwrap

__all__ = ["RunControl", "DistributedContext", "init_distributed", "save_checkpoint", "load_checkpoint", "MetricsLog", "plot_curves"]


@dataclasses.dataclass
class RunControl:
    """How a training run runs, apart from what it learns; every trainer's config starts with these.

    ``seed`` seeds everything (and is recorded in every output); ``device`` is ``auto``, ``cpu`` or
    ``cuda``; ``resume`` continues from the run folder's last checkpoint; ``max_minutes`` stops
    cleanly after that wall time; ``threads`` caps torch's CPU threads; ``progress`` shows bars.
    """

    seed: int = 0
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    threads: int | None = None
    progress: bool = True


# --- torchrun / DistributedDataParallel -------------------------------------------------------------------
class DistributedContext:
    """Rank, world size and device of this process; a single process when not under torchrun."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and figures."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        """``model`` on this process's device, inside DDP when distributed.

        ``find_unused_parameters``: for models whose loss may skip some parameters in a step (a
        detector's box-regression head on a batch without any lesion).
        """
        model = model.to(self.device)
        if not self.distributed:
            return model
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                         find_unused_parameters=find_unused_parameters)

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a scalar over processes (identity for one process)."""
        if not self.distributed:
            return float(value)
        tensor = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Set up DDP from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) if present.

    gloo on CPU, nccl on CUDA (each process takes the GPU of its local rank). Without torchrun's
    variables this returns a single-process context on :func:`resolve_device`'s device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank, dev)




# --- checkpoints (resume) ------------------------------------------------------------------------------
def save_checkpoint(path: Path, *, epoch: int, models: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None, seed: int, extra: dict | None = None) -> Path:
    """Write a resumable checkpoint (atomic: a crash mid-write keeps the previous one).

    Holds tensors and plain Python values only, so :func:`load_checkpoint` reads it with
    ``weights_only=True`` (no arbitrary unpickling).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": int(epoch),
        "seed": int(seed),
        "models": {k: unwrap(m).state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(np.random.get_state()[1].tolist()),
        "extra": json.dumps(extra or {}),
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, *, models: Mapping[str, torch.nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> dict:
    """Restore models and optimizers from :func:`save_checkpoint`; returns epoch, seed and extra."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for k, m in models.items():
        unwrap(m).load_state_dict(state["models"][k])
    for k, o in (optimizers or {}).items():
        if k in state["optimizers"]:
            o.load_state_dict(state["optimizers"][k])
    torch.set_rng_state(state["torch_rng"])
    return {"epoch": state["epoch"], "seed": state["seed"], "extra": json.loads(state["extra"])}


# --- per-epoch metrics ----------------------------------------------------------------------------
class MetricsLog:
    """Per-epoch metrics appended to a CSV (kept across resumes: rows after the resume epoch are dropped)."""

    def __init__(self, path: Path, resume_epoch: int | None = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if resume_epoch is not None and self.path.exists():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
            self._write()

    def append(self, **values: Any) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys or ["epoch"])
            writer.writeheader()
            writer.writerows(self.rows)


def plot_curves(csv_path: Path, png_path: Path, panels: Iterable[tuple[str, Iterable[str]]], title: str = "") -> Path:
    """One panel per ``(ylabel, [columns])`` against epoch, from a :class:`MetricsLog` CSV."""
    plt = pyplot()

    with Path(csv_path).open() as f:
        rows = list(csv.DictReader(f))
    panels = list(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    epochs = [int(r["epoch"]) for r in rows]
    for ax, (ylabel, columns) in zip(axes[0], panels):
        for column in columns:
            values = [float(r[column]) if r.get(column) not in (None, "") else np.nan for r in rows]
            ax.plot(epochs, values, marker=".", label=column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=100)
