"""The commands that run the pipeline or a stage of it: info, demo, phantom, segment, detect, restore, bench."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from SpineInpaintLib import __version__
from SpineInpaintLib.cli.stages import lazy


# --- info ----------------------------------------------------------------------------------------
def _add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="CT volume or label map (NIfTI, NRRD, MHA, or a DICOM folder)")
    parser.add_argument("--labels", help="label map of the spine on the same grid, for per-vertebra statistics")


def _run_info(args: argparse.Namespace) -> int:
    from SpineInpaintLib.core import io
    from SpineInpaintLib.core.stats import volume_summary

    ct = io.read_volume(args.volume)
    labels = io.read_volume(args.labels) if args.labels else None
    print(json.dumps(volume_summary(ct, labels), indent=2))
    return 0


# --- demo ----------------------------------------------------------------------------------------
def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--detect", action="store_true",
                        help="find the lesion with the shipped detector instead of giving the simulated lesion mask "
                             "(off by default until the detector meets its accuracy target, see README)")
    parser.add_argument("--method", default=None, help="inpainting method (default: the pipeline's)")




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
    parser.add_argument(
        "--levels", default=None,
        help="field of view: levels, a range or a region, e.g. 'L1,L2', 'T4-L2', 'C1-sacrum', neck, chest, "
             "abdomen, thoracolumbar, whole (default: the random thoracolumbar draw, T10-S1)",
    )
    parser.add_argument("--simulator", default="classic", choices=("classic", "focal", "both"),
                        help="lesion simulator: classic (one blob in the body), focal (one to three lesions: "
                        "lytic with trabecular remnants, soft-tissue masses, blastic nodules, in the body, "
                        "pedicles or posterior elements), both (one of the two per case); default classic")
    parser.add_argument("--variety", action="store_true",
                        help="draw the whole-spine variety too: field of view, curvature, bone density, contrast "
                        "phase, kernel, slice thickness, transitional anatomy (PhantomConfig.random extended)")



_run_demo = lazy("SpineInpaintLib.cli.tools_run", "run_demo")
_run_phantom = lazy("SpineInpaintLib.cli.tools_run", "run_phantom")


# --- restore (the main job) ---------------------------------------------------------------------
def _add_restore(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", help="spine CT (NIfTI, NRRD, MHA, or a DICOM folder)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--lesion-mask", help="lesion mask on the CT's grid: skip detection and restore this region")
    parser.add_argument("--method", default=None,
                        help="inpainting method: context (default), wgan-gp, dcgan, pggan, biharmonic, nearest")
    parser.add_argument("--seg-net", default=None, choices=("unet", "vnet"),
                        help="segmentation network (default vnet, the more accurate; unet the faster)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed (recorded in report.json)")
    parser.add_argument("--no-figure", action="store_true", help="skip report.png")


def _run_restore(args: argparse.Namespace) -> int:
    from SpineInpaintLib import pipeline
    from SpineInpaintLib.core import files, io

    ct_path = Path(args.ct)
    ct = io.read_volume(ct_path)
    out = Path(args.out)
    files.check_output_folder(out)
    mask = io.read_volume(args.lesion_mask) if args.lesion_mask else None
    result = pipeline.restore(ct, mask, method=args.method or pipeline.DEFAULT_METHOD, seg_net=args.seg_net,
                              device=args.device, seed=args.seed, progress=True)
    paths = pipeline.write_outputs(result, out, figure=not args.no_figure)
    report = result.report
    print(f"restored levels: {', '.join(v['level'] for v in report['restored_vertebrae']) or 'none'} "
          f"({report['inpainting'].get('noop') or report['inpainting']['method']})")
    print("outputs:")
    for path in paths.values():
        print(f"  {path}")
    return 0


# --- segment / detect (the Slicer module's first two steps) ----------------------------------------
def _add_segment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", help="spine CT (NIfTI, NRRD, MHA, or a DICOM folder)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seg-net", default=None, choices=("unet", "vnet"),
                        help="segmentation network (default vnet, the more accurate; unet the faster)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed (recorded in report.json)")


def _step_report(command: str, ct, args: argparse.Namespace) -> dict:
    from SpineInpaintLib.core.runtime import resolve_device, seed_everything
    from SpineInpaintLib.segmentation.networks import DEFAULT_NETWORK

    seed_everything(args.seed)
    return {"version": __version__, "command": command, "seed": int(args.seed),
            "settings": {"seg_net": args.seg_net or DEFAULT_NETWORK, "device": str(resolve_device(args.device))},
            "input": {"path": str(args.ct), "geometry": ct.geometry()}}


def _run_segment(args: argparse.Namespace) -> int:
    from SpineInpaintLib import pipeline
    from SpineInpaintLib.core import files, io
    from SpineInpaintLib.core.labels import VERTEBRA_NAMES

    ct = io.read_volume(args.ct)
    files.check_output_folder(args.out)
    report = _step_report("segment", ct, args)
    seg = pipeline.segment_spine(ct, args.seg_net, device=report["settings"]["device"], progress=True)
    report["segmentation"] = {"net": seg.net, "levels": [VERTEBRA_NAMES.get(v, str(v)) for v in seg.levels()],
                              "timings": seg.timings}
    paths = pipeline.write_step_outputs({"spine_seg": seg.labels}, args.out, report)
    print(f"vertebrae: {', '.join(report['segmentation']['levels'])}")
    print("outputs:")
    for path in paths.values():
        print(f"  {path}")
    return 0


def _add_detect(parser: argparse.ArgumentParser) -> None:
    _add_segment(parser)
    parser.add_argument("--spine-seg", help="vertebra labels on the CT's grid (e.g. spine_seg.nii.gz of 'segment'); "
                        "segmented first when not given")


def _run_detect(args: argparse.Namespace) -> int:
    import numpy as np

    from SpineInpaintLib import pipeline
    from SpineInpaintLib.core import files, io
    from SpineInpaintLib.core.labels import VERTEBRA_NAMES

    ct = io.read_volume(args.ct)
    labels = io.read_volume(args.spine_seg) if args.spine_seg else None
    files.check_output_folder(args.out)
    report = _step_report("detect", ct, args)
    volumes = {}
    if labels is None:
        seg = pipeline.segment_spine(ct, args.seg_net, device=report["settings"]["device"], progress=True)
        labels = seg.labels
        volumes["spine_seg"] = labels
    found, mask = pipeline.detect_lesions(ct, labels, progress=True)
    volumes["lesion_seg"] = mask
    report["lesions"] = [lesion.to_dict() for lesion in found]
    report["lesion_ml"] = round(float(mask.array.sum() * np.prod(ct.spacing) / 1000.0), 3)
    if found:
        levels = [VERTEBRA_NAMES.get(int(v), str(v)) for v in np.unique(labels.array[mask.array > 0]) if v]
        report["lesion_levels"] = levels
        print(f"{len(found)} lesion(s), confidence {', '.join(f'{lesion.confidence:.2f}' for lesion in found)}; "
              f"mask {report['lesion_ml']} mL in {', '.join(levels) or 'no vertebra'}")
    paths = pipeline.write_step_outputs(volumes, args.out, report)
    if not found:
        print("no lesion found (the spine looks healthy)")
    print("outputs:")
    for path in paths.values():
        print(f"  {path}")
    return 0


# --- bench -----------------------------------------------------------------------------------------
def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--json", default="bench_results.json", help="where to write the results as JSON")


_run_bench = lazy("SpineInpaintLib.cli.tools_run", "run_bench")


# --- cards -------------------------------------------------------------------------------------------
def _add_cards(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cards", nargs="?", default="docs/models", help="folder of the cards (default docs/models)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a card is stale")


_run_cards = lazy("SpineInpaintLib.cli.tools_run", "run_cards")


# --- scans -------------------------------------------------------------------------------------------
def _add_scans(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="also load every scan and check its labels hold the levels the registry lists")
    parser.add_argument("--json", help="also write the registry and the leave-one-scan-out folds as JSON here")


_run_scans = lazy("SpineInpaintLib.cli.tools_run", "run_scans")
