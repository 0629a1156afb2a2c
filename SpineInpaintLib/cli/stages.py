"""Sub-commands with stages (``train <stage>``, ``evaluate <stage>``) and their lazily imported runs."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from SpineInpaintLib import SpineInpaintError

__all__ = ["Stages", "lazy", "add_stages", "run_stage"]

#: stage name -> (one-line help, add-arguments function, run function)
Stages = dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]


def lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """``module.function(args)``, imported only when the command runs.

    Keeps ``--help`` fast, and lets the command line run inside Slicer, whose extension installs
    the inference modules only: a training or evaluation command there is a one-line error.
    """

    def run(args: argparse.Namespace) -> int:
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("SpineInpaintLib"):
                raise
            raise SpineInpaintError(f"this installation has no {err.name} (the Slicer extension ships inference "
                                    "only); install SpineInpaintLib with pip from a clone to train or evaluate") from None
        return int(getattr(target, function)(args) or 0)

    return run


def add_stages(parser: argparse.ArgumentParser, stages: Stages, dest: str) -> None:
    """One sub-parser per stage under ``parser``, the stage's name stored in ``args.<dest>``."""
    sub = parser.add_subparsers(dest=dest, metavar="stage")
    for name, (help_text, add, _run) in stages.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run_stage(args: argparse.Namespace, stages: Stages, dest: str, command: str) -> int:
    """Run the stage named in ``args.<dest>``; a missing stage is a one-line error."""
    stage = getattr(args, dest, None)
    if stage not in stages:
        raise SpineInpaintError(f"{command} needs a stage: {', '.join(stages)}")
    return stages[stage][2](args)
