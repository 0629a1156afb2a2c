"""Shipped model weights: where they live, and safetensors + JSON metadata saved and loaded with a sha256 check."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: the command line reads weights_dir() without it
    import torch

from SpineInpaintLib import SpineInpaintError

__all__ = ["WEIGHTS_ENV", "weights_dir", "unwrap", "sha256_of", "save_weights", "read_weights_metadata", "load_weights"]


#: Environment variable naming another folder of weights (one sub-folder per stage, as ``weights/``).
WEIGHTS_ENV = "SPINEINPAINT_WEIGHTS"


def weights_dir(stage: str | None = None) -> Path:
    """The folder of the shipped weights, or of one stage's (``segmentation``, ``detection``, ``gan``).

    ``$SPINEINPAINT_WEIGHTS`` when set, else ``weights/`` inside the installed package: the same
    place in a clone, a ``pip install`` and the Slicer extension.
    """
    override = os.environ.get(WEIGHTS_ENV)
    root = Path(override) if override else Path(__file__).resolve().parents[1] / "weights"
    return root / stage if stage else root


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP (for saving)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# --- shipped weights (safetensors + JSON metadata) -----------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(model: torch.nn.Module, path: Path, metadata: dict, *, half: bool = False) -> Path:
    """Write ``model``'s weights as safetensors and ``<path>.json`` with ``metadata`` + sha256 + size.

    ``half`` stores floating tensors as float16 (halves the file; they are cast back on loading).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in unwrap(model).state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt", "stored_half": str(bool(half))})
    meta = dict(metadata)
    meta.update({"weights_file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size,
                 "stored_half": bool(half)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def read_weights_metadata(path: Path) -> dict:
    """The JSON sidecar of a weights file (``model.safetensors`` -> ``model.json``)."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.exists():
        raise SpineInpaintError(f"no metadata file {meta_path} beside the weights")
    return json.loads(meta_path.read_text())


def load_weights(model: torch.nn.Module, path: Path, *, check_sha256: bool = True) -> dict:
    """Load safetensors weights into ``model`` (no pickle); verifies the sha256 of its metadata.

    Returns the metadata. Raises :class:`SpineInpaintError` for a missing or corrupted file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise SpineInpaintError(f"model weights not found: {path}")
    meta = read_weights_metadata(path)
    if check_sha256 and meta.get("sha256") and sha256_of(path) != meta["sha256"]:
        raise SpineInpaintError(f"{path.name} does not match the sha256 in its metadata (corrupted or replaced)")
    tensors = load_file(str(path))
    reference = unwrap(model).state_dict()
    tensors = {k: v.to(reference[k].dtype) if k in reference else v for k, v in tensors.items()}
    unwrap(model).load_state_dict(tensors)
    return meta
