"""The runs behind ``train <stage>``: check the arguments, train, print the progress and the results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from SpineInpaintLib import SpineInpaintError
from SpineInpaintLib.data import cases as datasets
from SpineInpaintLib.data.real import same_patient_scans, scans_to_train_on
from SpineInpaintLib.inpainting.networks import _check_kind, _check_model
from SpineInpaintLib.segmentation import networks as seg
from SpineInpaintLib.training import augment
from SpineInpaintLib.training import loop as training
from SpineInpaintLib.training.context import ContextTrainConfig, train_context
from SpineInpaintLib.training.detection import TrainConfig, train_detector
from SpineInpaintLib.training.gan import GANTrainConfig, build_crop_cache, train_gan
from SpineInpaintLib.training.segmentation import (
    SegmentationTrainConfig,
    cache_case,
    deeplesion_cases,
    load_cache,
    train_segmentation,
)

__all__ = ["run_train_segmentation", "run_train_detection", "run_train_gan"]


# --- command line (arguments declared in SpineInpaintLib.cli) -------------------------------------------
def run_train_segmentation(args: argparse.Namespace) -> int:
    """``train segmentation``: build the cache (rank 0), then train; prints the last epoch's metrics."""
    from tqdm import tqdm

    if args.phantoms < 0:
        raise SpineInpaintError(f"--phantoms must be >= 0, got {args.phantoms}")
    if args.varied_phantoms < 0:
        raise SpineInpaintError(f"--varied-phantoms must be >= 0, got {args.varied_phantoms}")
    if args.crop % 16 or args.crop < 32:
        raise SpineInpaintError(f"--crop must be a multiple of 16 and >= 32, got {args.crop}")
    if not 0.0 <= args.low_resolution <= 1.0:
        raise SpineInpaintError(f"--low-resolution must be a probability in [0, 1], got {args.low_resolution}")
    if not 0.0 <= args.intensity_augment <= 1.0:
        raise SpineInpaintError(f"--intensity-augment must be a probability in [0, 1], got {args.intensity_augment}")
    if args.boundary_weight < 0:
        raise SpineInpaintError(f"--boundary-weight must be >= 0, got {args.boundary_weight}")
    if args.real_weight <= 0:
        raise SpineInpaintError(f"--real-weight must be > 0, got {args.real_weight}")
    if args.init and not Path(args.init).is_file():
        raise SpineInpaintError(f"--init weights not found: {args.init}")
    if args.folds == 1 or args.folds < 0:
        raise SpineInpaintError(f"--folds must be 0 (fixed split) or >= 2, got {args.folds}")
    if args.folds and not 0 <= args.fold < args.folds:
        raise SpineInpaintError(f"--fold must be in [0, {args.folds - 1}], got {args.fold}")
    grid_mm = seg.check_grid(args.grid_mm)
    cache = Path(args.cache)
    load_cache(cache, grid_mm)  # a cache of another grid is refused before any case is built
    out = Path(args.out or f"runs/segmentation/{args.net}")
    lesion_types = ("lytic", "sclerotic", "mixed")
    builders, sim = [], args.simulator
    # the simulator each lesioned case is drawn with: a cached case drawn with another one is rebuilt
    expected: dict[str, str | None] = {}
    for prefix, first, count, make in (("phantom", args.phantom_seed, args.phantoms, datasets.phantom_case),
                                       ("varied", args.varied_seed, args.varied_phantoms, datasets.varied_phantom_case)):
        for s in range(first, first + count):
            healthy = np.random.default_rng([s, 15485863]).random() < args.healthy_fraction
            case_id = f"{prefix}_{s:04d}"
            expected[case_id] = None if healthy else datasets.pick_simulator(sim, case_id, s)
            builders.append((case_id, lambda s=s, h=healthy, make=make: make(
                s, lesion_types=None if h else lesion_types, simulator=sim)))
    real = scans_to_train_on(args.real, args.leave_out)
    left_out = same_patient_scans([n.strip() for n in args.leave_out.split(",") if n.strip()])
    forced = []
    for name in real:
        for s, types in ((0, None), (1, lesion_types)):
            case_id = f"real_{name}_{s:04d}"
            expected[case_id] = datasets.pick_simulator(sim, case_id, s) if types else None
            builders.append((case_id, lambda n=name, s=s, t=types: datasets.real_case(n, seed=s, lesion_types=t,
                                                                                     simulator=sim)))
            forced.append(case_id)
    ctx = training.init_distributed(args.device)
    if ctx.is_main:
        existing = {c.case_id: c.info.get("simulator", "classic" if c.info.get("lesion") else None)
                    for c in load_cache(cache)}
        todo = [(i, b) for i, b in builders if i not in existing or existing[i] != expected[i]]
        for _case_id, build in tqdm(todo, desc="caching cases", unit="case", disable=not todo):
            cache_case(build(), cache, grid_mm)
        for root in args.deeplesion:
            for case in deeplesion_cases(Path(root)):
                if case.case_id not in existing:
                    cache_case(case, cache, grid_mm)
    ctx.barrier()
    ids = [i for i, _ in builders]
    for _root in args.deeplesion:
        ids += [c.case_id for c in load_cache(cache) if c.source == "deeplesion"]
    # No source named at all: train on every case already in the cache.
    excluded = [c.case_id for c in load_cache(cache) if c.case_id not in set(ids)] if ids else []
    phantom_seeds = (args.phantom_seed, args.phantom_seed + args.phantoms)
    if not ids:
        all_cached = load_cache(cache)
        cached = [c for c in all_cached if c.source == "phantom" and not c.case_id.startswith("varied_")]
        varied = [c for c in all_cached if c.case_id.startswith("varied_")]
        if varied:
            seeds = [c.info["seed"] for c in varied]
            args.varied_phantoms, args.varied_seed = len(varied), min(seeds)
        real = sorted({c.info["real_case"] for c in all_cached if c.info.get("real_case")} - left_out)
        forced = [c.case_id for c in all_cached if c.source == "real" and c.info.get("real_case") not in left_out]
        excluded = [c.case_id for c in all_cached if c.info.get("real_case") in left_out]
        if cached:
            seeds = [c.info["seed"] for c in cached]
            phantom_seeds = (min(seeds), max(seeds) + 1)
            args.phantoms, args.phantom_seed = len(cached), min(seeds)
    note = (f"{args.phantoms} phantoms (seeds {args.phantom_seed}-{args.phantom_seed + args.phantoms - 1}, "
            f"healthy fraction {args.healthy_fraction}, lesions {', '.join(lesion_types)}; labels = healthy labels)"
            + (f"; {args.varied_phantoms} varied phantoms (seeds {args.varied_seed}-"
               f"{args.varied_seed + args.varied_phantoms - 1}: low bone density, softer point spread, pelvic "
               "fields of view; datasets.varied_phantom_case)" if args.varied_phantoms else "")
            + (f"; real scans in training: {', '.join(real)} (labels are TotalSegmentator predictions)" if real else
               "; no real scan in training")
            + (f"; DeepLesion folders: {', '.join(args.deeplesion)}" if args.deeplesion else ""))
    summary = train_segmentation(SegmentationTrainConfig(
        net=args.net, out=out, cache=cache, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, seed=args.seed, folds=args.folds, fold=args.fold,
        train_cases=forced, exclude=excluded, max_steps=args.max_steps, device=args.device,
        resume=not args.no_resume, val_per_case=getattr(args, "val_slices", 12),
        export=Path(args.export) if args.export else None, threads=args.threads, data_note=note,
        phantom_seeds=phantom_seeds, healthy_fraction=args.healthy_fraction,
        real=real, real_weight=args.real_weight, init=Path(args.init) if args.init else None,
        low_resolution=args.low_resolution, intensity=args.intensity_augment,
        domain=None if args.no_domain_randomisation else augment.DomainRandomisation(),
        boundary_weight=args.boundary_weight, grid_mm=grid_mm))
    if ctx.is_main:
        print(json.dumps(summary, indent=2))
    return 0


# --- command line ------------------------------------------------------------------------------------
def _print_epoch(row: dict) -> None:
    """One line of JSON per epoch, floats rounded to 6 decimals."""
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def run_train_detection(args) -> int:
    """``python -m SpineInpaintLib train detection``."""
    import shutil

    out = args.out or f"runs/detection/{args.arch}"
    config = TrainConfig(arch=args.arch, backbone=args.backbone, out=out, cache=args.cache, phantoms=args.phantoms,
                         healthy_phantoms=args.healthy_phantoms, negative_phantoms=args.negative_phantoms,
                         real=args.real, val_phantoms=args.val_phantoms, val_real=args.val_real,
                         real_scans=tuple(scans_to_train_on(args.real_scans, args.leave_out)),
                         simulator=args.simulator,
                         deeplesion=args.deeplesion,
                         epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, resume=not args.no_resume, device=args.device,
                         threads=args.threads, max_minutes=args.max_minutes, progress=not args.quiet,
                         init=args.init, box_loss=args.box_loss, ema=args.ema,
                         small_box_weight=args.small_box_weight, grid_mm=args.grid_mm, crop_size=args.crop_size,
                         domain=None if args.no_domain_randomisation else augment.DomainRandomisation())
    # One JSON row per epoch as it ends (train_detector calls this on the main process only).
    summary = train_detector(config, on_epoch=_print_epoch)
    print(json.dumps(summary, indent=2))
    which = args.export_weights
    if args.export and (Path(out) / f"{which}.safetensors").exists():
        export = Path(args.export)
        export.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(out) / f"{which}.safetensors", export / f"{args.arch}.safetensors")
        shutil.copy(Path(out) / f"{which}.json", export / f"{args.arch}.json")
        for name in ("metrics.csv", "curves.png"):
            if (Path(out) / name).exists():
                shutil.copy(Path(out) / name, export / f"{args.arch}_{name}")
        print(f"exported the {which} weights to {export}")
    return 0


# --------------------------------------------------------------------------------------------
# Command line: python -m SpineInpaintLib train gan
# --------------------------------------------------------------------------------------------
def run_train_gan(args) -> int:
    """``train gan``: build the crop cache if needed, then train one GAN or the context generator."""
    from SpineInpaintLib.data import cases as datasets

    model = str(args.model).lower()
    if model != "context":
        model = _check_model(model)
    kind = _check_kind(args.kind)
    if args.phantoms < 0 or args.epochs < 1 or args.iters_per_epoch < 1 or args.batch_size < 2:
        raise SpineInpaintError("--phantoms must be >= 0, --epochs and --iters-per-epoch >= 1, --batch-size >= 2")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    seeds = [s for s in range(args.phantom_seed, args.phantom_seed + args.phantoms)
             if datasets.split_of(f"phantom_{s:04d}") != "test"]
    real = scans_to_train_on(args.real, args.leave_out)
    left_out = same_patient_scans([n.strip() for n in args.leave_out.split(",") if n.strip()])
    cached = sorted(p.name for name in left_out for p in Path(args.data).glob(f"real_{name}_*.npz"))
    if cached:
        raise SpineInpaintError(f"the crop cache {args.data} holds crops of left-out scans ({', '.join(cached)}): "
                                "use another --data folder")
    if seeds or real:
        build_crop_cache(Path(args.data), phantom_seeds=seeds, real=real, lesions_per_level=2,
                         progress=not args.quiet,
                         domain=None if args.no_domain_randomisation else augment.DomainRandomisation(),
                         simulator=args.simulator)
    out = args.out or f"runs/gan/{model}{'' if kind == 'binary' else '_grey'}"
    common = dict(kind=kind, data=args.data, out=out, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                  batch_size=args.batch_size, seed=args.seed, device=args.device, resume=not args.no_resume,
                  max_minutes=args.max_minutes, threads=args.threads, export=args.export, progress=not args.quiet)
    if model == "context":
        summary = train_context(ContextTrainConfig(width=args.width or 16, critic_width=args.critic_width or 8,
                                                   lr=args.lr or 3e-4, **common))
    else:
        summary = train_gan(GANTrainConfig(model=model, width=args.width, critic_width=args.critic_width,
                                           lr=args.lr, **common))
    if "weights" in summary:
        print(json.dumps({k: summary[k] for k in ("weights", "metrics", "train_seconds", "epochs_done")
                          if k in summary}, indent=2, default=str))
    return 0
