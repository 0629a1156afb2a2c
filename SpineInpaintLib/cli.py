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
    parser.add_argument("--detect", action="store_true",
                        help="find the lesion with the shipped detector instead of giving the simulated lesion mask "
                             "(off by default until the detector meets its accuracy target, see README)")
    parser.add_argument("--method", default=None, help="inpainting method (default: the pipeline's)")


def _run_demo(args: argparse.Namespace) -> int:
    from SpineInpaintLib.demo import run_demo

    return run_demo(Path(args.out), detect=args.detect, method=args.method)


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
    from SpineInpaintLib import io, pipeline

    ct_path = Path(args.ct)
    ct = io.read_volume(ct_path)
    out = Path(args.out)
    pipeline.check_output_folder(out)
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
    from SpineInpaintLib.segmentation import DEFAULT_NETWORK
    from SpineInpaintLib.training import resolve_device, seed_everything

    seed_everything(args.seed)
    return {"version": __version__, "command": command, "seed": int(args.seed),
            "settings": {"seg_net": args.seg_net or DEFAULT_NETWORK, "device": str(resolve_device(args.device))},
            "input": {"path": str(args.ct), "geometry": ct.geometry()}}


def _run_segment(args: argparse.Namespace) -> int:
    from SpineInpaintLib import io, pipeline
    from SpineInpaintLib.labels import VERTEBRA_NAMES

    ct = io.read_volume(args.ct)
    pipeline.check_output_folder(args.out)
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

    from SpineInpaintLib import io, pipeline
    from SpineInpaintLib.labels import VERTEBRA_NAMES

    ct = io.read_volume(args.ct)
    labels = io.read_volume(args.spine_seg) if args.spine_seg else None
    pipeline.check_output_folder(args.out)
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
        print(f"{len(found)} lesion(s), confidence {', '.join(f'{l.confidence:.2f}' for l in found)}; "
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


def _run_bench(args: argparse.Namespace) -> int:
    from SpineInpaintLib import bench

    result = bench.run_benchmarks(args.names or None)
    print(bench.format_table(result))
    print(f"results: {bench.write_result(result, Path(args.json))}")
    return 0


# --- train <stage> / evaluate <stage> ------------------------------------------------------------------
def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """``module.function(args)``, imported only when the command runs (keeps --help fast)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), function)(args) or 0)

    return run


def _add_train_segmentation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", choices=("unet", "vnet"), default="unet", help="network (default unet)")
    parser.add_argument("--out", help="run folder: checkpoint.pt, metrics.csv, curves.png, weights "
                        "(default runs/segmentation/<net>)")
    parser.add_argument("--cache", default="runs/segmentation/cache",
                        help="folder of the cases resampled to the network grid (.npy, built on demand)")
    parser.add_argument("--phantoms", type=int, default=40, help="number of phantom cases (default 40); with 0 "
                        "and no --real/--deeplesion, every case already in --cache")
    parser.add_argument("--phantom-seed", type=int, default=1000, help="seed of the first phantom (default 1000)")
    parser.add_argument("--healthy-fraction", type=float, default=0.3,
                        help="fraction of the phantoms without a lesion (default 0.3)")
    parser.add_argument("--varied-phantoms", type=int, default=0,
                        help="extra phantoms with low bone density, a softer point spread and fields of view "
                        "reaching the pelvis (datasets.varied_phantom_case; default 0)")
    parser.add_argument("--varied-seed", type=int, default=2000, help="seed of the first varied phantom (default 2000)")
    parser.add_argument("--real", default="", help="real scans to train on, comma-separated (e.g. totalsegmentator); "
                        "each joins the training set as is and with a simulated lesion")
    parser.add_argument("--deeplesion", action="append", default=[],
                        help="DeepLesion-format folder with our Masks_png/ extension (repeatable)")
    parser.add_argument("--real-weight", type=float, default=1.0,
                        help="draw real-scan cases this many times as often as their slice count says (default 1)")
    parser.add_argument("--init", help="start from these weights (.safetensors; fine-tuning), unless resuming")
    parser.add_argument("--boundary-weight", type=float, default=0.0,
                        help="weight of a binary cross-entropy of the spine mask added to the Dice + CE loss "
                        "(sharpens the mask's boundary; default 0)")
    parser.add_argument("--low-resolution", type=float, default=0.0,
                        help="probability of the coarse-scan augmentation (crops down-sampled to 40-100 %% and back)")
    parser.add_argument("--intensity-augment", type=float, default=0.0,
                        help="probability of each strong intensity remapping (random gamma 0.5-2, random "
                        "histogram shift; for scans whose HU differ from the phantoms')")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="crops per step and process")
    parser.add_argument("--crop", type=int, default=160, help="training crop size in pixels (multiple of 16)")
    parser.add_argument("--grid-mm", type=float, default=1.5,
                        help="in-plane pixel size (mm) of the network grid (default 1.5; recorded in the weights, "
                        "one grid per --cache)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation by case (the paper: 10)")
    parser.add_argument("--fold", type=int, default=0, help="which fold validates (0 ... folds-1)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    parser.add_argument("--val-slices", type=int, default=12,
                        help="validation slices per validation case, evaluated every epoch (default 12)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument("--export", help="also copy the final weights, metadata and curves here "
                        "(e.g. Resources/segmentation)")


def _add_evaluate_segmentation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", default="unet,vnet", help="networks to evaluate, comma-separated (default both)")
    parser.add_argument("--weights-dir", default=str(Path(__file__).resolve().parents[1] / "Resources" / "segmentation"),
                        help="folder of <net>.safetensors + <net>.json (default: the shipped weights)")
    parser.add_argument("--cases", type=int, default=None,
                        help="evaluate at most this many held-out test phantoms (default: all of them; 0: none)")
    parser.add_argument("--real", default="totalsegmentator", help="real scans to score, comma-separated ('' for none)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _add_run_control(parser: argparse.ArgumentParser) -> None:
    """Flags every resumable trainer shares: seed, time limit, device, threads, resume, progress."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="stop after the epoch that passes this wall time")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_detection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=("retinanet", "faster_rcnn"), default="retinanet",
                        help="MONAI RetinaNet (default) or the paper's Faster R-CNN VGG-16 baseline")
    parser.add_argument("--backbone", choices=("base", "small"), default="base",
                        help="RetinaNet backbone preset (detection.RETINANET_PRESETS; default base)")
    parser.add_argument("--out", help="run folder: last.pt, best.safetensors + .json (best validation AP@0.5), "
                        "final.safetensors + .json (last epoch), metrics.csv, curves.png "
                        "(default runs/detection/<arch>)")
    parser.add_argument("--cache", default="runs/detection/data",
                        help="folder of the cached training/validation crops (built on demand, shared by both)")
    parser.add_argument("--phantoms", type=int, default=28, help="lesioned training phantoms (default 28)")
    parser.add_argument("--healthy-phantoms", type=int, default=4, help="healthy training phantoms (default 4)")
    parser.add_argument("--negative-phantoms", type=int, default=0,
                        help="hard negatives: healthy phantoms between S1 and T10 of which up to 30 spine slices "
                        "each are kept (default 0)")
    parser.add_argument("--real", type=int, default=20,
                        help="simulated lesions on the real scan, one case each (default 20)")
    parser.add_argument("--val-phantoms", type=int, default=6, help="validation phantoms (default 6)")
    parser.add_argument("--val-real", type=int, default=6, help="validation real-scan lesions (default 6)")
    parser.add_argument("--deeplesion", help="also train on this DeepLesion-format folder (bone lesions)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="slices per step and process")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3 RetinaNet, 2e-4 Faster R-CNN)")
    parser.add_argument("--init", help="start from these weights (.safetensors of the same architecture; "
                        "fine-tuning), unless resuming")
    parser.add_argument("--box-loss", choices=("smooth_l1", "giou"), default="smooth_l1",
                        help="RetinaNet box-regression loss: smooth L1 on the offsets (default) or generalised IoU")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="validate and save an exponential moving average of the weights with this decay "
                        "(e.g. 0.998; default 0: the raw weights)")
    parser.add_argument("--small-box-weight", type=float, default=1.0,
                        help="draw lesion slices whose box has a side under 10 mm this many times as often")
    parser.add_argument("--grid-mm", type=float, default=1.0,
                        help="pixel size (mm) of the network input (default 1.0; recorded in the weights)")
    parser.add_argument("--crop-size", type=int, default=128,
                        help="side (pixels, a multiple of 32) of the network input (default 128)")
    _add_run_control(parser)
    parser.add_argument("--export",
                        help="also copy the weights, metadata and curves here (e.g. Resources/detection)")
    parser.add_argument("--export-weights", choices=("best", "final"), default="best",
                        help="which weights --export copies: the best validation epoch's (default) or the last "
                        "epoch's (with --ema, the longest-averaged)")


def _add_evaluate_detection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retinanet",
                        help="RetinaNet weights (default: the shipped Resources/detection/retinanet.safetensors)")
    parser.add_argument("--faster-rcnn", default="runs/detection/faster_rcnn/best.safetensors",
                        help="Faster R-CNN baseline weights "
                        "(default runs/detection/faster_rcnn/best.safetensors)")
    parser.add_argument("--compare", help="another RetinaNet's weights (e.g. the ones a new model would replace), "
                        "evaluated beside on the same slices")
    parser.add_argument("--phantoms", type=int, default=15, help="lesioned test phantoms (default 15)")
    parser.add_argument("--real", type=int, default=9, help="test lesions simulated on the real scan (default 9)")
    parser.add_argument("--healthy-phantoms", type=int, default=4, help="healthy test phantoms (default 4)")
    parser.add_argument("--deeplesion", help="also score the test-split bone lesions of this DeepLesion-format folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-volume", action="store_true", help="skip the volume-level evaluation")
    parser.add_argument("--tune", action="store_true",
                        help="tune RetinaNet's volume-level thresholds on the validation volumes first "
                        "(else those in its weights' JSON)")
    parser.add_argument("--save-thresholds", action="store_true",
                        help="with --tune: write the tuned thresholds into the RetinaNet weights' JSON")
    parser.add_argument("--figures",
                        help="write detection_froc.png and detection_examples.png here (e.g. docs)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_gan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="wgan-gp",
                        help="wgan-gp (default), dcgan, pggan (the paper's Table II) or context (our inpainter)")
    parser.add_argument("--kind", default="binary", help="binary spine masks (the paper's) or grey CT crops")
    parser.add_argument("--data", default="runs/gan_data", help="folder of the cached 64x64 crops (built on demand)")
    parser.add_argument("--phantoms", type=int, default=50,
                        help="phantom seeds to cache (train/val split only; default 50, 0 = use the cache as is)")
    parser.add_argument("--phantom-seed", type=int, default=0, help="first phantom seed (default 0)")
    parser.add_argument("--real", default="totalsegmentator", help="real scans to add ('' for none; L2-L4 held out)")
    parser.add_argument("--out", help="run folder (default runs/gan/<model>[_grey])")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iters-per-epoch", type=int, default=100, help="generator iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, help="generator base width (default: the shipped size)")
    parser.add_argument("--critic-width", type=int, help="discriminator base width (default: the shipped size)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the model's paper setting)")
    _add_run_control(parser)
    parser.add_argument("--export", help="also write the final weights and sample grid here (e.g. Resources/gan)")


def _add_evaluate_inpainting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="context,wgan-gp,dcgan,pggan,biharmonic,nearest",
                        help="methods to compare, comma-separated")
    parser.add_argument("--phantoms", type=int, default=6, help="held-out test phantoms (default 6)")
    parser.add_argument("--lesions-per-case", type=int, default=2,
                        help="simulated lesions per phantom: alternately destructive and intact cortex (default 2)")
    parser.add_argument("--real", type=int, default=2, help="lesions simulated on the real scan's held-out L2-L4 (default 2)")
    parser.add_argument("--grey", action="store_true", help="also restore the CT (MAE/PSNR/SSIM inside the lesion)")
    parser.add_argument("--steps", type=int, default=100, help="z-optimisation steps (default 100)")
    parser.add_argument("--restarts", type=int, default=2, help="z restarts per slice (default 2)")
    parser.add_argument("--figure6", default="context,wgan-gp,dcgan,pggan",
                        help="methods of the Figure 6 check (16x16 holes on healthy crops), comma-separated")
    parser.add_argument("--cache", default="runs/inpainting_eval",
                        help="folder that keeps the generated test lesions for the next run ('' for none)")
    parser.add_argument("--weights-dir", help="folder of the weights (default Resources/gan)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", help="write inpainting_*.png here (e.g. docs)")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


#: stage -> (one-line help, add-arguments function, run function) of ``train <stage>``; other stages
#: (detection, gan, inpainting) add their entry here.
TRAINERS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "segmentation": ("train the 2D U-Net or V-Net spine segmenter (k-fold, resumable, torchrun-ready)",
                     _add_train_segmentation, _lazy("SpineInpaintLib.seg_train", "run_train")),
    "detection": ("train the MONAI RetinaNet lesion detector or the Faster R-CNN VGG-16 baseline (resumable, "
                  "torchrun-ready)", _add_train_detection, _lazy("SpineInpaintLib.det_train", "run_train")),
    "gan": ("train a healthy-spine GAN (WGAN-GP, DCGAN, PGGAN) or the context inpainter on 64x64 crops "
            "(resumable, torchrun-ready)", _add_train_gan, _lazy("SpineInpaintLib.gan", "run_train")),
}

#: stage -> (one-line help, add-arguments function, run function) of ``evaluate <stage>``.
def _add_evaluate_restore(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", default="totalsegmentator", help="real case to put the lesion in")
    parser.add_argument("--level", default="L3", help="lesioned vertebra (default L3)")
    parser.add_argument("--seeds", default="1,2,3", help="lesion seeds, comma-separated")
    parser.add_argument("--methods", default="context,biharmonic", help="inpainting methods, comma-separated")
    parser.add_argument("--json", help="also write the rows as JSON here")


EVALUATORS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "restore": ("the whole pipeline on a real scan with simulated destructive lytic lesions: Dice, HD95 and "
                "volume error of the restored vertebra against its healthy label", _add_evaluate_restore,
                _lazy("SpineInpaintLib.pipeline", "run_evaluate")),
    "segmentation": ("the paper's Table I for U-Net and V-Net, 3D Dice and HD95 per vertebra on held-out cases",
                     _add_evaluate_segmentation, _lazy("SpineInpaintLib.seg_train", "run_evaluate")),
    "detection": ("RetinaNet and Faster R-CNN side by side on held-out slices: AP, FROC, images/s, "
                  "the paper's row",
                  _add_evaluate_detection, _lazy("SpineInpaintLib.det_train", "run_evaluate")),
    "inpainting": ("GAN inpainting vs biharmonic and nearest-slice on held-out lesions: Dice, HD95, KMMD, s/slice, "
                   "the paper's Figure 6 check", _add_evaluate_inpainting, _lazy("SpineInpaintLib.inpainting",
                                                                                "run_evaluate")),
}


def _add_stages(parser: argparse.ArgumentParser, stages: dict, dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar="stage")
    for name, (help_text, add, _run) in stages.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def _run_stage(args: argparse.Namespace, stages: dict, dest: str, command: str) -> int:
    stage = getattr(args, dest, None)
    if stage not in stages:
        raise SpineInpaintError(f"{command} needs a stage: {', '.join(stages)}")
    return stages[stage][2](args)


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_stages(parser, TRAINERS, "train_stage")


def _run_train(args: argparse.Namespace) -> int:
    return _run_stage(args, TRAINERS, "train_stage", "train")


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_stages(parser, EVALUATORS, "evaluate_stage")


def _run_evaluate(args: argparse.Namespace) -> int:
    return _run_stage(args, EVALUATORS, "evaluate_stage", "evaluate")


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
