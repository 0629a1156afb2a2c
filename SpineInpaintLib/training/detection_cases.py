"""The cases the lesion detectors learn from and are scored on: phantoms and real scans with simulated lesions.

Each case is a :data:`CaseSpec`: a cache key that names it (seed, lesion type, simulator), a function that
makes it and the sampling options that apply to it alone. Splits are by case id
(:func:`SpineInpaintLib.data.cases.split_of`); real scans come from the registry (``data.real``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.cases import case_seeds

__all__ = ["NEGATIVE_PHANTOM_SLICES", "CaseSpec", "case_specs", "make_detection_cases"]

#: Levels a phantom's field of view is drawn around (3 consecutive levels between L5 and T10).
_PHANTOM_LEVELS = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10")

#: Levels of the hard-negative phantoms (``negative_phantoms``): S1 too, whose junction with the sacral
#: ala the detector took for a lesion; a window of 3 levels cuts a vertebra at each end of the field.
_NEGATIVE_LEVELS = ("S1",) + _PHANTOM_LEVELS

#: Spine slices kept as negatives from each hard-negative phantom (a healthy case gives 6 otherwise).
NEGATIVE_PHANTOM_SLICES = 30


def _phantom_levels(seed: int, levels: Sequence[str] = _PHANTOM_LEVELS) -> tuple[str, ...]:
    k = int(np.random.default_rng([seed, 31337]).integers(0, len(levels) - 2))
    return tuple(levels[k:k + 3])


#: One case of :func:`case_specs`: its cache key, its generator and options of :func:`samples_from_case`
#: that apply to it alone.
CaseSpec = tuple[str, Callable[[], datasets.Case], dict]


def _drawn_simulator(simulator: str, case_id: str, seed: int) -> tuple[str, str]:
    which = datasets.pick_simulator(simulator, case_id, seed)
    return which, "" if which == "classic" else f"_{which}"


def case_specs(split: str, *, phantoms: int, real: int, healthy_phantoms: int = 0, healthy_real: bool = False,
               negative_phantoms: int = 0, real_name: str = "totalsegmentator",
               lesion_types: Sequence[str] = ("lytic", "sclerotic", "mixed"), simulator: str = "classic",
               ) -> list[CaseSpec]:
    """``(key, make_case, options)`` of one split: phantoms and real-scan seeds whose ids fall in ``split``.

    Lesion types are cycled over the cases. Lesioned phantoms use the first ``phantoms`` seeds of the
    split, healthy ones the following ``healthy_phantoms``, hard-negative ones the following
    ``negative_phantoms``. Each phantom covers 3 consecutive levels between L5 and T10 (drawn from its
    seed) to keep generation fast; hard-negative phantoms are healthy, their levels lie between S1 and
    T10 and up to ``NEGATIVE_PHANTOM_SLICES`` of their spine slices are kept (``options``). The key
    names the case and its lesion type (the same case id may carry different lesions), and ends in
    ``_focal`` when the focal simulator drew the lesion (``simulator``: classic, focal or both, see
    :func:`SpineInpaintLib.data.cases.pick_simulator`).
    """
    specs: list[CaseSpec] = []
    drawn = functools.partial(_drawn_simulator, simulator)

    seeds = case_seeds("phantom", split, phantoms + healthy_phantoms + negative_phantoms)
    for k, seed in enumerate(seeds):
        if k >= phantoms + healthy_phantoms:
            specs.append((f"phantom_{seed:04d}_negatives",
                          functools.partial(datasets.phantom_case, seed, lesion_types=None,
                                            levels=_phantom_levels(seed, _NEGATIVE_LEVELS)),
                          {"min_negatives": NEGATIVE_PHANTOM_SLICES}))
            continue
        types = [lesion_types[k % len(lesion_types)]] if k < phantoms else None
        which, tag = drawn(f"phantom_{seed:04d}", seed) if types else ("classic", "")
        specs.append((f"phantom_{seed:04d}_{types[0] if types else 'healthy'}{tag}",
                      functools.partial(datasets.phantom_case, seed, lesion_types=types, simulator=which,
                                        levels=_phantom_levels(seed)), {}))
    for k, seed in enumerate(case_seeds(f"real_{real_name}", split, real)):
        t = lesion_types[k % len(lesion_types)]
        which, tag = drawn(f"real_{real_name}_{seed:04d}", seed)
        specs.append((f"real_{real_name}_{seed:04d}_{t}{tag}",
                      functools.partial(datasets.real_case, real_name, seed=seed, lesion_types=[t],
                                        simulator=which), {}))
    if healthy_real:
        specs.append((f"real_{real_name}_healthy",
                      functools.partial(datasets.real_case, real_name, seed=0, lesion_types=None), {}))
    return specs


def make_detection_cases(split: str, **kwargs) -> Iterator[datasets.Case]:
    """The cases of :func:`case_specs`, generated one by one; a case the generators reject is skipped
    with a warning (a phantom draw can be invalid)."""
    for key, make, _ in case_specs(split, **kwargs):
        try:
            yield make()
        except SpineInpaintError as err:
            warnings.warn(f"skipped case {key}: {err}", stacklevel=2)
