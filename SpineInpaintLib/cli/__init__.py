"""The command line: ``python -m SpineInpaintLib <command> ...``.

Every command is a pair of functions, ``_add_<name>(parser)`` declaring its arguments and
``_run_<name>(args) -> int`` doing the work, registered in :data:`COMMANDS`. Heavy modules (torch,
VTK) are imported inside the run functions so that ``--help`` stays fast.

A user error (:class:`SpineInpaintLib.SpineInpaintError`) is printed as one line on stderr and
exits with code 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from SpineInpaintLib import SpineInpaintError, __version__
from SpineInpaintLib.cli.commands import (
    _add_bench,
    _add_cards,
    _add_demo,
    _add_detect,
    _add_info,
    _add_phantom,
    _add_restore,
    _add_scans,
    _add_segment,
    _run_bench,
    _run_cards,
    _run_demo,
    _run_detect,
    _run_info,
    _run_phantom,
    _run_restore,
    _run_scans,
    _run_segment,
)
from SpineInpaintLib.cli.evaluate import EVALUATORS
from SpineInpaintLib.cli.stages import add_stages, run_stage
from SpineInpaintLib.cli.train import TRAINERS

PROG = "python -m SpineInpaintLib"


# --- train <stage> / evaluate <stage> ------------------------------------------------------------------
def _add_train(parser: argparse.ArgumentParser) -> None:
    add_stages(parser, TRAINERS, "train_stage")


def _run_train(args: argparse.Namespace) -> int:
    return run_stage(args, TRAINERS, "train_stage", "train")


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    add_stages(parser, EVALUATORS, "evaluate_stage")


def _run_evaluate(args: argparse.Namespace) -> int:
    return run_stage(args, EVALUATORS, "evaluate_stage", "evaluate")


#: name -> (one-line help, add-arguments function, run function)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("print a volume's geometry and HU / spine statistics as JSON", _add_info, _run_info),
    "demo": ("run the main job on the embedded default case and list the outputs", _add_demo, _run_demo),
    "phantom": ("generate synthetic spine CT phantoms with simulated lesions and their truth", _add_phantom,
                _run_phantom),
    "segment": ("vertebra labels of a CT (spine_seg.nii.gz): the module's 'Segment spine' step", _add_segment,
                _run_segment),
    "detect": ("lesion mask of a CT (lesion_seg.nii.gz, and spine_seg.nii.gz unless given): 'Detect lesions'",
               _add_detect, _run_detect),
    "restore": ("the whole pipeline: restored CT, labels, lesion mask, STL surfaces and a report", _add_restore,
                _run_restore),
    "bench": ("time the pipeline's stages on this machine (table + JSON)", _add_bench, _run_bench),
    "cards": ("render the model cards' metrics blocks (docs/models) from the shipped weights' JSON", _add_cards,
              _run_cards),
    "scans": ("list the real CT scans of the registry (region, levels, labels, licence) and the "
              "leave-one-scan-out folds", _add_scans, _run_scans),
    "train": ("train a stage's network: train <stage> (" + ", ".join(TRAINERS) + ")", _add_train, _run_train),
    "evaluate": ("evaluate a stage's shipped model: evaluate <stage> (" + ", ".join(EVALUATORS) + ")",
                 _add_evaluate, _run_evaluate),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SpineInpaint: restore tumour-destroyed vertebrae in spine CT (library and CLI "
        "behind the 3D Slicer extension).",
    )
    parser.add_argument("--version", action="version", version=f"SpineInpaintLib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command][2](args) or 0)
    except SpineInpaintError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
if __name__ == "__main__":
    sys.exit(main())
