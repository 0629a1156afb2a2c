"""``train <stage>``: the trainers' arguments, and the runs that print their progress and results."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from SpineInpaintLib.cli.stages import lazy

__all__ = ["TRAINERS"]


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
    parser.add_argument("--real", default="", help="real scans to train on, comma-separated (e.g. totalsegmentator), "
                        "or 'all' (every labelled scan of the registry not left out); each joins the training set "
                        "as is and with a simulated lesion")
    _add_leave_out(parser)
    _add_simulator(parser)
    parser.add_argument("--deeplesion", action="append", default=[],
                        help="DeepLesion-format folder with our Masks_png/ extension (repeatable)")
    parser.add_argument("--real-weight", type=float, default=1.0,
                        help="draw real-scan cases this many times as often as their slice count says (default 1)")
    parser.add_argument("--init", help="start from these weights (.safetensors; fine-tuning), unless resuming")
    parser.add_argument("--boundary-weight", type=float, default=0.0,
                        help="weight of a binary cross-entropy of the spine mask added to the Dice + CE loss "
                        "(sharpens the mask's boundary; default 0)")
    parser.add_argument("--low-resolution", type=float, default=0.0,
                        help="probability of the in-plane coarse-scan randomisation (slices down-sampled to "
                        "40-90 %% and back; default 0: the shared domain randomisation's own)")
    parser.add_argument("--intensity-augment", type=float, default=0.0,
                        help="probability of the gamma randomisation (0.7-1.5 on -200...1200 HU, for scans whose "
                        "HU differ from the phantoms'; default 0: the shared domain randomisation's own)")
    _add_domain(parser)
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
                        "(e.g. SpineInpaintLib/weights/segmentation)")


def _add_leave_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--leave-out", default="",
                        help="real scans to keep out of training, comma-separated: the scans this model will be "
                        "evaluated on (leave-one-scan-out; 'python -m SpineInpaintLib scans' lists them)")


def _add_domain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-domain-randomisation", action="store_true",
                        help="train on the cases as they are: no shared 3D domain randomisation (intensity, bone "
                        "HU, contrast-like structures, kernels, noise, slice thickness, fields of view; "
                        "SpineInpaintLib.training.augment)")


def _add_simulator(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simulator", default="both", choices=("classic", "focal", "both"),
                        help="lesion simulator of the training lesions: classic, focal or both (one of the two "
                        "per case; default)")


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
                        help="simulated lesions on each real scan, one case each (default 20)")
    parser.add_argument("--real-scans", default="totalsegmentator",
                        help="real scans of the registry for those lesions, comma-separated, or 'all' (every "
                        "labelled scan not left out); default totalsegmentator")
    _add_leave_out(parser)
    _add_simulator(parser)
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
    _add_domain(parser)
    parser.add_argument("--export",
                        help="also copy the weights, metadata and curves here (e.g. SpineInpaintLib/weights/detection)")
    parser.add_argument("--export-weights", choices=("best", "final"), default="best",
                        help="which weights --export copies: the best validation epoch's (default) or the last "
                        "epoch's (with --ema, the longest-averaged)")


def _add_train_gan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="wgan-gp",
                        help="wgan-gp (default), dcgan, pggan (the paper's Table II) or context (our inpainter)")
    parser.add_argument("--kind", default="binary", help="binary spine masks (the paper's) or grey CT crops")
    parser.add_argument("--data", default="runs/gan_data", help="folder of the cached 64x64 crops (built on demand)")
    parser.add_argument("--phantoms", type=int, default=50,
                        help="phantom seeds to cache (train/val split only; default 50, 0 = use the cache as is)")
    parser.add_argument("--phantom-seed", type=int, default=0, help="first phantom seed (default 0)")
    parser.add_argument("--real", default="totalsegmentator",
                        help="real scans to add, comma-separated, or 'all' ('' for none; L2-L4 held out)")
    _add_leave_out(parser)
    _add_simulator(parser)
    parser.add_argument("--out", help="run folder (default runs/gan/<model>[_grey])")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iters-per-epoch", type=int, default=100, help="generator iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, help="generator base width (default: the shipped size)")
    parser.add_argument("--critic-width", type=int, help="discriminator base width (default: the shipped size)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the model's paper setting)")
    _add_run_control(parser)
    _add_domain(parser)
    parser.add_argument("--export", help="also write the final weights and sample grid here (e.g. SpineInpaintLib/weights/gan)")


#: stage -> (one-line help, add-arguments function, run function) of ``train <stage>``; other stages
#: (detection, gan, inpainting) add their entry here.
TRAINERS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "segmentation": ("train the 2D U-Net or V-Net spine segmenter (k-fold, resumable, torchrun-ready)",
                     _add_train_segmentation, lazy("SpineInpaintLib.cli.train_run", "run_train_segmentation")),
    "detection": ("train the MONAI RetinaNet lesion detector or the Faster R-CNN VGG-16 baseline (resumable, "
                  "torchrun-ready)", _add_train_detection, lazy("SpineInpaintLib.cli.train_run", "run_train_detection")),
    "gan": ("train a healthy-spine GAN (WGAN-GP, DCGAN, PGGAN) or the context inpainter on 64x64 crops "
            "(resumable, torchrun-ready)", _add_train_gan, lazy("SpineInpaintLib.cli.train_run", "run_train_gan")),
}
