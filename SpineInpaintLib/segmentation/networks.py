"""The segmentation networks (MONAI 2D U-Net and V-Net), their classes and their shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.weights import (
    load_weights,
    read_weights_metadata,
    weights_dir,
)

__all__ = [
    "NETWORKS", "DEFAULT_NETWORK", "GRID_MM", "IN_CHANNELS", "CLASS_IDS", "N_CLASSES", "RESOURCES", "build_network",
    "count_parameters", "ids_to_classes", "check_grid", "default_weights", "load_model",
]

#: The two networks of the paper.
NETWORKS = ("unet", "vnet")

#: The network used when none is named: the V-Net, the more accurate of the two (docs/models/vnet.md),
#: run on the box around the spine that the U-Net finds first (:func:`locate_spine`).
DEFAULT_NETWORK = "vnet"

#: In-plane pixel size (mm) of the network grid of new training runs and of weights that do not
#: record one (the paper: 512x512 native, about 0.7-0.9 mm).
GRID_MM = 1.5

#: Input channels: slice below, slice, slice above (wide window), slice (bone window).
IN_CHANNELS = 4

#: Class index -> TotalSegmentator v2 id: 0 background, 1 any vertebra above T10 (35-50),
#: 2 ... 11 the sacrum (25), S1 (26), L5 (27) ... T10 (34).
CLASS_IDS: tuple[int, ...] = (0, 35) + tuple(range(25, 35))

N_CLASSES = len(CLASS_IDS)

#: Shipped weights.
RESOURCES = weights_dir("segmentation")


# --- networks --------------------------------------------------------------------------------------
def _vnet_paper(in_channels: int, out_channels: int):
    """MONAI's 2D VNet with the paper's 3x3 padded convolutions and 16-channel last feature map."""
    import torch.nn as nn
    from monai.networks.nets import VNet
    from monai.networks.nets.vnet import OutputTransition

    act = ("elu", {"inplace": True})
    model = VNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, act=act,
                 dropout_prob_down=None, dropout_prob_up=(None, 0.0), dropout_dim=2)
    # Last block: 3x3 conv 32 -> 16 channels (the paper's 512x512x16 map), then a 1x1 conv to the classes.
    model.out_tr = OutputTransition(2, 32, 16, act)
    model.out_tr.conv2 = nn.Conv2d(16, out_channels, kernel_size=1)
    # MONAI hard-codes the original V-Net's 5x5 kernels; the paper uses 3x3 with padding.
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (5, 5):
                setattr(module, name, nn.Conv2d(child.in_channels, child.out_channels, 3, padding=1,
                                                bias=child.bias is not None))
    return model


def build_network(name: str, in_channels: int = IN_CHANNELS, out_channels: int = N_CLASSES):
    """A fresh (untrained) 2D segmentation network: ``'unet'`` or ``'vnet'``.

    Both output ``out_channels`` logits per pixel; input sizes must be multiples of 16.
    """
    name = str(name).lower()
    if name == "unet":
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                     channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    elif name == "vnet":
        if 16 % in_channels:
            raise SpineInpaintError(f"MONAI's VNet needs in_channels dividing 16, got {in_channels}")
        model = _vnet_paper(in_channels, out_channels)
    else:
        raise SpineInpaintError(f"unknown segmentation network '{name}' (use {' or '.join(NETWORKS)})")
    model._spine_net = name  # which network it is, for segment_volume's report and its locator
    return model


def count_parameters(model) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


# --- data on the network grid -------------------------------------------------------------------------
def ids_to_classes(labels: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids -> class indices of :data:`CLASS_IDS` (non-vertebra tissue -> 0)."""
    lut = np.zeros(256, np.uint8)
    for index, label in enumerate(CLASS_IDS):
        if index >= 2:
            lut[label] = index
    lut[35:51] = 1
    return lut[np.asarray(labels).astype(np.uint8)]


def check_grid(grid_mm: float) -> float:
    """``grid_mm`` as a float, or a one-line error when no network grid can have that pixel size."""
    try:
        value = float(grid_mm)
    except (TypeError, ValueError):
        raise SpineInpaintError(f"segmentation pixel size must be a number of mm, got {grid_mm!r}") from None
    if not (np.isfinite(value) and 0.25 <= value <= 4.0):
        raise SpineInpaintError(f"segmentation pixel size must be between 0.25 and 4 mm, got {grid_mm}")
    return value


# --- models --------------------------------------------------------------------------------------
def default_weights(net: str = DEFAULT_NETWORK) -> Path:
    """Path of the shipped weights of ``net`` (``weights/segmentation/<net>.safetensors``)."""
    if str(net).lower() not in NETWORKS:
        raise SpineInpaintError(f"unknown segmentation network '{net}' (use {' or '.join(NETWORKS)})")
    return RESOURCES / f"{str(net).lower()}.safetensors"


def load_model(net: str = DEFAULT_NETWORK, weights: str | Path | None = None, device: str = "cpu"):
    """A network in eval mode with its safetensors weights (default: the shipped ones) and their metadata.

    The network grid the weights were trained on (``preprocessing.grid_mm`` of the metadata,
    :data:`GRID_MM` when absent) is kept on the model as ``spine_grid_mm``; :func:`segment_volume`
    resamples to it.

    Returns
    -------
    (model, metadata)
    """
    import torch

    path = Path(weights) if weights else default_weights(net)
    if not path.exists():
        raise SpineInpaintError(f"segmentation weights not found: {path} (train them with "
                                f"'python -m SpineInpaintLib train segmentation --net {net}')")
    meta = read_weights_metadata(path)
    arch = meta.get("architecture", {})
    name = arch.get("net", net)
    model = build_network(name, arch.get("in_channels", IN_CHANNELS), arch.get("out_channels", N_CLASSES))
    load_weights(model, path)
    model.eval()
    model.spine_grid_mm = check_grid(meta.get("preprocessing", {}).get("grid_mm", GRID_MM))
    return model.to(torch.device(device)), meta
