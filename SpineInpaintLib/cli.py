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


# --- phantom -------------------------------------------------------------------------------------
def _add_phantom(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per case + manifest.json)")
    parser.add_argument("--cases", type=int, default=1, help="number of phantom cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case; case k uses seed + k")
    parser.add_argument(
        "--lesions", default="lytic,sclerotic,mixed",
        help="lesion types to draw from, comma-separated (lytic, sclerotic, mixed), or 'none' for healthy cases",
    )
    parser.add_argument("--healthy-fraction", type=float, default=0.0, help="fraction of cases left healthy")
    parser.add_argument("--real", default="", help="also add real scans with lesions, e.g. 'totalsegmentator'")
    parser.add_argument("--size", type=int, default=512, help="in-plane grid size (default 512)")
    parser.add_argument("--deeplesion", help="also write the cases as a DeepLesion-format folder here")
    parser.add_argument("--crops", action="store_true", help="also write 64x64 healthy vertebra crops (crops.npz)")


def _run_phantom(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from SpineInpaintLib import datasets
    from SpineInpaintLib.lesions import LESION_TYPES

    if args.cases < 0 or args.cases > 10_000:
        raise SpineInpaintError(f"--cases must be between 0 and 10000, got {args.cases}")
    if not 16 <= args.size <= 2048:
        raise SpineInpaintError(f"--size must be between 16 and 2048, got {args.size}")
    types = None if args.lesions.strip().lower() == "none" else [t.strip() for t in args.lesions.split(",")]
    unknown = [t for t in types or [] if t not in LESION_TYPES]
    if unknown:
        raise SpineInpaintError(f"unknown lesion type {', '.join(unknown)} (use {', '.join(LESION_TYPES)} or none)")
    real = [r.strip() for r in args.real.split(",") if r.strip()]
    out = Path(args.out)
    cases = datasets.make_cases(args.cases, seed=args.seed, real=real, lesion_types=types,
                                healthy_fraction=args.healthy_fraction, shape_xy=(args.size, args.size))
    entries, kept, crops, crop_meta = [], [], [], []
    for case in tqdm(cases, total=args.cases + len(real), desc="phantom", unit="case"):
        entries.append(datasets.write_case(case, out))
        if args.crops:
            for binary in (True, False):
                c, meta = datasets.vertebra_crops(case, binary=binary)
                crops.append((binary, c, meta))
        if args.deeplesion:
            kept.append(case)
    manifest = datasets.write_manifest(entries, out / "manifest.json", seed=args.seed, command="phantom",
                                       lesion_types=types or [])
    print(f"wrote {len(entries)} cases to {out}; manifest: {manifest}")
    if args.deeplesion:
        datasets.write_deeplesion(kept, Path(args.deeplesion))
        print(f"DeepLesion-format folder: {args.deeplesion}")
    if args.crops:
        binary = [c for b, c, _ in crops if b]
        grey = [c for b, c, _ in crops if not b]
        meta = [m for b, _, ms in crops if b for m in ms]
        path = out / "crops.npz"
        np.savez_compressed(path, binary=np.concatenate(binary), grey=np.concatenate(grey),
                            meta=json.dumps(meta), seed=args.seed)
        print(f"crops: {path} ({sum(len(c) for c in binary)} per kind)")
    return 0


# --- bench -----------------------------------------------------------------------------------------
def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--json", default="bench_results.json", help="where to write the results as JSON")


def _run_bench(args: argparse.Namespace) -> int:
    from SpineInpaintLib import bench

    result = bench.run_benchmarks(args.names or None)
    print(bench.format_table(result))
    print(f"results: {bench.write_result(result, Path(args.json))}")
    return 0


#: name -> (one-line help, add-arguments function, run function)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("print a volume's geometry and HU / spine statistics as JSON", _add_info, _run_info),
    "demo": ("run the main job on the embedded default case and list the outputs", _add_demo, _run_demo),
    "phantom": ("generate synthetic spine CT phantoms with simulated lesions and their truth", _add_phantom,
                _run_phantom),
    "bench": ("time the pipeline's stages on this machine (table + JSON)", _add_bench, _run_bench),
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
