"""matplotlib for figures written to files: the Agg backend, and one way to save and close a figure."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures go to files, never to a display.

    Imported on use, so that the command line and Slicer's steps start without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig_options) -> Path:
    """Write ``fig`` to ``path`` (its folder made if missing), close it, and return the path.

    ``savefig_options`` go to :meth:`matplotlib.figure.Figure.savefig` (``dpi``, ``facecolor`` ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, **savefig_options)
    finally:
        pyplot().close(fig)
    return path
