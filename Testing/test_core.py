"""The shared primitives of core/ and cli/stages: the weights resolver, figures, truth metrics, lazy commands."""

from __future__ import annotations

import argparse
import shutil
import sys

import numpy as np
import pytest

from SpineInpaintLib import SpineInpaintError, cli
from SpineInpaintLib.cli.stages import lazy
from SpineInpaintLib.core import io
from SpineInpaintLib.core.plotting import pyplot, save_figure
from SpineInpaintLib.core.weights import WEIGHTS_ENV, weights_dir
from SpineInpaintLib.evaluation.restore import truth_metrics
from SpineInpaintLib.pipeline import RestoreResult
from Testing.conftest import REPO


def test_weights_dir_is_the_package_folder_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert weights_dir() == REPO / "SpineInpaintLib" / "weights"
    assert (weights_dir("segmentation") / "vnet.safetensors").is_file()
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert weights_dir() == tmp_path and weights_dir("gan") == tmp_path / "gan"


def test_save_figure_makes_the_folder_writes_a_png_and_closes(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "new" / "fig.png", dpi=50)
    assert path == tmp_path / "new" / "fig.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def _volume(array: np.ndarray) -> io.Volume:
    return io.Volume(array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))


def test_truth_metrics_against_hand_computed_values():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 29  # 64 voxels of 2 mm3: 0.128 mL
    restored = truth.copy()
    restored[2:6, 2:6, 6] = 29  # one extra x-slab of 16 voxels
    ct_truth = np.zeros(truth.shape, np.int16)
    ct_restored = ct_truth.copy()
    lesion = np.zeros(truth.shape, np.uint8)
    lesion[3, 3, 3:5] = 1
    ct_restored[3, 3, 3] = 100  # HU error 100 and 0 over the two lesion voxels
    result = RestoreResult(_volume(ct_restored), _volume(ct_restored), _volume(truth), _volume(lesion),
                           _volume(restored), {}, {})
    m = truth_metrics(result, {"labels": _volume(truth), "ct": _volume(ct_truth), "level": 29})
    assert m["level"] == "L3"
    assert m["dice"] == pytest.approx(2 * 64 / (64 + 80))
    assert m["volume_ml"] == pytest.approx(80 * 2 / 1000) and m["truth_volume_ml"] == pytest.approx(64 * 2 / 1000)
    assert m["volume_error_relative"] == pytest.approx(16 / 64)
    assert m["hd95_mm"] == pytest.approx(1.0)  # the extra slab (1/5 of the surface) lies one 1 mm x-step out
    assert m["hu_mae_in_lesion"] == pytest.approx(50.0)


def test_lazy_command_of_a_missing_library_module_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "SpineInpaintLib.cli.train_run", None)  # as in the Slicer install
    assert cli.main(["train", "segmentation"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "SpineInpaintLib.cli.train_run" in err and "install SpineInpaintLib with pip" in err


def test_lazy_command_keeps_other_import_errors():
    run = lazy("no_such_package_for_spineinpaint", "main")
    with pytest.raises(ModuleNotFoundError):
        run(argparse.Namespace())


def test_cards_check_reports_a_stale_card(tmp_path, capsys):
    cards = tmp_path / "models"
    shutil.copytree(REPO / "docs" / "models", cards)
    assert cli.main(["cards", str(cards), "--check"]) == 0
    card = cards / "vnet.md"
    card.write_text(card.read_text().replace("| value |", "| value (edited) |", 1))
    assert cli.main(["cards", str(cards), "--check"]) == 1
    assert capsys.readouterr().err.strip() == f"stale model card: {card}"
    assert cli.main(["cards", str(cards)]) == 0
    assert cli.main(["cards", str(cards), "--check"]) == 0
    assert (cards / "vnet.md").read_text() == (REPO / "docs" / "models" / "vnet.md").read_text()


def test_spine_error_is_a_value_error():
    assert issubclass(SpineInpaintError, ValueError)
