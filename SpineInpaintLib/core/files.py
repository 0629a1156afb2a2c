"""Writing outputs safely: one atomic file write, one atomic output folder, JSON that numpy values can go into."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError

__all__ = ["to_jsonable", "write_report_json", "atomic_write", "check_output_folder", "atomic_folder"]


# --- report.json -----------------------------------------------------------------------------------
def to_jsonable(value):
    """``value`` with numpy scalars and arrays, paths, tuples, sets and dataclasses turned into JSON
    types; non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    raise TypeError(f"cannot put a {type(value).__name__} into report.json")


def write_report_json(path: str | os.PathLike, report: Mapping) -> Path:
    """Write ``report`` as indented JSON (numpy values converted), replacing the file in one step."""
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_path)`` beside ``path``, then move the file into place in one step.

    A failed or interrupted write leaves no partial output (only the old file, if any). The file
    gets the usual permissions (``0o666`` less the umask), not the private ones of a temporary.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _umask() -> int:
    """The process's umask; from /proc where there is one (setting it to read it is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path; a one-line error when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpineInpaintError(f"output folder {out} exists and is not empty; choose a new one")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike):
    """Write into a temporary folder beside ``out`` and move it into place only when the block succeeds.

    ``out`` must not exist or be empty; on any error the temporary folder goes and ``out`` is left
    as it was, so a failed or interrupted run leaves no partial outputs.
    """
    out = check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
