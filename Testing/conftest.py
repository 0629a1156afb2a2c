"""Shared fixtures: paths to the real sample scans and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SpineInpaintLib.core import io
from SpineInpaintLib.data.real import load_real_case, real_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_dir() -> Path:
    path = real_data_dir()
    assert path.is_dir(), f"the shared real data is missing at {path} (CI lays ../shared beside the clone)"
    return path


@pytest.fixture(scope="session")
def real_case():
    """The TotalSegmentator example CT (3 mm iso) and its vertebra labels, read once per session."""
    return load_real_case("totalsegmentator")


@pytest.fixture
def oblique_volume() -> io.Volume:
    """A small float volume with anisotropic spacing, an offset origin and an oblique direction."""
    rng = np.random.default_rng(0)
    angle = np.deg2rad(20.0)
    direction = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    return io.Volume(
        rng.normal(size=(5, 7, 9)).astype(np.float32),
        spacing=(0.7, 0.8, 2.5),
        origin=(-12.5, 40.0, 3.0),
        direction=direction,
    )
