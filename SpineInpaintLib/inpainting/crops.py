"""The square crops around one vertebra that the inpainting networks see: size, field of view, intensity window."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["CROP_SIZE", "CROP_FOV_MM", "CROP_WINDOW", "crop_slice"]

#: Crop size of the GAN data (the paper's 64x64).
CROP_SIZE = 64

#: Physical side (mm) of the square cut around a vertebra before scaling to 64x64. A fixed
#: physical field of view keeps the scale the same across scanners, levels and slices.
CROP_FOV_MM = 96.0

#: HU window of the grayscale crops (bone and soft tissue both visible), mapped to [0, 1].
CROP_WINDOW = (-200.0, 1300.0)


def crop_slice(image: np.ndarray, centre_rc: tuple[float, float], spacing_yx: Sequence[float], *,
               size: int = CROP_SIZE, fov_mm: float = CROP_FOV_MM, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Cut a ``fov_mm`` square around ``centre_rc`` from a 2D slice and scale it to ``size`` x ``size``."""
    step = fov_mm / size
    offsets = (np.arange(size) - (size - 1) / 2.0) * step
    rows = centre_rc[0] + offsets / spacing_yx[0]
    cols = centre_rc[1] + offsets / spacing_yx[1]
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32), grid, order=order, mode="constant", cval=cval)
