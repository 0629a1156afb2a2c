"""The embedded demo case (``make demo``): a phantom with a destructive lytic L3 lesion, all seeded."""

from __future__ import annotations

from SpineInpaintLib.data import lesions
from SpineInpaintLib.data.phantom import config as phantom
from SpineInpaintLib.data.phantom.generate import make_phantom

__all__ = ["demo_case", "DEMO_PHANTOM", "DEMO_LESION"]

#: The embedded case: phantom and lesion settings (all seeded).
DEMO_PHANTOM = dict(seed=0, shape_xy=(512, 512), n_slices=100, spacing_xy=0.8, slice_thickness=2.5,
                    levels=("L2", "L3", "L4"))

DEMO_LESION = dict(level="L3", lesion_type="lytic", destructive=True, size=0.7, seed=1)


def demo_case():
    """The embedded default case: ``(SimulatedLesion, Phantom)``."""
    ph = make_phantom(phantom.PhantomConfig(**DEMO_PHANTOM))
    labels = phantom.totalsegmentator_labels(ph.labels)
    sim = lesions.simulate_lesion(ph.ct, labels, **DEMO_LESION)
    return sim, ph
