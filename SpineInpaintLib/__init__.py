"""SpineInpaintLib: the pure-Python library behind the SpineInpaint 3D Slicer extension.

Restores tumour-destroyed vertebrae in spine CT after Miao et al., "Spinal Neoplasm Image
Inpainting with Deep Convolutional Neural Networks": vertebra segmentation, lesion detection,
GAN-based semantic inpainting and marching-cubes reconstruction.

Nothing here imports Qt or ``slicer.app``; the MRML part needs only the ``slicer`` MRML
libraries (the Slicer application, or the ``slicer-core`` package).
"""

__version__ = "0.1.0"


class SpineInpaintError(ValueError):
    """A user error (bad input, bad request): the CLI prints its message on one line, exit 2."""


__all__ = ["SpineInpaintError", "__version__"]
