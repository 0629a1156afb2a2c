"""The command line: help, version, one-line errors with exit code 2, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from SpineInpaintLib import __version__, cli
from Testing.conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m SpineInpaintLib`` in a real process (tracebacks would show on stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "SpineInpaintLib", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert name in result.stdout


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().out


def _assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert pattern in lines[0], lines[0]


def test_missing_file_is_a_one_line_error(tmp_path):
    _assert_one_line_error(run_cli("info", str(tmp_path / "missing.nii.gz")), "file not found")


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.nrrd"
    text.write_text("hello")
    flat = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(flat)
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    return {"not an image": (text, "as an image"), "2D": (flat, "3D volume is needed"),
            "pixel type": (rgb, "scalar")}


@pytest.mark.parametrize("case", ["not an image", "2D", "pixel type"])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, case):
    path, pattern = _bad_inputs(tmp_path)[case]
    before = path.read_bytes()
    assert cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0]
    assert path.read_bytes() == before  # the input is left untouched


def test_unknown_command_exits_2():
    assert run_cli("frobnicate").returncode == 2


def test_info_reports_geometry_and_vertebrae(tmp_path, capsys, real_dir):
    ct = real_dir / "totalsegmentator" / "example_ct.nii.gz"
    labels = real_dir / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"
    assert cli.main(["info", str(ct), "--labels", str(labels)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["geometry"]["size_xyz"] == [122, 101, 112]
    names = [row["name"] for row in summary["vertebrae"]]
    assert names == ["sacrum", "S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11"]
    l3 = summary["vertebrae"][names.index("L3")]
    # Volume = voxels x 27 mm^3, in mL.
    assert l3["volume_ml"] == pytest.approx(l3["voxels"] * 27 / 1000, abs=1e-3)


@pytest.mark.slow
def test_demo_restores_the_embedded_case(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["restored_levels"] == [29]
    assert "restored L3 against its healthy truth: Dice" in printed
    for name in ("restored_ct.nii.gz", "restored_spine.stl", "report.png"):
        assert str(tmp_path / "out" / name) in printed


def test_demo_refuses_a_non_empty_output_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
