"""The runs behind ``evaluate <stage>``: score the shipped models, print the tables, write the figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.core.runtime import seed_everything
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.real import evaluation_scans, trained_scans
from SpineInpaintLib.detection import inference as det
from SpineInpaintLib.evaluation.detection import (
    TUNING_VOLUMES,
    evaluate_detection,
    format_evaluation,
    tune_volume_level,
)
from SpineInpaintLib.evaluation.inpainting import (
    _examples_png,
    _figure6_png,
    evaluate,
    evaluation_lesions,
    figure6_check,
    format_summary,
    gan_samples_png,
    gan_table,
    paired_wins,
)
from SpineInpaintLib.evaluation.restore import evaluate_restore, folder_training_scans, shipped_training_scans
from SpineInpaintLib.evaluation.segmentation import (
    PAPER_TABLE_I,
    evaluate_cases,
    format_case,
    format_table_i,
    held_out_phantoms,
    summarise,
)
from SpineInpaintLib.inpainting.methods import GAN_METHODS, METHODS, ModelCache
from SpineInpaintLib.segmentation import networks as seg
from SpineInpaintLib.training.detection import make_detection_cases, slim_case

__all__ = ["run_evaluate_restore", "run_evaluate_segmentation", "run_evaluate_detection", "run_evaluate_inpainting"]


def _sidecar(weights: Path) -> dict:
    """The JSON beside a weight file ({} when there is none)."""
    path = Path(weights).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def run_evaluate_restore(args) -> int:
    """``python -m SpineInpaintLib evaluate restore``: prints a table (and writes JSON with ``--json``)."""
    import json

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    simulators = [m.strip() for m in str(args.simulators).split(",") if m.strip()]
    evaluation_scans([args.case], shipped_training_scans(), "a shipped model", allow_seen=args.seen_ok)
    rows = evaluate_restore(args.case, args.level, seeds, methods, simulators)
    print(f"{'method':<12} {'simulator':<9} {'seed':>4} {'lesion mL':>9} {'Dice':>6} {'HD95 mm':>8} {'vol err %':>9} "
          f"{'HU MAE':>7} {'s':>6}")
    for r in rows:
        print(f"{r['method']:<12} {r['simulator']:<9} {r['seed']:>4} {r['lesion_ml']:9.1f} {r['dice']:6.3f} "
              f"{r['hd95_mm']:8.2f} {r['volume_error_pct']:+9.1f} {r['hu_mae_in_lesion'] or float('nan'):7.0f} "
              f"{r['seconds']:6.1f}")
    for method, simulator in ((m, s) for m in methods for s in simulators):
        sel = [r for r in rows if r["method"] == method and r["simulator"] == simulator]
        print(f"{method:<12} {simulator:<9} mean: Dice {np.mean([r['dice'] for r in sel]):.3f}, HD95 "
              f"{np.mean([r['hd95_mm'] for r in sel]):.2f} mm, |volume error| "
              f"{np.mean([abs(r['volume_error_pct']) for r in sel]):.1f} % (bar: Dice >= 0.90, HD95 <= 6 mm, 5 %)")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2))
    return 0


def run_evaluate_segmentation(args: argparse.Namespace) -> int:
    """``evaluate segmentation``: Table I beside the paper's, then whole-volume scores of held-out cases."""
    import torch

    from SpineInpaintLib.core.labels import vertebra_name

    if args.threads:
        torch.set_num_threads(int(args.threads))
    nets = [n.strip().lower() for n in args.nets.split(",") if n.strip()]
    bad = [n for n in nets if n not in seg.NETWORKS]
    if bad or not nets:
        raise SpineInpaintError(f"unknown network {', '.join(bad) or '(none)'} (use unet, vnet)")
    models, metas = {}, {}
    for net in nets:
        models[net], metas[net] = seg.load_model(net, Path(args.weights_dir) / f"{net}.safetensors")
    print(format_table_i({n: metas[n].get("metrics_last_epoch", {}) for n in nets}))
    grids = ", ".join(f"{n} {getattr(models[n], 'spine_grid_mm', seg.GRID_MM):g} mm" for n in nets)
    print(f"(ours: last epoch, 2.5D crops on the network grid ({grids}), spine-class IoU pooled over the "
          "validation crops; the paper: 512x512 slices, Keras)")
    report: dict = {"table_i": {n: metas[n].get("metrics_last_epoch", {}) for n in nets}, "paper": PAPER_TABLE_I}
    test = held_out_phantoms(metas[nets[0]])
    if args.cases is not None:
        test = test[: max(0, args.cases)]
    trained = sorted({scan for net in nets for scan in trained_scans(metas[net])})
    real = evaluation_scans(args.real, trained, "/".join(nets), allow_seen=args.seen_ok)
    print(f"\nwhole-volume inference on {len(test)} held-out test phantoms (seeds {', '.join(str(s) for s, _ in test)})"
          + (f" and the real scans {', '.join(real)}" if real else ""))
    records: dict[str, list[dict]] = {n: [] for n in nets}
    real_records: dict[str, list[dict]] = {n: [] for n in nets}
    # Each case is built once and segmented by every network.
    for seed_, healthy in test:
        case = datasets.phantom_case(seed_, lesion_types=None if healthy else ("lytic", "sclerotic", "mixed"))
        for net in nets:
            records[net] += evaluate_cases(models[net], [case], net=net)
            print(format_case(net, records[net][-1]), flush=True)
    for name in real:
        case = datasets.real_case(name, lesion_types=None)
        for net in nets:
            real_records[net] += evaluate_cases(models[net], [case], net=net)
            print(format_case(net, real_records[net][-1]), flush=True)
    for net in nets:
        summary = summarise(records[net])
        report[net] = {"phantom_test": summary, "phantom_cases": records[net], "real": real_records[net],
                       "real_in_training": list(trained_scans(metas[net])), "real_left_out": real}
        print(f"\n{net}: mean over {summary['cases']} test phantoms: 3D IoU {summary['iou_3d']:.4f}, "
              f"3D Dice {summary['dice_3d']:.4f}, HD95 {summary['hd95_mm']:.2f} mm, per-slice spine IoU "
              f"{summary['slice_iou']:.4f}, per-slice 2-class mean IoU {summary['slice_mean_iou_2class']:.4f}")
        print(f"{'vertebra':<9}{'Dice':>8}{'HD95 mm':>9}{'missing':>9}")
        for level, v in summary["per_vertebra"].items():
            print(f"{vertebra_name(level):<9}{v['dice']:>8.3f}{v['hd95_mm']:>9.2f}{v['missing']:>6}/{v['n']}")
        for name, r in zip(real, real_records[net]):
            seen = "in training" if name in trained else "left out"
            print(f"{net} real {r['case_id']} ({seen}; labels are TotalSegmentator predictions): "
                  f"spine 3D Dice {r['dice_3d']:.4f}, IoU {r['iou_3d']:.4f}, HD95 {r['hd95_mm']:.2f} mm; per vertebra Dice "
                  + ", ".join(f"{vertebra_name(k)} {v['dice']:.2f}" for k, v in r["per_vertebra"].items()))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=float))
        print(f"results: {path}")
    return 0


def run_evaluate_detection(args) -> int:
    """``python -m SpineInpaintLib evaluate detection``: both detectors side by side with the paper's row."""
    if args.save_thresholds and not args.tune:
        raise SpineInpaintError("--save-thresholds needs --tune (there is nothing tuned to save)")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    seed_everything(args.seed)
    detectors = {"RetinaNet (MONAI, ours)": det.load_detector(args.retinanet or det.DEFAULT_WEIGHTS,
                                                              arch="retinanet")}
    if args.compare:
        detectors[f"RetinaNet ({args.compare})"] = det.load_detector(args.compare, arch="retinanet")
    baseline = Path(args.faster_rcnn)
    if baseline.exists():
        detectors["Faster R-CNN VGG-16 (baseline)"] = det.load_detector(baseline, arch="faster_rcnn")
    else:
        print(f"note: no Faster R-CNN weights at {baseline}; train them with "
              "'python -m SpineInpaintLib train detection --arch faster_rcnn' to compare")
    retinanet = detectors["RetinaNet (MONAI, ours)"]
    volume_options, tuning = None, None
    if args.tune and not args.no_volume:
        val_cases = [slim_case(c) for c in make_detection_cases("val", **TUNING_VOLUMES)]
        tuning = tune_volume_level(retinanet, val_cases)
        volume_options = {k: tuning["chosen"][k] for k in ("score_threshold", "slice_threshold", "min_slices")}
        print(f"volume-level thresholds tuned on {len(val_cases)} validation volumes: {volume_options} "
              f"(sensitivity {tuning['chosen']['sensitivity']:.2f}, "
              f"{tuning['chosen']['fp_per_lesioned_volume']:.2f} / {tuning['chosen']['fp_per_healthy_volume']:.2f} "
              "false lesions per lesioned / healthy volume)")
    retinanet_weights = Path(args.retinanet or det.DEFAULT_WEIGHTS)
    trained = trained_scans(_sidecar(retinanet_weights))
    scans = evaluation_scans(args.real_scans, trained, f"the detector {retinanet_weights.name}",
                             allow_seen=args.seen_ok)
    print(f"real test scans: {', '.join(scans) or 'none'} (the detector was trained on {', '.join(trained) or 'none'})")
    cases = [slim_case(c) for c in make_detection_cases("test", phantoms=args.phantoms, real=0,
                                                        healthy_phantoms=args.healthy_phantoms,
                                                        simulator=args.simulator)]
    for scan in scans:
        cases += [slim_case(c) for c in make_detection_cases("test", phantoms=0, real=args.real, real_name=scan,
                                                             healthy_real=True, simulator=args.simulator)]
    result = evaluate_detection(detectors, phantoms=args.phantoms, real=args.real,
                                healthy_phantoms=args.healthy_phantoms, deeplesion=args.deeplesion,
                                seed=args.seed, volume_level=not args.no_volume, progress=not args.quiet,
                                figures=args.figures, cases=cases, volume_options=volume_options)
    result["command"] = "evaluate detection" + (" --tune" if tuning else "")
    result["real_scans"] = {"left_out": scans, "trained_on": list(trained)}
    if tuning:
        result["volume_tuning"] = tuning
        if args.save_thresholds:
            path = Path(args.retinanet or det.DEFAULT_WEIGHTS).with_suffix(".json")
            meta = json.loads(path.read_text())
            meta["volume_level"] = {**volume_options, "tuned_on": ", ".join(tuning["cases"]),
                                    "objective": f"sensitivity - {tuning['fp_weight']} x false lesions per volume",
                                    "test": {k: result["volume_level"][k] for k in
                                             ("sensitivity", "fp_per_lesioned_volume", "fp_per_healthy_volume")}}
            path.write_text(json.dumps(meta, indent=2))
            print(f"thresholds written to {path}")
    result["threads"] = torch.get_num_threads()
    print(format_evaluation(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
        print(f"results: {args.json}")
    return 0


def run_evaluate_inpainting(args) -> int:
    """``evaluate inpainting``: every method on the same held-out lesions, plus the Figure 6 check."""
    import json
    from pathlib import Path

    if args.threads:
        torch.set_num_threads(int(args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SpineInpaintError(f"unknown method {', '.join(unknown)} (use {', '.join(METHODS)})")
    if args.phantoms < 0 or args.real < 0 or args.lesions_per_case < 1:
        raise SpineInpaintError("--phantoms and --real must be >= 0 and --lesions-per-case >= 1")
    models = ModelCache(args.weights_dir)
    trained = shipped_training_scans(("gan",)) if not args.weights_dir else folder_training_scans(args.weights_dir)
    scans = evaluation_scans(args.real_scans, trained, "the GANs", allow_seen=args.seen_ok)
    print(f"real test scans: {', '.join(scans) or 'none'} (the GANs were trained on {', '.join(trained) or 'none'})")
    simulators = [m.strip() for m in args.simulators.split(",") if m.strip()]
    bad = [m for m in simulators if m not in ("classic", "focal")]
    if bad or not simulators:
        raise SpineInpaintError(f"unknown lesion simulator {', '.join(bad) or '(none)'} (use classic, focal)")
    lesions_ = evaluation_lesions(args.phantoms, args.lesions_per_case, args.real, args.seed, progress=not args.quiet,
                                  cache=args.cache or None, real_scans=scans, simulators=simulators,
                                  seen=[s for s in scans if s in trained])
    result = evaluate(lesions_, methods, grey=args.grey, steps=args.steps, restarts=args.restarts, models=models,
                      seed=args.seed, progress=not args.quiet)
    print(format_summary(result))
    gan_methods = [m for m in methods if m in ("context",) + GAN_METHODS]
    for a in gan_methods:
        if "biharmonic" in methods:
            w = paired_wins(result["rows"], a, "biharmonic")
            print(f"destructive, {a} vs biharmonic on the same {w['lesions']} lesions: Dice in better on "
                  f"{w['dice_in_wins']}, HD95 in better on {w['hd95_in_wins']}; mean Dice {w['mean_dice_in'][0]:.3f} "
                  f"vs {w['mean_dice_in'][1]:.3f}, mean HD95 {w['mean_hd95_in'][0]:.2f} vs {w['mean_hd95_in'][1]:.2f} mm")
            result.setdefault("paired", {})[f"{a}_vs_biharmonic"] = w
    fig6 = [m.strip() for m in (args.figure6 or ",".join(gan_methods)).split(",") if m.strip()]
    check = figure6_check(fig6, steps=args.steps, restarts=args.restarts, models=models, seed=args.seed)
    print("\nFigure 6 check (16x16 holes on healthy held-out crops; the paper's WGAN-GP KMMD: 0.001084)")
    for m in check["results"]:
        k = check["kmmd"][m]
        print(f"{m:<12} Dice in square {check['dice_in'][m]:.3f}  KMMD^2 unbiased {k['kmmd2_unbiased']:.6f} "
              f"biased {k['kmmd2_biased']:.6f}  {check['seconds'][m]:.3f} s/crop")
    table = gan_table(models, check["healthy_test_crops"], seed=args.seed)
    print("\nTable II reproduction: parameters (shipped width; at the papers' width 64) and KMMD^2 of 500 samples "
          "(binarised) vs the held-out healthy test crops")
    for m, row in table.items():
        print(f"{m:<8} G {row['generator_parameters']:>9,d} D {row['critic_parameters']:>9,d} | width-64 G "
              f"{row['generator_parameters_w64']:>10,d} D {row['critic_parameters_w64']:>10,d} | KMMD^2 unbiased "
              f"{row.get('kmmd2_unbiased', float('nan')):.6f} biased {row.get('kmmd2_biased', float('nan')):.6f}")
    result["gan_table"] = table
    if args.figures:
        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        gan_samples_png(models, check["healthy_test_crops"], folder / "gan_samples.png", seed=args.seed)
        folder.mkdir(parents=True, exist_ok=True)
        _figure6_png(check, folder / "inpainting_figure6.png")
        _examples_png(result["examples"], methods, folder / "inpainting_destructive.png")
        print(f"figures: {folder / 'inpainting_figure6.png'}, {folder / 'inpainting_destructive.png'}")
    if args.json:
        payload = {k: v for k, v in result.items() if k != "examples"}
        payload["figure6"] = {k: check[k] for k in ("dice_in", "kmmd", "seconds")}
        payload["paper_kmmd_wgan_gp"] = 0.001084
        payload["settings"] = {"methods": methods, "phantoms": args.phantoms, "lesions_per_case": args.lesions_per_case,
                               "real": args.real, "real_scans": scans, "steps": args.steps, "restarts": args.restarts, "seed": args.seed,
                               "kmmd_estimator": "squared MMD, Gaussian kernel, median-heuristic bandwidth, "
                                                 "flattened 64x64 crops in [0, 1]; unbiased and biased"}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float))
    return 0
