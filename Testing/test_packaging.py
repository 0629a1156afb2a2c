"""Packaging: the wheel holds every subpackage and the shipped weights, and `pip install` of it into a
fresh venv (not editable, the runtime lock beside it) gives a working ``restore`` outside the repo.

Slow (minutes): it builds a wheel, makes a venv and installs torch and the rest of requirements.lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from SpineInpaintLib.core.outputs import OUTPUT_FILES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "SpineInpaintLib"
WEIGHT_SUFFIXES = (".safetensors", ".json")


def _run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 1800) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} exited {result.returncode}:\n" \
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def _clean_env() -> dict:
    """The environment without anything that would point Python at the repo or at other weights."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "SPINEINPAINT_WEIGHTS", "VIRTUAL_ENV"):
        env.pop(key, None)
    return env


def _source_tree(dest: Path) -> Path:
    """A copy of what a clone holds (tracked files and untracked ones git does not ignore).

    Built from a copy so that a stale build/ or egg-info folder of the working tree cannot leak
    into the wheel.
    """
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(source copy, wheel) built with ``pip wheel --no-deps``."""
    root = tmp_path_factory.mktemp("packaging")
    source = _source_tree(root / "source")
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", wheels, source], cwd=root,
         env=_clean_env())
    (wheel,) = wheels.glob("*.whl")
    return source, wheel


def test_the_wheel_holds_every_module_and_the_weights(built):
    source, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    library = source / PACKAGE
    modules = {p.relative_to(source).as_posix() for p in library.rglob("*.py")}
    packages = {p.parent.relative_to(source).as_posix() for p in library.rglob("__init__.py")}
    assert {"SpineInpaintLib", "SpineInpaintLib/core", "SpineInpaintLib/cli", "SpineInpaintLib/training"} <= packages
    assert modules - names == set(), f"modules missing from the wheel: {sorted(modules - names)}"
    weights = {p.relative_to(source).as_posix() for p in (library / "weights").rglob("*")
               if p.suffix in WEIGHT_SUFFIXES}
    assert any(w.endswith(".safetensors") for w in weights)
    assert weights - names == set(), f"weights missing from the wheel: {sorted(weights - names)}"
    assert not [n for n in names if n.startswith(("Testing/", "SpineInpaint/", "experiments/", "docs/"))]
    assert not [n for n in names if n.startswith(f"{PACKAGE}/weights/") and not n.endswith(WEIGHT_SUFFIXES)], \
        "only the safetensors and their JSON ship among the weights"
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Requires-Dist: torch" in text and "Provides-Extra: test" in text and "Provides-Extra: lint" in text


def test_pip_install_into_a_fresh_venv_restores_the_example_ct(built, tmp_path, real_case, real_dir):
    from SpineInpaintLib.core import io
    from SpineInpaintLib.data.lesions import simulate_lesion
    from SpineInpaintLib.data.real import REAL_SCANS

    _, wheel = built
    ct, labels = real_case
    ct_path = real_dir / REAL_SCANS["totalsegmentator"].ct
    sim = simulate_lesion(ct, labels, "L3", "lytic", True, seed=1)
    assert sim.mask.same_grid(ct) and sim.mask.array.any()
    mask_path = io.write_volume(sim.mask, tmp_path / "lesion_mask.nii.gz")

    env = _clean_env()
    venv = tmp_path / "venv"
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    # As `make setup` does: pip from the machine's configured index (torch from its local wheels).
    _run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], cwd=tmp_path, env=env)
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel], cwd=tmp_path, env=env)
    _run([python, "-m", "pip", "install", "--quiet", "-r", REPO / "requirements.lock"], cwd=tmp_path, env=env)
    _run([python, "-m", "pip", "check"], cwd=tmp_path, env=env)
    installed = time.monotonic() - started

    where = json.loads(_run([python, "-c", "import json, SpineInpaintLib; from SpineInpaintLib.core.weights "
                             "import weights_dir; print(json.dumps([SpineInpaintLib.__file__, str(weights_dir())]))"],
                            cwd=tmp_path, env=env))
    assert Path(where[0]).is_relative_to(venv), f"SpineInpaintLib imported from {where[0]}, not the venv"
    assert Path(where[1]).is_relative_to(venv) and (Path(where[1]) / "segmentation").is_dir(), where

    out = tmp_path / "restored"
    started = time.monotonic()
    _run([python, "-m", PACKAGE, "restore", ct_path, "--out", out, "--lesion-mask", mask_path], cwd=tmp_path,
         env=env)
    restored = time.monotonic() - started
    for name in OUTPUT_FILES.values():
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"restore wrote no {name}"
    report = json.loads((out / OUTPUT_FILES["report_json"]).read_text())
    assert report, "empty report.json"
    print(f"venv + install {installed:.0f} s, restore {restored:.0f} s")
