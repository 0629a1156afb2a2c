"""Image-quality metrics inside a mask: BraTS-style normalisation, MAE, MSE, PSNR, SSIM."""

from __future__ import annotations

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.evaluation.metrics.overlap import _binary, _same_shape

__all__ = [
    "brats_intensity_range", "brats_normalise", "masked_mae", "masked_mse", "masked_psnr", "masked_ssim",
    "inpainting_quality",
]


# ---------------------------------------------------------------------------------------------
# image quality inside a mask
# ---------------------------------------------------------------------------------------------
def _image_pair(prediction, target, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    prediction, target = np.asarray(prediction, dtype=float), np.asarray(target, dtype=float)
    _same_shape(prediction, target, "prediction and target")
    mask = _binary(mask, "mask")
    _same_shape(prediction, mask, "images and mask")
    if not mask.any():
        raise SpineInpaintError("mask is empty: nothing to compare")
    return prediction, target, mask


def brats_intensity_range(
    image: np.ndarray,
    void_mask: np.ndarray,
    *,
    percentiles: tuple[float, float] = (0.5, 99.5),
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> tuple[float, float]:
    """The intensity window of the BraTS 2023 inpainting challenge: percentiles of the voided image.

    The challenge (Kofler et al., arXiv 2305.08992; package ``BraTS-inpainting/inpainting``) takes the
    0.5th and 99.5th percentiles of the *voided* image, the image the model sees, with the region to
    inpaint set to 0, over every voxel of the array (the void included).

    Parameters
    ----------
    image
        The true image.
    void_mask
        Binary mask of the region to inpaint, same shape.
    percentiles
        Lower and upper percentile.
    void_value
        Value the voided region takes in the percentile computation (the challenge: 0). ``None``
        leaves the voided voxels out instead.
    strictly_positive
        Raise a negative lower bound to 0, as the challenge does. Harmless for its MRI (non-negative)
        but it would clip all of air, fat and water in CT Hounsfield units, so off by default.

    Returns
    -------
    (low, high)
    """
    image = np.asarray(image, dtype=float)
    void_mask = _binary(void_mask, "void_mask")
    _same_shape(image, void_mask, "image and void_mask")
    low_p, high_p = (float(p) for p in percentiles)
    if not 0.0 <= low_p < high_p <= 100.0:
        raise SpineInpaintError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if void_value is None:
        values = image[~void_mask]
        if values.size == 0:
            raise SpineInpaintError("void_mask covers the whole image: no voxel left to normalise with")
    else:
        values = np.where(void_mask, float(void_value), image)
    low, high = (float(v) for v in np.percentile(values, [low_p, high_p]))
    if strictly_positive:
        low = max(low, 0.0)
    if not high > low:
        raise SpineInpaintError(f"the voided image is constant between its percentiles ({low} .. {high})")
    return low, high


def brats_normalise(
    image: np.ndarray,
    void_mask: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> np.ndarray:
    """Map ``image`` to [0, 1] with the BraTS inpainting challenge's percentile window.

    The window comes from :func:`brats_intensity_range` of ``reference`` (default: ``image``) and
    ``void_mask``; ``image`` is clipped to it and scaled linearly, low -> 0 and high -> 1. To compare an
    inpainted image with the truth, normalise both with ``reference=truth`` (the challenge uses the
    voided input, which equals the truth outside the void).
    """
    image = np.asarray(image, dtype=float)
    reference = image if reference is None else np.asarray(reference, dtype=float)
    _same_shape(image, reference, "image and reference")
    low, high = brats_intensity_range(
        reference,
        void_mask,
        percentiles=percentiles,
        void_value=void_value,
        strictly_positive=strictly_positive,
    )
    return (np.clip(image, low, high) - low) / (high - low)


def masked_mae(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error over the voxels inside ``mask`` (which must not be empty)."""
    prediction, target, mask = _image_pair(prediction, target, mask)
    return float(np.abs(prediction[mask] - target[mask]).mean())


def masked_mse(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over the voxels inside ``mask`` (which must not be empty)."""
    prediction, target, mask = _image_pair(prediction, target, mask)
    return float(((prediction[mask] - target[mask]) ** 2).mean())


def masked_psnr(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0
) -> float:
    """Peak signal-to-noise ratio in dB over the voxels inside ``mask``.

    ``10 log10(data_range^2 / MSE)`` with the MSE of the masked voxels only; ``data_range`` is 1 for
    images normalised by :func:`brats_normalise`. ``inf`` when the images agree in the mask.
    """
    if not data_range > 0:
        raise SpineInpaintError(f"data_range must be positive, got {data_range}")
    mse = masked_mse(prediction, target, mask)
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


#: SSIM window: Gaussian, sigma 1.5, truncated to 11 taps (Wang et al. 2004; torchmetrics, MONAI).
_SSIM_SIGMA = 1.5

_SSIM_WINDOW = 11


def masked_ssim(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0
) -> float:
    """Mean structural similarity inside ``mask``.

    The SSIM map is computed over the whole image (2D or 3D) with Wang et al.'s constants
    (K1 = 0.01, K2 = 0.03), an 11-tap Gaussian window of sigma 1.5 and population covariances
    (:func:`skimage.metrics.structural_similarity`, borders reflected); its values inside ``mask``
    are averaged. Every axis needs at least 11 voxels.
    """
    from skimage.metrics import (
        structural_similarity,  # scikit-image is heavy: import on use
    )

    prediction, target, mask = _image_pair(prediction, target, mask)
    if not data_range > 0:
        raise SpineInpaintError(f"data_range must be positive, got {data_range}")
    if prediction.ndim not in (2, 3) or min(prediction.shape) < _SSIM_WINDOW:
        raise SpineInpaintError(
            f"SSIM needs a 2D or 3D image at least {_SSIM_WINDOW} voxels along every axis, "
            f"got {prediction.shape}"
        )
    _, ssim_map = structural_similarity(
        target,
        prediction,
        data_range=float(data_range),
        gaussian_weights=True,
        sigma=_SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return float(ssim_map[mask].mean())


def inpainting_quality(
    prediction: np.ndarray,
    target: np.ndarray,
    void_mask: np.ndarray,
    *,
    void_value: float | None = 0.0,
    strictly_positive: bool = False,
) -> dict[str, float]:
    """MAE, MSE, PSNR and SSIM of an inpainted image inside the inpainted region, BraTS-style.

    Both images are normalised to [0, 1] with the window of the truth voided by ``void_mask``
    (:func:`brats_normalise`), then compared inside ``void_mask`` with data range 1. Unlike the
    challenge, which computes SSIM on images zeroed outside the void, the SSIM map here is taken on
    the full images so that the window sees the real surroundings.

    Returns
    -------
    dict with ``mae``, ``mse``, ``psnr`` (dB) and ``ssim``.
    """
    options = {"void_value": void_value, "strictly_positive": strictly_positive}
    pred_n = brats_normalise(prediction, void_mask, reference=target, **options)
    target_n = brats_normalise(target, void_mask, **options)
    return {
        "mae": masked_mae(pred_n, target_n, void_mask),
        "mse": masked_mse(pred_n, target_n, void_mask),
        "psnr": masked_psnr(pred_n, target_n, void_mask, 1.0),
        "ssim": masked_ssim(pred_n, target_n, void_mask, 1.0),
    }
