"""The runs behind ``demo``, ``phantom`` and ``bench``.

They need the phantom generator and the benchmarks, which the Slicer extension does not ship, so
the command line imports this module only when one of them runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from SpineInpaintLib import SpineInpaintError, pipeline
from SpineInpaintLib.core import io
from SpineInpaintLib.core.weights import weights_dir
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.lesions import LESION_TYPES
from SpineInpaintLib.detection import inference as detection
from SpineInpaintLib.evaluation import bench, model_cards
from SpineInpaintLib.evaluation.demo import DEMO_LESION, DEMO_PHANTOM, demo_case
from SpineInpaintLib.evaluation.restore import truth_metrics

__all__ = ["restore_demo_case", "run_demo", "run_phantom", "run_bench", "run_cards", "run_scans"]


def restore_demo_case(out: Path, *, detect: bool = False, method: str | None = None) -> int:
    """Generate the embedded case, restore it into ``out``, print the scores and list the outputs.

    By default the simulated lesion mask is given, as a user drawing it in Slicer's Segment Editor
    would: the shipped detector does not meet its accuracy target yet and finds false lesions at
    other levels. With ``detect`` (and shipped detector weights) the detector finds the lesion.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SpineInpaintError(f"output folder {out} exists and is not empty; choose a new one (or delete it)")
    print("making the embedded case: phantom seed 0, destructive lytic lesion in L3 ...", flush=True)
    sim, _ = demo_case()
    have_detector = Path(detection.DEFAULT_WEIGHTS).exists()
    use_detector = detect and have_detector
    truth = {"labels": sim.healthy_labels, "ct": sim.healthy_ct, "level": sim.level}
    result = pipeline.restore(sim.ct, None if use_detector else sim.mask, method=method or pipeline.DEFAULT_METHOD,
                              seed=0, progress=True)
    result.report["truth_metrics"] = truth_metrics(result, truth)
    result.report["demo_case"] = {"phantom": {k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_PHANTOM.items()},
                                  "lesion": DEMO_LESION,
                                  "lesion_mask": "detected" if use_detector else "given (simulated truth)"}
    paths = pipeline.write_outputs(result, out)
    case_dir = out / "input_case"
    io.write_volume(sim.ct, case_dir / "ct.nii.gz")
    io.write_volume(sim.healthy_ct, case_dir / "healthy_ct.nii.gz")
    io.write_volume(sim.healthy_labels, case_dir / "healthy_labels.nii.gz")
    io.write_volume(sim.mask, case_dir / "lesion_mask_truth.nii.gz")

    report = result.report
    print(f"lesion mask: {result.report['demo_case']['lesion_mask']}"
          + (" -- no detector weights shipped" if detect and not have_detector else ""))
    metrics = report.get("truth_metrics")
    if metrics and report["restored_levels"]:
        print(f"restored {metrics['level']} against its healthy truth: Dice {metrics['dice']:.3f}, "
              f"HD95 {metrics['hd95_mm']:.2f} mm, volume {metrics['volume_ml']:.1f} mL vs "
              f"{metrics['truth_volume_ml']:.1f} mL ({100 * metrics['volume_error_relative']:+.1f} %), "
              f"HU MAE in the lesion {metrics.get('hu_mae_in_lesion', float('nan')):.0f}")
    else:
        print(f"nothing restored: {report['inpainting'].get('noop')}")
    timings = ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in report["timings"]["stages"])
    print(f"stages: {timings}")
    print("outputs:")
    for path in list(paths.values()) + sorted(case_dir.iterdir()):
        print(f"  {path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``demo``: restore the embedded case (``make demo``)."""
    return restore_demo_case(Path(args.out), detect=args.detect, method=args.method)

def run_phantom(args: argparse.Namespace) -> int:
    """``phantom``: write phantom cases (and optionally DeepLesion, crops) with their manifest."""

    if args.cases < 0 or args.cases > 10_000:
        raise SpineInpaintError(f"--cases must be between 0 and 10000, got {args.cases}")
    if not 16 <= args.size <= 2048:
        raise SpineInpaintError(f"--size must be between 16 and 2048, got {args.size}")
    types = None if args.lesions.strip().lower() == "none" else [t.strip() for t in args.lesions.split(",")]
    unknown = [t for t in types or [] if t not in LESION_TYPES]
    if unknown:
        raise SpineInpaintError(f"unknown lesion type {', '.join(unknown)} (use {', '.join(LESION_TYPES)} or none)")
    real = [r.strip() for r in args.real.split(",") if r.strip()]
    overrides: dict = {"shape_xy": (args.size, args.size)}
    if getattr(args, "levels", None):
        datasets.PhantomConfig(levels=args.levels).level_ids()  # a bad request fails here, before any writing
        overrides["levels"] = args.levels
    if getattr(args, "variety", False):
        overrides["extended"] = True
    out = Path(args.out)
    cases = datasets.make_cases(args.cases, seed=args.seed, real=real, lesion_types=types,
                                healthy_fraction=args.healthy_fraction, simulator=getattr(args, "simulator", "classic"),
                                **overrides)
    entries, kept, crops = [], [], []
    for case in tqdm(cases, total=args.cases + len(real), desc="phantom", unit="case"):
        entries.append(datasets.write_case(case, out))
        if args.crops:
            for binary in (True, False):
                c, meta = datasets.vertebra_crops(case, binary=binary)
                crops.append((binary, c, meta))
        if args.deeplesion:
            kept.append(case)
    manifest = datasets.write_manifest(entries, out / "manifest.json", seed=args.seed, command="phantom",
                                       lesion_types=types or [], simulator=getattr(args, "simulator", "classic"))
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


def run_bench(args: argparse.Namespace) -> int:
    """``bench``: run the benchmarks, print their table, write their JSON."""

    result = bench.run_benchmarks(args.names or None)
    print(bench.format_table(result))
    print(f"results: {bench.write_result(result, Path(args.json))}")
    return 0


def run_cards(args: argparse.Namespace) -> int:
    """``cards``: render the model cards' metrics blocks from the weights' JSON (``--check``: report only)."""
    cards_dir = Path(args.cards)
    if args.check:
        stale = model_cards.stale_cards(cards_dir)
        for name in stale:
            print(f"stale model card: {cards_dir / name}", file=sys.stderr)
        return 1 if stale else 0
    for name, rel in model_cards.CARDS.items():
        if model_cards.update_card(cards_dir / name, weights_dir() / rel):
            print(f"updated {cards_dir / name}")
    return 0


def run_scans(args: argparse.Namespace) -> int:
    """``scans``: the real-scan registry, a line each, and the leave-one-scan-out folds."""
    import warnings

    from SpineInpaintLib.core.labels import VERTEBRA_NAMES
    from SpineInpaintLib.data import real

    print(f"real scans in {real.real_data_dir()}")
    print(f"{'name':<24}{'region':<15}{'labels':<26}{'levels':<16}{'partial':<10}licence")
    problems = []
    for scan in real.REAL_SCANS.values():
        names = scan.level_names
        levels = "-" if not names else names[0] if len(names) == 1 else f"{names[-1]}-{names[0]}"
        partial = ",".join(VERTEBRA_NAMES[v] for v in scan.partial) or "-"
        print(f"{scan.name:<24}{scan.region:<15}{scan.label_format:<26}{levels:<16}{partial:<10}"
              f"{scan.licence.split(';')[0]}")
        if args.check and scan.label_format != "none":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, labels = real.load_real_case(scan.name)
            found = {int(v) for v in np.unique(labels.array) if int(v) in VERTEBRA_NAMES}
            if found != set(scan.levels) | set(scan.partial):
                problems.append(f"{scan.name}: labels hold {sorted(found)}, the registry lists "
                                f"{sorted(set(scan.levels) | set(scan.partial))}")
    folds = real.leave_one_out()
    print("\nleave-one-scan-out folds (test scan: training scans)")
    for test, train in folds:
        print(f"  {test}: {', '.join(train)}")
    if args.json:
        payload = {"scans": [s.summary() for s in real.REAL_SCANS.values()],
                   "leave_one_out": [{"test": t, "train": list(tr)} for t, tr in folds]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    for line in problems:
        print(f"mismatch: {line}", file=sys.stderr)
    if args.check and not problems:
        print("every labelled scan loads and holds the levels the registry lists")
    return 1 if problems else 0
