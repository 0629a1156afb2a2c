"""The command line: ``python -m SpineInpaintLib <command> ...``.

Every command is a pair of functions, ``_add_<name>(parser)`` declaring its arguments and
``_run_<name>(args) -> int`` doing the work, registered in :data:`COMMANDS`. Heavy modules (torch,
VTK) are imported inside the run functions so that ``--help`` stays fast.

A user error (:class:`SpineInpaintLib.SpineInpaintError`) is printed as one line on stderr and
exits with code 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from SpineInpaintLib import SpineInpaintError, __version__

PROG = "python -m SpineInpaintLib"


# --- info ----------------------------------------------------------------------------------------
def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="CT volume or label map (NIfTI, NRRD, MHA, or a DICOM folder)")
    parser.add_argument("--labels", help="label map of the spine on the same grid, for per-vertebra statistics")


def _run_info(args: argparse.Namespace) -> int:
    from SpineInpaintLib import io
    from SpineInpaintLib.stats import volume_summary

    ct = io.read_volume(args.volume)
    labels = io.read_volume(args.labels) if args.labels else None
    print(json.dumps(volume_summary(ct, labels), indent=2))
    return 0


# --- demo ----------------------------------------------------------------------------------------
def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--case", default="totalsegmentator", help="embedded real case to run on")


def _run_demo(args: argparse.Namespace) -> int:
    from SpineInpaintLib.demo import run_demo

    return run_demo(Path(args.out), case=args.case)


#: name -> (one-line help, add-arguments function, run function)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("print a volume's geometry and HU / spine statistics as JSON", _add_info, _run_info),
    "demo": ("run the main job on the embedded default case and list the outputs", _add_demo, _run_demo),
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
